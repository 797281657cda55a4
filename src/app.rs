//! Wiring: builds the parts from a [`Config`] and runs them until shutdown.

use crate::command::{self, CommandError, CommandTable};
use crate::config::{Config, ConfigErrors, Guarantee};
use crate::delivery::{CommitLoop, DeliveryError, ExactlyOnce, LoadError};
use crate::kafka::{SinkError, TransactionalSink};
use crate::mqtt::{MqttError, MqttSession};
use crate::reload::{self, Reloader, Trigger};
use crate::route::RouteTable;
use crate::scale::{HaMode, Lease};
use crate::telemetry::{self, Health};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Config(#[from] ConfigErrors),
    #[error(transparent)]
    Metrics(#[from] telemetry::ServeError),
    #[error(transparent)]
    Kafka(#[from] SinkError),
    #[error(transparent)]
    Mqtt(#[from] MqttError),
    #[error(transparent)]
    Delivery(#[from] DeliveryError),
    /// The exactly-once state could not be read at start-up.
    #[error(transparent)]
    ExactlyOnce(#[from] LoadError),
    #[error(transparent)]
    Command(#[from] CommandError),
    /// A route's schema has no id: the registry refused it, or is down.
    #[error(transparent)]
    Registry(#[from] crate::registry::RegistryFailure),
    #[error(transparent)]
    Lease(#[from] crate::scale::LeaseError),
    /// Another bridge of this identity holds the lease now.
    #[error("lost the standby lease to another bridge of this identity")]
    LeaseLost,
    #[error("shutdown did not finish within {0:?}; unacknowledged messages will be redelivered")]
    ShutdownTimeout(Duration),
    /// A task that runs for the bridge's whole life ended on its own (a
    /// panic, or a bug): the bridge stops with an error rather than run on
    /// without it.
    #[error("the {task} task ended unexpectedly: {why}")]
    TaskEnded { task: &'static str, why: String },
}

/// What a task's end says, for [`AppError::TaskEnded`].
fn task_end<T, E: std::fmt::Display>(
    joined: Result<Result<T, E>, tokio::task::JoinError>,
) -> String {
    match joined {
        Ok(Ok(_)) => "it returned".into(),
        Ok(Err(e)) => e.to_string(),
        Err(e) if e.is_panic() => {
            let panic = e.into_panic();
            let text = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".into());
            format!("panicked: {text}")
        }
        Err(e) => e.to_string(),
    }
}

/// Aborts the task when dropped: the metrics listener ends with the run.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Asks for a reload on every SIGHUP.
async fn reload_on_sighup(triggers: mpsc::Sender<Trigger>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hangup = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; reload with --watch");
                return;
            }
        };
        while hangup.recv().await.is_some() {
            // Full: a reload is already queued, and it reads the files anew.
            let _ = triggers.try_send(Trigger::Signal);
        }
    }
    #[cfg(not(unix))]
    std::future::pending::<()>().await;
}

/// How long to wait for the broker to take DISCONNECT before dropping the
/// connection anyway.
const DISCONNECT_GRACE: Duration = Duration::from_secs(2);

/// Runs the bridge until `shutdown` is cancelled or a fatal error occurs.
///
/// Shutdown order: stop taking messages from MQTT, commit the open
/// transaction, acknowledge what it committed, disconnect keeping the
/// session. Bounded by `delivery.shutdown_timeout_ms`.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), AppError> {
    run_with_readiness(config, shutdown, CancellationToken::new()).await
}

/// What makes a running bridge reload its configuration (see
/// [`crate::reload`]).
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Reload on SIGHUP. For the process, not for a bridge run inside a
    /// test binary, where the signal would reach every bridge.
    pub reload_on_sighup: bool,
    /// Reload when a configuration file changes, looking this often.
    pub watch: Option<Duration>,
}

/// [`run`], cancelling `ready` once the MQTT subscriptions are in place, so
/// tests and the demo start publishing only when nothing can be missed.
pub async fn run_with_readiness(
    config: Config,
    shutdown: CancellationToken,
    ready: CancellationToken,
) -> Result<(), AppError> {
    run_with(config, shutdown, ready, RunOptions::default()).await
}

/// [`run_with_readiness`], reloading as `options` say.
pub async fn run_with(
    config: Config,
    shutdown: CancellationToken,
    ready: CancellationToken,
    options: RunOptions,
) -> Result<(), AppError> {
    // Before anything slow: SIGHUP's default action ends the process.
    let (triggers, trigger_rx) = mpsc::channel(1);
    let _on_sighup = options
        .reload_on_sighup
        .then(|| AbortOnDrop(tokio::spawn(reload_on_sighup(triggers.clone()))));
    let mut table = RouteTable::compile(&config)?;
    if table.has_encodings() {
        // Schema ids before the first message: the registry's HTTP calls
        // are blocking, and few.
        let registry = config.bridge.schema_registry.clone();
        let base = config.path.parent().unwrap_or(Path::new(".")).to_path_buf();
        table = tokio::task::spawn_blocking(move || {
            crate::registry::resolve_table(registry.as_ref(), &base, &mut table).map(|()| table)
        })
        .await
        .map_err(|e| AppError::TaskEnded {
            task: "schema registry",
            why: e.to_string(),
        })??;
    }
    let table = Arc::new(table);
    let commands = Arc::new(CommandTable::compile(&config)?);
    for warning in &table.warnings {
        tracing::warn!("{warning}");
    }
    for warning in config.certificate_warnings(std::time::SystemTime::now()) {
        tracing::warn!("{warning}");
    }
    let bridge = &config.bridge;
    // Secrets print as `[redacted]` (see `crate::secret`).
    tracing::debug!(config = ?bridge, "effective bridge settings");
    let health = Arc::new(Health::new(Duration::from_millis(
        bridge.metrics.max_commit_wait_ms,
    )));
    // First, so that probes answer (not ready) while Kafka and MQTT come up.
    let _listener = match bridge.metrics.listen {
        Some(listen) => Some(AbortOnDrop(telemetry::serve(listen, health.clone()).await?)),
        None => None,
    };
    telemetry::register(&reload::known_labels(&table, &commands));
    telemetry::certificates_in_use("mqtt", &config.tls.certificates);
    telemetry::certificates_in_use("kafka", &config.tls.certificates);
    telemetry::config_loaded();
    // Standby: nothing touches Kafka's producer or the MQTT session until
    // this bridge holds its identity's lease; losing it stops the bridge
    // like a shutdown request (the process exits; its supervisor starts it
    // again as a standby).
    let lease = match bridge.ha.as_ref().filter(|ha| ha.mode == HaMode::Standby) {
        Some(ha) => {
            health.standby();
            let member = crate::scale::host_name();
            let identity = &bridge.kafka.transactional_id;
            match Lease::acquire(&bridge.kafka, ha, identity, &member, &shutdown).await? {
                Some(lease) => {
                    health.active();
                    Some(lease)
                }
                None => return Ok(()),
            }
        }
        None => None,
    };
    let shutdown = match &lease {
        Some(_) => shutdown.child_token(),
        None => shutdown,
    };
    let _watch_lease = lease.as_ref().map(|_| {
        let (shutdown, lease_held) = (shutdown.clone(), lease_watch(&lease));
        AbortOnDrop(tokio::spawn(async move {
            lease_held.await;
            tracing::warn!("lost the lease to another bridge of this identity: stopping");
            shutdown.cancel();
        }))
    });
    let sink = tokio::select! {
        sink = TransactionalSink::connect(
            &bridge.kafka,
            Duration::from_millis(bridge.delivery.transaction_timeout_ms),
            Duration::from_millis(bridge.delivery.commit_timeout_ms),
            health.clone(),
        ) => sink?,
        _ = shutdown.cancelled() => return stopped(&lease, Ok(())),
    };
    tracing::info!(transactional_id = %bridge.kafka.transactional_id, "Kafka producer ready");
    // After `init_transactions` (which settled what an earlier instance left
    // open) and before subscribing: the state of the last committed
    // transaction.
    let exactly_once = match bridge.delivery.guarantee {
        Guarantee::AtLeastOnce => None,
        Guarantee::ExactlyOnce => {
            health.state_reading();
            tokio::select! {
                state = ExactlyOnce::load(bridge) => Some(state?),
                _ = shutdown.cancelled() => return stopped(&lease, Ok(())),
            }
        }
    };
    if let Some(eo) = &exactly_once {
        tokio::select! {
            ready = sink.await_topic(eo.topic()) => ready?,
            _ = shutdown.cancelled() => return stopped(&lease, Ok(())),
        }
        health.state_read();
    }

    let subscriptions = table.subscriptions();
    for sub in &subscriptions {
        tracing::info!(filter = %sub.filter, qos = sub.qos.as_u8(), "subscribing");
    }
    let session = MqttSession::new(&bridge.mqtt, subscriptions)
        .with_tls(config.tls.mqtt.clone())
        .with_max_packet_bytes(bridge.limits.max_packet_bytes)
        .with_health(health.clone());
    let client = session.client();
    let (tx, rx) = mpsc::channel(usize::from(bridge.mqtt.inflight_window));
    // Intake stops forwarding as soon as shutdown is requested, and keeps
    // polling so the last acks and the DISCONNECT go out.
    // `stop` is the shutdown request, or the command runner failing.
    let stop = shutdown.child_token();
    let stop_intake = stop.child_token();
    let finished = CancellationToken::new();
    let mut intake =
        tokio::spawn(session.run_intake(tx, stop_intake.clone(), finished.clone(), ready));
    // Always running: a reload may add command routes to a bridge that
    // had none (the runner makes no consumer until then).
    let (command_tables, command_rx) = watch::channel(commands);
    let command_runner = {
        let (kafka, client, stop) = (bridge.kafka.clone(), client.clone(), stop.clone());
        let runner = {
            let stop = stop.clone();
            tokio::spawn(async move { command::run(command_rx, &kafka, client, stop).await })
        };
        // Supervises the runner: an error or a panic stops the bridge.
        tokio::spawn(async move {
            let joined = runner.await;
            match joined {
                Ok(Ok(())) if stop.is_cancelled() => Ok(()),
                Ok(Err(e)) => {
                    stop.cancel();
                    Err(AppError::from(e))
                }
                other => {
                    stop.cancel();
                    Err(AppError::TaskEnded {
                        task: "command runner",
                        why: task_end(other),
                    })
                }
            }
        })
    };

    let (route_swaps, swap_rx) = mpsc::channel(1);
    let reloader = Reloader::new(&config, route_swaps, command_tables, client.clone());
    let _watcher = options.watch.map(|every| {
        AbortOnDrop(tokio::spawn(reload::watch_files(
            reloader.files(),
            config.mapping_globs(),
            every,
            triggers.clone(),
            stop.clone(),
        )))
    });
    let _reloader = AbortOnDrop(tokio::spawn(reloader.run(trigger_rx, stop.clone())));
    let commit_loop = CommitLoop::new(
        table,
        sink,
        client.clone(),
        &bridge.delivery,
        exactly_once,
        health.clone(),
    )
    .with_route_swaps(swap_rx)
    .with_partition(bridge.partition.as_ref().map(|p| {
        p.resolve(&crate::scale::host_name())
            .expect("checked when the configuration loaded")
    }));
    if let Some(p) = &bridge.partition {
        tracing::info!(instances = p.instances, instance = ?p.instance, "partitioned: keeping the keys this bridge owns");
    }
    let shutdown_timeout = Duration::from_millis(bridge.delivery.shutdown_timeout_ms);
    let run = commit_loop.run(rx, stop.clone());
    let deadline = async {
        stop.cancelled().await;
        health.stopping();
        tracing::info!("shutting down: committing the open batch");
        tokio::time::sleep(shutdown_timeout).await;
    };
    let mut result = tokio::select! {
        result = run => result.map_err(AppError::from),
        _ = deadline => Err(AppError::ShutdownTimeout(shutdown_timeout)),
    };
    // The commit loop returns Ok only at shutdown or when the intake's
    // channel closed: without a shutdown request, the intake task ended
    // (a panic, or an error it could not ride out).
    if result.is_ok() && !stop.is_cancelled() {
        let why = match tokio::time::timeout(DISCONNECT_GRACE, &mut intake).await {
            Ok(joined) => task_end(joined),
            Err(_) => "its channel closed".into(),
        };
        result = Err(AppError::TaskEnded {
            task: "MQTT intake",
            why,
        });
    }
    stop.cancel();
    if let Ok(Ok(Err(e))) = tokio::time::timeout(DISCONNECT_GRACE, command_runner).await {
        if result.is_ok() {
            result = Err(e);
        }
    }

    stop_intake.cancel();
    if let Err(e) = &result {
        tracing::error!(error = %e, "bridge stopping");
    }
    let _ = tokio::time::timeout(DISCONNECT_GRACE, client.disconnect()).await;
    if !intake.is_finished()
        && tokio::time::timeout(DISCONNECT_GRACE, &mut intake)
            .await
            .is_err()
    {
        finished.cancel();
        let _ = intake.await;
    }
    tracing::info!("bridge stopped");
    stopped(&lease, result)
}

/// How a run that stopped ends: a stop the lost lease caused is an error,
/// on every path (a supervisor that restarts only failures must restart a
/// bridge that lost its lease, as a standby).
fn stopped(lease: &Option<Lease>, result: Result<(), AppError>) -> Result<(), AppError> {
    match lease {
        Some(lease) if lease.is_lost() && result.is_ok() => Err(AppError::LeaseLost),
        _ => result,
    }
}

/// Resolves when `lease` (if any) is lost.
fn lease_watch(lease: &Option<Lease>) -> impl std::future::Future<Output = ()> + Send + 'static {
    let held = lease.as_ref().map(Lease::watcher);
    async move {
        if let Some(mut held) = held {
            let _ = held.wait_for(|holds| !*holds).await;
        }
    }
}
