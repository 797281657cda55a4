#!/usr/bin/env bash
# Fetch the Apicurio Registry server (version pinned in pom.xml) from Maven
# Central into a cache dir outside the source tree, once, and unpack it.
# Prints the runner jar's path on stdout (nothing else), so callers can do:
#     JAR=$(tests/registry/fetch.sh) && java -jar "$JAR" ...
# The jar finds its lib/ through its manifest, relative to itself: run it
# where it lies, do not copy it alone.
# Env: REGISTRY_TEST_CACHE overrides the cache root
#      (default ${XDG_CACHE_HOME:-$HOME/.cache}/mqtt-kafka-bridge).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
pom="$here/pom.xml"

die() { echo "tests/registry/fetch.sh: $*" >&2; exit 1; }

command -v java >/dev/null 2>&1 || die "java not found on PATH (need JDK/JRE 17+ to run Apicurio Registry 3.x)"
[ -f "$pom" ] || die "missing $pom"

version=$(sed -n 's:.*<apicurio.version>\(.*\)</apicurio.version>.*:\1:p' "$pom" | head -n1)
[ -n "$version" ] || die "cannot read <apicurio.version> from $pom"

root=${REGISTRY_TEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mqtt-kafka-bridge}
base="$root/apicurio-$version"
app="$base/app"
jar="$app/apicurio-registry-app-$version-runner.jar"
marker="$base/.complete"
# The marker records the pom's checksum: editing pom.xml forces a refetch.
want=$(sha256sum "$pom" | cut -d' ' -f1)

complete() { [ -f "$marker" ] && [ "$(cat "$marker")" = "$want" ] && [ -f "$jar" ] && [ -d "$app/lib" ]; }

if complete; then
  echo "$jar"; exit 0
fi

mkdir -p "$base"
# Serialise concurrent callers (e.g. several test binaries starting at once).
exec 9>"$base/.lock"
flock 9 2>/dev/null || true
if complete; then
  echo "$jar"; exit 0
fi
# Left by a caller killed mid-fetch; nobody else works here while we hold the lock.
rm -rf "$base"/app.tmp.*

command -v mvn >/dev/null 2>&1 || die "mvn not found on PATH (needed once to fetch Apicurio Registry from Maven Central; e.g. apt-get install maven)"
command -v tar >/dev/null 2>&1 || die "tar not found on PATH"
tmp=$(mktemp -d "$base/app.tmp.XXXXXX")
chmod 755 "$tmp"
trap 'rm -rf "$tmp"' EXIT
echo "tests/registry/fetch.sh: fetching Apicurio Registry $version (~110 MB) into $app ..." >&2
if ! mvn -B -q -C -Dstyle.color=never -f "$pom" dependency:copy \
     -DoutputDirectory="$tmp" >"$base/mvn.log" 2>&1; then
  tail -n 30 "$base/mvn.log" >&2
  die "mvn dependency:copy failed, see $base/mvn.log (is Maven Central reachable?)"
fi
archive="$tmp/apicurio-registry-app-$version-all.tar.gz"
[ -f "$archive" ] || die "$(basename "$archive") missing after mvn run"
tar -xzf "$archive" -C "$tmp" --no-same-owner || die "cannot unpack $archive"
rm -f "$archive"
[ -f "$tmp/$(basename "$jar")" ] || die "$(basename "$jar") missing from the archive"
[ -d "$tmp/lib" ] || die "lib/ missing from the archive"
rm -rf "$app" "$marker"
mv "$tmp" "$app"
trap - EXIT
echo "$want" > "$marker"
echo "$jar"
