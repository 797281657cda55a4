//! Names no other test uses: tests share one Kafka (and run in parallel in
//! one binary), so each picks its own topics, client ids and groups.

/// A unique name per call, so tests sharing a cluster never see each
/// other's records or sessions.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Topic names of one test, so tests sharing a Kafka never see each
/// other's records.
#[derive(Clone, Debug)]
pub struct Topics {
    pub prefix: String,
}

impl Topics {
    pub fn new() -> Self {
        Self {
            prefix: format!("{}.", unique("t")),
        }
    }
    /// `name` under this test's prefix: how every Kafka topic a test
    /// mapping names is renamed (see `ConfigBuilder`).
    pub fn named(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }
    pub fn telemetry(&self) -> String {
        self.named("hvac.telemetry")
    }
    pub fn diagnostics(&self) -> String {
        self.named("hvac.diagnostics")
    }
    pub fn dead_letter(&self) -> String {
        self.named("dead-letter")
    }
    pub fn commands(&self) -> String {
        self.named("hvac.commands")
    }
    /// A bridge state topic of the test's own, for tests on private
    /// clusters (created by `Rig::on_cluster`).
    pub fn state(&self) -> String {
        self.named("state")
    }
    /// The topics every rig creates.
    pub fn all(&self) -> Vec<String> {
        vec![
            self.telemetry(),
            self.diagnostics(),
            self.dead_letter(),
            self.commands(),
        ]
    }
}
