//! Small reads of one dataset that wait at the same time go to storaged
//! as one request.
//!
//! Each dataset has a queue and a dispatcher. The dispatcher takes a
//! request slot (the mount's `--fetches-max`), then everything queued by
//! then (up to `BATCH_ITEMS_MAX` items and `BATCH_BYTES_MAX` bytes), and
//! sends it as one `ReadInto` (or one `ReadBatch` over TCP): while all
//! slots are busy, reads pile up and leave together, so many concurrent
//! sample reads cost a few requests instead of one each, and a lone read
//! leaves at once. A read whose batch failed transiently (storaged
//! restarting) is tried again on its own, within the retry budget.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use storaged_client::{ClientError, Dataset, SizedRange};
use tokio::sync::{Semaphore, mpsc, oneshot};

use super::reader::ReadFailure;

/// Largest read that goes through a batch (larger ones are requests of
/// their own).
pub const BATCH_ITEM_BYTES_MAX: u64 = 1 << 20;
/// Items of one batch.
const BATCH_ITEMS_MAX: usize = 64;
/// Bytes of one batch.
const BATCH_BYTES_MAX: u64 = 16 << 20;

/// How one read of a batch ended, as its reader needs it.
pub enum BatchFailure {
    /// Worth trying again on its own (storaged away, region forgotten).
    Transient(ClientError),
    Final(ReadFailure),
}

type Reply = Result<Bytes, BatchFailure>;

struct Request {
    range: SizedRange,
    reply: oneshot::Sender<Reply>,
}

/// The queues of a mount, one per dataset (by id).
pub struct Batcher {
    runtime: tokio::runtime::Handle,
    fetches: Arc<Semaphore>,
    queues: Mutex<HashMap<u64, mpsc::UnboundedSender<Request>>>,
}

impl Batcher {
    pub fn new(runtime: tokio::runtime::Handle, fetches: Arc<Semaphore>) -> Self {
        Self {
            runtime,
            fetches,
            queues: Mutex::default(),
        }
    }

    /// Queues `range` of `dataset` (id `dataset_id`) and waits for its
    /// batch.
    pub async fn read(&self, dataset: &Dataset, dataset_id: u64, range: SizedRange) -> Reply {
        let (reply, done) = oneshot::channel();
        let queue = {
            let mut queues = self.queues.lock().expect("queues poisoned");
            queues
                .entry(dataset_id)
                .or_insert_with(|| {
                    let (tx, rx) = mpsc::unbounded_channel();
                    let fetches = Arc::clone(&self.fetches);
                    self.runtime.spawn(dispatch(dataset.clone(), rx, fetches));
                    tx
                })
                .clone()
        };
        // The dispatcher lives as long as the batcher's sender.
        if queue.send(Request { range, reply }).is_err() {
            return Err(BatchFailure::Final(ReadFailure::Failed(
                "the mount's read queue is closed".into(),
            )));
        }
        done.await.unwrap_or_else(|_| {
            Err(BatchFailure::Final(ReadFailure::Failed(
                "a batch of reads ended without answering".into(),
            )))
        })
    }
}

/// Sends the queue's reads in batches, one per free request slot.
async fn dispatch(
    dataset: Dataset,
    mut queue: mpsc::UnboundedReceiver<Request>,
    fetches: Arc<Semaphore>,
) {
    while let Some(first) = queue.recv().await {
        let Ok(permit) = Arc::clone(&fetches).acquire_owned().await else {
            return;
        };
        let mut bytes = first.range.length;
        let mut batch = vec![first];
        while batch.len() < BATCH_ITEMS_MAX && bytes < BATCH_BYTES_MAX {
            match queue.try_recv() {
                Ok(r) => {
                    bytes += r.range.length;
                    batch.push(r);
                }
                Err(_) => break,
            }
        }
        let dataset = dataset.clone();
        tokio::spawn(async move {
            let _permit = permit;
            send_batch(&dataset, batch).await;
        });
    }
}

/// One request for `batch`; every read gets its own answer.
async fn send_batch(dataset: &Dataset, batch: Vec<Request>) {
    let ranges: Vec<SizedRange> = batch.iter().map(|r| r.range.clone()).collect();
    let started = std::time::Instant::now();
    let result = dataset.read_ranges_sized(&ranges).await;
    tracing::debug!(
        items = ranges.len(),
        us = started.elapsed().as_micros() as u64,
        "batch read"
    );
    match result {
        Ok((results, _)) => {
            for (request, result) in batch.into_iter().zip(results) {
                let _ = request.reply.send(result.map_err(classify));
            }
        }
        Err(e) => {
            let transient = storaged_client::retry::is_transient(&e);
            let message = e.to_string();
            for request in batch {
                let failure = if transient {
                    BatchFailure::Transient(ClientError::Status(tonic::Status::unavailable(
                        message.clone(),
                    )))
                } else {
                    BatchFailure::Final(ReadFailure::from_client_code(e.code(), message.clone()))
                };
                let _ = request.reply.send(Err(failure));
            }
        }
    }
}

fn classify(e: ClientError) -> BatchFailure {
    if storaged_client::retry::is_transient(&e) {
        BatchFailure::Transient(e)
    } else {
        BatchFailure::Final(ReadFailure::from_client(e))
    }
}
