//! Log output: human text, or JSON lines for a log pipeline.
//!
//! Lines at info level are lifecycle events only (connected, subscribed,
//! reloaded, fenced, stopping); anything per message is debug, so a busy
//! bridge logs as much as an idle one.

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines, coloured on a terminal.
    #[default]
    Text,
    /// One JSON object per line (`timestamp`, `level`, `target`, `message`
    /// and the event's fields at the top level), for Loki, Elasticsearch,
    /// Cloud Logging and the like.
    Json,
}

/// Installs the global subscriber. `filter` is an `EnvFilter` directive
/// (`info`, `mqtt_kafka_bridge=debug`); an invalid one falls back to `info`
/// and says so.
pub fn init(filter: &str, format: LogFormat) {
    let (env_filter, invalid) = match tracing_subscriber::EnvFilter::try_new(filter) {
        Ok(f) => (f, None),
        Err(e) => (tracing_subscriber::EnvFilter::new("info"), Some(e)),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(env_filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .init(),
    }
    if let Some(e) = invalid {
        tracing::warn!(filter, error = %e, "invalid log filter; logging at info");
    }
}
