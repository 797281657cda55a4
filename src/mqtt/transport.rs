//! Reaching the broker: a TCP connection, wrapped in TLS when configured.
//!
//! Apart from the session loop so that the loop only sees a byte stream:
//! tests drive it over an in-memory pipe, and TLS setup (root certificates,
//! server names) stays out of the protocol logic.

use super::{MqttConfig, MqttError};
use bytes::BytesMut;
use std::sync::Arc;
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

/// Connects to the configured broker. Nagle is off: acks and PINGREQs are
/// small and their latency is what the delivery task waits on.
pub(super) async fn open(config: &MqttConfig) -> Result<Box<dyn Stream>, MqttError> {
    let tcp = tokio::net::TcpStream::connect((config.host.as_str(), config.port)).await?;
    tcp.set_nodelay(true)?;
    if !config.tls {
        return Ok(Box::new(tcp));
    }
    use tokio_rustls::rustls;
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        // A certificate the store cannot use is skipped, as browsers do.
        let _ = roots.add(cert);
    }
    let tls = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(config.host.clone())
        .map_err(|e| MqttError::Tls(e.to_string()))?;
    let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(name, tcp)
        .await?;
    Ok(Box::new(stream))
}
