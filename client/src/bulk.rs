//! The bulk channel's client side: `ReadInto` without HTTP/2 on the same
//! host (wire format: `storaged_proto::bulk`).
//!
//! One request per connection at a time, written and answered on the
//! caller's own task: no connection task, no stream task, no buffer task
//! in between, which is where a gRPC call's wakeups went. Concurrent
//! callers each take an idle connection from the pool or open one (a
//! connect and a hello, about as much as one small read); a finished call
//! gives its connection back. A call dropped before its reply drops its
//! connection, so no reply can ever be read by the wrong call.

use std::io::ErrorKind;
use std::path::PathBuf;
use std::sync::Mutex;

use storaged_proto::bulk::{Hello, HelloReply, ReadIntoFrame, ReadIntoReply, VERSION};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tonic::{Code, Status};

use crate::ClientError;

/// Connections of one client at once: calls beyond wait for one to come
/// free. storaged counts each against the uid's connections
/// (`connections_per_peer_max`, 256 by default), which several processes
/// of one user share.
const CONNECTIONS_MAX: usize = 32;
/// Idle connections kept for later calls (more are closed when given
/// back).
const IDLE_CONNECTIONS_MAX: usize = 16;

/// Idle connections of a pool (Unix or TCP), at most
/// `IDLE_CONNECTIONS_MAX`: more given back are closed.
pub(crate) struct IdleConnections<S>(Mutex<Vec<S>>);

impl<S> Default for IdleConnections<S> {
    fn default() -> Self {
        Self(Mutex::default())
    }
}

impl<S> IdleConnections<S> {
    pub(crate) fn take(&self) -> Option<S> {
        self.0.lock().expect("bulk pool poisoned").pop()
    }

    pub(crate) fn give_back(&self, conn: S) {
        let mut idle = self.0.lock().expect("bulk pool poisoned");
        if idle.len() < IDLE_CONNECTIONS_MAX {
            idle.push(conn);
        }
    }
}

/// Connections to one storaged's bulk socket.
pub(crate) struct BulkPool {
    path: PathBuf,
    /// The `authorization` value gRPC calls carry, if any.
    authorization: Option<String>,
    idle: IdleConnections<UnixStream>,
    slots: tokio::sync::Semaphore,
    /// A failed connect was logged (once per pool).
    unreachable_logged: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for BulkPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token itself.
        f.debug_struct("BulkPool")
            .field("path", &self.path)
            .field("token", &self.authorization.as_ref().map(|_| "<set>"))
            .finish_non_exhaustive()
    }
}

/// Why a bulk channel call did not answer.
#[derive(Debug)]
pub(crate) enum BulkError {
    /// No connection could be opened or greeted (socket gone, refused,
    /// another version, credentials refused): nothing was sent, so the
    /// call can go over gRPC instead (the first such error is logged).
    Unreachable,
    /// The call was sent and failed.
    Call(ClientError),
}

impl BulkPool {
    pub(crate) fn new(path: PathBuf, authorization: Option<String>) -> Self {
        Self {
            path,
            authorization,
            idle: IdleConnections::default(),
            slots: tokio::sync::Semaphore::new(CONNECTIONS_MAX),
            unreachable_logged: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Sends `frame` and returns storaged's reply. A pooled connection
    /// that storaged closed while it sat idle (its idle deadline) fails at
    /// once; the call then goes once more on a new connection.
    pub(crate) async fn read_into(
        &self,
        frame: &ReadIntoFrame,
    ) -> Result<ReadIntoReply, BulkError> {
        let request = frame.encode().map_err(|e| {
            BulkError::Call(ClientError::InvalidArgument(format!(
                "bulk channel request: {e}"
            )))
        })?;
        let _slot = self
            .slots
            .acquire()
            .await
            .expect("the semaphore is never closed");
        let mut pooled = self.idle.take();
        loop {
            let reused = pooled.is_some();
            let mut conn = match pooled.take() {
                Some(conn) => conn,
                None => self.connect().await.map_err(|e| {
                    let logged = std::sync::atomic::Ordering::Relaxed;
                    if !self.unreachable_logged.swap(true, logged) {
                        tracing::warn!(error = %e, "bulk channel unreachable; reading over gRPC");
                    }
                    BulkError::Unreachable
                })?,
            };
            match exchange(&mut conn, &request, frame.items.len()).await {
                Ok(reply) => {
                    self.idle.give_back(conn);
                    return Ok(reply);
                }
                Err(Exchange::Io(_)) if reused => continue,
                Err(Exchange::Io(e)) => {
                    let message = format!("bulk channel {}: {e}", self.path.display());
                    return Err(BulkError::Call(ClientError::Status(Status::unavailable(
                        message,
                    ))));
                }
                Err(Exchange::Protocol(m)) => {
                    return Err(BulkError::Call(ClientError::Protocol(m)));
                }
            }
        }
    }

    /// A new connection, past its hello.
    async fn connect(&self) -> Result<UnixStream, ClientError> {
        let mut conn = UnixStream::connect(&self.path)
            .await
            .map_err(|e| self.unavailable(e))?;
        greet(&mut conn, self.authorization.clone(), |e| {
            self.unavailable(e)
        })
        .await?;
        Ok(conn)
    }

    /// A new connection that blocks, past its hello, for a thread of its
    /// own: each call then costs one write and the reads of its reply on
    /// the calling thread, with no task or thread between (`timeout`
    /// bounds each read and write: a storaged that stops answering fails
    /// the call instead of holding the thread).
    pub(crate) fn connect_blocking(
        &self,
        timeout: std::time::Duration,
    ) -> Result<std::os::unix::net::UnixStream, ClientError> {
        use std::io::{Read, Write};
        let mut conn =
            std::os::unix::net::UnixStream::connect(&self.path).map_err(|e| self.unavailable(e))?;
        let timeout = Some(timeout.max(std::time::Duration::from_millis(1)));
        conn.set_read_timeout(timeout)
            .and_then(|()| conn.set_write_timeout(timeout))
            .map_err(|e| self.unavailable(e))?;
        conn.write_all(&self.hello()?).map_err(blocking_io)?;
        let mut fixed = [0u8; HelloReply::FIXED_BYTES];
        conn.read_exact(&mut fixed).map_err(blocking_io)?;
        let (version, code, message_len) = decode_hello_reply(&fixed)?;
        let mut message = vec![0u8; message_len];
        conn.read_exact(&mut message).map_err(blocking_io)?;
        hello_answer(version, code, &message)?;
        Ok(conn)
    }

    fn hello(&self) -> Result<Vec<u8>, ClientError> {
        hello_bytes(self.authorization.clone())
    }

    fn unavailable(&self, e: std::io::Error) -> ClientError {
        ClientError::Status(Status::unavailable(format!(
            "bulk channel {}: {e}",
            self.path.display()
        )))
    }
}

/// A hello carrying `authorization`.
fn hello_bytes(authorization: Option<String>) -> Result<Vec<u8>, ClientError> {
    Hello {
        version: VERSION,
        token: authorization,
    }
    .encode()
    .map_err(|e| ClientError::InvalidArgument(format!("bulk channel hello: {e}")))
}

/// Sends the hello on a new connection and reads storaged's answer to it;
/// `unavailable` says what an I/O error on it means.
pub(crate) async fn greet<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    conn: &mut S,
    authorization: Option<String>,
    unavailable: impl Fn(std::io::Error) -> ClientError,
) -> Result<(), ClientError> {
    conn.write_all(&hello_bytes(authorization)?)
        .await
        .map_err(&unavailable)?;
    let mut fixed = [0u8; HelloReply::FIXED_BYTES];
    conn.read_exact(&mut fixed).await.map_err(&unavailable)?;
    let (version, code, message_len) = decode_hello_reply(&fixed)?;
    let mut message = vec![0u8; message_len];
    conn.read_exact(&mut message).await.map_err(&unavailable)?;
    hello_answer(version, code, &message)
}

fn decode_hello_reply(
    fixed: &[u8; HelloReply::FIXED_BYTES],
) -> Result<(u16, u32, usize), ClientError> {
    HelloReply::decode_fixed(fixed)
        .map_err(|e| ClientError::Protocol(format!("bulk channel hello reply: {e}")))
}

/// The hello's answer as a result: code 0 admits the connection.
fn hello_answer(version: u16, code: u32, message: &[u8]) -> Result<(), ClientError> {
    if code == 0 {
        return Ok(());
    }
    Err(ClientError::Status(Status::new(
        Code::from(code as i32),
        format!(
            "bulk channel (server version {version}): {}",
            String::from_utf8_lossy(message)
        ),
    )))
}

/// How one request and reply failed.
enum Exchange {
    /// The socket broke (storaged gone, or the connection closed).
    Io(std::io::Error),
    /// storaged answered something that is not a reply.
    Protocol(String),
}

/// Sends `request` (of `items` items) and reads its reply.
async fn exchange(
    conn: &mut UnixStream,
    request: &[u8],
    items: usize,
) -> Result<ReadIntoReply, Exchange> {
    conn.write_all(request).await.map_err(Exchange::Io)?;
    let mut len = [0u8; 4];
    conn.read_exact(&mut len).await.map_err(Exchange::Io)?;
    let mut body = vec![0u8; reply_bytes(len, items)?];
    conn.read_exact(&mut body).await.map_err(Exchange::Io)?;
    decode_reply(&body)
}

/// [`exchange`] on a connection that blocks.
fn exchange_blocking(
    conn: &mut std::os::unix::net::UnixStream,
    request: &[u8],
    items: usize,
) -> Result<ReadIntoReply, Exchange> {
    use std::io::{Read, Write};
    conn.write_all(request).map_err(Exchange::Io)?;
    let mut len = [0u8; 4];
    conn.read_exact(&mut len).map_err(Exchange::Io)?;
    let mut body = vec![0u8; reply_bytes(len, items)?];
    conn.read_exact(&mut body).map_err(Exchange::Io)?;
    decode_reply(&body)
}

/// The reply's length from its prefix, refused when no reply to `items`
/// items can be that long.
fn reply_bytes(len: [u8; 4], items: usize) -> Result<usize, Exchange> {
    let len = u32::from_le_bytes(len);
    let max = ReadIntoReply::frame_bytes_max(items);
    if u64::from(len) > max {
        return Err(Exchange::Protocol(format!(
            "bulk channel reply of {len} bytes to {items} items; at most {max} can be right"
        )));
    }
    Ok(len as usize)
}

fn decode_reply(body: &[u8]) -> Result<ReadIntoReply, Exchange> {
    ReadIntoReply::decode(body).map_err(|e| Exchange::Protocol(format!("bulk channel reply: {e}")))
}

/// One `ReadInto` on a blocking connection (see
/// [`BulkPool::connect_blocking`]). Any failure leaves the connection in
/// an unknown state: the caller drops it.
pub(crate) fn read_into_blocking(
    conn: &mut std::os::unix::net::UnixStream,
    frame: &ReadIntoFrame,
) -> Result<ReadIntoReply, ClientError> {
    let request = frame
        .encode()
        .map_err(|e| ClientError::InvalidArgument(format!("bulk channel request: {e}")))?;
    exchange_blocking(conn, &request, frame.items.len()).map_err(|e| match e {
        Exchange::Io(e) => blocking_io(e),
        Exchange::Protocol(m) => ClientError::Protocol(m),
    })
}

/// A blocking connection's I/O error: its timeout running out means
/// storaged is there but did not answer in time (DEADLINE_EXCEEDED, not
/// worth waiting for again); anything else, that the connection broke.
fn blocking_io(e: std::io::Error) -> ClientError {
    if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) {
        return ClientError::Status(Status::deadline_exceeded(format!(
            "bulk channel: storaged did not answer in time ({e})"
        )));
    }
    ClientError::Status(Status::unavailable(format!("bulk channel: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_never_shows_the_token() {
        // Guards against a client's `{:?}` (logs, panics) printing its
        // bearer token through the bulk pool it holds.
        let pool = BulkPool::new("/run/x.bulk".into(), Some("Bearer sdt_secret".into()));
        let shown = format!("{pool:?}");
        assert!(!shown.contains("sdt_secret"), "{shown}");
        assert!(shown.contains("<set>"), "{shown}");
    }
}
