//! Byte budgets: how much of the buffer pool one connection, or one
//! tenant, may hold at once.
//!
//! The reads behind a call run inside [`Budget::scope_stream`]; every pool
//! buffer they take is first charged to each account of the budget (the
//! connection's, then the tenant's), and the charge goes back with the
//! buffer. That may be long after the read: a message handed to HTTP/2
//! holds its buffer until the client's window lets it out. So a client
//! that stops reading holds at most its budget; its own later calls wait
//! for their budget, and everyone else finds the rest of the pool free.
//! (A stalled stream also ends its connection after
//! `stream_stall_timeout_s`, which returns the rest; see `conn`.)
//!
//! Accounts are always charged in the same order (connection before
//! tenant), so two calls waiting on each other's accounts cannot
//! deadlock; one acquisition takes everything it needs at once.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures::Stream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// One holder of pool bytes: a connection or a tenant. Its `bytes_max`
/// is a share of the pool, applied to each size class of it alike (an
/// account of half the pool may hold half of the 64 KiB buffers and half
/// of the stripe-unit ones), so no holder can take a whole class that
/// others' reads need.
#[derive(Debug)]
pub struct Account {
    /// For log lines: "connection 12", "tenant \"vision\"".
    what: String,
    bytes_max: usize,
    /// Per size class (by buffer size): buffers it may hold, and the
    /// semaphore of what is left; made at first use.
    classes: Mutex<Vec<ClassShare>>,
    /// KiB of heap copies (multi-window items of any-order batches) it may
    /// hold: `bytes_max` too.
    heap_kib: Arc<Semaphore>,
}

#[derive(Debug)]
struct ClassShare {
    buf_bytes: usize,
    buffers_max: usize,
    left: Arc<Semaphore>,
}

/// A size class of the pool, as a budget sees it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClassOfPool {
    pub buf_bytes: usize,
    pub count: usize,
    pub pool_bytes: usize,
}

impl Account {
    pub fn new(what: String, bytes_max: usize) -> Arc<Self> {
        Arc::new(Self {
            what,
            bytes_max,
            classes: Mutex::new(Vec::new()),
            heap_kib: Arc::new(Semaphore::new((bytes_max / 1024).max(1))),
        })
    }

    /// "connection 12", "tenant \"vision\"".
    pub fn what(&self) -> &str {
        &self.what
    }

    pub fn bytes_max(&self) -> usize {
        self.bytes_max
    }

    /// Heap bytes charged right now.
    pub fn heap_bytes_held(&self) -> usize {
        ((self.bytes_max / 1024).max(1) - self.heap_kib.available_permits()) * 1024
    }

    /// Pool bytes charged right now.
    pub fn bytes_held(&self) -> usize {
        self.lock()
            .iter()
            .map(|c| (c.buffers_max - c.left.available_permits()) * c.buf_bytes)
            .sum()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<ClassShare>> {
        self.classes.lock().expect("budget account poisoned")
    }

    /// The semaphore of `class`, and how many of its buffers this account
    /// may hold (its share, at least one).
    fn share_of(&self, class: ClassOfPool) -> (Arc<Semaphore>, usize) {
        let mut classes = self.lock();
        if let Some(c) = classes.iter().find(|c| c.buf_bytes == class.buf_bytes) {
            return (Arc::clone(&c.left), c.buffers_max);
        }
        let share = (class.count as u128 * self.bytes_max as u128 / class.pool_bytes.max(1) as u128)
            .clamp(1, class.count.max(1) as u128) as usize;
        let left = Arc::new(Semaphore::new(share));
        classes.push(ClassShare {
            buf_bytes: class.buf_bytes,
            buffers_max: share,
            left: Arc::clone(&left),
        });
        (left, share)
    }
}

/// The accounts the current call's buffers are charged to. Shared, so the
/// clone each poll of a [`Scoped`] stream makes is one reference count.
#[derive(Debug, Clone)]
pub struct Budget {
    accounts: Arc<[Arc<Account>]>,
}

impl Default for Budget {
    fn default() -> Self {
        Self {
            accounts: Arc::new([]),
        }
    }
}

/// What one buffer holds of each account; dropping it gives it back.
#[derive(Debug)]
pub struct Charge {
    _permits: Vec<OwnedSemaphorePermit>,
}

tokio::task_local! {
    static CURRENT: Budget;
}

impl Budget {
    /// Adds an account (charged after those already added).
    #[must_use]
    pub fn with(self, account: Arc<Account>) -> Self {
        let mut accounts = self.accounts.to_vec();
        accounts.push(account);
        Self {
            accounts: accounts.into(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.accounts.is_empty()
    }

    /// Runs `fut` with no budget current. For reads that take buffers
    /// while their call's later windows already hold the budget and wait
    /// for this one (rebuilding a degraded window): waiting on the budget
    /// there would deadlock the call. The pool still bounds them.
    pub async fn exempt<F: std::future::Future>(fut: F) -> F::Output {
        CURRENT.scope(Budget::default(), fut).await
    }

    /// Polls `stream` with this budget current, so the buffers its reads
    /// take are charged to it.
    pub fn scope_stream<S: Stream>(self, stream: S) -> Scoped<S> {
        Scoped {
            budget: self,
            inner: Box::pin(stream),
        }
    }

    /// Charges `n` buffers of `class` to the current budget, all at once,
    /// waiting for room; `None` when no budget is current. A request for
    /// more than an account's share waits for all of it (it runs alone
    /// within that account rather than failing).
    pub(crate) async fn charge_current(class: ClassOfPool, n: usize) -> Option<Vec<Charge>> {
        let budget = CURRENT.try_with(Budget::clone).ok()?;
        if budget.accounts.is_empty() || n == 0 {
            return None;
        }
        let mut whole = Vec::with_capacity(budget.accounts.len());
        for account in budget.accounts.iter() {
            let (left, share) = account.share_of(class);
            let permits = left
                .acquire_many_owned(n.min(share) as u32)
                .await
                .expect("budget semaphores are never closed");
            whole.push(permits);
        }
        let charges = (0..n)
            .map(|_| Charge {
                _permits: whole
                    .iter_mut()
                    .map(|p| {
                        let one = p.num_permits().min(1);
                        p.split(one).expect("never more than is left")
                    })
                    .collect(),
            })
            .collect();
        Some(charges)
    }
}

impl Budget {
    /// Charges a heap copy of `bytes` to the current budget, waiting for
    /// room (a copy larger than an account waits for all of it); `None`
    /// when no budget is current. Keep the charge with the copy (see
    /// [`HeapCopy`]).
    pub(crate) async fn charge_heap_current(bytes: usize) -> Option<Charge> {
        let budget = CURRENT.try_with(Budget::clone).ok()?;
        if budget.accounts.is_empty() {
            return None;
        }
        let kib = bytes.div_ceil(1024).max(1);
        let mut permits = Vec::with_capacity(budget.accounts.len());
        for account in budget.accounts.iter() {
            let max = (account.bytes_max / 1024).max(1);
            permits.push(
                Arc::clone(&account.heap_kib)
                    .acquire_many_owned(kib.min(max) as u32)
                    .await
                    .expect("budget semaphores are never closed"),
            );
        }
        Some(Charge { _permits: permits })
    }
}

/// Bytes copied to the heap, and their charge: as a `Bytes` owner, the
/// charge lasts as long as any slice of the copy, even one HTTP/2 holds.
#[derive(Debug)]
pub struct HeapCopy {
    pub data: Vec<u8>,
    pub charge: Option<Charge>,
}

impl AsRef<[u8]> for HeapCopy {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

/// A stream polled with a budget current (see [`Budget::scope_stream`]).
pub struct Scoped<S> {
    budget: Budget,
    inner: Pin<Box<S>>,
}

impl<S: Stream> Stream for Scoped<S> {
    type Item = S::Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        let this = &mut *self;
        let budget = this.budget.clone();
        let inner = this.inner.as_mut();
        CURRENT.sync_scope(budget, || inner.poll_next(cx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    const CLASS: ClassOfPool = ClassOfPool {
        buf_bytes: 4096,
        count: 8,
        pool_bytes: 8 * 4096 * 2,
    };

    #[tokio::test]
    async fn charges_wait_for_room_and_return_with_the_buffer() {
        // Guards against a budget that lets one holder take more than its
        // share of a buffer class, or that never gives charges back.
        // Half the pool: half of each class, 4 of these 8 buffers.
        let account = Account::new("connection 1".into(), 8 * 4096);
        let budget = Budget::default().with(Arc::clone(&account));
        let take = |n| {
            budget
                .clone()
                .scope_stream(futures::stream::once(async move {
                    Budget::charge_current(CLASS, n).await
                }))
        };
        let first = take(3).next().await.unwrap().unwrap();
        assert_eq!(first.len(), 3);
        assert_eq!(account.bytes_held(), 3 * 4096);
        // Two more do not fit until one of the first three goes back.
        let mut second = Box::pin(take(2));
        assert!(futures::poll!(second.next()).is_pending());
        let mut first = first;
        drop(first.pop());
        let second = second.next().await.unwrap().unwrap();
        assert_eq!(second.len(), 2);
        assert_eq!(account.bytes_held(), 4 * 4096);
        drop(first);
        drop(second);
        assert_eq!(account.bytes_held(), 0);
        // More than the share takes all of it.
        let all = take(5).next().await.unwrap().unwrap();
        assert_eq!(all.len(), 5);
        assert_eq!(account.bytes_held(), 4 * 4096);
        drop(all);
        assert_eq!(account.bytes_held(), 0);
        // Outside a scope nothing is charged.
        assert!(Budget::charge_current(CLASS, 9).await.is_none());
    }

    #[tokio::test]
    async fn heap_copies_are_charged_while_any_slice_lives() {
        // Guards against any-order batches holding unbounded heap copies
        // (+3 GB at 48 stalled 64 MiB items).
        let account = Account::new("connection 2".into(), 64 << 10);
        let budget = Budget::default().with(Arc::clone(&account));
        let copy = |bytes| {
            budget
                .clone()
                .scope_stream(futures::stream::once(async move {
                    let charge = Budget::charge_heap_current(bytes).await;
                    bytes::Bytes::from_owner(HeapCopy {
                        data: vec![7; bytes],
                        charge,
                    })
                }))
        };
        let a = copy(40 << 10).next().await.unwrap();
        let slice = a.slice(0..10);
        drop(a);
        assert_eq!(account.heap_bytes_held(), 40 << 10);
        let mut b = Box::pin(copy(40 << 10));
        assert!(futures::poll!(b.next()).is_pending());
        drop(slice);
        let b = b.next().await.unwrap();
        assert_eq!(account.heap_bytes_held(), 40 << 10);
        drop(b);
        assert_eq!(account.heap_bytes_held(), 0);
    }
}
