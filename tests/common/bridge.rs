//! The bridge in-process, for tests that inspect what `app::run` returns.

use mqtt_kafka_bridge::config::Config;
use std::time::Duration;

/// The bridge running in-process, subscribed and ready.
pub struct Bridge {
    shutdown: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<Result<(), mqtt_kafka_bridge::app::AppError>>,
}

impl Bridge {
    /// Starts the bridge and waits until its subscriptions are in place.
    pub async fn start(config: Config) -> Self {
        // The bridge's log goes to the test's captured output, which the
        // harness shows only for a failing test; BRIDGE_TEST_LOG=debug for
        // more.
        let filter = std::env::var("BRIDGE_TEST_LOG")
            .unwrap_or_else(|_| "warn,mqtt_kafka_bridge=info".into());
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
        let shutdown = tokio_util::sync::CancellationToken::new();
        let ready = tokio_util::sync::CancellationToken::new();
        let mut task = tokio::spawn(mqtt_kafka_bridge::app::run_with_readiness(
            config,
            shutdown.clone(),
            ready.clone(),
        ));
        tokio::select! {
            _ = await_token(&ready, "bridge subscribed", Duration::from_secs(30)) => {}
            stopped = &mut task => panic!("the bridge stopped before it was ready: {stopped:?}"),
        }
        Self { shutdown, task }
    }

    /// Whether the bridge has stopped on its own.
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    pub async fn stop(self) {
        self.stop_result().await.expect("bridge exits cleanly");
    }

    pub async fn stop_result(self) -> Result<(), mqtt_kafka_bridge::app::AppError> {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("bridge stops within 20 s")
            .expect("bridge task")
    }
}

/// Waits for `token` with a deadline, naming what was awaited on failure.
pub async fn await_token(
    token: &tokio_util::sync::CancellationToken,
    what: &str,
    timeout: Duration,
) {
    tokio::time::timeout(timeout, token.cancelled())
        .await
        .unwrap_or_else(|_| panic!("{what} did not happen within {timeout:?}"));
}
