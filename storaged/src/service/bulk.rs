//! The bulk channel's server side (wire format: `storaged_proto::bulk`,
//! docs/FORMAT.md "The bulk channel"): `ReadInto` without HTTP/2.
//!
//! Connections arrive on their own Unix socket through the same admission
//! as gRPC's (connection counts, the first bytes' deadline, the idle
//! deadline between requests). The hello authenticates the peer exactly as
//! a gRPC call on the Unix socket is (its uid and gid, and a token if it
//! sends one); then each request runs as a `ReadInto` call would: one of
//! its tenant's concurrent calls, its rights on the dataset, regions of
//! its own uid only, the connection's and tenant's byte budgets. One
//! request at a time per connection, and its reply before the next: a
//! client can make storaged hold one request's reads per connection, no
//! more. A frame that cannot be decoded is answered INVALID_ARGUMENT and
//! ends the connection (what follows it cannot be trusted to be framed).

use std::time::Instant;

use storaged_proto::bulk::{
    FrameError, HELLO_BYTES, Hello, HelloReply, ItemReply, ReadIntoFrame, ReadIntoReply, VERSION,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::caller::CallId;
use super::codes::GrpcCode;
use super::*;

/// The method name bulk requests are counted under in `storaged_rpc_seconds`.
const METHOD_READ_INTO: &str = "bulk/ReadInto";

impl StoragedService {
    /// Serves the bulk channel on every admitted connection of `conns`
    /// until the server stops.
    pub async fn serve_bulk<IO>(
        self,
        conns: impl Stream<Item = std::io::Result<crate::conn::Conn<IO>>> + Send + 'static,
    ) where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mut conns = std::pin::pin!(conns);
        let mut stopping = self.stopping.clone();
        loop {
            tokio::select! {
                next = conns.next() => match next {
                    Some(Ok(conn)) => {
                        tokio::spawn(self.clone().bulk_connection(conn));
                    }
                    Some(Err(e)) => tracing::warn!(error = %e, "bulk channel: accept failed"),
                    None => return,
                },
                _ = stopping.wait_for(|stop| *stop) => return,
            }
        }
    }

    /// One connection: the hello, then requests until the client leaves,
    /// breaks the framing, or the server stops.
    async fn bulk_connection<IO>(self, mut conn: crate::conn::Conn<IO>)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        use tonic::transport::server::Connected;
        let info = conn.connect_info();
        let Some(cred) = info.unix().and_then(|u| u.peer_cred) else {
            // Without the peer's uid there is no telling whose regions
            // these are.
            let _ = hello_failed(
                &mut conn,
                Code::Unauthenticated,
                "the peer's uid is unknown",
            )
            .await;
            return;
        };
        let Some(principal) = self.bulk_hello(&mut conn, cred).await else {
            return;
        };
        let mut stopping = self.stopping.clone();
        loop {
            let mut len = [0u8; 4];
            tokio::select! {
                read = conn.read_exact(&mut len) => if read.is_err() {
                    // Gone, or idle past the deadline (the admission's).
                    return;
                },
                _ = stopping.wait_for(|stop| *stop) => return,
            }
            let _call = info.state.call_started();
            let started = Instant::now();
            let len = u32::from_le_bytes(len) as usize;
            let reply = if len > self.bulk_frame_bytes_max {
                Err(FrameError::TooLong {
                    what: "the request frame",
                    bytes: len,
                    max: self.bulk_frame_bytes_max,
                })
            } else {
                // Once its length is in, a frame arrives within the stall
                // timeout: a peer cannot hold its buffer by trickling.
                let mut body = vec![0u8; len];
                let read = tokio::time::timeout(self.stream_stall, conn.read_exact(&mut body));
                if !matches!(read.await, Ok(Ok(_))) {
                    return;
                }
                ReadIntoFrame::decode(&body)
            };
            let (reply, framing_broken) = match reply {
                Ok(frame) => (
                    self.bulk_read_into(&principal, &info.state, cred.uid(), frame)
                        .await,
                    false,
                ),
                Err(e) => (
                    ReadIntoReply::failed(
                        Code::InvalidArgument as u32,
                        format!("bulk channel: {e}; closing the connection"),
                    ),
                    true,
                ),
            };
            self.bulk_requests.fetch_add(1, Ordering::Relaxed);
            crate::metrics::rpc::record_call(
                METHOD_READ_INTO,
                Code::from(reply.code as i32),
                started.elapsed().as_secs_f64(),
            );
            let Ok(bytes) = reply.encode() else {
                return;
            };
            // A reply is small; a client that does not take it within the
            // stall timeout is not reading at all.
            let written = tokio::time::timeout(self.stream_stall, conn.write_all(&bytes)).await;
            if !matches!(written, Ok(Ok(()))) || framing_broken {
                return;
            }
        }
    }

    /// Reads and answers the hello; the authenticated principal, or `None`
    /// when the connection is to end (answered already where it could be).
    async fn bulk_hello<IO>(
        &self,
        conn: &mut crate::conn::Conn<IO>,
        cred: tokio::net::unix::UCred,
    ) -> Option<Principal>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mut fixed = [0u8; HELLO_BYTES];
        conn.read_exact(&mut fixed).await.ok()?;
        let (version, token_len) = match Hello::decode_fixed(&fixed) {
            Ok(v) => v,
            Err(e) => {
                let _ =
                    hello_failed(conn, Code::InvalidArgument, &format!("bulk channel: {e}")).await;
                return None;
            }
        };
        if version != VERSION {
            let message = format!(
                "the client speaks bulk channel version {version}; this server speaks {VERSION}"
            );
            let _ = hello_failed(conn, Code::FailedPrecondition, &message).await;
            return None;
        }
        let mut token = vec![0u8; token_len];
        conn.read_exact(&mut token).await.ok()?;
        let Ok(token) = String::from_utf8(token) else {
            let _ = hello_failed(
                conn,
                Code::InvalidArgument,
                "the hello's token is not UTF-8",
            )
            .await;
            return None;
        };
        let authenticated = self.tenants.authenticate(Presented {
            authorization: (!token.is_empty()).then_some(token.as_str()),
            unix_uid: Some(cred.uid()),
            unix_gid: Some(cred.gid()),
            cert_names: &[],
        });
        match authenticated {
            Ok(principal) => {
                let ok = HelloReply {
                    version: VERSION,
                    code: 0,
                    message: String::new(),
                };
                conn.write_all(&ok.encode()).await.ok()?;
                Some(principal)
            }
            Err(e) => {
                let status = Status::unauthenticated(e.to_string());
                let _ = self.record(
                    ("unauthenticated", "none".into()),
                    &CallId::bulk(),
                    "bulk_hello",
                    None,
                    Err(&status),
                );
                let _ = hello_failed(conn, status.code(), status.message()).await;
                None
            }
        }
    }

    /// One `ReadInto` request, answered whole: a failed call as its status,
    /// otherwise every item's outcome in request order.
    async fn bulk_read_into(
        &self,
        principal: &Principal,
        conn: &Arc<ConnState>,
        uid: u32,
        frame: ReadIntoFrame,
    ) -> ReadIntoReply {
        match self.bulk_read_into_call(principal, conn, uid, frame).await {
            Ok(reply) => reply,
            Err(status) => ReadIntoReply {
                region_unknown: status
                    .metadata()
                    .contains_key(storaged_proto::model::REGION_UNKNOWN_METADATA_KEY),
                ..ReadIntoReply::failed(status.code() as u32, status.message())
            },
        }
    }

    async fn bulk_read_into_call(
        &self,
        principal: &Principal,
        conn: &Arc<ConnState>,
        uid: u32,
        frame: ReadIntoFrame,
    ) -> Result<ReadIntoReply, Status> {
        let caller = Caller::admit(
            principal.clone(),
            CallId::bulk(),
            Some(Arc::clone(conn)),
            None,
        )?;
        let count = frame.items.len();
        let call = ReadIntoCall {
            dataset: frame.dataset,
            dataset_id: frame.dataset_id,
            region_id: frame.region_id,
            max_in_flight: frame.max_in_flight,
            items: frame.items.into_iter().map(Into::into).collect(),
        };
        let (completions, _) = self.start_read_into(&caller, uid, call)?;
        let mut replies = vec![None; count];
        let mut completions = std::pin::pin!(caller.budget.clone().scope_stream(completions));
        while let Some((index, result)) = completions.next().await {
            let reply = match result {
                Ok(done) => ItemReply {
                    code: 0,
                    message: String::new(),
                    data_offset: done.data_offset,
                    length: done.length,
                    span_bytes: done.span_bytes,
                },
                Err(error) => {
                    if error.code() == Code::DataLoss {
                        tracing::warn!(%error, "bulk ReadInto item failed");
                    }
                    ItemReply {
                        code: error.code() as u32,
                        message: error.to_string(),
                        ..ItemReply::default()
                    }
                }
            };
            if let Some(slot) = replies.get_mut(index as usize) {
                *slot = Some(reply);
            }
        }
        let items = replies
            .into_iter()
            .enumerate()
            .map(|(i, r)| {
                r.ok_or_else(|| Status::internal(format!("ReadInto ended without item {i}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        drop(caller);
        Ok(ReadIntoReply {
            code: 0,
            message: String::new(),
            region_unknown: false,
            items,
        })
    }
}

/// A `ReadInto` as either transport asked for it.
pub(super) struct ReadIntoCall {
    pub dataset: String,
    pub dataset_id: Option<u64>,
    pub region_id: u64,
    pub max_in_flight: u32,
    pub items: Vec<pb::ReadIntoItem>,
}

/// A `ReadInto`'s completions from the store: (item index, outcome).
pub(super) type ReadIntoCompletions = Pin<
    Box<
        dyn Stream<
                Item = (
                    u32,
                    Result<crate::store::read_into::ReadIntoDone, ReadError>,
                ),
            > + Send,
    >,
>;

impl StoragedService {
    /// Starts `call` for `caller` (on the Unix socket as `uid`): its right
    /// on the dataset, its own region, the items validated (a bad one fails
    /// alone). Returns the store's completions and the items in flight.
    pub(super) fn start_read_into(
        &self,
        caller: &Caller,
        uid: u32,
        call: ReadIntoCall,
    ) -> Result<(ReadIntoCompletions, u32), Status> {
        let name = DatasetName::new(call.dataset).map_err(invalid)?;
        self.authorize(caller, "read_into", Right::Read, name.as_str())?;
        let principal = &caller.principal;
        let region = self.regions.get(call.region_id, |region| {
            region_is_callers(region, principal, uid)
        })?;
        let items = call
            .items
            .into_iter()
            .map(|i| {
                let range = RangeSpec::try_from(&pb::ReadItem {
                    path: i.path,
                    offset: i.offset,
                    length: i.length,
                })
                .map_err(ReadError::from)?;
                Ok(ReadIntoItem {
                    range,
                    region_offset: i.region_offset,
                })
            })
            .collect();
        let in_flight = match call.max_in_flight {
            0 => self.store.limits().batch_in_flight_default,
            n => n,
        };
        let completions = self
            .store
            .read_into(region, &name, call.dataset_id, items, in_flight)?;
        Ok((Box::pin(completions), in_flight))
    }
}

/// Whether `principal`, connected as `uid`, may use `region`: without
/// tenants, the uid's own regions (root: any); with tenants, its own
/// regions of its tenant (an admin: any).
fn region_is_callers(region: &crate::region::RegionMap, principal: &Principal, uid: u32) -> bool {
    match &principal.tenant {
        None => region.owner_uid == uid || uid == 0,
        Some(t) => t.admin || (region.owner_uid == uid && region.tenant == t.name),
    }
}

/// Answers a hello with `code` and `message`; the connection ends after.
async fn hello_failed<IO: AsyncWrite + Unpin>(
    conn: &mut IO,
    code: Code,
    message: &str,
) -> std::io::Result<()> {
    let reply = HelloReply {
        version: VERSION,
        code: code as u32,
        message: message.to_owned(),
    };
    conn.write_all(&reply.encode()).await?;
    conn.shutdown().await
}
