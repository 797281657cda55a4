#!/usr/bin/env bash
# Fetch the Apache Kafka broker jars (KRaft, pinned in pom.xml) from Maven
# Central into a cache dir outside the source tree, once. Prints the libs dir
# on stdout (nothing else), so callers can do:
#     LIBS=$(tests/kafka/fetch.sh) && java -cp "$LIBS/*" kafka.Kafka ...
# Env: KAFKA_TEST_CACHE overrides the cache root
#      (default ${XDG_CACHE_HOME:-$HOME/.cache}/mqtt-kafka-bridge).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
pom="$here/pom.xml"

die() { echo "tests/kafka/fetch.sh: $*" >&2; exit 1; }

command -v java >/dev/null 2>&1 || die "java not found on PATH (need JDK/JRE 17+ to run Kafka 4.x)"
[ -f "$pom" ] || die "missing $pom"

version=$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$pom" | head -n1)
[ -n "$version" ] || die "cannot read <kafka.version> from $pom"

root=${KAFKA_TEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mqtt-kafka-bridge}
base="$root/kafka-$version"
libs="$base/libs"
marker="$base/.complete"
# The marker records the pom's checksum: editing pom.xml forces a refetch.
want=$(sha256sum "$pom" | cut -d' ' -f1)

if [ -f "$marker" ] && [ "$(cat "$marker")" = "$want" ] && [ -f "$libs/kafka_2.13-$version.jar" ]; then
  echo "$libs"; exit 0
fi

mkdir -p "$base"
# Serialise concurrent callers (e.g. several test binaries starting at once).
exec 9>"$base/.lock"
flock 9 2>/dev/null || true
if [ -f "$marker" ] && [ "$(cat "$marker")" = "$want" ] && [ -f "$libs/kafka_2.13-$version.jar" ]; then
  echo "$libs"; exit 0
fi

command -v mvn >/dev/null 2>&1 || die "mvn not found on PATH (needed once to fetch Kafka jars from Maven Central; e.g. apt-get install maven)"
tmp=$(mktemp -d "$base/libs.tmp.XXXXXX")
chmod 755 "$tmp"
trap 'rm -rf "$tmp"' EXIT
echo "tests/kafka/fetch.sh: fetching Kafka $version jars into $libs ..." >&2
if ! mvn -B -q -Dstyle.color=never -f "$pom" dependency:copy-dependencies \
     -DoutputDirectory="$tmp" >"$base/mvn.log" 2>&1; then
  tail -n 30 "$base/mvn.log" >&2
  die "mvn dependency:copy-dependencies failed, see $base/mvn.log (is Maven Central reachable?)"
fi
[ -f "$tmp/kafka_2.13-$version.jar" ] || die "kafka_2.13-$version.jar missing after mvn run"
rm -rf "$libs" "$marker"
mv "$tmp" "$libs"
trap - EXIT
echo "$want" > "$marker"
echo "$libs"
