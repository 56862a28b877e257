//! The fallback engine: blocking pread/pwrite on a few worker threads.
//!
//! Used when io_uring is unavailable (old kernel, seccomp, or
//! `io_uring_disabled`). The workers share one bounded channel; their number
//! bounds the operations in flight.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::thread::JoinHandle;

use super::{
    EngineLimits, FOREIGN_READS_IN_FLIGHT_MAX, ForeignRead, ForeignReadFuture, IoBackend, IoOp,
    OpKind,
};
use crate::buf::{BufLease, BufferPool, IoFuture};

enum Job {
    Pool {
        op: IoOp,
        index: u32,
    },
    Foreign {
        read: ForeignRead,
        done: futures::channel::oneshot::Sender<io::Result<usize>>,
    },
}

/// pread/pwrite engine; see the module docs.
pub struct PsyncEngine {
    tx: Option<crossbeam_channel::Sender<Job>>,
    files: Arc<Vec<File>>,
    pool: Arc<BufferPool>,
    threads: Vec<JoinHandle<()>>,
}

impl PsyncEngine {
    pub fn new(files: Vec<File>, pool: Arc<BufferPool>, limits: EngineLimits) -> io::Result<Self> {
        let files = Arc::new(files);
        let (tx, rx) =
            crossbeam_channel::bounded::<Job>(pool.buffer_count() + FOREIGN_READS_IN_FLIGHT_MAX);
        let n = limits.psync_threads.max(1);
        let mut threads = Vec::with_capacity(n as usize);
        for i in 0..n {
            let rx = rx.clone();
            let files = Arc::clone(&files);
            let pool = Arc::clone(&pool);
            threads.push(
                std::thread::Builder::new()
                    .name(format!("storaged-psync-{i}"))
                    .spawn(move || {
                        while let Ok(job) = rx.recv() {
                            match job {
                                Job::Pool { op, index } => {
                                    let (ptr, cap) = pool.buf_raw(index);
                                    assert!(op.len as usize <= cap);
                                    let r = do_io(&files[op.device as usize], op, ptr);
                                    pool.complete(index, r);
                                }
                                Job::Foreign { read, done } => {
                                    let op = IoOp {
                                        kind: OpKind::Read,
                                        device: read.device,
                                        offset: read.device_offset,
                                        len: read.len,
                                    };
                                    let r = do_io(&files[op.device as usize], op, read.target(0));
                                    // The read is over; `read.memory` may go.
                                    let _ = done.send(r);
                                }
                            }
                        }
                    })?,
            );
        }
        tracing::info!(threads = n, devices = files.len(), "psync engine started");
        Ok(Self {
            tx: Some(tx),
            files,
            pool,
            threads,
        })
    }
}

/// Moves `op.len` bytes between the device and `ptr`, which the caller
/// guarantees is valid for `op.len` bytes and lent to this operation.
fn do_io(file: &File, op: IoOp, ptr: *mut u8) -> io::Result<usize> {
    let len = op.len as usize;
    let mut done = 0usize;
    while done < len {
        let off = op.offset + done as u64;
        let n = match op.kind {
            OpKind::Read => {
                // SAFETY: `ptr..ptr + len` is the operation's target (a pool
                // buffer lent to it, or checked foreign memory kept alive by
                // the job), and done < len.
                let b = unsafe { std::slice::from_raw_parts_mut(ptr.add(done), len - done) };
                file.read_at(b, off)
            }
            OpKind::Write => {
                // SAFETY: as above; writes only read the buffer.
                let b = unsafe { std::slice::from_raw_parts(ptr.add(done), len - done) };
                file.write_at(b, off)
            }
        };
        match n {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

impl IoBackend for PsyncEngine {
    fn kind(&self) -> &'static str {
        "psync"
    }

    fn submit(&self, op: IoOp, buf: BufLease) -> IoFuture {
        if op.device as usize >= self.files.len() || op.len as usize > buf.capacity() {
            let err = io::Error::new(io::ErrorKind::InvalidInput, format!("bad I/O {op:?}"));
            return IoFuture::ready(Err(err), buf);
        }
        let index = buf.index();
        let fut = buf.lend_to_kernel();
        let sent = self
            .tx
            .as_ref()
            .map(|tx| tx.try_send(Job::Pool { op, index }).is_ok())
            .unwrap_or(false);
        if !sent {
            self.pool
                .complete(index, Err(io::Error::other("psync workers are gone")));
        }
        fut
    }

    fn read_foreign(&self, read: ForeignRead) -> ForeignReadFuture {
        if let Err(e) = read.check(self.files.len() as u32) {
            return ForeignReadFuture::ready(Err(e));
        }
        let (done, fut) = ForeignReadFuture::channel();
        match &self.tx {
            Some(tx) => match tx.try_send(Job::Foreign { read, done }) {
                Ok(()) => fut,
                Err(_) => ForeignReadFuture::ready(Err(io::Error::other(
                    "psync queue is full or its workers are gone",
                ))),
            },
            None => ForeignReadFuture::ready(Err(io::Error::other("psync workers are gone"))),
        }
    }

    fn sync(&self, device: u32) -> io::Result<()> {
        self.files[device as usize].sync_data()
    }

    fn discard(&self, device: u32, offset: u64, len: u64) -> io::Result<()> {
        let file = self.files.get(device as usize).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("no device {device}"))
        })?;
        super::discard_file(file, offset, len)
    }

    fn device_count(&self) -> u32 {
        self.files.len() as u32
    }
}

impl Drop for PsyncEngine {
    fn drop(&mut self) {
        // Closing the channel lets workers finish queued jobs and exit.
        self.tx.take();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::tests::{conformance, test_files, test_pool};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn psync_engine_conforms() {
        let dir = tempfile::tempdir().unwrap();
        let pool = test_pool();
        let engine = PsyncEngine::new(
            test_files(dir.path(), 2, 1 << 20),
            Arc::clone(&pool),
            EngineLimits {
                queue_depth_per_device_max: 4,
                psync_threads: 3,
            },
        )
        .unwrap();
        conformance(Arc::new(engine), pool).await;
    }
}
