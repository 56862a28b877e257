//! The HTTP endpoint Prometheus scrapes: `GET /metrics` answers the text
//! exposition (format 0.0.4), refreshed from a status snapshot first;
//! anything else is a 404 or 405.
//!
//! It is as careful as the gRPC side with what it accepts: HTTP/1.1 only,
//! at most [`CONNECTIONS_MAX`] connections at once, request headers within
//! [`HEADER_TIMEOUT`], and each connection closed after
//! [`CONNECTION_TIMEOUT`] whatever it does.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use storaged_proto::pb;

use super::MetricsError;

/// Scrapers served at once; more wait in the accept queue.
pub const CONNECTIONS_MAX: usize = 16;
/// Time a client has to send its request headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a connection lives.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// How often histogram samples are folded in between scrapes (bounds the
/// memory they take).
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Where the numbers come from at each scrape.
pub type Snapshot = Arc<dyn Fn() -> pb::StatusResponse + Send + Sync>;

/// Binds the endpoint's address (before anything else starts, so a port
/// in use fails the start at once).
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, MetricsError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })
}

/// Serves the metrics on `listener` until the runtime stops. Returns the
/// address bound (port 0 picks one).
pub fn serve(
    listener: tokio::net::TcpListener,
    handle: PrometheusHandle,
    snapshot: Snapshot,
) -> Result<SocketAddr, MetricsError> {
    let bound = listener.local_addr().map_err(MetricsError::Address)?;
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    let slots = Arc::new(tokio::sync::Semaphore::new(CONNECTIONS_MAX));
    tokio::spawn(async move {
        loop {
            let Ok(permit) = Arc::clone(&slots).acquire_owned().await else {
                return;
            };
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let handle = handle.clone();
            let snapshot = Arc::clone(&snapshot);
            tokio::spawn(async move {
                let _permit = permit;
                let service = hyper::service::service_fn(move |req| {
                    let handle = handle.clone();
                    let snapshot = Arc::clone(&snapshot);
                    async move { Ok::<_, Infallible>(answer(&req, &handle, &snapshot)) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .max_buf_size(64 << 10)
                    .serve_connection(TokioIo::new(stream), service);
                let _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn).await;
            });
        }
    });
    tracing::info!(%bound, "serving Prometheus metrics at /metrics");
    Ok(bound)
}

fn answer<B>(
    req: &hyper::Request<B>,
    handle: &PrometheusHandle,
    snapshot: &Snapshot,
) -> hyper::Response<Full<Bytes>> {
    let reply = |status: u16, content_type: &str, body: String| {
        hyper::Response::builder()
            .status(status)
            .header(hyper::header::CONTENT_TYPE, content_type)
            .body(Full::new(Bytes::from(body)))
            .expect("a static response is valid")
    };
    if req.uri().path() != "/metrics" {
        return reply(404, "text/plain", "only /metrics is here\n".into());
    }
    if req.method() != hyper::Method::GET && req.method() != hyper::Method::HEAD {
        return reply(405, "text/plain", "GET /metrics\n".into());
    }
    super::publish_status(&snapshot());
    reply(
        200,
        "text/plain; version=0.0.4; charset=utf-8",
        handle.render(),
    )
}
