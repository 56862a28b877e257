//! The control-plane store, as cluster mode needs it: a small, strongly
//! consistent key-value store with leases and atomic compare-and-commit.
//!
//! Membership, the placement map and (later) the dataset registry live in
//! it; object and stripe metadata never do (each node keeps its own). The
//! trait is what the rest of `cluster` sees, so an engine other than etcd
//! (FoundationDB, as 3FS uses, or Consul) could replace [`super::etcd`]
//! without touching membership logic. Every call is bounded in time by the
//! implementation: a control plane that does not answer is an error, never
//! a hang.

use std::future::Future;
use std::pin::Pin;

/// A lease's id in the control plane. Keys written with a lease vanish
/// when it expires or is revoked: that is how a dead node's liveness key
/// goes away.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LeaseId(pub i64);

/// A key as stored, with the revisions compare-and-commit works on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub key: String,
    pub value: Vec<u8>,
    /// Revision of the write that created the key (0: never).
    pub create_revision: i64,
    /// Revision of the last write to the key.
    pub mod_revision: i64,
    /// The lease the key is attached to, if any.
    pub lease: Option<LeaseId>,
}

/// What must hold for a [`ControlPlane::commit`] to apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Condition {
    /// The key does not exist.
    Absent(String),
    /// The key exists and was last written at this revision.
    Unchanged { key: String, mod_revision: i64 },
}

/// One write of a [`ControlPlane::commit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    Put {
        key: String,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    },
    Delete {
        key: String,
    },
}

/// Why a control-plane call failed. Callers choose by variant: the
/// service layer turns `Unreachable` into UNAVAILABLE.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// No answer: the store is down, partitioned away or too slow.
    #[error("the control plane ({endpoint}) cannot be reached: {why}")]
    Unreachable { endpoint: String, why: String },
    /// It answered with an error.
    #[error("the control plane ({endpoint}) refused {operation}: {why}")]
    Refused {
        endpoint: String,
        operation: &'static str,
        why: String,
    },
    /// A key that must hold a record holds something else.
    #[error("control-plane key {key} holds no valid record: {why}")]
    Corrupt { key: String, why: String },
}

/// A boxed future, so the trait can be used as `dyn ControlPlane`.
pub type ControlFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, ControlError>> + Send + 'a>>;

/// The operations cluster mode uses.
pub trait ControlPlane: Send + Sync + std::fmt::Debug {
    /// Where it is, for messages.
    fn endpoint(&self) -> &str;
    /// One key.
    fn get(&self, key: &str) -> ControlFuture<'_, Option<Entry>>;
    /// Every key that begins with `prefix`, in key order, at most `limit`.
    fn list(&self, prefix: &str, limit: usize) -> ControlFuture<'_, Vec<Entry>>;
    /// Applies every write at once if every condition holds; answers
    /// whether it did.
    fn commit(&self, conditions: Vec<Condition>, writes: Vec<Write>) -> ControlFuture<'_, bool>;
    /// A lease that expires `ttl_s` seconds after its last keep-alive.
    fn grant_lease(&self, ttl_s: i64) -> ControlFuture<'_, LeaseId>;
    /// Renews a lease; answers the seconds it has now, or `None` when it
    /// has expired (its keys are gone).
    fn keep_alive(&self, lease: LeaseId) -> ControlFuture<'_, Option<i64>>;
    /// Seconds left on a lease, `None` when it has expired.
    fn lease_ttl(&self, lease: LeaseId) -> ControlFuture<'_, Option<i64>>;
    /// Ends a lease now, deleting its keys.
    fn revoke(&self, lease: LeaseId) -> ControlFuture<'_, ()>;
}
