//! The HTTP listener at `metrics.listen`: `/metrics`, `/livez`, `/readyz`.
//!
//! Our own small hyper server rather than the exporter's built-in one,
//! which serves only `/metrics` (and any path as `/metrics`): probes need
//! their own paths and status codes. It runs on the bridge's runtime on
//! purpose: a runtime that no longer turns answers no `/livez`, which is
//! what the liveness probe is for.

use super::health::Health;
use super::names::{self, BATCH_BUCKETS, LATENCY_BUCKETS};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::CONTENT_TYPE;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A scraper or probe that opens a connection and sends nothing is dropped
/// after this long.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; more wait to be accepted. Scrapers and
/// probes need a handful.
const MAX_CONNECTIONS: usize = 32;
/// How often histogram samples are folded in (the exporter's own listener
/// did this on a timer too).
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot install the Prometheus recorder: {0}")]
    Recorder(#[from] metrics_exporter_prometheus::BuildError),
    #[error("cannot serve metrics on {listen}: {source}")]
    Bind {
        listen: SocketAddr,
        source: std::io::Error,
    },
}

/// The process-wide recorder, installed by the first call. `metrics` has
/// one global recorder per process; a second bridge run in the same
/// process (tests, the demo) serves the same metrics.
fn recorder() -> Result<PrometheusHandle, ServeError> {
    static HANDLE: Mutex<Option<PrometheusHandle>> = Mutex::new(None);
    let mut handle = HANDLE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(handle) = handle.as_ref() {
        return Ok(handle.clone());
    }
    let installed = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(names::COMMIT_SECONDS.into()), LATENCY_BUCKETS)?
        .set_buckets_for_metric(
            Matcher::Full(names::RECEIVE_TO_COMMIT_SECONDS.into()),
            LATENCY_BUCKETS,
        )?
        .set_buckets_for_metric(Matcher::Full(names::BATCH_MESSAGES.into()), BATCH_BUCKETS)?
        .install_recorder()?;
    names::describe();
    *handle = Some(installed.clone());
    Ok(installed)
}

/// Binds `listen` and serves the endpoints until the runtime ends. The
/// returned task can be aborted to stop serving.
pub async fn serve(
    listen: SocketAddr,
    health: Arc<Health>,
) -> Result<tokio::task::JoinHandle<()>, ServeError> {
    let handle = recorder()?;
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|source| ServeError::Bind { listen, source })?;
    let local = listener.local_addr().unwrap_or(listen);
    tracing::info!(listen = %local, "serving /metrics, /livez and /readyz");
    let process = Arc::new(metrics_process::Collector::default());
    process.describe();
    Ok(tokio::spawn(accept(listener, handle, health, process)))
}

async fn accept(
    listener: TcpListener,
    handle: PrometheusHandle,
    health: Arc<Health>,
    process: Arc<metrics_process::Collector>,
) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut upkeep = tokio::time::interval(UPKEEP_EVERY);
    loop {
        let (stream, permit) = tokio::select! {
            _ = upkeep.tick() => {
                handle.run_upkeep();
                continue;
            }
            next = next_connection(&listener, &permits) => next,
        };
        let (handle, health, process) = (handle.clone(), health.clone(), process.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let response = respond(&request, &handle, &health, &process);
                async move { Ok::<_, std::convert::Infallible>(response) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            drop(permit);
        });
    }
}

/// The next connection, once one of the [`MAX_CONNECTIONS`] is free.
async fn next_connection(
    listener: &TcpListener,
    permits: &Arc<Semaphore>,
) -> (tokio::net::TcpStream, OwnedSemaphorePermit) {
    let permit = permits.clone().acquire_owned().await.expect("never closed");
    loop {
        match listener.accept().await {
            Ok((stream, _)) => return (stream, permit),
            Err(e) => {
                // Out of file descriptors, usually: try again shortly.
                tracing::warn!(error = %e, "metrics listener cannot accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

fn respond<B>(
    request: &Request<B>,
    handle: &PrometheusHandle,
    health: &Health,
    process: &metrics_process::Collector,
) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".into());
    }
    match request.uri().path() {
        "/metrics" => {
            process.collect();
            super::refresh_certificate_expiry();
            // Sets the `ready` gauge to the probe's verdict.
            health.readiness();
            let mut response = text(StatusCode::OK, handle.render());
            response.headers_mut().insert(
                CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8"
                    .parse()
                    .expect("valid"),
            );
            response
        }
        "/livez" => json(StatusCode::OK, r#"{"status":"alive"}"#.into()),
        "/readyz" => {
            let readiness = health.readiness();
            let status = if readiness.ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            json(status, readiness.to_json())
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /metrics, /livez or /readyz\n".into(),
        ),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        "text/plain; charset=utf-8".parse().expect("valid"),
    );
    response
}

fn json(status: StatusCode, mut body: String) -> Response<Full<Bytes>> {
    body.push('\n');
    let mut response = text(status, body);
    response
        .headers_mut()
        .insert(CONTENT_TYPE, "application/json".parse().expect("valid"));
    response
}
