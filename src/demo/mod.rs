//! The zero-install demo.

use tokio_util::sync::CancellationToken;

#[derive(Debug, clap::Args)]
pub struct DemoArgs {}

pub async fn run(_args: DemoArgs, _shutdown: CancellationToken) -> anyhow::Result<()> {
    Ok(())
}
