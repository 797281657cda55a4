//! Reaching the broker: a TCP connection, wrapped in TLS when configured.
//!
//! Apart from the session loop so that the loop only sees a byte stream:
//! tests drive it over an in-memory pipe, and TLS setup (root certificates,
//! server names) stays out of the protocol logic.

use super::tls::MqttTls;
use super::{MqttConfig, MqttError};
use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

/// The connection to the broker, plain or TLS; boxed so the session has one
/// type whichever it is.
pub(super) trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// Writes and flushes everything encoded so far, so a packet never waits in
/// a buffer behind the next select, and empties `out` for the next batch.
pub(super) async fn write(
    stream: &mut Box<dyn Stream>,
    out: &mut BytesMut,
) -> Result<(), MqttError> {
    stream.write_all(out).await?;
    stream.flush().await?;
    out.clear();
    Ok(())
}

/// Connects to the configured broker, with TLS when `tls` is given. Nagle
/// is off: acks and PINGREQs are small and their latency is what the
/// delivery task waits on.
pub(super) async fn open(
    config: &MqttConfig,
    tls: Option<&MqttTls>,
) -> Result<Box<dyn Stream>, MqttError> {
    let tcp = tokio::net::TcpStream::connect((config.host.as_str(), config.port)).await?;
    tcp.set_nodelay(true)?;
    let Some(tls) = tls else {
        return Ok(Box::new(tcp));
    };
    let stream = tokio_rustls::TlsConnector::from(tls.config.clone())
        .connect(tls.server_name.clone(), tcp)
        .await?;
    Ok(Box::new(stream))
}
