//! The TCP bulk channel's client side: reads from a storaged on another
//! host, received straight into this process's memory (wire format:
//! `storaged_proto::bulk`, version 2 `Read`).
//!
//! A request names each item and where in the caller's region its window
//! goes; storaged answers item by item, in the order they are read: a
//! header with the window's checksum-block CRCs, then the window itself,
//! which is received (`recv`) at its place in the region, with no copy in
//! user space on either side and no HTTP/2 framing around it. Every window
//! is checked against its CRCs here before anyone sees it (storaged may
//! leave its own check out: `ReadFrame::client_verifies`); a window that
//! fails is reported to the caller as [`Piece::Mismatch`], which reads it
//! again through a path storaged verifies and counts where the damage was.
//!
//! Connections are pooled as the Unix bulk channel's are (one request at a
//! time each; concurrent calls open more, up to `connections_max`, the
//! nconnect of NFS clients): a connection whose call was dropped mid-answer
//! is closed, so no answer is ever read by the wrong call.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use storaged_proto::bulk::{ItemHeader, ReadAnswer, ReadEnd, ReadFrame};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::{Code, Status};

use crate::ClientError;
use crate::bulk::BulkError;

/// How long one frame or window may take to arrive once asked for: a
/// storaged that stops sending fails the call instead of holding it.
const RECEIVE_STALL: Duration = Duration::from_secs(60);

/// Where one requested piece goes in the caller's region, and what its
/// answer must say (from the layout rule both sides share).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PieceLayout {
    pub region_offset: u64,
    /// Region bytes reserved for it.
    pub span: u64,
    pub lead: u64,
    pub length: u64,
}

/// How one piece came back.
#[derive(Debug)]
pub(crate) enum Piece {
    /// Its window is in place, checked; the span's tail is zeroed.
    Landed,
    /// storaged answered it with an error.
    Failed(Status),
    /// Its window arrived but did not match its CRCs.
    Mismatch(storaged_proto::bulk::WindowMismatch),
}

/// What the TCP bulk channel has carried for one client.
#[derive(Debug, Default)]
pub struct BulkTcpCounters {
    pub requests: AtomicU64,
    /// Window bytes received into regions.
    pub bytes_received: AtomicU64,
    /// Windows that failed their CRCs here and whose bytes storaged's own
    /// check then passed: damaged between its memory and ours.
    pub wire_mismatches: AtomicU64,
    /// Windows that failed their CRCs here and storaged's check too
    /// (DATA_LOSS on the verified path): damaged on the device.
    pub device_mismatches: AtomicU64,
}

/// A snapshot of [`BulkTcpCounters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BulkTcpStats {
    pub requests: u64,
    pub bytes_received: u64,
    pub wire_mismatches: u64,
    pub device_mismatches: u64,
}

impl BulkTcpCounters {
    pub fn snapshot(&self) -> BulkTcpStats {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        BulkTcpStats {
            requests: load(&self.requests),
            bytes_received: load(&self.bytes_received),
            wire_mismatches: load(&self.wire_mismatches),
            device_mismatches: load(&self.device_mismatches),
        }
    }
}

/// Connections to one storaged's TCP bulk channel.
pub(crate) struct TcpBulkPool {
    /// `host:port`.
    pub addr: String,
    authorization: Option<String>,
    /// The largest item span storaged serves at once
    /// (`bulk_tcp_item_bytes_max`); longer ranges are split.
    pub item_bytes_max: u64,
    /// storaged's checksum block (regions lay reads out by it).
    pub checksum_block_bytes: u64,
    idle: crate::bulk::IdleConnections<TcpStream>,
    slots: tokio::sync::Semaphore,
    pub counters: std::sync::Arc<BulkTcpCounters>,
}

impl std::fmt::Debug for TcpBulkPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token itself.
        f.debug_struct("TcpBulkPool")
            .field("addr", &self.addr)
            .field("token", &self.authorization.as_ref().map(|_| "<set>"))
            .field("item_bytes_max", &self.item_bytes_max)
            .finish_non_exhaustive()
    }
}

impl TcpBulkPool {
    pub(crate) fn new(
        addr: String,
        authorization: Option<String>,
        item_bytes_max: u64,
        checksum_block_bytes: u64,
        connections_max: usize,
        counters: std::sync::Arc<BulkTcpCounters>,
    ) -> Self {
        Self {
            addr,
            authorization,
            item_bytes_max,
            checksum_block_bytes,
            idle: Default::default(),
            slots: tokio::sync::Semaphore::new(connections_max.max(1)),
            counters,
        }
    }

    /// Sends `frame` and receives its items into `region` where `layout`
    /// puts each (one entry per item of the frame, in order). Returns each
    /// item's outcome. A pooled connection that storaged closed while it
    /// sat idle fails before any answer; the call then goes once more on
    /// a new connection.
    pub(crate) async fn read(
        &self,
        frame: &ReadFrame,
        layout: &[PieceLayout],
        region: &mut [u8],
    ) -> Result<Vec<Piece>, BulkError> {
        debug_assert_eq!(frame.items.len(), layout.len());
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
                None => self.connect().await?,
            };
            self.counters.requests.fetch_add(1, Ordering::Relaxed);
            match self.exchange(&mut conn, &request, layout, region).await {
                Ok(pieces) => {
                    self.idle.give_back(conn);
                    return Ok(pieces);
                }
                Err(Exchange::Io { answered: 0, .. }) if reused => continue,
                Err(Exchange::Io { error, .. }) => {
                    return Err(BulkError::Call(ClientError::Status(Status::unavailable(
                        format!("bulk channel {}: {error}", self.addr),
                    ))));
                }
                Err(Exchange::Protocol(m)) => {
                    return Err(BulkError::Call(ClientError::Protocol(format!(
                        "bulk channel {}: {m}",
                        self.addr
                    ))));
                }
                Err(Exchange::Failed(status)) => {
                    self.idle.give_back(conn);
                    return Err(BulkError::Call(ClientError::Status(status)));
                }
            }
        }
    }

    /// A new connection, past its hello. One that cannot be opened is
    /// `Unreachable` (nothing was sent: storaged is gone, or listens
    /// elsewhere now); one refused at its hello is the hello's error.
    async fn connect(&self) -> Result<TcpStream, BulkError> {
        let connecting = TcpStream::connect(&self.addr);
        let mut conn = tokio::time::timeout(storaged_proto::http2::CONNECT_TIMEOUT, connecting)
            .await
            .ok()
            .and_then(Result::ok)
            .ok_or(BulkError::Unreachable)?;
        let unavailable = |e: std::io::Error| {
            ClientError::Status(Status::unavailable(format!(
                "bulk channel {}: {e}",
                self.addr
            )))
        };
        conn.set_nodelay(true)
            .map_err(|e| BulkError::Call(unavailable(e)))?;
        crate::bulk::greet(&mut conn, self.authorization.clone(), unavailable)
            .await
            .map_err(BulkError::Call)?;
        Ok(conn)
    }

    /// One request and its answer on `conn`.
    async fn exchange(
        &self,
        conn: &mut TcpStream,
        request: &[u8],
        layout: &[PieceLayout],
        region: &mut [u8],
    ) -> Result<Vec<Piece>, Exchange> {
        let io = |answered: usize| move |error| Exchange::Io { answered, error };
        conn.write_all(request).await.map_err(io(0))?;
        let mut pieces: Vec<Option<Piece>> = (0..layout.len()).map(|_| None).collect();
        let mut answered = 0usize;
        loop {
            let mut len = [0u8; 4];
            within(conn.read_exact(&mut len))
                .await
                .map_err(io(answered))?;
            let len = u32::from_le_bytes(len) as usize;
            if len > ReadAnswer::FRAME_BYTES_MAX {
                return Err(Exchange::Protocol(format!(
                    "an answer frame of {len} bytes; at most {} can be right",
                    ReadAnswer::FRAME_BYTES_MAX
                )));
            }
            let mut body = vec![0u8; len];
            within(conn.read_exact(&mut body))
                .await
                .map_err(io(answered))?;
            let frame = ReadAnswer::decode(&body)
                .map_err(|e| Exchange::Protocol(format!("answer frame: {e}")))?;
            let header = match frame {
                ReadAnswer::End(end) => return finish(end, pieces, answered),
                ReadAnswer::Item(header) => header,
            };
            let i = header.index as usize;
            let Some(want) = layout.get(i).filter(|_| pieces[i].is_none()) else {
                return Err(Exchange::Protocol(format!(
                    "an answer for item {i}, which was not asked for or was answered already"
                )));
            };
            if header.region_offset != want.region_offset {
                return Err(Exchange::Protocol(format!(
                    "item {i} answered for region offset {}; it was asked for at {}",
                    header.region_offset, want.region_offset
                )));
            }
            answered += 1;
            if header.code != 0 {
                pieces[i] = Some(Piece::Failed(Status::new(
                    Code::from(header.code as i32),
                    header.message,
                )));
                continue;
            }
            check_shape(&header, want).map_err(Exchange::Protocol)?;
            let start = want.region_offset as usize;
            let window = &mut region[start..start + header.window_bytes as usize];
            within(conn.read_exact(window))
                .await
                .map_err(io(answered))?;
            self.counters
                .bytes_received
                .fetch_add(header.window_bytes, Ordering::Relaxed);
            let checked = header.check_window(window);
            // The span's tail past the window: zeroes, as a device read
            // into a registered region leaves it.
            region[start + header.window_bytes as usize..start + want.span as usize].fill(0);
            pieces[i] = Some(match checked {
                Ok(()) => Piece::Landed,
                Err(mismatch) => Piece::Mismatch(mismatch),
            });
        }
    }
}

/// How one exchange failed.
enum Exchange {
    /// The socket broke or stalled after `answered` items.
    Io {
        answered: usize,
        error: std::io::Error,
    },
    /// storaged answered something that is not an answer to this request.
    Protocol(String),
    /// storaged refused the request as a whole (its end frame's status);
    /// the connection is fine.
    Failed(Status),
}

/// A read of the answer that takes at most [`RECEIVE_STALL`].
async fn within<T>(
    read: impl std::future::Future<Output = std::io::Result<T>>,
) -> std::io::Result<T> {
    tokio::time::timeout(RECEIVE_STALL, read)
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("storaged sent nothing for {} s", RECEIVE_STALL.as_secs()),
            )
        })?
}

/// Whether an item's header fits what was asked: its window inside the
/// reserved span, one CRC per checksum block, and the requested bytes
/// exactly where the layout rule puts them.
fn check_shape(header: &ItemHeader, want: &PieceLayout) -> Result<(), String> {
    if !header.is_consistent(want.span) || (header.lead, header.length) != (want.lead, want.length)
    {
        return Err(format!(
            "item {} answered with a window of {} bytes ({} CRCs of {}-byte blocks), its bytes at {}+{}; the layout reserved {} bytes with them at {}+{}",
            header.index,
            header.window_bytes,
            header.crcs.len(),
            header.block_bytes,
            header.lead,
            header.length,
            want.span,
            want.lead,
            want.length
        ));
    }
    Ok(())
}

/// The end of an answer: every item answered, or the call's own failure.
fn finish(
    end: ReadEnd,
    pieces: Vec<Option<Piece>>,
    answered: usize,
) -> Result<Vec<Piece>, Exchange> {
    if end.code != 0 {
        let status = Status::new(Code::from(end.code as i32), end.message);
        return if answered == 0 {
            Err(Exchange::Failed(status))
        } else {
            Err(Exchange::Protocol(format!(
                "the call failed after {answered} items: {status}"
            )))
        };
    }
    if end.items as usize != answered {
        return Err(Exchange::Protocol(format!(
            "the end frame counts {} items; {answered} arrived",
            end.items
        )));
    }
    pieces
        .into_iter()
        .enumerate()
        .map(|(i, p)| p.ok_or_else(|| Exchange::Protocol(format!("item {i} was never answered"))))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_never_shows_the_token() {
        // Guards against a client's `{:?}` printing its bearer token
        // through the TCP pool it holds.
        let pool = TcpBulkPool::new(
            "10.0.0.1:7401".into(),
            Some("Bearer sdt_secret".into()),
            16 << 20,
            32 << 10,
            4,
            Default::default(),
        );
        let shown = format!("{pool:?}");
        assert!(!shown.contains("sdt_secret"), "{shown}");
    }

    #[test]
    fn a_header_that_does_not_fit_its_layout_is_refused() {
        // Guards against a lying server making the client write past an
        // item's span or hand out bytes from the wrong place.
        let want = PieceLayout {
            region_offset: 0,
            span: 8192,
            lead: 100,
            length: 5000,
        };
        let good = ItemHeader {
            lead: 100,
            length: 5000,
            window_bytes: 5100,
            block_bytes: 32768,
            crcs: vec![0],
            ..ItemHeader::default()
        };
        assert!(check_shape(&good, &want).is_ok());
        for bad in [
            ItemHeader {
                window_bytes: 8193,
                ..good.clone()
            },
            ItemHeader {
                crcs: vec![],
                ..good.clone()
            },
            ItemHeader {
                block_bytes: 0,
                ..good.clone()
            },
            ItemHeader {
                lead: 0,
                ..good.clone()
            },
            ItemHeader {
                length: u64::MAX,
                ..good.clone()
            },
        ] {
            assert!(check_shape(&bad, &want).is_err(), "{bad:?}");
        }
    }
}
