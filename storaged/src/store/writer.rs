//! The writers of an ingest: the byte stream of a session becomes device
//! writes, a stripe unit at a time (`StripeWriter`) or a whole `ec` stripe
//! with its parity (`redundancy::EcWriter`), with at most
//! `ingest_write_depth` writes in flight; `ClassWriter` picks one by the
//! dataset's storage class.

use super::*;

pub(crate) type WriteFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), StoreError>> + Send>>;

/// Queues the write of `lease` at `offset` of `device`, then waits while
/// `depth_max` or more writes are in flight.
pub(crate) async fn push_write(
    writes: &mut FuturesUnordered<WriteFuture>,
    depth_max: usize,
    engine: &Arc<dyn IoBackend>,
    device: u32,
    offset: u64,
    lease: BufLease,
) -> Result<(), StoreError> {
    let engine = Arc::clone(engine);
    writes.push(Box::pin(async move {
        engine::write_all(&*engine, device, offset, lease)
            .await
            .map(drop)
            .map_err(|e| StoreError::from_io(device, offset, e))
    }));
    while writes.len() >= depth_max {
        if let Some(r) = writes.next().await {
            r?;
        }
    }
    Ok(())
}

/// A pool buffer of `len` bytes for an ingest. Completed writes hold
/// buffers until polled, so they are drained while waiting for a free one.
pub(crate) async fn acquire_draining(
    writes: &mut FuturesUnordered<WriteFuture>,
    pool: &Arc<BufferPool>,
    len: usize,
) -> Result<BufLease, StoreError> {
    loop {
        tokio::select! {
            biased;
            Some(r) = writes.next(), if !writes.is_empty() => r?,
            lease = pool.acquire(len) => {
                return lease.map_err(StoreError::Buffers);
            }
        }
    }
}

/// Turns sequential logical writes into stripe-unit-sized device writes.
pub(super) struct StripeWriter {
    layout: StripeLayout,
    depth_max: usize,
    stage: Option<BufLease>,
    stage_logical: u64,
    stage_fill: usize,
    writes: FuturesUnordered<WriteFuture>,
}

impl StripeWriter {
    pub(super) fn new(layout: StripeLayout, depth_max: usize) -> Self {
        Self {
            layout,
            depth_max: depth_max.max(1),
            stage: None,
            stage_logical: 0,
            stage_fill: 0,
            writes: FuturesUnordered::new(),
        }
    }

    pub(super) fn stage_end(&self) -> u64 {
        self.stage_logical + self.stage_fill as u64
    }

    pub(super) fn unit_end(&self, at: u64) -> u64 {
        (at / self.layout.stripe_unit_bytes + 1) * self.layout.stripe_unit_bytes
    }

    pub(super) async fn acquire(&mut self, pool: &Arc<BufferPool>) -> Result<BufLease, StoreError> {
        acquire_draining(
            &mut self.writes,
            pool,
            self.layout.stripe_unit_bytes as usize,
        )
        .await
    }

    pub(super) async fn write_at(
        &mut self,
        io: &WriteIo<'_>,
        mut logical: u64,
        mut data: &[u8],
    ) -> Result<(), StoreError> {
        while !data.is_empty() {
            if self.stage.is_some() && logical != self.stage_end() {
                self.flush(io).await?;
            }
            if self.stage.is_none() {
                assert_eq!(logical % BLOCK_BYTES, 0, "stages start 4 KiB aligned");
                self.stage = Some(self.acquire(io.pool).await?);
                self.stage_logical = logical;
                self.stage_fill = 0;
            }
            let room = (self.unit_end(self.stage_logical) - self.stage_end()) as usize;
            let n = room.min(data.len());
            let fill = self.stage_fill;
            let stage = self.stage.as_mut().expect("staged");
            stage.as_mut_full()[fill..fill + n].copy_from_slice(&data[..n]);
            self.stage_fill += n;
            logical += n as u64;
            data = &data[n..];
            if self.stage_end() == self.unit_end(self.stage_logical) {
                self.flush(io).await?;
            }
        }
        Ok(())
    }

    /// Zero-fills the stage to the next 4 KiB boundary (end of an object).
    pub(super) async fn pad_to_block(&mut self, io: &WriteIo<'_>) -> Result<(), StoreError> {
        let Some(stage) = self.stage.as_mut() else {
            return Ok(());
        };
        let padded = self.stage_fill.next_multiple_of(BLOCK_BYTES as usize);
        stage.as_mut_full()[self.stage_fill..padded].fill(0);
        self.stage_fill = padded;
        if self.stage_end() == self.unit_end(self.stage_logical) {
            self.flush(io).await?;
        }
        Ok(())
    }

    pub(super) async fn flush(&mut self, io: &WriteIo<'_>) -> Result<(), StoreError> {
        let Some(mut stage) = self.stage.take() else {
            return Ok(());
        };
        let padded = self.stage_fill.next_multiple_of(BLOCK_BYTES as usize);
        stage.as_mut_full()[self.stage_fill..padded].fill(0);
        stage.set_len(padded);
        let (device, offset) = self.layout.map(self.stage_logical);
        debug_assert!(self.stage_logical + padded as u64 <= self.unit_end(self.stage_logical));
        push_write(
            &mut self.writes,
            self.depth_max,
            io.engine,
            device,
            offset,
            stage,
        )
        .await?;
        Ok(())
    }

    pub(super) async fn finish(&mut self, io: &WriteIo<'_>) -> Result<(), StoreError> {
        self.flush(io).await?;
        while let Some(r) = self.writes.next().await {
            r?;
        }
        Ok(())
    }
}

/// The erasure-coding side of an ingest.
pub(super) struct EcIngest {
    pub(super) map: EcMap,
    pub(super) writer: redundancy::EcWriter,
    /// End of the data space carved so far.
    pub(super) data_end: u64,
    pub(super) dataset_id: u64,
}

/// The storage class's side of an ingest: the writer that turns the byte
/// stream into device writes.
pub(super) enum ClassWriter {
    /// Stripe units, written as they fill.
    Stripe(StripeWriter),
    /// Whole `ec` stripes with their parity; the session's `extents` are
    /// its rows, in data order.
    Ec(Box<EcIngest>),
}

impl ClassWriter {
    pub(super) async fn write_at(
        &mut self,
        io: &WriteIo<'_>,
        at: u64,
        bytes: &[u8],
    ) -> Result<(), StoreError> {
        match self {
            Self::Stripe(w) => w.write_at(io, at, bytes).await,
            Self::Ec(ec) => ec.writer.write_at(io, &ec.map, at, bytes).await,
        }
    }

    /// Zero-fills to the next 4 KiB boundary (the end of an object).
    pub(super) async fn pad_to_block(&mut self, io: &WriteIo<'_>) -> Result<(), StoreError> {
        match self {
            Self::Stripe(w) => w.pad_to_block(io).await,
            Self::Ec(ec) => ec.writer.pad_to_block(io, &ec.map).await,
        }
    }

    /// Writes what is staged and waits for every write.
    pub(super) async fn finish(&mut self, io: &WriteIo<'_>) -> Result<(), StoreError> {
        match self {
            Self::Stripe(w) => w.finish(io).await,
            Self::Ec(ec) => ec.writer.finish(io, &ec.map).await,
        }
    }

    /// The writes still in flight (an aborted ingest waits for them before
    /// its space is freed).
    pub(super) fn take_writes(&mut self) -> FuturesUnordered<WriteFuture> {
        match self {
            Self::Stripe(w) => std::mem::take(&mut w.writes),
            Self::Ec(ec) => std::mem::take(&mut ec.writer.writes),
        }
    }

    /// Check values per unit the dataset record keeps (see `DatasetRecord`).
    pub(super) fn unit_rows(&self) -> u32 {
        match self {
            Self::Stripe(_) => 1,
            Self::Ec(ec) => ec.writer.rows,
        }
    }
}
