use clap::Parser;
use mqtt_kafka_bridge::cli::{self, Cli};
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = Cli::parse();
    cli::init_tracing(&cli);
    cli::execute(cli)
}
