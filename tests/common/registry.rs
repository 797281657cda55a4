//! A real schema registry for tests: Apicurio Registry, run from its Maven
//! Central release on the machine's Java 17, speaking Confluent's REST API
//! (`/apis/ccompat/v7`), the API the bridge's client uses.
//!
//! Real rather than a stub, as Kafka is: the ids, the subjects and the
//! refusals the bridge must cope with are the registry's own. Apicurio
//! because its server is one Apache-2.0 archive on Maven Central, fetched
//! like the Kafka jars (`tests/registry/fetch.sh`, see
//! `tests/registry/NOTES.md`); no Docker.
//!
//! One registry for the whole test process, started on first use (about
//! 7 s), killed when the process exits, even by SIGKILL
//! (`PR_SET_PDEATHSIG`). Its storage is in memory, so each run starts
//! empty; tests share it, so each uses subjects of its own
//! ([`super::unique`]).

use super::ports::{free_port, listens_on};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How long the registry may take to answer after launch (6.5-8 s
/// measured with another build on both cores; generous for a loaded CI
/// machine).
const START_TIMEOUT: Duration = Duration::from_secs(90);
/// One request to a started registry: a loopback round trip takes
/// milliseconds, so this only bounds a hung server.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// A start that exits is taken for a port lost to another process between
/// picking and binding it; this many tries, then it is a real failure.
const START_ATTEMPTS: usize = 5;
/// Where Apicurio serves the Confluent-compatible API.
const CCOMPAT_PATH: &str = "/apis/ccompat/v7";
/// Apicurio's readiness check (database included), outside the API.
const READY_PATH: &str = "/health/ready";

/// The schema registry shared by the tests of this process.
pub struct Registry {
    /// The Confluent-compatible API's base URL, with no trailing slash
    /// (`http://127.0.0.1:PORT/apis/ccompat/v7`): what goes into the
    /// bridge file's `schema_registry.url`.
    pub url: String,
    port: u16,
    log: PathBuf,
}

/// The registry of this process, started on first use.
///
/// # Panics
/// If it cannot be fetched or started, with the end of its log: a test
/// that needs a registry cannot run without one.
pub fn shared() -> &'static Registry {
    static SHARED: OnceLock<Registry> = OnceLock::new();
    SHARED.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        // The registry's parent-death signal follows the thread that
        // spawned it, so that thread lives as long as the process.
        std::thread::Builder::new()
            .name("shared-registry".into())
            .spawn(move || match start(None) {
                Ok((registry, child, _)) => {
                    tx.send(Ok(registry)).expect("report the registry");
                    // Held, never waited for: the process's exit ends it.
                    let _child = child;
                    loop {
                        std::thread::park();
                    }
                }
                Err(message) => {
                    let _ = tx.send(Err(message));
                }
            })
            .expect("spawn shared-registry thread");
        match rx.recv() {
            Ok(Ok(registry)) => registry,
            Ok(Err(message)) => panic!("{message}"),
            Err(_) => panic!("the shared-registry thread ended without a word"),
        }
    })
}

impl Registry {
    /// `GET` of `path` under [`Self::url`] (e.g. `/schemas/ids/1`): the
    /// answer's JSON.
    ///
    /// Blocking, and safe to call from a test's runtime: the registry is
    /// another process, so the call cannot wait on the runtime it blocks;
    /// it only holds it for a loopback round trip.
    ///
    /// # Panics
    /// On anything but a 2xx answer, with the registry's own message.
    pub fn get_json(&self, path: &str) -> serde_json::Value {
        self.expect_success("GET", path, None)
    }

    /// `POST` of `body` to `path` under [`Self::url`]: the answer's JSON.
    /// Blocking, like [`Self::get_json`].
    ///
    /// # Panics
    /// On anything but a 2xx answer.
    pub fn post_json(&self, path: &str, body: &serde_json::Value) -> serde_json::Value {
        self.expect_success("POST", path, Some(body))
    }

    /// Registers `schema` under `subject` as another producer would, so a
    /// test can set up what the bridge then finds (an existing version, an
    /// incompatible one). `schema_type` is `AVRO`, `PROTOBUF` or `JSON`.
    /// Returns the schema's id.
    ///
    /// # Panics
    /// If the registry refuses the schema.
    pub fn register(&self, subject: &str, schema_type: &str, schema: &str) -> u32 {
        let answer = self.post_json(
            &format!("/subjects/{}/versions", super::percent_encode(subject)),
            &serde_json::json!({ "schema": schema, "schemaType": schema_type }),
        );
        answer["id"]
            .as_u64()
            .and_then(|id| u32::try_from(id).ok())
            .unwrap_or_else(|| panic!("registering under `{subject}` answered {answer}"))
    }

    /// Any request to `path` under [`Self::url`], whatever the answer: the
    /// status and the body's JSON (`Null` when empty), for tests that
    /// expect a refusal (404 and `error_code` 40403 for an unknown id).
    ///
    /// # Panics
    /// If the registry does not answer, or not in JSON.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let body = body.map(serde_json::Value::to_string);
        let (status, text) = exchange(
            self.port,
            method,
            &format!("{CCOMPAT_PATH}{path}"),
            body.as_deref(),
        )
        .unwrap_or_else(|e| {
            panic!(
                "{method} {}{path}: {e}\nregistry log:\n{}",
                self.url,
                self.log()
            )
        });
        if text.trim().is_empty() {
            return (status, serde_json::Value::Null);
        }
        let json = serde_json::from_str(&text).unwrap_or_else(|e| {
            panic!(
                "{method} {}{path} answered {status}, not JSON ({e}): {text:.500}",
                self.url
            )
        });
        (status, json)
    }

    /// The end of the registry's log (its access log included), for
    /// failure messages.
    pub fn log(&self) -> String {
        super::process::tail(&self.log)
    }

    fn expect_success(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> serde_json::Value {
        let (status, json) = self.request(method, path, body);
        assert!(
            (200..300).contains(&status),
            "{method} {}{path} answered {status}: {json}",
            self.url
        );
        json
    }
}

/// A registry of one test's own that also serves HTTPS, with a
/// certificate the test made; killed on drop.
pub struct HttpsRegistry {
    /// The plain-HTTP side, for the test's own requests and readiness.
    pub registry: Registry,
    /// The Confluent-compatible API over HTTPS, for the bridge.
    pub https_url: String,
    child: Child,
}

impl HttpsRegistry {
    /// Starts one serving `server` (certificate and key, PEM) on an HTTPS
    /// port besides its plain one.
    ///
    /// Call it from the test's own thread (a `#[tokio::test]` body is):
    /// the registry's parent-death signal follows the thread that starts
    /// it, so one started from a pool thread could die with that thread.
    ///
    /// # Panics
    /// If it cannot be started, with the end of its log.
    pub fn start(server: &super::certs::Identity) -> Self {
        let tls = Tls {
            cert: server.cert_file.clone(),
            key: server.key_file.clone(),
        };
        let (registry, child, https_port) =
            start(Some(&tls)).unwrap_or_else(|message| panic!("{message}"));
        let https_port = https_port.expect("an HTTPS port");
        Self {
            registry,
            https_url: format!("https://127.0.0.1:{https_port}{CCOMPAT_PATH}"),
            child,
        }
    }
}

impl Drop for HttpsRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What an HTTPS listener serves.
struct Tls {
    cert: PathBuf,
    key: PathBuf,
}

/// Fetches, launches and awaits a registry (with an HTTPS port, whose
/// number comes back, if `tls`); on failure, why, with the end of its log.
fn start(tls: Option<&Tls>) -> Result<(Registry, Child, Option<u16>), String> {
    super::process::remove_stale_dirs("mkb-registry-");
    let jar = runner_jar()?;
    // Named after this process, so a later run removes it once this
    // process is gone (`process::remove_stale_dirs`); kept until then for its log.
    let dir = std::env::temp_dir().join(match tls {
        None => format!("mkb-registry-{}", std::process::id()),
        Some(_) => format!(
            "mkb-registry-{}-https-{}",
            std::process::id(),
            fastrand::u32(..)
        ),
    });
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let log = dir.join("registry.log");
    for _attempt in 0..START_ATTEMPTS {
        let port = free_port();
        let management_port = free_port();
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|e| format!("cannot open {}: {e}", log.display()))?;
        let log_err = log_file
            .try_clone()
            .map_err(|e| format!("cannot open {}: {e}", log.display()))?;
        let https_port = tls.map(|_| free_port());
        let mut command = java(&dir, port, management_port);
        if let (Some(tls), Some(https_port)) = (tls, https_port) {
            command
                .arg(format!("-Dquarkus.http.ssl-port={https_port}"))
                .arg(format!(
                    "-Dquarkus.http.ssl.certificate.files={}",
                    tls.cert.display()
                ))
                .arg(format!(
                    "-Dquarkus.http.ssl.certificate.key-files={}",
                    tls.key.display()
                ));
        }
        command
            .arg("-jar")
            .arg(&jar)
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_err);
        super::die_with_parent(&mut command);
        let mut child = command.spawn().map_err(|e| {
            format!("cannot start java ({e}): the test schema registry needs Java 17+ (e.g. apt-get install openjdk-17-jre-headless)")
        })?;
        let registry = Registry {
            url: format!("http://127.0.0.1:{port}{CCOMPAT_PATH}"),
            port,
            log: log.clone(),
        };
        match await_ready(&mut child, port, https_port) {
            Launch::Ready => return Ok((registry, child, https_port)),
            Launch::Exited => continue,
            Launch::TimedOut => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "the schema registry did not answer on port {port} within {START_TIMEOUT:?}:\n{}",
                    registry.log()
                ));
            }
        }
    }
    Err(format!(
        "the schema registry exited at start {START_ATTEMPTS} times:\n{}",
        super::process::tail(&log)
    ))
}

enum Launch {
    Ready,
    /// Most likely the port was taken meanwhile: another one.
    Exited,
    TimedOut,
}

/// Waits until `child` itself listens on `port` (and `https_port`, if
/// any; not some process that took a port since it was picked) and
/// reports ready.
fn await_ready(child: &mut Child, port: u16, https_port: Option<u16>) -> Launch {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            return Launch::Exited;
        }
        if listens_on(child.id(), port)
            && https_port.is_none_or(|p| listens_on(child.id(), p))
            && matches!(exchange(port, "GET", READY_PATH, None), Ok((200, _)))
        {
            return Launch::Ready;
        }
        if Instant::now() > deadline {
            return Launch::TimedOut;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The registry's JVM options, as measured in `tests/registry/NOTES.md`
/// (the caller adds its own properties, then `-jar`).
fn java(dir: &Path, port: u16, management_port: u16) -> Command {
    let mut command = Command::new("java");
    command
        // Small heap, one GC thread: the registry shares two cores with
        // the bridge, Kafka and mosquitto, and serves a few requests.
        .args(["-Xmx256m", "-XX:+UseSerialGC"])
        // C1 only: ready in 6.5-8 s instead of 11-12.7 s, 220 MiB instead
        // of 255 MiB; a test registry never gets hot enough to miss C2.
        .arg("-XX:TieredStopAtLevel=1")
        .arg("-Djava.awt.headless=true")
        // An IPv4 listening socket, which `listens_on` (reading
        // /proc/net/tcp) sees; by default the JVM listens on an IPv6
        // socket mapped to 127.0.0.1.
        .arg("-Djava.net.preferIPv4Stack=true")
        // Vert.x's file cache in this run's dir, not a `/tmp/vertx-cache`
        // shared with whatever else runs Vert.x.
        .arg(format!("-Djava.io.tmpdir={}", dir.display()))
        .arg("-Dquarkus.http.host=127.0.0.1")
        .arg(format!("-Dquarkus.http.port={port}"))
        // 3.0.9 is built without Quarkus's management interface (health is
        // on the main port); these keep it on loopback and off its fixed
        // default port, 9000, which two test processes would both take,
        // should a later version turn it on.
        .arg("-Dquarkus.management.host=127.0.0.1")
        .arg(format!("-Dquarkus.management.port={management_port}"));
    // `-jar` goes last, after any property a caller adds.
    command
}

/// The runner jar, fetched once into a cache outside the tree. It finds
/// its `lib/` beside itself, so it runs where it lies.
fn runner_jar() -> Result<PathBuf, String> {
    let script = super::repo_path("tests/registry/fetch.sh");
    let out = Command::new("bash")
        .arg(&script)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    if !out.status.success() {
        return Err(format!(
            "tests/registry/fetch.sh failed (needs java 17+ and, once, mvn):\n{}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// One HTTP/1.1 exchange with the registry on `port`: status and body.
///
/// By hand rather than with the bridge's HTTP client, so that tests of the
/// bridge's registry calls check them with a second, independent reader.
/// `Connection: close` makes the end of the stream the end of the answer;
/// the body may still come chunked, and is decoded.
fn exchange(
    port: u16,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    let body = body.unwrap_or("");
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: application/json\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes())?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    parse_response(&response)
}

/// Status and body of a whole HTTP/1.1 response.
fn parse_response(response: &[u8]) -> std::io::Result<(u16, String)> {
    let invalid = |what: &str| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "{what} in the response: {:.300}",
                String::from_utf8_lossy(response)
            ),
        )
    };
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| invalid("no end of headers"))?;
    let head = String::from_utf8_lossy(&response[..split]);
    let rest = &response[split + 4..];
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| invalid("no status"))?;
    let header = |name: &str| {
        head.lines().skip(1).find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.trim()
                .eq_ignore_ascii_case(name)
                .then(|| value.trim().to_string())
        })
    };
    let body = if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        dechunk(rest).ok_or_else(|| invalid("bad chunked body"))?
    } else if let Some(length) = header("content-length") {
        let length: usize = length.parse().map_err(|_| invalid("bad Content-Length"))?;
        rest.get(..length)
            .ok_or_else(|| invalid("short body"))?
            .to_vec()
    } else {
        rest.to_vec()
    };
    let body = String::from_utf8(body).map_err(|_| invalid("a body not in UTF-8"))?;
    Ok((status, body))
}

/// The payload of a chunked body (`SIZE[;ext]\r\nDATA\r\n`..., then `0`);
/// trailers are ignored. `None` if it is cut short or malformed.
fn dechunk(mut rest: &[u8]) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = rest.windows(2).position(|w| w == b"\r\n")?;
        let line = std::str::from_utf8(&rest[..line_end]).ok()?;
        let size = usize::from_str_radix(line.split(';').next()?.trim(), 16).ok()?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Some(body);
        }
        body.extend_from_slice(rest.get(..size)?);
        rest = rest.get(size..)?.strip_prefix(b"\r\n")?;
    }
}
