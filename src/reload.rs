//! Hot reload: a new configuration is loaded, checked in full, and swapped
//! in between two transactions, or refused with the old one left running.
//!
//! What reloads live is what the mapping files say: routes, schemas,
//! transforms, M2M trees, relay and command routes, and so the MQTT
//! subscriptions and the command topics; and the contents of the MQTT TLS
//! files, so a renewed client certificate is used from the next connection. The bridge file's settings
//! (broker address, client id, transactional id, delivery, limits, the
//! listener) belong to connections and state made at start-up; a change to
//! any of them is refused with the names of the settings, and the bridge
//! keeps running on the old configuration until it is restarted.
//!
//! The order keeps every message on exactly one set of routes: the commit
//! loop takes the new routes at the top of its loop (the last batch
//! committed, the next not begun), and only then does the session subscribe
//! to new filters, so nothing arrives that the running routes do not know.
//! Messages on a dropped filter that arrive before the UNSUBSCRIBE lands are
//! unrouted, as they would be after it.

use crate::command::CommandTable;
use crate::config::{BridgeConfig, Config, ConfigError, ConfigErrors};
use crate::delivery::RouteSwap;
use crate::mqtt::MqttClient;
use crate::route::{RejectReason, RouteTable};
use crate::telemetry;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

/// Why a reload was refused; the old configuration keeps running.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] ConfigErrors),
    #[error("{path}: {} cannot change while the bridge runs; restart it to apply them (only the mapping files, their schemas and the `mappings` list reload live)", .settings.join(", "))]
    RestartNeeded {
        path: PathBuf,
        settings: Vec<String>,
    },
    #[error("the bridge is stopping")]
    Stopping,
}

/// What asks for a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// SIGHUP.
    Signal,
    /// `--watch` saw a file change.
    FileChanged,
}

/// Applies reloads to the running parts.
pub struct Reloader {
    path: PathBuf,
    /// The bridge file as running; a reload may not change it.
    running: BridgeConfig,
    routes: mpsc::Sender<RouteSwap>,
    commands: watch::Sender<Arc<CommandTable>>,
    client: MqttClient,
    /// Files the running configuration was read from, for `--watch`.
    files: watch::Sender<Vec<PathBuf>>,
}

impl Reloader {
    pub fn new(
        config: &Config,
        routes: mpsc::Sender<RouteSwap>,
        commands: watch::Sender<Arc<CommandTable>>,
        client: MqttClient,
    ) -> Self {
        Self {
            path: config.path.clone(),
            running: config.bridge.clone(),
            routes,
            commands,
            client,
            files: watch::Sender::new(config.files()),
        }
    }

    /// The files to watch; follows each successful reload (a new mapping
    /// file, a new schema).
    pub fn files(&self) -> watch::Receiver<Vec<PathBuf>> {
        self.files.subscribe()
    }

    /// Reloads on each trigger until `shutdown`.
    pub async fn run(mut self, mut triggers: mpsc::Receiver<Trigger>, shutdown: CancellationToken) {
        loop {
            let trigger = tokio::select! {
                _ = shutdown.cancelled() => return,
                trigger = triggers.recv() => match trigger {
                    Some(t) => t,
                    None => return,
                },
            };
            tracing::info!(?trigger, path = %self.path.display(), "reloading the configuration");
            match self.reload().await {
                Ok(summary) => {
                    telemetry::config_reloaded(true);
                    tracing::info!(
                        routes = summary.routes,
                        command_routes = summary.command_routes,
                        subscriptions = summary.subscriptions,
                        "configuration reloaded"
                    );
                }
                Err(ReloadError::Stopping) => return,
                Err(error) => {
                    telemetry::config_reloaded(false);
                    for line in error.to_string().lines() {
                        tracing::error!(
                            error = line,
                            "configuration not reloaded; the running one stays"
                        );
                    }
                }
            }
        }
    }

    async fn reload(&mut self) -> Result<Summary, ReloadError> {
        let path = self.path.clone();
        // Files and schemas are read and compiled off the runtime, and so
        // is the list of files to watch (it compiles each `.proto` for
        // its imports).
        let loaded = tokio::task::spawn_blocking(move || {
            load(&path).map(|loaded| {
                let files = loaded.0.files();
                (loaded, files)
            })
        })
        .await
        .map_err(|_| ReloadError::Stopping)??;
        let ((config, table, commands), files) = loaded;
        let settings = restart_only_changes(&self.running, &config.bridge);
        if !settings.is_empty() {
            return Err(ReloadError::RestartNeeded {
                path: self.path.clone(),
                settings,
            });
        }
        for warning in &table.warnings {
            tracing::warn!("{warning}");
        }
        for warning in config.certificate_warnings(std::time::SystemTime::now()) {
            tracing::warn!("{warning}");
        }
        telemetry::register(&known_labels(&table, &commands));
        let subscriptions = table.subscriptions();
        let summary = Summary {
            routes: table.routes().len(),
            command_routes: commands.topics().len(),
            subscriptions: subscriptions.len(),
        };
        let (done, swapped) = oneshot::channel();
        self.routes
            .send(RouteSwap {
                table: Arc::new(table),
                done,
            })
            .await
            .map_err(|_| ReloadError::Stopping)?;
        swapped.await.map_err(|_| ReloadError::Stopping)?;
        self.client
            .set_subscriptions(subscriptions)
            .await
            .map_err(|_| ReloadError::Stopping)?;
        self.commands.send_replace(Arc::new(commands));
        // Certificate files read again: a renewed one is used from the next
        // connection on. (Kafka's are read by librdkafka once, at start-up:
        // their gauges keep what runs.)
        if let Some(tls) = config.tls.mqtt.clone() {
            telemetry::certificates_in_use("mqtt", &tls.certificates);
            self.client
                .set_tls(tls)
                .await
                .map_err(|_| ReloadError::Stopping)?;
        }
        self.files.send_replace(files);
        Ok(summary)
    }
}

struct Summary {
    routes: usize,
    command_routes: usize,
    subscriptions: usize,
}

fn load(path: &Path) -> Result<(Config, RouteTable, CommandTable), ConfigErrors> {
    let config = Config::load(path)?;
    let table = RouteTable::compile(&config);
    let commands = CommandTable::compile(&config);
    match (table, commands) {
        (Ok(mut table), Ok(commands)) => {
            // New or changed encodings get their schema ids before the
            // table is used; a registry that refuses keeps the old routes.
            let base = config.path.parent().unwrap_or(Path::new("."));
            crate::registry::resolve_table(
                config.bridge.schema_registry.as_ref(),
                base,
                &mut table,
            )
            .map_err(|failure| {
                ConfigErrors(
                    failure
                        .0
                        .into_iter()
                        .map(|m| ConfigError::field(&config.path, "schema_registry", m))
                        .collect(),
                )
            })?;
            Ok((config, table, commands))
        }
        (Err(mut a), Err(b)) => {
            a.extend(b);
            Err(a)
        }
        (Err(e), _) | (_, Err(e)) => Err(e),
    }
}

/// The label values the configuration fixes, registered at 0.
pub fn known_labels(table: &RouteTable, commands: &CommandTable) -> telemetry::KnownLabels {
    telemetry::KnownLabels {
        routes: table.routes().iter().map(|r| r.name.clone()).collect(),
        command_routes: commands
            .topics()
            .into_iter()
            .map(|t| commands.route_name(t).to_string())
            .collect(),
        command_topics: commands.topics().into_iter().map(String::from).collect(),
        reasons: RejectReason::ALL.iter().map(|r| r.as_str()).collect(),
        kafka_refusals: crate::kafka::REFUSALS
            .iter()
            .map(|c| format!("{c:?}"))
            .collect(),
    }
}

/// The bridge-file settings that differ, as `section.field`; empty when
/// only the `mappings` list changed.
///
/// Sections compare whole (`PartialEq`); the field names come from their
/// `Debug` output, one field per line, so a new setting needs no change
/// here. A changed secret shows in `Debug` as the same placeholder, so a
/// section that differs with no differing line is named whole.
pub fn restart_only_changes(running: &BridgeConfig, new: &BridgeConfig) -> Vec<String> {
    let mut changed = Vec::new();
    section(&mut changed, "mqtt", &running.mqtt, &new.mqtt);
    section(&mut changed, "kafka", &running.kafka, &new.kafka);
    section(&mut changed, "delivery", &running.delivery, &new.delivery);
    section(&mut changed, "limits", &running.limits, &new.limits);
    section(&mut changed, "metrics", &running.metrics, &new.metrics);
    // Which keys a bridge owns and whether it stands by are decided at
    // start-up, with the lease and the group.
    if running.partition != new.partition {
        changed.push("partition".into());
    }
    if running.ha != new.ha {
        changed.push("ha".into());
    }
    changed
}

fn section<T: PartialEq + std::fmt::Debug>(changed: &mut Vec<String>, name: &str, a: &T, b: &T) {
    if a == b {
        return;
    }
    let fields = |value: &T| -> Vec<(String, String)> {
        let text = format!("{value:#?}");
        let mut field = String::new();
        let mut lines = Vec::new();
        for line in text.lines() {
            // Fields of the section itself are indented by four spaces.
            if let Some(rest) = line.strip_prefix("    ") {
                if rest.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_') {
                    field = rest.split(':').next().unwrap_or_default().to_string();
                }
            }
            lines.push((field.clone(), line.to_string()));
        }
        lines
    };
    let (a, b) = (fields(a), fields(b));
    let mut names: Vec<String> = a
        .iter()
        .filter(|l| !b.contains(l))
        .chain(b.iter().filter(|l| !a.contains(l)))
        .filter(|(field, _)| !field.is_empty())
        .map(|(field, _)| format!("{name}.{field}"))
        .collect();
    names.dedup();
    if names.is_empty() {
        names.push(format!("{name} (a secret)"));
    }
    for n in names {
        if !changed.contains(&n) {
            changed.push(n);
        }
    }
}

/// How often `--watch` looks at the files.
pub const WATCH_EVERY: Duration = Duration::from_secs(2);

/// Triggers a reload when the content of a watched file changes (or one
/// appears or goes). Polls content rather than relying on inotify: a
/// Kubernetes ConfigMap volume changes by swapping a symlink two levels up,
/// which file watches miss, and a few small files every two seconds cost
/// nothing.
pub async fn watch_files(
    mut files: watch::Receiver<Vec<PathBuf>>,
    globs: Vec<PathBuf>,
    every: Duration,
    triggers: mpsc::Sender<Trigger>,
    shutdown: CancellationToken,
) {
    let fingerprint = |files: &[PathBuf]| {
        let mut hasher = DefaultHasher::new();
        let mut all: Vec<PathBuf> = files.to_vec();
        // New mapping files that a glob would now match.
        for pattern in &globs {
            if let Some(p) = pattern.to_str() {
                if let Ok(paths) = glob::glob(p) {
                    all.extend(paths.filter_map(Result::ok));
                }
            }
        }
        all.sort();
        all.dedup();
        for path in &all {
            path.hash(&mut hasher);
            std::fs::read(path).ok().hash(&mut hasher);
        }
        hasher.finish()
    };
    let mut last = fingerprint(&files.borrow_and_update());
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = fingerprint(&files.borrow_and_update());
        if now != last {
            last = now;
            // Full: a reload is already queued, and it reads the files anew.
            let _ = triggers.try_send(Trigger::FileChanged);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bridge(extra: &str) -> BridgeConfig {
        let text = format!(
            "mqtt: {{ host: h, client_id: c, password: p1 }}\nkafka: {{ bootstrap_servers: b, transactional_id: t }}\nmappings: [x]\n{extra}"
        );
        serde_yaml_ng::from_str(&text).expect("bridge file")
    }

    #[test]
    fn only_the_mappings_list_may_change() {
        let running = bridge("");
        let mut new = bridge("");
        new.mappings = vec!["y".into(), "z".into()];
        assert!(restart_only_changes(&running, &new).is_empty());

        let mut new = bridge("");
        new.mqtt.host = "elsewhere".into();
        new.mqtt.client_id = "other".into();
        new.kafka.transactional_id = "other".into();
        new.kafka
            .properties
            .insert("sasl.password".into(), "x".into());
        assert_eq!(
            restart_only_changes(&running, &new),
            [
                "mqtt.host",
                "mqtt.client_id",
                "kafka.transactional_id",
                "kafka.properties"
            ]
        );
    }

    #[test]
    fn a_changed_secret_is_named_without_its_value() {
        let running = bridge("");
        let mut new = bridge("");
        new.mqtt.password = Some(crate::secret::Secret::new("p2"));
        let changes = restart_only_changes(&running, &new);
        assert_eq!(changes, ["mqtt (a secret)"]);
    }
}
