//! Per-RPC latency and result, and a tracing span, as a tower layer
//! around the gRPC server.
//!
//! Every call runs inside an `rpc` span with its method; the service
//! records the dataset (when it authorizes the call) and the object into
//! it, and the layer records the response's bytes and gRPC code when the
//! response ends, then logs one `rpc` event at debug level
//! (`RUST_LOG=storaged::metrics::rpc=debug`).
//!
//! The clock starts when the request arrives and stops when the response
//! ends: at its trailers (where gRPC puts the status of a call that sent a
//! body), or at the headers of a trailers-only answer, or when the body is
//! dropped unfinished (the client went away: `CANCELLED`). The method
//! label is the RPC's name when it is one this server has, and `other`
//! otherwise, so a client cannot grow the label set by inventing paths.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use tracing::Instrument;

/// Adds [`super::RPC_SECONDS`] to every call.
#[derive(Debug, Clone)]
pub struct RpcMetricsLayer {
    methods: Arc<HashSet<String>>,
}

impl RpcMetricsLayer {
    /// The methods of the services in these encoded file descriptor sets
    /// (and gRPC reflection's) are labelled by name.
    pub fn new(descriptor_sets: &[&[u8]]) -> Self {
        let mut methods = HashSet::new();
        for set in descriptor_sets {
            let Ok(set) = <prost_types::FileDescriptorSet as prost::Message>::decode(*set) else {
                continue;
            };
            for file in &set.file {
                let package = file.package();
                for service in &file.service {
                    for method in &service.method {
                        methods.insert(format!("/{package}.{}/{}", service.name(), method.name()));
                    }
                }
            }
        }
        for v in ["v1", "v1alpha"] {
            methods.insert(format!(
                "/grpc.reflection.{v}.ServerReflection/ServerReflectionInfo"
            ));
        }
        Self {
            methods: Arc::new(methods),
        }
    }

    fn label(&self, path: &str) -> String {
        if self.methods.contains(path) {
            path.rsplit('/').next().unwrap_or("other").to_owned()
        } else {
            "other".to_owned()
        }
    }
}

impl<S> tower::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;

    fn layer(&self, inner: S) -> RpcMetrics<S> {
        RpcMetrics {
            inner,
            layer: self.clone(),
        }
    }
}

/// See [`RpcMetricsLayer`].
#[derive(Debug, Clone)]
pub struct RpcMetrics<S> {
    inner: S,
    layer: RpcMetricsLayer,
}

impl<S, B, ResBody> tower_service::Service<http::Request<B>> for RpcMetrics<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: http_body::Body + Unpin,
    ResBody::Data: bytes::Buf,
{
    type Response = http::Response<Timed<ResBody>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let method = self.layer.label(request.uri().path());
        let span = tracing::info_span!(
            "rpc",
            method = %method,
            dataset = tracing::field::Empty,
            object = tracing::field::Empty,
            bytes = tracing::field::Empty,
            code = tracing::field::Empty,
        );
        let started = Instant::now();
        let response = {
            let _in = span.enter();
            self.inner.call(request)
        };
        let call_span = span.clone();
        Box::pin(
            async move {
                let response = response.await?;
                // A trailers-only answer carries the status in its headers.
                let code = grpc_code(response.headers());
                Ok(response.map(|body| Timed {
                    inner: body,
                    call: Some(Call {
                        method,
                        started,
                        code,
                        bytes: 0,
                        span: call_span,
                    }),
                }))
            }
            .instrument(span),
        )
    }
}

/// One call being timed.
#[derive(Debug)]
struct Call {
    method: String,
    started: Instant,
    code: Option<tonic::Code>,
    /// Response body bytes so far (gRPC framing included).
    bytes: u64,
    span: tracing::Span,
}

impl Call {
    fn finish(self, code: tonic::Code) {
        let seconds = self.started.elapsed().as_secs_f64();
        let name = code_name(code);
        self.span.record("bytes", self.bytes);
        self.span.record("code", name);
        tracing::debug!(parent: &self.span, seconds, "rpc");
        metrics::histogram!(
            super::RPC_SECONDS,
            "method" => self.method,
            "code" => name,
        )
        .record(seconds);
    }
}

/// Records a call served outside gRPC (the bulk channel) under `method`.
pub fn record_call(method: &'static str, code: tonic::Code, seconds: f64) {
    metrics::histogram!(
        super::RPC_SECONDS,
        "method" => method,
        "code" => code_name(code),
    )
    .record(seconds);
}

fn grpc_code(headers: &http::HeaderMap) -> Option<tonic::Code> {
    headers
        .get("grpc-status")
        .map(|v| tonic::Code::from_bytes(v.as_bytes()))
}

/// The code's name as gRPC spells it (`OK`, `NOT_FOUND`, ...).
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// A response body that records its call when it ends.
#[derive(Debug)]
pub struct Timed<B> {
    inner: B,
    call: Option<Call>,
}

impl<B: http_body::Body + Unpin> http_body::Body for Timed<B>
where
    B::Data: bytes::Buf,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(call)) = (frame.data_ref(), self.call.as_mut()) {
                    call.bytes += bytes::Buf::remaining(data) as u64;
                }
                if let Some(code) = frame.trailers_ref().and_then(grpc_code)
                    && let Some(call) = self.call.take()
                {
                    call.finish(code);
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(call) = self.call.take() {
                    call.finish(tonic::Code::Internal);
                }
            }
            Poll::Ready(None) => {
                if let Some(call) = self.call.take() {
                    let code = call.code.unwrap_or(tonic::Code::Ok);
                    call.finish(code);
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for Timed<B> {
    fn drop(&mut self) {
        if let Some(call) = self.call.take() {
            // A trailers-only answer whose empty body was never polled, or
            // a call its client left.
            let code = call.code.unwrap_or(tonic::Code::Cancelled);
            call.finish(code);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Guards against label sets a client can grow: only this server's
    /// methods are named, anything else is `other`.
    #[test]
    fn only_known_methods_are_labelled() {
        let layer = RpcMetricsLayer::new(&[
            storaged_proto::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
        ]);
        assert_eq!(layer.label("/storaged.v1.Storaged/Read"), "Read");
        assert_eq!(layer.label("/storaged.v1.Storaged/ReadInto"), "ReadInto");
        assert_eq!(layer.label("/grpc.health.v1.Health/Check"), "Check");
        assert_eq!(layer.label("/storaged.v1.Storaged/Nope"), "other");
        assert_eq!(layer.label("/x/../../Read"), "other");
        assert_eq!(layer.label(""), "other");
    }
}
