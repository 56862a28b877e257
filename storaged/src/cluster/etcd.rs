//! [`ControlPlane`] on etcd's v3 gRPC API (KV and Lease), through the
//! client stubs `storaged-proto` generates from the trimmed protos in
//! `proto/proto/etcd` (no protoc, no extra crate).
//!
//! One tonic channel balances over the endpoints of the `etcd://` URL;
//! every call has a deadline, so an etcd that is down or partitioned away
//! answers `Unreachable` within [`EtcdControl::request_timeout`] instead
//! of holding a caller.

use std::future::Future;
use std::time::Duration;

use storaged_proto::etcd::etcdserverpb as pb;
use storaged_proto::etcd::etcdserverpb::kv_client::KvClient;
use storaged_proto::etcd::etcdserverpb::lease_client::LeaseClient;
use tonic::transport::{Channel, Endpoint};

use super::control::{Condition, ControlError, ControlFuture, ControlPlane, Entry, LeaseId, Write};

/// Why an `etcd://` URL was refused.
#[derive(Debug, thiserror::Error)]
pub enum EtcdUrlError {
    #[error("cluster URL {url:?} must begin with etcd:// (etcd://HOST:PORT[,HOST:PORT...])")]
    Scheme { url: String },
    #[error("cluster URL {url:?} names no endpoint")]
    Empty { url: String },
    #[error("cluster URL {url:?}: endpoint {endpoint:?} is not HOST:PORT")]
    Endpoint { url: String, endpoint: String },
}

/// The endpoints of an `etcd://host:port[,host:port...]` URL, as
/// `http://host:port`.
pub fn parse_etcd_url(url: &str) -> Result<Vec<String>, EtcdUrlError> {
    let rest = url
        .strip_prefix("etcd://")
        .ok_or_else(|| EtcdUrlError::Scheme {
            url: url.to_owned(),
        })?;
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() {
        return Err(EtcdUrlError::Empty {
            url: url.to_owned(),
        });
    }
    rest.split(',')
        .map(|endpoint| {
            if super::records::is_host_port(endpoint) {
                Ok(format!("http://{endpoint}"))
            } else {
                Err(EtcdUrlError::Endpoint {
                    url: url.to_owned(),
                    endpoint: endpoint.to_owned(),
                })
            }
        })
        .collect()
}

/// etcd as the control plane.
#[derive(Debug, Clone)]
pub struct EtcdControl {
    url: String,
    kv: KvClient<Channel>,
    lease: LeaseClient<Channel>,
    request_timeout: Duration,
}

/// The largest answer storaged accepts from etcd (its own requests are
/// limited to 1.5 MiB by default; lists are bounded by `limit`).
const ETCD_MESSAGE_BYTES_MAX: usize = 16 << 20;

impl EtcdControl {
    /// A client of the etcd cluster at `url` (`etcd://HOST:PORT,...`).
    /// Connects lazily: an etcd that is down is found by the first call.
    /// Must be called inside a tokio runtime.
    pub fn new(url: &str, request_timeout: Duration) -> Result<Self, EtcdUrlError> {
        let endpoints = parse_etcd_url(url)?;
        let endpoints: Vec<Endpoint> = endpoints
            .iter()
            .map(|e| {
                Endpoint::from_shared(e.clone())
                    .map(|e| {
                        e.connect_timeout(request_timeout)
                            .timeout(request_timeout)
                            .tcp_nodelay(true)
                    })
                    .map_err(|_| EtcdUrlError::Endpoint {
                        url: url.to_owned(),
                        endpoint: e.clone(),
                    })
            })
            .collect::<Result<_, _>>()?;
        let channel = Channel::balance_list(endpoints.into_iter());
        Ok(Self {
            url: url.to_owned(),
            kv: KvClient::new(channel.clone()).max_decoding_message_size(ETCD_MESSAGE_BYTES_MAX),
            lease: LeaseClient::new(channel).max_decoding_message_size(ETCD_MESSAGE_BYTES_MAX),
            request_timeout,
        })
    }

    /// How long one call may take.
    pub fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    fn error(&self, operation: &'static str, status: &tonic::Status) -> ControlError {
        use tonic::Code;
        match status.code() {
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown => {
                ControlError::Unreachable {
                    endpoint: self.url.clone(),
                    why: format!("{operation}: {}", status.message()),
                }
            }
            _ => ControlError::Refused {
                endpoint: self.url.clone(),
                operation,
                why: status.message().to_owned(),
            },
        }
    }

    /// Bounds `call` by the request timeout (tonic's covers the request,
    /// this one also the stream of a keep-alive).
    async fn bounded<T>(
        &self,
        operation: &'static str,
        call: impl Future<Output = Result<T, tonic::Status>>,
    ) -> Result<T, ControlError> {
        match tokio::time::timeout(self.request_timeout, call).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(status)) => Err(self.error(operation, &status)),
            Err(_) => Err(ControlError::Unreachable {
                endpoint: self.url.clone(),
                why: format!("{operation}: no answer within {:?}", self.request_timeout),
            }),
        }
    }
}

/// The smallest key after every key that begins with `prefix` (etcd's
/// `range_end` for a prefix scan).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xff (or empty): to the end of the key space.
    vec![0]
}

fn entry(kv: storaged_proto::etcd::mvccpb::KeyValue) -> Entry {
    Entry {
        key: String::from_utf8_lossy(&kv.key).into_owned(),
        value: kv.value,
        create_revision: kv.create_revision,
        mod_revision: kv.mod_revision,
        lease: (kv.lease != 0).then_some(LeaseId(kv.lease)),
    }
}

fn compare(c: Condition) -> pb::Compare {
    use pb::compare::{CompareResult, CompareTarget, TargetUnion};
    match c {
        Condition::Absent(key) => pb::Compare {
            result: CompareResult::Equal as i32,
            target: CompareTarget::Create as i32,
            key: key.into_bytes(),
            target_union: Some(TargetUnion::CreateRevision(0)),
            ..Default::default()
        },
        Condition::Unchanged { key, mod_revision } => pb::Compare {
            result: CompareResult::Equal as i32,
            target: CompareTarget::Mod as i32,
            key: key.into_bytes(),
            target_union: Some(TargetUnion::ModRevision(mod_revision)),
            ..Default::default()
        },
    }
}

fn request(w: Write) -> pb::RequestOp {
    use pb::request_op::Request;
    pb::RequestOp {
        request: Some(match w {
            Write::Put { key, value, lease } => Request::RequestPut(pb::PutRequest {
                key: key.into_bytes(),
                value,
                lease: lease.map_or(0, |l| l.0),
                ..Default::default()
            }),
            Write::Delete { key } => Request::RequestDeleteRange(pb::DeleteRangeRequest {
                key: key.into_bytes(),
                ..Default::default()
            }),
        }),
    }
}

impl ControlPlane for EtcdControl {
    fn endpoint(&self) -> &str {
        &self.url
    }

    fn get(&self, key: &str) -> ControlFuture<'_, Option<Entry>> {
        let request = pb::RangeRequest {
            key: key.as_bytes().to_vec(),
            ..Default::default()
        };
        Box::pin(async move {
            let mut kv = self.kv.clone();
            let r = self.bounded("get", kv.range(request)).await?.into_inner();
            Ok(r.kvs.into_iter().next().map(entry))
        })
    }

    fn list(&self, prefix: &str, limit: usize) -> ControlFuture<'_, Vec<Entry>> {
        let request = pb::RangeRequest {
            key: prefix.as_bytes().to_vec(),
            range_end: prefix_end(prefix.as_bytes()),
            limit: i64::try_from(limit).unwrap_or(i64::MAX),
            sort_order: pb::range_request::SortOrder::Ascend as i32,
            ..Default::default()
        };
        Box::pin(async move {
            let mut kv = self.kv.clone();
            let r = self.bounded("list", kv.range(request)).await?.into_inner();
            Ok(r.kvs.into_iter().map(entry).collect())
        })
    }

    fn commit(&self, conditions: Vec<Condition>, writes: Vec<Write>) -> ControlFuture<'_, bool> {
        let request = pb::TxnRequest {
            compare: conditions.into_iter().map(compare).collect(),
            success: writes.into_iter().map(request).collect(),
            failure: Vec::new(),
        };
        Box::pin(async move {
            let mut kv = self.kv.clone();
            let r = self.bounded("commit", kv.txn(request)).await?.into_inner();
            Ok(r.succeeded)
        })
    }

    fn grant_lease(&self, ttl_s: i64) -> ControlFuture<'_, LeaseId> {
        Box::pin(async move {
            let mut lease = self.lease.clone();
            let r = self
                .bounded(
                    "lease grant",
                    lease.lease_grant(pb::LeaseGrantRequest { ttl: ttl_s, id: 0 }),
                )
                .await?
                .into_inner();
            if !r.error.is_empty() {
                return Err(ControlError::Refused {
                    endpoint: self.url.clone(),
                    operation: "lease grant",
                    why: r.error,
                });
            }
            Ok(LeaseId(r.id))
        })
    }

    fn keep_alive(&self, id: LeaseId) -> ControlFuture<'_, Option<i64>> {
        Box::pin(async move {
            let mut lease = self.lease.clone();
            let once = tokio_stream::once(pb::LeaseKeepAliveRequest { id: id.0 });
            let answer = self
                .bounded("lease keep-alive", async move {
                    let mut stream = lease.lease_keep_alive(once).await?.into_inner();
                    stream.message().await
                })
                .await?;
            // etcd answers TTL 0 (or closes the stream) for a lease it no
            // longer has.
            Ok(answer.and_then(|r| (r.ttl > 0).then_some(r.ttl)))
        })
    }

    fn lease_ttl(&self, id: LeaseId) -> ControlFuture<'_, Option<i64>> {
        Box::pin(async move {
            let mut lease = self.lease.clone();
            let r = self
                .bounded(
                    "lease time-to-live",
                    lease.lease_time_to_live(pb::LeaseTimeToLiveRequest {
                        id: id.0,
                        keys: false,
                    }),
                )
                .await?
                .into_inner();
            Ok((r.ttl > 0).then_some(r.ttl))
        })
    }

    fn revoke(&self, id: LeaseId) -> ControlFuture<'_, ()> {
        Box::pin(async move {
            let mut lease = self.lease.clone();
            let call = async move {
                match lease
                    .lease_revoke(pb::LeaseRevokeRequest { id: id.0 })
                    .await
                {
                    // Already gone (expired, or revoked by a later run of
                    // this node) is what revoking wanted.
                    Err(status) if status.code() == tonic::Code::NotFound => Ok(()),
                    other => other.map(drop),
                }
            };
            self.bounded("lease revoke", call).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_their_endpoints() {
        assert_eq!(
            parse_etcd_url("etcd://127.0.0.1:2379").unwrap(),
            ["http://127.0.0.1:2379"]
        );
        assert_eq!(
            parse_etcd_url("etcd://a:1,b:2/").unwrap(),
            ["http://a:1", "http://b:2"]
        );
        for bad in [
            "http://127.0.0.1:2379",
            "etcd://",
            "etcd://host",
            "etcd://host:0",
            "etcd://host:99999",
            "etcd://:2379",
            "etcd://a:1,",
            "etcd://user@a:1",
        ] {
            assert!(parse_etcd_url(bad).is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn a_prefix_scan_ends_after_the_prefix() {
        assert_eq!(prefix_end(b"/a/"), b"/a0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff"), [0]);
    }
}
