//! The gRPC server: every HTTP/2 limit set explicitly, the storaged service,
//! `grpc.health.v1.Health` and server reflection, and a bounded graceful
//! shutdown (hyper's graceful shutdown has been seen to hang, so draining
//! has a deadline).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use storaged_proto::pb::storaged_server::StoragedServer;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;

use crate::config::ServerLimits;
use crate::service::StoragedService;
use crate::store::Store;
use crate::wire::{WireLimits, ZeroCopyReads};

/// Why serving stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Serves until `shutdown` resolves, then drains for at most
/// `limits.shutdown_grace_s`. `on_bound` gets the bound address (useful
/// with port 0).
pub async fn serve(
    store: Arc<Store>,
    listen: SocketAddr,
    limits: &ServerLimits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    on_bound: impl FnOnce(SocketAddr),
) -> Result<(), ServeError> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: listen,
            source,
        })?;
    let bound = listener.local_addr()?;
    let incoming = TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(Duration::from_secs(60)));

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<StoragedServer<StoragedService>>()
        .await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(storaged_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(storaged_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    let storaged = StoragedService::new(store);
    let generated = StoragedServer::new(storaged.clone())
        .max_decoding_message_size(limits.max_decoding_message_bytes)
        .max_encoding_message_size(limits.max_encoding_message_bytes);
    let service = ZeroCopyReads::new(
        generated,
        storaged,
        WireLimits {
            max_decoding_message_bytes: limits.max_decoding_message_bytes,
            max_encoding_message_bytes: limits.max_encoding_message_bytes,
        },
    );

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = Server::builder()
        .max_concurrent_streams(limits.max_concurrent_streams)
        .http2_max_local_error_reset_streams(Some(limits.max_local_error_reset_streams))
        .max_frame_size(limits.max_frame_bytes)
        .initial_stream_window_size(limits.initial_stream_window_bytes)
        .initial_connection_window_size(limits.initial_connection_window_bytes)
        .http2_keepalive_interval(Some(Duration::from_secs(limits.keepalive_interval_s)))
        .http2_keepalive_timeout(Some(Duration::from_secs(limits.keepalive_timeout_s)))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, async {
            let _ = stop_rx.await;
        });
    on_bound(bound);
    tracing::info!(%bound, "serving gRPC");
    let mut server = Box::pin(server);
    tokio::select! {
        r = &mut server => r?,
        () = shutdown => {
            tracing::info!("shutting down");
            health_reporter
                .set_not_serving::<StoragedServer<StoragedService>>()
                .await;
            let _ = stop_tx.send(());
            let grace = Duration::from_secs(limits.shutdown_grace_s);
            match tokio::time::timeout(grace, server).await {
                Ok(r) => r?,
                Err(_) => tracing::warn!(grace_s = limits.shutdown_grace_s, "drain deadline passed; closing remaining streams"),
            }
        }
    }
    Ok(())
}
