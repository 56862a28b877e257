//! Zero-copy gRPC framing for the two read methods, `Read` and `ReadBatch`.
//!
//! tonic encodes every response message into its own buffer: the payload of
//! a 1 MiB `ReadResponse` is copied once by `encode` and, while that buffer
//! grows, a second time by `realloc`. Profiling a 1 GiB stream put those two
//! copies at 26% of the server's CPU, more than the CRC (19%) and as much as
//! the kernel's socket copy (18%); see BENCHMARKS.md.
//!
//! This module answers those two methods itself, below tonic's codec but on
//! the same HTTP/2 connection and with the same handlers in `service.rs`.
//! Each response message is framed as two `Bytes` chunks: a small head (the
//! 5-byte gRPC prefix, every field except the payload, then the payload's
//! field key and length) and the payload itself, which is the verified pool
//! buffer. Protobuf decoders accept fields in any order, so putting the
//! payload last is still the same message on the wire. h2 writes large data
//! chunks with vectored I/O instead of copying them, so the only copy left
//! is the kernel's. Errors and the end of the stream become gRPC trailers,
//! exactly as tonic writes them; requests are decoded with the same size
//! limit tonic applies. Every other method goes to the generated service.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{BufMut, Bytes, BytesMut};
use futures::future::BoxFuture;
use futures::{Stream, StreamExt};
use http::{HeaderMap, HeaderValue};
use http_body::Frame;
use http_body_util::{BodyExt, Limited};
use prost::Message;
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};
use storaged_proto::pb;
use storaged_proto::pb::storaged_server::Storaged;
use tonic::Status;
use tonic::body::Body;
use tonic::metadata::MetadataMap;
use tonic::server::NamedService;

use crate::service::StoragedService;

/// Length of the gRPC message prefix: compression flag and big-endian length.
pub const GRPC_PREFIX_BYTES: usize = 5;

const READ_PATH: &str = "/storaged.v1.Storaged/Read";
const READ_BATCH_PATH: &str = "/storaged.v1.Storaged/ReadBatch";

/// A response message with one large `bytes` field that is sent by
/// reference instead of being encoded.
pub trait SplitPayload: Message + Sized {
    /// The payload's protobuf field number.
    const PAYLOAD_FIELD: u32;
    /// Moves the payload out; the emptied field is not encoded (proto3).
    fn take_payload(&mut self) -> Bytes;
}

impl SplitPayload for pb::ReadResponse {
    const PAYLOAD_FIELD: u32 = 2;
    fn take_payload(&mut self) -> Bytes {
        std::mem::take(&mut self.data)
    }
}

impl SplitPayload for pb::ReadBatchResponse {
    const PAYLOAD_FIELD: u32 = 3;
    fn take_payload(&mut self) -> Bytes {
        std::mem::take(&mut self.data)
    }
}

/// Frames one message as (head, payload). Concatenated they are one gRPC
/// length-prefixed message; the payload is not copied.
pub fn encode_split<M: SplitPayload>(
    mut message: M,
    max_message_bytes: usize,
) -> Result<(Bytes, Bytes), Status> {
    let payload = message.take_payload();
    let head_fields_bytes = message.encoded_len();
    let payload_key_bytes = if payload.is_empty() {
        0
    } else {
        key_len(M::PAYLOAD_FIELD) + encoded_len_varint(payload.len() as u64)
    };
    let message_bytes = head_fields_bytes + payload_key_bytes + payload.len();
    let limit = max_message_bytes.min(u32::MAX as usize);
    if message_bytes > limit {
        // The code and wording tonic's own encoder uses for this limit.
        return Err(Status::out_of_range(format!(
            "Error, encoded message length too large: found {message_bytes} bytes, the limit is: {limit} bytes"
        )));
    }
    let mut head =
        BytesMut::with_capacity(GRPC_PREFIX_BYTES + head_fields_bytes + payload_key_bytes);
    head.put_u8(0); // not compressed
    head.put_u32(message_bytes as u32);
    message.encode_raw(&mut head);
    if !payload.is_empty() {
        encode_key(M::PAYLOAD_FIELD, WireType::LengthDelimited, &mut head);
        encode_varint(payload.len() as u64, &mut head);
    }
    Ok((head.freeze(), payload))
}

/// The trailers that end a response: `grpc-status` and, for an error, its
/// message.
fn trailers(status: &Status) -> HeaderMap {
    let mut headers = HeaderMap::with_capacity(3);
    if status.add_header(&mut headers).is_err() {
        // Only a message that cannot be a header value gets here; the code
        // alone still tells the client what happened.
        headers.clear();
        headers.insert("grpc-status", HeaderValue::from(status.code() as i32));
    }
    headers
}

/// An HTTP/2 response body that writes each message's payload by reference.
pub struct SplitBody<S> {
    /// `None` once the trailers are out; dropping the stream early cancels
    /// its reads (the buffer pool keeps in-flight buffers until the kernel
    /// completes them).
    stream: Option<S>,
    pending_payload: Option<Bytes>,
    max_message_bytes: usize,
}

impl<S> SplitBody<S> {
    pub fn new(stream: S, max_message_bytes: usize) -> Self {
        Self {
            stream: Some(stream),
            pending_payload: None,
            max_message_bytes,
        }
    }
}

impl<S, M> http_body::Body for SplitBody<S>
where
    S: Stream<Item = Result<M, Status>> + Unpin,
    M: SplitPayload,
{
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        if let Some(payload) = this.pending_payload.take() {
            return Poll::Ready(Some(Ok(Frame::data(payload))));
        }
        let Some(stream) = this.stream.as_mut() else {
            return Poll::Ready(None);
        };
        let end = match ready!(stream.poll_next_unpin(cx)) {
            Some(Ok(message)) => match encode_split(message, this.max_message_bytes) {
                Ok((head, payload)) => {
                    if !payload.is_empty() {
                        this.pending_payload = Some(payload);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(head))));
                }
                Err(status) => status,
            },
            Some(Err(status)) => status,
            None => Status::ok(""),
        };
        this.stream = None;
        Poll::Ready(Some(Ok(Frame::trailers(trailers(&end)))))
    }

    fn is_end_stream(&self) -> bool {
        self.stream.is_none() && self.pending_payload.is_none()
    }
}

/// Size limits for the intercepted methods, the same ones tonic enforces
/// for the rest of the service.
#[derive(Debug, Clone, Copy)]
pub struct WireLimits {
    pub max_decoding_message_bytes: usize,
    pub max_encoding_message_bytes: usize,
}

/// Decodes the single request message of a server-streaming call.
pub fn decode_unary<T: Message + Default>(
    body: &[u8],
    max_message_bytes: usize,
) -> Result<T, Status> {
    let Some((prefix, rest)) = body.split_first_chunk::<GRPC_PREFIX_BYTES>() else {
        return Err(Status::invalid_argument(format!(
            "request has no message: {} bytes, a gRPC message needs at least {GRPC_PREFIX_BYTES}",
            body.len()
        )));
    };
    match prefix[0] {
        0 => {}
        1 => {
            return Err(Status::unimplemented(
                "compressed requests are not supported; send them uncompressed",
            ));
        }
        flag => {
            return Err(Status::invalid_argument(format!(
                "invalid gRPC compression flag {flag} (must be 0 or 1)"
            )));
        }
    }
    let message_bytes = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
    if message_bytes > max_message_bytes {
        return Err(Status::out_of_range(format!(
            "Error, decoded message length too large: found {message_bytes} bytes, the limit is: {max_message_bytes} bytes"
        )));
    }
    if rest.len() != message_bytes {
        return Err(Status::invalid_argument(format!(
            "request must be exactly one message of {message_bytes} bytes; the body holds {} bytes after the prefix",
            rest.len()
        )));
    }
    T::decode(rest).map_err(|e| Status::invalid_argument(format!("malformed request message: {e}")))
}

/// Reads, decodes and dispatches one server-streaming call, answering with a
/// [`SplitBody`].
async fn serve_streaming<Req, M, St, F, Fut>(
    request: http::Request<Body>,
    limits: WireLimits,
    handler: F,
) -> Result<http::Response<Body>, Status>
where
    Req: Message + Default,
    M: SplitPayload + Send + 'static,
    St: Stream<Item = Result<M, Status>> + Unpin + Send + 'static,
    F: FnOnce(tonic::Request<Req>) -> Fut,
    Fut: Future<Output = Result<tonic::Response<St>, Status>>,
{
    let (parts, body) = request.into_parts();
    if let Some(encoding) = parts.headers.get("grpc-encoding")
        && encoding != "identity"
    {
        return Err(Status::unimplemented(format!(
            "request compression {encoding:?} is not supported; send requests uncompressed"
        )));
    }
    let body_limit = limits
        .max_decoding_message_bytes
        .saturating_add(GRPC_PREFIX_BYTES);
    let body = Limited::new(body, body_limit)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                Status::out_of_range(format!(
                    "request body exceeds the {} byte message limit",
                    limits.max_decoding_message_bytes
                ))
            } else {
                Status::cancelled(format!("reading the request: {e}"))
            }
        })?
        .to_bytes();
    let message: Req = decode_unary(&body, limits.max_decoding_message_bytes)?;
    let request = tonic::Request::from_parts(
        MetadataMap::from_headers(parts.headers),
        parts.extensions,
        message,
    );
    let (metadata, stream, _) = handler(request).await?.into_parts();
    let mut response = http::Response::new(Body::new(SplitBody::new(
        stream,
        limits.max_encoding_message_bytes,
    )));
    *response.headers_mut() = metadata.into_headers();
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    Ok(response)
}

/// The storaged service with `Read` and `ReadBatch` answered zero-copy.
/// `inner` is the tonic-generated server for the same service.
#[derive(Clone)]
pub struct ZeroCopyReads<S> {
    inner: S,
    service: StoragedService,
    limits: WireLimits,
}

impl<S> ZeroCopyReads<S> {
    pub fn new(inner: S, service: StoragedService, limits: WireLimits) -> Self {
        Self {
            inner,
            service,
            limits,
        }
    }
}

impl<S: NamedService> NamedService for ZeroCopyReads<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> tower_service::Service<http::Request<Body>> for ZeroCopyReads<S>
where
    S: tower_service::Service<
            http::Request<Body>,
            Response = http::Response<Body>,
            Error = Infallible,
        >,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let service = self.service.clone();
        let limits = self.limits;
        match request.uri().path() {
            READ_PATH => Box::pin(async move {
                let response = serve_streaming(request, limits, |r| async move {
                    Storaged::read(&service, r).await
                })
                .await;
                Ok(response.unwrap_or_else(Status::into_http))
            }),
            READ_BATCH_PATH => Box::pin(async move {
                let response = serve_streaming(request, limits, |r| async move {
                    Storaged::read_batch(&service, r).await
                })
                .await;
                Ok(response.unwrap_or_else(Status::into_http))
            }),
            _ => Box::pin(self.inner.call(request)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    /// The gRPC status code a trailers map carries.
    fn trailer_code(headers: &HeaderMap) -> Option<Code> {
        Status::from_header_map(headers).map(|s| s.code())
    }

    fn concat(head: &Bytes, payload: &Bytes) -> Vec<u8> {
        [head.as_ref(), payload.as_ref()].concat()
    }

    // Guards against a wrong payload field number or length: the split
    // framing must decode to the very message tonic would have sent.
    #[test]
    fn split_frames_decode_to_the_original_message() {
        let payload = Bytes::from((0..300_000u32).map(|i| i as u8).collect::<Vec<_>>());
        let read = pb::ReadResponse {
            offset: 1 << 40,
            data: payload.clone(),
            object_size: 7 << 30,
            range_length: 123_456,
        };
        let (head, body) = encode_split(read.clone(), 4 << 20).unwrap();
        assert_eq!(
            body.as_ptr(),
            payload.as_ptr(),
            "payload must not be copied"
        );
        let wire = concat(&head, &body);
        assert_eq!(wire[0], 0);
        assert_eq!(
            u32::from_be_bytes(wire[1..5].try_into().unwrap()) as usize,
            wire.len() - 5
        );
        assert_eq!(pb::ReadResponse::decode(&wire[5..]).unwrap(), read);

        let batch = pb::ReadBatchResponse {
            index: 77,
            offset: 4096,
            data: payload,
            last: true,
            error: None,
            item_length: 300_000,
        };
        let (head, body) = encode_split(batch.clone(), 4 << 20).unwrap();
        let wire = concat(&head, &body);
        assert_eq!(pb::ReadBatchResponse::decode(&wire[5..]).unwrap(), batch);
    }

    // Guards against emitting a zero-length payload chunk (or a field key
    // without data) for messages that carry only an error or the end.
    #[test]
    fn empty_payload_is_head_only() {
        let batch = pb::ReadBatchResponse {
            index: 3,
            last: true,
            error: Some(pb::ItemError {
                code: Code::NotFound as i32,
                message: "no such object".into(),
            }),
            ..Default::default()
        };
        let (head, body) = encode_split(batch.clone(), 1024).unwrap();
        assert!(body.is_empty());
        assert_eq!(pb::ReadBatchResponse::decode(&head[5..]).unwrap(), batch);
    }

    // Guards against sending a message past the encoding limit.
    #[test]
    fn encoding_limit_is_enforced() {
        let read = pb::ReadResponse {
            data: Bytes::from(vec![1u8; 2048]),
            ..Default::default()
        };
        let err = encode_split(read, 2000).unwrap_err();
        assert_eq!(err.code(), Code::OutOfRange);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
        // Guards the request decoder against any bytes a client sends: a
        // message that decodes re-encodes to one that decodes to itself;
        // anything else is a status, never a panic.
        #[test]
        fn any_request_bytes_decode_or_fail(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300), framed in proptest::prelude::any::<bool>()) {
            let mut b = body;
            if framed {
                let n = b.len() as u32;
                let mut f = vec![0u8];
                f.extend_from_slice(&n.to_be_bytes());
                f.extend_from_slice(&b);
                b = f;
            }
            fn check<T: Message + Default + PartialEq + std::fmt::Debug>(b: &[u8]) -> Result<(), proptest::test_runner::TestCaseError> {
                if let Ok(m) = decode_unary::<T>(b, 4096) {
                    let again = T::decode(&m.encode_to_vec()[..]).unwrap();
                    proptest::prop_assert_eq!(again, m);
                }
                Ok(())
            }
            check::<pb::ReadRequest>(&b)?;
            check::<pb::ReadBatchRequest>(&b)?;
            check::<pb::ReadIntoRequest>(&b)?;
            check::<pb::ScrubRequest>(&b)?;
            check::<pb::ListObjectsRequest>(&b)?;
        }
    }

    #[test]
    fn decode_unary_rejects_bad_framing_with_clear_errors() {
        let request = pb::ReadRequest {
            dataset: "ds".into(),
            path: "a/b".into(),
            offset: 5,
            length: Some(9),
            dataset_id: None,
        };
        let mut framed = vec![0u8];
        framed.extend_from_slice(&(request.encoded_len() as u32).to_be_bytes());
        request.encode(&mut framed).unwrap();
        assert_eq!(
            decode_unary::<pb::ReadRequest>(&framed, 1024).unwrap(),
            request
        );

        let code = |body: &[u8], limit| {
            decode_unary::<pb::ReadRequest>(body, limit)
                .unwrap_err()
                .code()
        };
        assert_eq!(code(&[], 1024), Code::InvalidArgument);
        assert_eq!(
            code(&framed[..framed.len() - 1], 1024),
            Code::InvalidArgument
        );
        assert_eq!(
            code(&[framed.clone(), framed.clone()].concat(), 1024),
            Code::InvalidArgument
        );
        assert_eq!(code(&framed, 4), Code::OutOfRange);
        let mut compressed = framed.clone();
        compressed[0] = 1;
        assert_eq!(code(&compressed, 1024), Code::Unimplemented);
        compressed[0] = 9;
        assert_eq!(code(&compressed, 1024), Code::InvalidArgument);
        let garbage = [0u8, 0, 0, 0, 3, 0xff, 0xff, 0xff];
        assert_eq!(code(&garbage, 1024), Code::InvalidArgument);
    }

    fn collect_body<S, M>(body: SplitBody<S>) -> (Vec<u8>, usize, HeaderMap)
    where
        S: Stream<Item = Result<M, Status>> + Unpin,
        M: SplitPayload,
    {
        futures::executor::block_on(async move {
            let mut body = std::pin::pin!(body);
            let mut data = Vec::new();
            let mut chunks = 0;
            let mut trailers = None;
            while let Some(frame) =
                std::future::poll_fn(|cx| http_body::Body::poll_frame(body.as_mut(), cx)).await
            {
                let frame = frame.unwrap();
                match frame.into_data() {
                    Ok(chunk) => {
                        chunks += 1;
                        data.extend_from_slice(&chunk);
                    }
                    Err(frame) => {
                        assert!(trailers.is_none(), "one trailers frame");
                        trailers = Some(frame.into_trailers().unwrap());
                    }
                }
            }
            assert!(http_body::Body::is_end_stream(&*body));
            (data, chunks, trailers.expect("trailers end the body"))
        })
    }

    // Guards against losing the error or the OK status at the end of a
    // zero-copy stream, and against sending data after an error.
    #[test]
    fn body_ends_with_status_trailers() {
        let message = |offset: u64| pb::ReadResponse {
            offset,
            data: Bytes::from(vec![offset as u8; 1000]),
            object_size: 2000,
            range_length: 2000,
        };
        let ok = futures::stream::iter(vec![Ok(message(0)), Ok(message(1000))]);
        let (data, chunks, trailers) = collect_body(SplitBody::new(ok, 4096));
        assert_eq!(chunks, 4, "head and payload per message");
        assert_eq!(trailer_code(&trailers), Some(Code::Ok));
        let first_len = u32::from_be_bytes(data[1..5].try_into().unwrap()) as usize;
        let first = pb::ReadResponse::decode(&data[5..5 + first_len]).unwrap();
        let second = pb::ReadResponse::decode(&data[10 + first_len..]).unwrap();
        assert_eq!((first, second), (message(0), message(1000)));

        let failing = futures::stream::iter(vec![
            Ok(message(0)),
            Err(Status::data_loss(
                "checksum mismatch in ds/a at device 2 offset 4096",
            )),
            Ok(message(1000)),
        ]);
        let (data, chunks, trailers) = collect_body(SplitBody::new(failing, 4096));
        assert_eq!(chunks, 2, "nothing after the error");
        assert_eq!(data.len(), 5 + first_len);
        let status = Status::from_header_map(&trailers).unwrap();
        assert_eq!(status.code(), Code::DataLoss);
        assert!(status.message().contains("checksum mismatch"));

        let too_big = futures::stream::iter(vec![Ok(message(0))]);
        let (_, chunks, trailers) = collect_body(SplitBody::new(too_big, 100));
        assert_eq!(chunks, 0);
        assert_eq!(trailer_code(&trailers), Some(Code::OutOfRange));
    }
}
