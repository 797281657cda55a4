//! The command line: `run`, `check`, `translate`, `demo`.

use crate::app::{self, AppError};
use crate::config::{Config, ConfigErrors};
use crate::telemetry::{self, LogFormat};
use crate::{check, reload, translate};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

/// Exit code for configuration errors (`EX_CONFIG` from sysexits.h), so a
/// supervisor can tell "fix the config" from "retry".
const EXIT_CONFIG: u8 = 78;

#[derive(Debug, Parser)]
#[command(
    name = "mqtt-kafka-bridge",
    version,
    about = "MQTT-to-Kafka bridge and protocol translator"
)]
pub struct Cli {
    /// Log filter, e.g. `info` or `mqtt_kafka_bridge=debug`.
    #[arg(
        long,
        env = "BRIDGE_LOG",
        default_value = "info,rumqttd=off",
        global = true
    )]
    pub log: String,
    /// Log line format: `text` for people, `json` (one object per line)
    /// for a log pipeline.
    #[arg(
        long,
        env = "BRIDGE_LOG_FORMAT",
        value_enum,
        default_value_t = LogFormat::Text,
        global = true
    )]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the bridge. SIGHUP reloads the mapping files.
    Run {
        #[arg(long, short, env = "BRIDGE_CONFIG")]
        config: PathBuf,
        /// Also reload when the bridge file, a mapping file or a schema
        /// changes (checked every 2 s; Kubernetes ConfigMap updates too).
        #[arg(long, env = "BRIDGE_WATCH")]
        watch: bool,
    },
    /// Load and validate the configuration, print the route table.
    Check {
        #[arg(long, short, env = "BRIDGE_CONFIG")]
        config: PathBuf,
    },
    /// Dry run: show what one MQTT message would become.
    Translate {
        #[arg(long, short, env = "BRIDGE_CONFIG")]
        config: PathBuf,
        /// The MQTT topic the message arrives on.
        #[arg(long)]
        topic: String,
        /// The payload, or `@path` to read it from a file.
        #[arg(long)]
        payload: String,
        /// MQTT 5 user property `name=value`; repeatable.
        #[arg(long = "property", value_name = "NAME=VALUE")]
        properties: Vec<String>,
        /// MQTT QoS of the message.
        #[arg(long, default_value_t = 1)]
        qos: u8,
        /// A message routed first, unprinted: a Sparkplug B birth whose
        /// aliases the message is decoded with. `TOPIC=PAYLOAD` or
        /// `TOPIC=@path` (split at the first `=`); repeatable, in order.
        #[arg(long = "birth", value_name = "TOPIC=PAYLOAD")]
        births: Vec<String>,
    },
    /// Run everything in-process: MQTT broker, Kafka mock cluster, a fleet
    /// of simulated HVAC units and the bridge with `mappings/hvac.yaml`.
    #[cfg(feature = "demo")]
    Demo(crate::demo::DemoArgs),
}

pub fn init_tracing(cli: &Cli) {
    telemetry::init_logging(&cli.log, cli.log_format);
}

/// Runs a command and maps its result to the process exit code.
pub fn execute(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Check { config } => check(&config),
        Command::Translate {
            config,
            topic,
            payload,
            properties,
            qos,
            births,
        } => match translate::run(&config, &topic, &payload, &properties, qos, &births) {
            Ok(code) => code,
            Err(e) => match e.downcast_ref::<ConfigErrors>() {
                Some(errors) => config_error(errors),
                None => report(&e),
            },
        },
        Command::Run { config, watch } => {
            let config = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => return config_error(&e),
            };
            let options = app::RunOptions {
                reload_on_sighup: true,
                watch: watch.then_some(reload::WATCH_EVERY),
            };
            run_to_end(async {
                let shutdown = CancellationToken::new();
                tokio::spawn(cancel_on_signal(shutdown.clone()));
                let ready = CancellationToken::new();
                match app::run_with(config, shutdown, ready, options).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(AppError::Config(e)) => config_error(&e),
                    Err(e) => report(&anyhow::Error::new(e)),
                }
            })
        }
        #[cfg(feature = "demo")]
        Command::Demo(args) => run_to_end(async {
            let shutdown = CancellationToken::new();
            tokio::spawn(cancel_on_signal(shutdown.clone()));
            match crate::demo::run(args, shutdown).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => report(&e),
            }
        }),
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    match check::run(path) {
        Ok(report) => {
            print!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => config_error(&e),
    }
}

fn config_error(errors: &ConfigErrors) -> ExitCode {
    eprintln!("error: {errors}");
    ExitCode::from(EXIT_CONFIG)
}

fn report(error: &anyhow::Error) -> ExitCode {
    eprintln!("error: {error:#}");
    ExitCode::FAILURE
}

/// One thread for all of the bridge's async work. The MQTT session, the
/// commit loop and the command runner hand work to each other constantly;
/// on a multi-threaded runtime each hand-over could wake the other worker,
/// and the bridge spent about 30 % of its CPU in the scheduler. Measured on
/// 2 cores, mock Kafka, exactly once: 42 815 -> 47 366 msg/s and 14.8 ->
/// 9.8 us CPU per message. Blocking Kafka calls still run on tokio's
/// blocking pool and librdkafka has its own threads; the per-message work
/// (about 3 us) leaves a single thread far from saturated.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("the tokio runtime starts (only fails without OS threads)")
}

/// How long the process waits, once the bridge has stopped, for blocking
/// calls it gave up on (a Kafka call still waiting for its timeout, a
/// producer being destroyed) before it exits anyway.
const STRAY_CALLS_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Runs `work` to its end, then exits without waiting out blocking calls
/// it no longer waits for: a bridge that stops because Kafka refused its
/// credentials must not linger until the abandoned `init_transactions`
/// times out (measured: 30 s with the default `commit_timeout_ms`).
fn run_to_end(work: impl std::future::Future<Output = ExitCode>) -> ExitCode {
    let runtime = runtime();
    let code = runtime.block_on(work);
    runtime.shutdown_timeout(STRAY_CALLS_WAIT);
    code
}

/// Cancels `token` on Ctrl-C or SIGTERM (what `docker stop` sends).
pub async fn cancel_on_signal(token: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for SIGTERM");
                    let _ = ctrl_c.await;
                    token.cancel();
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutdown requested");
    token.cancel();
}
