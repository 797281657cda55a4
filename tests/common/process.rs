//! Child processes of tests: the bridge as the real binary, killed for
//! real, and the rule that no child outlives its test.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `mqtt-kafka-bridge run`. Killed (SIGKILL) when dropped, and by
/// the kernel if the test process dies.
pub struct BridgeProcess {
    child: Child,
    log: PathBuf,
}

impl BridgeProcess {
    /// Starts the binary on `config`, logging to `log` (appended, so one
    /// file tells the story of every run of a test). `crash_at` sets the
    /// crash point (see `mqtt_kafka_bridge::fault`).
    pub fn start(config: &Path, log: &Path, crash_at: Option<&str>) -> Self {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("bridge log");
        let mut command = Command::new(env!("CARGO_BIN_EXE_mqtt-kafka-bridge"));
        command
            .args(["run", "--config"])
            .arg(config)
            .env("BRIDGE_LOG", "info")
            .env("NO_COLOR", "1")
            .env_remove(mqtt_kafka_bridge::fault::ENV)
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file);
        if let Some(point) = crash_at {
            command.env(mqtt_kafka_bridge::fault::ENV, point);
        }
        super::die_with_parent(&mut command);
        let child = command.spawn().expect("start the bridge binary");
        Self {
            child,
            log: log.to_path_buf(),
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Waits until the log shows `needle` `count` times in all, or panics at
    /// `timeout` (also if the process exits first).
    pub fn await_log(&mut self, needle: &str, count: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if log_count(&self.log, needle) >= count {
                return;
            }
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!(
                    "bridge exited ({status}) before logging {needle:?}:\n{}",
                    tail(&self.log)
                );
            }
            assert!(
                Instant::now() < deadline,
                "bridge did not log {needle:?} within {timeout:?}:\n{}",
                tail(&self.log)
            );
            std::thread::sleep(Duration::from_millis(20));
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
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn log_count(log: &Path, needle: &str) -> usize {
    let mut text = String::new();
    if let Ok(mut f) = std::fs::File::open(log) {
        let _ = f.read_to_string(&mut text);
    }
    text.matches(needle).count()
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
