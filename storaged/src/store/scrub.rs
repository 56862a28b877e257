//! Scrub: read everything, verify every checksum, repair what parity can.
//!
//! For an `ec` dataset the scrub walks its stripes: every unit (data and
//! parity) is read and checked against its position-bound CRC. Units that
//! fail are rebuilt from the others (at most M per stripe), the rebuilt unit
//! must match its CRC, and it is written back in place, made durable and
//! read back once more before it counts as repaired. Units on a missing
//! device are counted, not written (that is `device replace`'s job). For a
//! `stripe` dataset the scrub reads every object and checks every checksum
//! block; bad blocks are reported, as there is nothing to repair them from.
//!
//! The scrub paces itself to `rate_mib_s` (a running budget: it sleeps
//! whenever it is ahead of `bytes / rate`), so foreground reads keep their
//! latency. One scrub runs at a time; the background scrub (every
//! `scrub_interval_s`) and `storagectl scrub` share the same code and
//! counters.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use storaged_proto::DatasetName;

use super::class::DatasetLayout;
use super::redundancy::EcDataset;
use super::window::{ReadWindow, WindowPolicy};
use super::{DatasetHandle, ObjectRef, Store};
use crate::engine;
use crate::error::{AdminError, StoreError};

/// Totals over every scrub since start (Status).
#[derive(Debug, Default)]
pub struct ScrubCounters {
    pub passes: AtomicU64,
    pub bytes_checked: AtomicU64,
    pub corrupt: AtomicU64,
    pub repaired: AtomicU64,
    pub unrecoverable: AtomicU64,
    pub running: AtomicBool,
}

/// What one scrub found. Units are stripe units for `ec` datasets and
/// checksum blocks for `stripe` datasets.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ScrubReport {
    pub datasets: u64,
    pub bytes_checked: u64,
    pub units_checked: u64,
    pub corrupt: u64,
    pub repaired: u64,
    pub unrecoverable: u64,
    /// Units not checked because their device is missing.
    pub missing: u64,
    /// `ec` unit rows (32 KiB) found bad and rebuilt: repairs are as fine
    /// as the checks (a whole unit for datasets from before row CRCs).
    pub rows_corrupt: u64,
    pub rows_repaired: u64,
    /// The first problems found, one line each (at most 100).
    pub problems: Vec<String>,
}

const PROBLEMS_MAX: usize = 100;

impl ScrubReport {
    fn problem(&mut self, line: String) {
        tracing::warn!(problem = %line, "scrub");
        if self.problems.len() < PROBLEMS_MAX {
            self.problems.push(line);
        }
    }
}

/// Progress of a running scrub: bytes done and bytes in all.
pub type ScrubProgress = (u64, u64);

/// Keeps a scrub at or below a byte rate.
struct Pacer {
    start: Instant,
    bytes_per_s: f64,
    done: u64,
}

impl Pacer {
    async fn pace(&mut self, bytes: u64) {
        self.done += bytes;
        let due = Duration::from_secs_f64(self.done as f64 / self.bytes_per_s);
        let elapsed = self.start.elapsed();
        if due > elapsed {
            tokio::time::sleep(due - elapsed).await;
        }
    }
}

/// Clears the running flag however the scrub ends.
struct Running<'a>(&'a AtomicBool);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

/// Scrubs every dataset every `scrub_interval_s` (first pass one interval
/// after start) at `scrub_rate_mib_s`, unless the interval is 0. A pass
/// that finds a scrub already running is skipped.
pub fn spawn_background(store: &Arc<Store>) {
    let interval_s = store.limits.scrub_interval_s;
    if interval_s == 0 {
        return;
    }
    let weak = Arc::downgrade(store);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(interval_s)).await;
            let Some(store) = weak.upgrade() else { return };
            let rate = store.limits.scrub_rate_mib_s;
            if let Err(e) = store.scrub(None, rate, |_| {}).await {
                tracing::warn!(error = %e, "background scrub did not run");
            }
        }
    });
}

impl Store {
    /// Scrubs one dataset, or all of them; see the module docs.
    /// `progress` is called after each stripe or object.
    pub async fn scrub(
        self: &Arc<Self>,
        name: Option<&DatasetName>,
        rate_mib_s: u64,
        progress: impl FnMut(ScrubProgress) + Send,
    ) -> Result<ScrubReport, AdminError> {
        let datasets = match name {
            Some(n) => vec![
                self.dataset(n)
                    .map_err(|_| AdminError::DatasetNotFound(n.to_string()))?,
            ],
            None => self.list_datasets(),
        };
        if self
            .scrub_counters
            .running
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            return Err(AdminError::ScrubRunning);
        }
        let _running = Running(&self.scrub_counters.running);
        let pass = ScrubPass {
            store: self,
            total: datasets.iter().map(|d| d.record.allocated_bytes).sum(),
            pacer: Pacer {
                start: Instant::now(),
                bytes_per_s: (rate_mib_s.max(1) << 20) as f64,
                done: 0,
            },
            report: ScrubReport::default(),
            progress,
        };
        let report = pass.run(datasets).await?;
        let c = &self.scrub_counters;
        c.passes.fetch_add(1, Ordering::Relaxed);
        c.bytes_checked
            .fetch_add(report.bytes_checked, Ordering::Relaxed);
        c.corrupt.fetch_add(report.corrupt, Ordering::Relaxed);
        c.repaired.fetch_add(report.repaired, Ordering::Relaxed);
        c.unrecoverable
            .fetch_add(report.unrecoverable, Ordering::Relaxed);
        tracing::info!(
            datasets = report.datasets,
            bytes = report.bytes_checked,
            corrupt = report.corrupt,
            repaired = report.repaired,
            unrecoverable = report.unrecoverable,
            "scrub finished"
        );
        Ok(report)
    }
}

/// One scrub pass: the store it reads, its pace, and what it has found.
struct ScrubPass<'a, P> {
    store: &'a Arc<Store>,
    /// Bytes the pass will check in all (for progress).
    total: u64,
    pacer: Pacer,
    report: ScrubReport,
    progress: P,
}

impl<P: FnMut(ScrubProgress) + Send> ScrubPass<'_, P> {
    async fn run(mut self, datasets: Vec<Arc<DatasetHandle>>) -> Result<ScrubReport, StoreError> {
        for ds in datasets {
            self.report.datasets += 1;
            // The class's scrub strategy: stripes against their unit
            // CRCs (and repaired) where there is parity, objects against
            // their block CRCs where there is not.
            match &ds.layout {
                DatasetLayout::Ec(ec) => self.ec_dataset(&ds, ec).await?,
                DatasetLayout::Stripe(_) => self.stripe_dataset(&ds).await?,
            }
        }
        Ok(self.report)
    }

    fn progress(&mut self) {
        (self.progress)((self.pacer.done, self.total));
    }

    async fn ec_dataset(
        &mut self,
        ds: &Arc<DatasetHandle>,
        ec: &EcDataset,
    ) -> Result<(), StoreError> {
        let width = ec.geometry().width();
        let unit = ec.map.unit_bytes();
        for stripe in 0..ec.map.stripes() {
            if ds.deleted.load(Ordering::SeqCst) {
                return Ok(());
            }
            self.pacer.pace(unit * u64::from(width)).await;
            let mut read = self.store.read_stripe(ds, ec, stripe, true).await?;
            let report = &mut self.report;
            report.units_checked += u64::from(width);
            report.bytes_checked += unit * u64::from(width);
            let bad: Vec<u32> = (0..width)
                .filter(|p| !read.intact[*p as usize] && !read.missing[*p as usize])
                .collect();
            report.missing += read.missing.iter().filter(|m| **m).count() as u64;
            report.corrupt += bad.len() as u64;
            let bad_rows: u64 = bad
                .iter()
                .map(|p| read.rows_good[*p as usize].iter().filter(|g| !**g).count() as u64)
                .sum();
            report.rows_corrupt += bad_rows;
            if !bad.is_empty() {
                match self.store.rebuild_stripe(ds, ec, stripe, &mut read) {
                    Err(e) => {
                        report.unrecoverable += bad.len() as u64;
                        report.problem(e.to_string());
                    }
                    Ok(_) => self.repair(ds, ec, stripe, &bad, &read, bad_rows).await,
                }
            }
            self.progress();
        }
        Ok(())
    }

    /// Writes the rebuilt units `bad` of `stripe` back in place.
    async fn repair(
        &mut self,
        ds: &DatasetHandle,
        ec: &EcDataset,
        stripe: u64,
        bad: &[u32],
        read: &super::redundancy::StripeRead,
        bad_rows: u64,
    ) {
        let mut all_written = true;
        for &p in bad {
            let (device, _) = ec.map.unit_location(stripe, p);
            match self
                .store
                .write_back(ds, ec, stripe, p, &read.units[p as usize])
                .await
            {
                Ok(()) => self.report.repaired += 1,
                Err(e) => {
                    all_written = false;
                    self.report.unrecoverable += 1;
                    self.report.problem(format!(
                        "dataset {:?} stripe {stripe} unit {p} (device {device}): rebuilt but not written back: {e}",
                        ds.name
                    ));
                }
            }
        }
        if all_written {
            self.report.rows_repaired += bad_rows;
        }
    }

    async fn stripe_dataset(&mut self, ds: &Arc<DatasetHandle>) -> Result<(), StoreError> {
        let store = self.store;
        let block = u64::from(ds.record.checksum_block_bytes);
        let mut after: Option<String> = None;
        loop {
            let (page, more) = store.data.catalog.list_objects(
                ds.record.id,
                "",
                after.as_deref(),
                store.limits.list_page_size_max as usize,
            )?;
            let paths: Vec<&str> = page.iter().map(|o| o.path.as_str()).collect();
            let records = store.data.catalog.get_objects(ds.record.id, &paths)?;
            for (summary, record) in page.iter().zip(records) {
                if ds.deleted.load(Ordering::SeqCst) {
                    return Ok(());
                }
                let Some(record) = record else { continue };
                let obj = ObjectRef {
                    dataset: Arc::clone(ds),
                    path: summary.path.clone(),
                    record,
                };
                for w in store.window_policy(&obj).windows(0, obj.record.size) {
                    self.pacer.pace(w.device_len()).await;
                    self.report.units_checked += w.len().div_ceil(block);
                    self.report.bytes_checked += w.len();
                    if let Err(e) = store.read_window_healthy(&obj, w).await {
                        // Count each bad block of the window.
                        let bad = store.bad_blocks(&obj, w).await;
                        self.report.corrupt += bad.max(1);
                        self.report.unrecoverable += bad.max(1);
                        self.report.problem(e.to_string());
                    }
                }
                self.progress();
            }
            if !more {
                return Ok(());
            }
            after = page.last().map(|o| o.path.clone());
        }
    }
}

impl Store {
    /// Writes a rebuilt unit in place, makes it durable and reads it back.
    async fn write_back(
        &self,
        ds: &DatasetHandle,
        ec: &EcDataset,
        stripe: u64,
        position: u32,
        unit: &crate::buf::BufLease,
    ) -> Result<(), StoreError> {
        let (device, offset) = ec.map.unit_location(stripe, position);
        let len = unit.len();
        let mut lease = self
            .io
            .pool
            .acquire(len)
            .await
            .map_err(StoreError::Buffers)?;
        lease.as_mut_full()[..len].copy_from_slice(unit.as_slice());
        lease.set_len(len);
        let lease = engine::write_all(&*self.io.engine, device, offset, lease)
            .await
            .map_err(|e| StoreError::from_io(device, offset, e))?;
        let engine = Arc::clone(&self.io.engine);
        tokio::task::spawn_blocking(move || engine.sync(device))
            .await
            .map_err(|source| StoreError::TaskFailed {
                what: "sync",
                source,
            })?
            .map_err(|source| StoreError::Sync { device, source })?;
        let back = engine::read_exact(&*self.io.engine, device, offset, len, lease)
            .await
            .map_err(|e| StoreError::from_io(device, offset, e))?;
        let rows = ds.record.unit_rows.max(1) as usize;
        let crcs = self.data.catalog.unit_crcs(
            ds.record.id,
            ec.geometry().width() as usize * rows,
            stripe,
            1,
        )?;
        let at = position as usize * rows;
        let checks = crate::ec::unit_checks(ds.record.id, stripe, position, back.as_slice(), rows);
        if checks[..] != crcs[at..at + rows] {
            return Err(StoreError::Unrecoverable {
                dataset: ds.name.clone(),
                stripe,
                devices: vec![device],
                parity: 0,
                missing: false,
            });
        }
        Ok(())
    }

    /// Checksum blocks of window `w` that fail, one read per block (only
    /// after the window failed).
    async fn bad_blocks(&self, obj: &ObjectRef, w: ReadWindow) -> u64 {
        let block = u64::from(obj.dataset.record.checksum_block_bytes);
        let mut bad = 0;
        for b in WindowPolicy::new(obj, block).windows(w.start, w.len()) {
            if self.read_window_healthy(obj, b).await.is_err() {
                bad += 1;
            }
        }
        bad
    }
}
