//! Deadlines (`grpc-timeout`) of calls that have not answered yet.
//!
//! tonic enforces a client's deadline until the response starts, but
//! answers a call that runs past it with CANCELLED ("Timeout expired");
//! the gRPC spec says DEADLINE_EXCEEDED, which is what clients retry on
//! and report. [`DeadlineLayer`] sits inside tonic's timeout and answers
//! first, a little before it (`MARGIN_MAX`, or a tenth of a short
//! deadline), with DEADLINE_EXCEEDED; dropping the call's future cancels
//! its work as tonic's would. Response streams end at the deadline in the
//! service (`service::respond`).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

/// How much earlier than tonic's timer this layer answers.
const MARGIN_MAX: Duration = Duration::from_millis(5);

/// A `grpc-timeout` value: at most 8 digits and a unit (H, M, S, m, u, n).
pub fn parse_grpc_timeout(v: &str) -> Option<std::time::Duration> {
    use std::time::Duration;
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// See the module docs.
#[derive(Debug, Clone, Copy, Default)]
pub struct DeadlineLayer;

impl<S> tower::Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;

    fn layer(&self, inner: S) -> Deadline<S> {
        Deadline(inner)
    }
}

/// See [`DeadlineLayer`].
#[derive(Debug, Clone)]
pub struct Deadline<S>(S);

impl<S, B, ResBody> tower_service::Service<http::Request<B>> for Deadline<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let timeout = request
            .headers()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout);
        let response = self.0.call(request);
        Box::pin(async move {
            let Some(timeout) = timeout else {
                return response.await;
            };
            let early = timeout.saturating_sub(MARGIN_MAX.min(timeout / 10));
            match tokio::time::timeout(early, response).await {
                Ok(r) => r,
                Err(_) => Ok(tonic::Status::deadline_exceeded(
                    "the call's deadline (grpc-timeout) passed before it was answered",
                )
                .into_http()),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_by_the_spec_and_nothing_else_does() {
        // Guards against a deadline a client set being ignored, or a
        // malformed one being taken for a tiny or a huge one.
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(
            parse_grpc_timeout("99999999n"),
            Some(Duration::from_nanos(99_999_999))
        );
        for bad in ["", "S", "5", "5s", "-5S", "123456789S", "5 S", "1.5S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }
}
