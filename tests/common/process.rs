//! Child processes of tests: the bridge as the real binary, killed for
//! real and watched through its own metrics endpoint, and the rule that no
//! child outlives its test.

use super::config::{ConfigBuilder, METRICS_PORT_ENV};
use super::metrics::MetricsEndpoint;
use super::ports::{free_port, listens_on};
use mqtt_kafka_bridge::telemetry;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How often waits look again.
const POLL: Duration = Duration::from_millis(50);
/// How long a start may take until the metrics endpoint answers.
const SERVING_TIMEOUT: Duration = Duration::from_secs(30);

/// One bridge identity's files for the binary, in a temporary directory:
/// its config and its log. The log is appended by every run, so one file
/// tells the story of all of a test's runs (for failure messages).
pub struct BridgeFiles {
    dir: tempfile::TempDir,
}

impl BridgeFiles {
    pub fn new(config: &ConfigBuilder) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        config.write(dir.path());
        Self { dir }
    }

    pub fn config(&self) -> PathBuf {
        self.dir.path().join("bridge.yaml")
    }

    pub fn log(&self) -> PathBuf {
        self.dir.path().join("bridge.log")
    }

    /// Starts the binary on these files (see [`BridgeProcess::start`]).
    pub fn start(&self, crash_at: Option<&str>) -> BridgeProcess {
        BridgeProcess::start(&self.config(), &self.log(), crash_at)
    }

    /// Starts the binary as host `host` (its `HOSTNAME`: a standby's
    /// member id in the lease group, a partitioned bridge's ordinal), so
    /// that several processes of one identity are told apart.
    pub fn start_as(&self, host: &str) -> BridgeProcess {
        BridgeProcess::start_with_env(&self.config(), &self.log(), None, &[("HOSTNAME", host)])
    }

    /// Starts the binary with `--watch` (through `BRIDGE_WATCH`).
    pub fn start_watching(&self) -> BridgeProcess {
        BridgeProcess::start_with_env(
            &self.config(),
            &self.log(),
            None,
            &[("BRIDGE_WATCH", "true")],
        )
    }

    /// Writes `config`'s files over these, each by a rename, so that a
    /// watching bridge never reads half a file.
    pub fn rewrite(&self, config: &ConfigBuilder) {
        let staging = tempfile::tempdir_in(self.dir.path()).expect("staging dir");
        config.write(staging.path());
        for name in ["mapping.yaml", "bridge.yaml"] {
            std::fs::rename(staging.path().join(name), self.dir.path().join(name))
                .expect("replace a config file");
        }
    }
}

/// A running `mqtt-kafka-bridge run` with its metrics endpoint. Killed
/// (SIGKILL) when dropped, and by the kernel if the test process dies.
pub struct BridgeProcess {
    child: Child,
    log: PathBuf,
    metrics: MetricsEndpoint,
}

impl BridgeProcess {
    /// Starts the binary on `config` (a file from [`ConfigBuilder::write`],
    /// which takes its metrics port from the environment), logging to
    /// `log`, and returns once it serves its metrics endpoint. `crash_at` sets
    /// the crash point (see `mqtt_kafka_bridge::fault`).
    ///
    /// The port is free when picked but may be taken before the bridge
    /// binds it; the bridge then exits at once ("cannot serve metrics"),
    /// and this starts it again on another port.
    pub fn start(config: &Path, log: &Path, crash_at: Option<&str>) -> Self {
        Self::start_with_env(config, log, crash_at, &[])
    }

    /// [`Self::start`] with extra environment variables.
    pub fn start_with_env(
        config: &Path,
        log: &Path,
        crash_at: Option<&str>,
        env: &[(&str, &str)],
    ) -> Self {
        for _attempt in 0..5 {
            let logged_before = std::fs::metadata(log).map_or(0, |m| m.len());
            let port = free_port();
            let mut process = Self {
                child: spawn(config, log, crash_at, port, env),
                log: log.to_path_buf(),
                metrics: MetricsEndpoint { port },
            };
            match process.await_serving() {
                Ok(()) => return process,
                Err(status) => {
                    let this_run = log_since(log, logged_before);
                    assert!(
                        this_run.contains("cannot serve metrics"),
                        "bridge exited ({status}) before serving metrics:\n{}",
                        tail(log)
                    );
                }
            }
        }
        panic!(
            "no free port for the bridge's metrics in 5 tries:\n{}",
            tail(log)
        );
    }

    /// Until this process listens on its metrics port; the exit status if
    /// it ended first.
    fn await_serving(&mut self) -> Result<(), std::process::ExitStatus> {
        let deadline = Instant::now() + SERVING_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Err(status);
            }
            if listens_on(self.child.id(), self.metrics.port) {
                return Ok(());
            }
            assert!(
                Instant::now() < deadline,
                "bridge did not serve metrics within {SERVING_TIMEOUT:?}:\n{}",
                tail(&self.log)
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// This process's metrics endpoint, e.g. for a sampler task.
    pub fn metrics(&self) -> MetricsEndpoint {
        self.metrics
    }

    /// The log file, shared by every run of the same [`BridgeFiles`].
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    /// Waits until this process has its MQTT subscriptions granted (the
    /// broker's SUBACK: from then on nothing published is missed), or
    /// panics at `timeout` (also if it exits first). Each process starts
    /// with the gauge at 0, so this waits for this process, not an earlier
    /// run of the same identity.
    pub async fn await_connected(&mut self, timeout: Duration) {
        self.await_metric(telemetry::MQTT_SUBSCRIBED, &[], |v| v == 1.0, timeout)
            .await;
    }

    /// Waits until `GET path` answers `status` with a body containing
    /// `contains`, and returns the body; panics at `timeout` with the last
    /// answer and the log, or if the process exits first.
    pub async fn await_probe(
        &mut self,
        path: &str,
        status: u16,
        contains: &str,
        timeout: Duration,
    ) -> String {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(exit) = self.child.try_wait().expect("try_wait") {
                panic!(
                    "bridge exited ({exit}) while waiting for {path} to answer {status}:\n{}",
                    tail(&self.log)
                );
            }
            let last = self.metrics.get_async(path).await;
            if let Ok((got, body)) = &last {
                if *got == status && body.contains(contains) {
                    return body.clone();
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{path} did not answer {status} with {contains:?} within {timeout:?}; last answer: {last:?}\nbridge log:\n{}",
                tail(&self.log)
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until metric `name`, summed over its samples carrying
    /// `labels`, satisfies `ok`, and returns that value; panics at
    /// `timeout` with the last scrape and the log, or if the process exits
    /// first.
    pub async fn await_metric(
        &mut self,
        name: &str,
        labels: &[(&str, &str)],
        ok: impl Fn(f64) -> bool,
        timeout: Duration,
    ) -> f64 {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!(
                    "bridge exited ({status}) while waiting for {name}{labels:?}:\n{}",
                    tail(&self.log)
                );
            }
            let last = self.metrics.scrape_async().await;
            if let Some(value) = last.as_ref().ok().and_then(|s| s.value(name, labels)) {
                if ok(value) {
                    return value;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{name}{labels:?} not as expected within {timeout:?}; last scrape: {}\nbridge log:\n{}",
                last.map_or_else(|e| e.to_string(), |s| s.text),
                tail(&self.log)
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until the bridge's log holds `contains`, and returns the log;
    /// panics at `timeout` with the log's end.
    pub async fn await_log(&mut self, contains: &str, timeout: Duration) -> String {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            if log.contains(contains) {
                return log;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the bridge's log did not say {contains:?} within {timeout:?}:\n{}",
                tail(&self.log)
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits for the process to end by itself; `None` at `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// [`Self::wait`] on the blocking pool, handing the process back.
    pub async fn wait_async(
        mut self,
        timeout: Duration,
    ) -> (Option<std::process::ExitStatus>, Self) {
        tokio::task::spawn_blocking(move || (self.wait(timeout), self))
            .await
            .expect("wait task")
    }

    /// Waits until the process has stopped itself (a `:freeze` crash
    /// point) or panics at `timeout`, also if it exits first.
    pub fn await_frozen(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let stat = format!("/proc/{}/stat", self.pid());
        loop {
            // The state is the field after the parenthesised command name.
            let state = std::fs::read_to_string(&stat)
                .ok()
                .and_then(|s| s.rsplit_once(") ").and_then(|(_, r)| r.chars().next()));
            if state == Some('T') {
                return;
            }
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!(
                    "bridge exited ({status}) before freezing:\n{}",
                    tail(&self.log)
                );
            }
            assert!(
                Instant::now() < deadline,
                "bridge did not freeze within {timeout:?}:\n{}",
                tail(&self.log)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn signal(&self, signal: i32) {
        unsafe {
            libc::kill(self.pid(), signal);
        }
    }

    /// SIGKILL, and reap it.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits for a clean exit.
    pub fn stop(mut self) {
        self.signal(libc::SIGTERM);
        let status = self
            .wait(Duration::from_secs(20))
            .unwrap_or_else(|| panic!("bridge did not stop on SIGTERM:\n{}", tail(&self.log)));
        assert!(status.success(), "{status}:\n{}", tail(&self.log));
    }
}

impl Drop for BridgeProcess {
    /// Kills the bridge; when the test is failing, prints the end of its
    /// log first: a count that did not arrive says less than what the
    /// bridge was doing meanwhile.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- end of the bridge's log ({}) ---\n{}",
                self.log.display(),
                tail(&self.log)
            );
        }
    }
}

/// The bridge binary: `BRIDGE_TEST_BINARY` if set, else the one cargo built
/// for this test. (The target directory may be shared with other
/// checkouts, whose builds replace `target/debug/mqtt-kafka-bridge`; a
/// copy named here is the one tested.)
pub fn binary() -> PathBuf {
    std::env::var_os("BRIDGE_TEST_BINARY")
        .filter(|path| !path.is_empty())
        .map_or_else(
            || env!("CARGO_BIN_EXE_mqtt-kafka-bridge").into(),
            PathBuf::from,
        )
}

fn spawn(
    config: &Path,
    log: &Path,
    crash_at: Option<&str>,
    metrics_port: u16,
    env: &[(&str, &str)],
) -> Child {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("bridge log");
    let mut command = Command::new(binary());
    command
        .args(["run", "--config"])
        .arg(config)
        .env(
            "BRIDGE_LOG",
            std::env::var("TEST_BRIDGE_LOG").unwrap_or_else(|_| "info".into()),
        )
        .env("NO_COLOR", "1")
        .env(METRICS_PORT_ENV, metrics_port.to_string())
        .env_remove(mqtt_kafka_bridge::fault::ENV)
        .stdin(Stdio::null())
        .stdout(file.try_clone().expect("bridge log"))
        .stderr(file);
    if let Some(point) = crash_at {
        command.env(mqtt_kafka_bridge::fault::ENV, point);
    }
    command.envs(env.iter().copied());
    die_with_parent(&mut command);
    command.spawn().expect("start the bridge binary")
}

/// What `log` gained after its first `offset` bytes.
fn log_since(log: &Path, offset: u64) -> String {
    let bytes = std::fs::read(log).unwrap_or_default();
    let start = usize::try_from(offset)
        .unwrap_or(usize::MAX)
        .min(bytes.len());
    String::from_utf8_lossy(&bytes[start..]).into_owned()
}

/// The end of a log, for failure messages.
pub fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<_> = text.lines().collect();
    lines[lines.len().saturating_sub(80)..].join("\n")
}

/// Ends a child process when the test process dies, even by SIGKILL, so no
/// broker outlives its test.
pub fn die_with_parent(command: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

/// Removes the directories `<prefix><pid>[-...]` in the temp dir whose
/// test process is gone (one that died without cleaning up).
pub fn remove_stale_dirs(prefix: &str) {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(prefix)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<i32>().ok())
        else {
            continue;
        };
        // SAFETY: signal 0 only asks whether the process exists.
        let alive = unsafe { libc::kill(pid, 0) } == 0;
        if !alive {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}
