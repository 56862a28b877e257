//! Who is calling and what they may do: the caller's identity (tenant,
//! credentials, request id, peer), the authorization of each call against
//! its tenant's rights, and the audit record of its outcome.

use super::*;

/// Who called, for one call: authenticated, holding one of its tenant's
/// concurrent calls, and named for the audit log.
#[derive(Debug)]
pub struct Caller {
    pub principal: Principal,
    pub call: CallId,
    pub(super) permit: CallPermit,
    /// The connection the call came on (`None` only in unit tests that
    /// call the service directly).
    pub(super) conn: Option<Arc<ConnState>>,
    /// Pool bytes the call's reads are charged to: its connection's and
    /// its tenant's.
    pub(super) budget: Budget,
    /// The client's deadline (`grpc-timeout`), if it set one.
    pub(super) deadline: Option<tokio::time::Instant>,
}

impl Caller {
    /// A call of `principal` on `conn` (gRPC or the bulk channel): it takes
    /// one of its tenant's concurrent calls, and its reads are charged to
    /// its connection's and its tenant's byte budgets.
    pub(super) fn admit(
        principal: Principal,
        call: CallId,
        conn: Option<Arc<ConnState>>,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<Self, Status> {
        let permit = principal
            .call_permit()
            .map_err(|e: QuotaExceeded| Status::resource_exhausted(e.to_string()))?;
        let mut budget = Budget::default();
        if let Some(c) = &conn {
            budget = budget.with(Arc::clone(&c.inflight));
        }
        if let Some(t) = &principal.tenant {
            budget = budget.with(Arc::clone(&t.inflight));
        }
        Ok(Caller {
            principal,
            call,
            permit,
            conn,
            budget,
            deadline,
        })
    }
}

/// What names a call in the audit log. Kept raw: the strings are made only
/// when a line is written, not on every read.
#[derive(Debug)]
pub struct CallId {
    /// The client's `x-request-id`, when valid.
    given: Option<String>,
    /// This process's call counter, for calls that named none.
    serial: u64,
    /// The TCP peer; `None` on the Unix socket.
    peer: Option<std::net::SocketAddr>,
}

impl CallId {
    pub(super) fn of<T>(request: &Request<T>) -> Self {
        Self {
            given: given_request_id(request),
            serial: next_call_serial(),
            peer: ConnInfo::of(request.extensions()).and_then(ConnInfo::remote_addr),
        }
    }

    /// A call on the bulk channel (Unix socket, no request id).
    pub(super) fn bulk() -> Self {
        Self {
            given: None,
            serial: next_call_serial(),
            peer: None,
        }
    }

    /// The client's id, or `<process prefix>-<serial>`: unique across
    /// restarts (the prefix is random per process).
    pub fn request_id(&self) -> String {
        static PREFIX: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        match &self.given {
            Some(id) => id.clone(),
            None => {
                let prefix = PREFIX.get_or_init(|| {
                    let mut b = [0u8; 4];
                    let _ = getrandom::fill(&mut b);
                    storaged_proto::auth::hex(&b)
                });
                format!("{prefix}-{}", self.serial)
            }
        }
    }

    /// The peer's address, or "unix".
    pub fn peer(&self) -> String {
        self.peer
            .map_or_else(|| "unix".to_owned(), |a| a.to_string())
    }
}

fn next_call_serial() -> u64 {
    static SERIAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    SERIAL.fetch_add(1, Ordering::Relaxed)
}

pub(super) fn via_name(via: Via) -> String {
    match via {
        Via::Open => "open".into(),
        Via::Token => "token".into(),
        Via::UnixUid(uid) => format!("uid:{uid}"),
        Via::UnixGid(gid) => format!("gid:{gid}"),
        Via::Certificate => "certificate".into(),
        Via::Jwt => "jwt".into(),
    }
}

/// Metadata key a client may set to name its request in the audit log.
pub const REQUEST_ID_METADATA_KEY: &str = "x-request-id";
pub(super) const REQUEST_ID_BYTES_MAX: usize = 64;

pub(super) fn given_request_id<T>(request: &Request<T>) -> Option<String> {
    request
        .metadata()
        .get(REQUEST_ID_METADATA_KEY)
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= REQUEST_ID_BYTES_MAX
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
        })
        .map(str::to_owned)
}

/// The name of a status code, for the audit log.
pub(super) fn code_name(code: tonic::Code) -> String {
    format!("{code:?}")
}

impl StoragedService {
    /// Authenticates the caller of `request` and takes one of its tenant's
    /// concurrent calls. Failures are audited.
    pub(super) fn caller<T>(
        &self,
        request: &Request<T>,
        operation: &str,
    ) -> Result<Caller, Status> {
        let call = CallId::of(request);
        let authorization = request
            .metadata()
            .get(storaged_proto::auth::AUTHORIZATION_METADATA_KEY)
            .map(|v| v.to_str().map_err(|_| AuthError::Malformed))
            .transpose();
        let cert_names = ConnInfo::peer_certs(request.extensions())
            .and_then(|chain| chain.first().map(|leaf| crate::tls::cert_names(leaf)))
            .unwrap_or_default();
        let authenticated = authorization.and_then(|authorization| {
            self.tenants.authenticate(Presented {
                authorization,
                unix_uid: peer_uid(request).ok(),
                unix_gid: peer_cred(request).ok().map(|c| c.gid()),
                cert_names: &cert_names,
            })
        });
        let principal = match authenticated {
            Ok(p) => p,
            Err(e) => {
                let status = Status::unauthenticated(e.to_string());
                let _ = self.record(
                    ("unauthenticated", "none".into()),
                    &call,
                    operation,
                    None,
                    Err(&status),
                );
                return Err(status);
            }
        };
        let conn = ConnInfo::of(request.extensions()).map(|c| Arc::clone(&c.state));
        let deadline = request
            .metadata()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(crate::deadline::parse_grpc_timeout)
            .map(|d| tokio::time::Instant::now() + d);
        Caller::admit(principal, call, conn, deadline)
    }

    /// Writes `caller`'s `operation` and its outcome to the audit log. A
    /// required log that cannot be written turns the outcome into
    /// UNAVAILABLE.
    pub(super) fn audit(
        &self,
        caller: &Caller,
        operation: &str,
        dataset: Option<&str>,
        outcome: Result<u64, &Status>,
    ) -> Result<(), Status> {
        let who = (caller.principal.name(), via_name(caller.principal.via));
        self.record(who, &caller.call, operation, dataset, outcome)
    }

    /// One audit line: `who` is (principal, how it authenticated).
    pub(super) fn record(
        &self,
        (principal, via): (&str, String),
        call: &CallId,
        operation: &str,
        dataset: Option<&str>,
        outcome: Result<u64, &Status>,
    ) -> Result<(), Status> {
        if !self.audit.enabled() {
            return Ok(());
        }
        let (result, message, bytes) = match outcome {
            Ok(bytes) => ("ok".to_owned(), None, bytes),
            Err(s) => (code_name(s.code()), Some(s.message()), 0),
        };
        self.audit
            .record(&AuditEvent {
                time_unix_ms: crate::audit::now_unix_ms(),
                request_id: &call.request_id(),
                principal,
                via: &via,
                peer: &call.peer(),
                operation,
                dataset,
                result: &result,
                message,
                bytes,
            })
            .map_err(|e| {
                Status::unavailable(format!(
                    "{operation} finished ({result}) but could not be audited: {e}"
                ))
            })
    }

    /// `Ok` if `caller` may exercise `right` on `dataset`; a denial is
    /// audited and answered PERMISSION_DENIED.
    pub(super) fn authorize(
        &self,
        caller: &Caller,
        operation: &str,
        right: Right,
        dataset: &str,
    ) -> Result<(), Status> {
        if !dataset.is_empty() {
            // Into the call's `rpc` span (see `metrics::rpc`).
            tracing::Span::current().record("dataset", dataset);
        }
        let checked = match right {
            Right::Admin => caller.principal.check_admin(),
            _ => caller.principal.check(right, dataset),
        };
        checked.map_err(|e: Denied| {
            let status = Status::permission_denied(e.to_string());
            let dataset = (!dataset.is_empty()).then_some(dataset);
            let _ = self.audit(caller, operation, dataset, Err(&status));
            status
        })
    }

    /// Read authorization: [`authorize`](Self::authorize) with `Read`,
    /// except that on a node of a cluster a unit dataset (`cluster.…`,
    /// which clients read straight from the nodes) may be read by whoever
    /// may read the cluster dataset it holds shares of. A unit this node
    /// does not know yet is learnt first (one list of the records,
    /// rate-limited).
    pub(super) async fn authorize_read(
        &self,
        caller: &Caller,
        operation: &str,
        dataset: &str,
    ) -> Result<(), Status> {
        self.learn_unit(caller, dataset).await;
        self.authorize_read_known(caller, operation, dataset)
    }

    /// Makes sure this node knows which cluster dataset unit `dataset`
    /// holds, when the caller may not read it by its own name.
    pub(super) async fn learn_unit(&self, caller: &Caller, dataset: &str) {
        if let Some(member) = &self.cluster
            && dataset.starts_with(storaged_proto::cluster::UNIT_PREFIX)
            && !caller.principal.allows(Right::Read, dataset)
        {
            member.registry().learn_unit(member, dataset).await;
        }
    }

    /// [`authorize_read`](Self::authorize_read) from what this node already
    /// knows of the records (for the region reads, which check inside a
    /// call that cannot wait: their callers [`learn_unit`](Self::learn_unit)
    /// first).
    pub(super) fn authorize_read_known(
        &self,
        caller: &Caller,
        operation: &str,
        dataset: &str,
    ) -> Result<(), Status> {
        if let Some(member) = &self.cluster
            && dataset.starts_with(storaged_proto::cluster::UNIT_PREFIX)
            && !caller.principal.allows(Right::Read, dataset)
            && let Some(of) = member.registry().dataset_of_unit(dataset)
            && caller.principal.allows(Right::Read, &of)
        {
            tracing::Span::current().record("dataset", dataset);
            return Ok(());
        }
        self.authorize(caller, operation, Right::Read, dataset)
    }

    /// Before a write or admin operation: the audit log must be able to
    /// record it.
    pub(super) fn audit_ready(&self, caller: &Caller) -> Result<(), Status> {
        self.audit
            .ready(|| caller.call.request_id())
            .map_err(|e| Status::unavailable(e.to_string()))
    }
}

/// The credentials of a caller on the Unix socket; regions are for them
/// only.
pub(super) fn peer_cred<T>(request: &Request<T>) -> Result<tokio::net::unix::UCred, RegionError> {
    ConnInfo::of(request.extensions())
        .and_then(ConnInfo::unix)
        .and_then(|info| info.peer_cred)
        .ok_or(RegionError::NotLocal)
}

/// The uid of a caller on the Unix socket.
pub(super) fn peer_uid<T>(request: &Request<T>) -> Result<u32, RegionError> {
    peer_cred(request).map(|c| c.uid())
}
