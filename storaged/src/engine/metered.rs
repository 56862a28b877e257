//! Per-device I/O metrics, as an engine wrapper: bytes and operations read
//! and written, errors, fdatasyncs, the latency of each operation from
//! submission to completion, and the operations in flight.
//!
//! Installed only when metrics are served (`storaged serve --metrics`):
//! it costs one small allocation per operation. Handles are made once per
//! device, so recording is a few atomic operations. An operation whose
//! waiter goes away before it completes leaves the queue-depth gauge at
//! that moment (the engine still owns it until the kernel is done).

use std::io;
use std::sync::Arc;
use std::time::Instant;

use metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};

use super::{FixedForeign, ForeignRead, ForeignReadFuture, IoBackend, IoOp, OpKind};
use crate::buf::{BufLease, IoFuture};
use crate::metrics::{
    DEVICE_ERRORS, DEVICE_IO_SECONDS, DEVICE_QUEUE_DEPTH, DEVICE_READ_BYTES, DEVICE_READS,
    DEVICE_SYNCS, DEVICE_WRITES, DEVICE_WRITTEN_BYTES,
};

/// One device's handles.
#[derive(Debug)]
struct DeviceMetrics {
    read_bytes: Counter,
    written_bytes: Counter,
    reads: Counter,
    writes: Counter,
    read_errors: Counter,
    write_errors: Counter,
    syncs: Counter,
    read_seconds: Histogram,
    write_seconds: Histogram,
    queue_depth: Gauge,
}

impl DeviceMetrics {
    fn new(device: u32) -> Self {
        let d = device.to_string();
        Self {
            read_bytes: counter!(DEVICE_READ_BYTES, "device" => d.clone()),
            written_bytes: counter!(DEVICE_WRITTEN_BYTES, "device" => d.clone()),
            reads: counter!(DEVICE_READS, "device" => d.clone()),
            writes: counter!(DEVICE_WRITES, "device" => d.clone()),
            read_errors: counter!(DEVICE_ERRORS, "device" => d.clone(), "op" => "read"),
            write_errors: counter!(DEVICE_ERRORS, "device" => d.clone(), "op" => "write"),
            syncs: counter!(DEVICE_SYNCS, "device" => d.clone()),
            read_seconds: histogram!(DEVICE_IO_SECONDS, "device" => d.clone(), "op" => "read"),
            write_seconds: histogram!(DEVICE_IO_SECONDS, "device" => d.clone(), "op" => "write"),
            queue_depth: gauge!(DEVICE_QUEUE_DEPTH, "device" => d),
        }
    }

    fn completed(&self, kind: OpKind, started: Instant, result: &io::Result<usize>) {
        let seconds = started.elapsed().as_secs_f64();
        match (kind, result) {
            (OpKind::Read, Ok(n)) => {
                self.reads.increment(1);
                self.read_bytes.increment(*n as u64);
                self.read_seconds.record(seconds);
            }
            (OpKind::Write, Ok(n)) => {
                self.writes.increment(1);
                self.written_bytes.increment(*n as u64);
                self.write_seconds.record(seconds);
            }
            (OpKind::Read, Err(_)) => self.read_errors.increment(1),
            (OpKind::Write, Err(_)) => self.write_errors.increment(1),
        }
    }
}

/// Takes an operation off the queue-depth gauge however it ends.
struct InFlight(Arc<DeviceMetrics>);

impl InFlight {
    fn start(m: &Arc<DeviceMetrics>) -> Self {
        m.queue_depth.increment(1.0);
        Self(Arc::clone(m))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.queue_depth.decrement(1.0);
    }
}

/// An engine whose operations are counted and timed.
pub struct MeteredBackend {
    inner: Arc<dyn IoBackend>,
    devices: Vec<Arc<DeviceMetrics>>,
}

impl MeteredBackend {
    pub fn new(inner: Arc<dyn IoBackend>) -> Self {
        let devices = (0..inner.device_count())
            .map(|d| Arc::new(DeviceMetrics::new(d)))
            .collect();
        Self { inner, devices }
    }
}

impl IoBackend for MeteredBackend {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    fn submit(&self, op: IoOp, buf: BufLease) -> IoFuture {
        let Some(m) = self.devices.get(op.device as usize) else {
            return self.inner.submit(op, buf);
        };
        let in_flight = InFlight::start(m);
        let started = Instant::now();
        let io = self.inner.submit(op, buf);
        IoFuture::boxed(async move {
            let (result, buf) = io.await;
            in_flight.0.completed(op.kind, started, &result);
            drop(in_flight);
            (result, buf)
        })
    }

    fn read_foreign(&self, read: ForeignRead) -> ForeignReadFuture {
        let Some(m) = self.devices.get(read.device as usize) else {
            return self.inner.read_foreign(read);
        };
        let in_flight = InFlight::start(m);
        let started = Instant::now();
        let io = self.inner.read_foreign(read);
        ForeignReadFuture::boxed(async move {
            let result = io.await;
            in_flight.0.completed(OpKind::Read, started, &result);
            drop(in_flight);
            result
        })
    }

    fn sync(&self, device: u32) -> io::Result<()> {
        if let Some(m) = self.devices.get(device as usize) {
            m.syncs.increment(1);
        }
        self.inner.sync(device)
    }

    fn discard(&self, device: u32, offset: u64, len: u64) -> io::Result<()> {
        self.inner.discard(device, offset, len)
    }

    fn device_count(&self) -> u32 {
        self.inner.device_count()
    }

    unsafe fn fix_foreign(&self, base: *mut u8, len: usize) -> Option<FixedForeign> {
        // SAFETY: the caller's promise, passed on unchanged.
        unsafe { self.inner.fix_foreign(base, len) }
    }
}
