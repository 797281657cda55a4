//! A real Prometheus server (Debian's `prometheus` package) scraping one
//! bridge, on a free loopback port; stopped on drop.

use super::ports::{free_port, listens_on};
use super::repo_path;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Prometheus {
    child: Child,
    pub port: u16,
    dir: tempfile::TempDir,
}

/// `PROMETHEUS`, or the package's binary.
fn binary(name: &str, env: &str) -> PathBuf {
    if let Ok(path) = std::env::var(env) {
        return path.into();
    }
    let packaged = PathBuf::from("/usr/bin").join(name);
    if packaged.exists() {
        return packaged;
    }
    name.into()
}

/// `promtool` from the same package (`PROMTOOL` overrides).
pub fn promtool() -> Command {
    Command::new(binary("promtool", "PROMTOOL"))
}

impl Prometheus {
    /// Scrapes `127.0.0.1:target_port` every second as job
    /// `mqtt-kafka-bridge` and evaluates the shipped alert rules.
    pub fn start(target_port: u16) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - {}\n\
                 scrape_configs:\n  - job_name: mqtt-kafka-bridge\n    static_configs:\n      - targets: ['127.0.0.1:{target_port}']\n",
                repo_path("deploy/prometheus/alerts.yaml").display()
            ),
        )
        .expect("write prometheus.yml");
        for _attempt in 0..5 {
            let port = free_port();
            let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log");
            let mut command = Command::new(binary("prometheus", "PROMETHEUS"));
            command
                .arg(format!("--config.file={}", config.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log);
            super::die_with_parent(&mut command);
            let mut child = command.spawn().unwrap_or_else(|e| {
                panic!("cannot start prometheus ({e}); install it with `apt-get install -y prometheus` or set PROMETHEUS=/path/to/prometheus")
            });
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if listens_on(child.id(), port) {
                    return Self { child, port, dir };
                }
                if let Ok(Some(_)) = child.try_wait() {
                    break; // The port was taken meanwhile: another one.
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("prometheus did not start:\n{}", self_log(&dir));
    }

    /// An instant query through the HTTP API: the `data.result` array.
    pub async fn query(&self, promql: &str) -> Result<Vec<serde_json::Value>, String> {
        let endpoint = super::MetricsEndpoint { port: self.port };
        let path = format!("/api/v1/query?query={}", super::percent_encode(promql));
        let (status, body) = endpoint.get_async(&path).await.map_err(|e| e.to_string())?;
        let answer: serde_json::Value =
            serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
        if status != 200 || answer["status"] != "success" {
            return Err(format!("{status}: {body}"));
        }
        Ok(answer["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    /// Waits until `promql` returns at least one series, and returns them;
    /// panics at `timeout` with the last answer.
    pub async fn await_series(&self, promql: &str, timeout: Duration) -> Vec<serde_json::Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let last = self.query(promql).await;
            if let Ok(result) = &last {
                if !result.is_empty() {
                    return result.clone();
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "`{promql}` returned nothing within {timeout:?}; last answer: {last:?}\nprometheus log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// `GET path` on the server: status and body.
    pub async fn get(&self, path: &str) -> (u16, String) {
        super::MetricsEndpoint { port: self.port }
            .get_async(path)
            .await
            .expect("prometheus answers")
    }

    pub fn log(&self) -> String {
        self_log(&self.dir)
    }
}

fn self_log(dir: &tempfile::TempDir) -> String {
    let text = std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default();
    let lines: Vec<_> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
