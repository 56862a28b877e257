//! Opening a store: assembling the pool from its devices, reconciling the
//! catalog with the devices' root, rebuilding the allocator from committed
//! datasets, and starting the engine and the discard worker.

use super::*;

/// Buffer classes for a pool of `total` bytes: a quarter in 64 KiB buffers
/// (4 KiB to 64 KiB sample reads), a quarter in 256 KiB, half in
/// stripe-unit buffers (streaming and ingest).
pub(super) fn buffer_classes(total: u64, stripe_unit: u64) -> Vec<ClassSpec> {
    let mut v = vec![
        ClassSpec {
            buf_bytes: 64 << 10,
            count: (total / 4 / (64 << 10)).max(1) as usize,
        },
        ClassSpec {
            buf_bytes: stripe_unit as usize,
            count: (total / 2 / stripe_unit).max(8) as usize,
        },
    ];
    if stripe_unit > 256 << 10 {
        v.push(ClassSpec {
            buf_bytes: 256 << 10,
            count: (total / 4 / (256 << 10)).max(1) as usize,
        });
    }
    v
}

impl Store {
    /// Opens the devices, the engine and the catalog, and rebuilds the
    /// allocator from committed datasets.
    pub fn open(cfg: &StoreConfig) -> Result<Arc<Self>, OpenError> {
        Self::open_hooked(cfg, Arc::new(hooks::NoHooks))
    }

    /// As [`open`](Self::open), with a hook to wrap the pool's engine
    /// (tests inject faults this way).
    pub fn open_with(
        cfg: &StoreConfig,
        wrap: impl FnOnce(Arc<dyn IoBackend>) -> Arc<dyn IoBackend> + Send + 'static,
    ) -> Result<Arc<Self>, OpenError> {
        Self::open_hooked(cfg, Arc::new(hooks::WrapEngineOnce::new(wrap)))
    }

    /// As [`open`](Self::open), with every write path of the pool going
    /// through `hooks` (tests simulate power loss this way).
    pub fn open_hooked(
        cfg: &StoreConfig,
        hooks: Arc<dyn hooks::IoHooks>,
    ) -> Result<Arc<Self>, OpenError> {
        std::fs::create_dir_all(&cfg.data_dir).map_err(|source| OpenError::DataDir {
            path: cfg.data_dir.clone(),
            source,
        })?;
        let catalog_path = cfg.data_dir.join("catalog.redb");
        let (replacements, pending) = replacement_paths(cfg, &catalog_path)?;
        let OpenedPool {
            files,
            paths,
            layout,
            pool_id,
            formatted,
            mut missing,
            superblocks,
            superblocks_repaired,
        } = open_pool(&PoolSpec {
            devices: cfg.devices.clone(),
            replacements,
            create_size_bytes: Some(cfg.device_size_bytes),
            stripe_unit_bytes: cfg.stripe_unit_bytes,
            force: cfg.force,
        })?;
        if formatted && catalog_path.exists() && !cfg.force {
            // Blank devices next to a catalog: the catalog describes data that
            // is gone. Keeping it would serve garbage; erasing it silently
            // would hide the loss.
            return Err(OpenError::StaleCatalog(catalog_path));
        }
        let meta_devices = meta_devices(&*hooks, &files, &missing, &paths, layout);
        let catalog = open_catalog(
            cfg,
            &*hooks,
            &catalog_path,
            pool_id,
            formatted,
            &meta_devices,
        )?;
        let (data, recovery, discard_worker) =
            open_dataset_side(cfg, &catalog_path, catalog, meta_devices, layout, pool_id)?;
        // Everything format 2 promises is on the devices now.
        let mut superblocks = superblocks;
        crate::device::upgrade_superblocks(&files, &paths, &mut superblocks, &missing)?;
        redundancy::check_degraded_start(
            &data.datasets.read().expect("dataset map poisoned"),
            layout,
            &missing,
            &paths,
        )?;
        let (pool, engine_limits, engine, injected) =
            start_engine(cfg, &*hooks, files, &paths, layout)?;
        let redundancy = RedundancyState::open(
            cfg,
            layout,
            pending,
            &superblocks,
            &mut missing,
            paths.clone(),
        );
        let io = DeviceIo::new(cfg, hooks, pool, engine_limits, engine, &missing);
        if let Some(worker) = discard_worker {
            worker
                .start(Arc::clone(&io.engine), layout)
                .map_err(OpenError::Engine)?;
        }
        log_open(&io, layout, &pool_id, &missing, &paths);
        Ok(Arc::new(Self {
            io,
            data,
            redundancy,
            scrub_counters: Default::default(),
            injected,
            superblocks_repaired,
            layout,
            recovery,
            pool_id,
            limits: cfg.limits.clone(),
            read_counters: ReadCounters::default(),
            // Never more than half the pool, whatever the limits say:
            // foreground reads need the rest.
            read_ahead: readahead::ReadAhead::new(
                cfg.limits
                    .hint_cache_bytes_max
                    .min(cfg.buffer_pool_bytes / 2),
                std::time::Duration::from_millis(cfg.limits.hint_ttl_ms),
            ),
        }))
    }
}

/// The pool's metadata files on the devices that are present, through
/// `hooks`.
fn meta_devices(
    hooks: &dyn hooks::IoHooks,
    files: &[std::fs::File],
    missing: &[bool],
    paths: &[std::path::PathBuf],
    layout: StripeLayout,
) -> crate::poolmeta::MetaDevices {
    crate::poolmeta::MetaDevices {
        files: files
            .iter()
            .zip(missing)
            .zip(paths)
            .map(|((f, m), path)| match (m, f.try_clone()) {
                (false, Ok(f)) => Some(hooks.meta_file(f, path)),
                _ => None,
            })
            .collect(),
        layout,
    }
}

/// Says what opened, and warns of every missing device.
fn log_open(
    io: &DeviceIo,
    layout: StripeLayout,
    pool_id: &[u8; 16],
    missing: &[bool],
    paths: &[std::path::PathBuf],
) {
    for (i, m) in missing.iter().enumerate() {
        if *m {
            tracing::warn!(device = i, path = %paths[i].display(), "device missing: the pool is degraded");
        }
    }
    tracing::info!(
        pool = %pool_id_hex(pool_id),
        engine = io.engine.kind(),
        devices = layout.device_count,
        capacity_bytes = layout.capacity_bytes(),
        "store open"
    );
}

impl DeviceIo {
    /// The I/O side of a store being opened: `engine` behind the device
    /// slots that know which devices are `missing`.
    fn new(
        cfg: &StoreConfig,
        hooks: Arc<dyn hooks::IoHooks>,
        pool: Arc<BufferPool>,
        engine_limits: EngineLimits,
        engine: Arc<dyn IoBackend>,
        missing: &[bool],
    ) -> Self {
        let slots = Arc::new(engine::route::DeviceSlots::new(engine, missing));
        Self {
            engine: Arc::clone(&slots) as _,
            slots,
            pool,
            engine_kind: cfg.engine,
            engine_limits,
            hooks,
            foreign_reads: tokio::sync::Semaphore::new(engine::FOREIGN_READS_IN_FLIGHT_MAX),
        }
    }
}

impl RedundancyState {
    /// The redundancy side of a store being opened. A replacement that did
    /// not finish (`pending`) leaves its device marked missing: it is not
    /// trusted until `device replace` resumes and completes it.
    fn open(
        cfg: &StoreConfig,
        layout: StripeLayout,
        pending: Option<replace::ReplaceRecord>,
        superblocks: &[crate::device::Superblock],
        missing: &mut [bool],
        paths: Vec<PathBuf>,
    ) -> Self {
        let rebuild = pending.as_ref().map(|r| {
            tracing::warn!(device = r.index, path = %r.new_path.display(), "a device replacement was interrupted; run storagectl device replace again to resume it");
            if let Some(m) = missing.get_mut(r.index as usize) {
                *m = true;
            }
            replace::RebuildState {
                index: r.index,
                new_path: r.new_path.clone(),
                running: false,
                ..Default::default()
            }
        });
        // A superblock of a device that is there: the template for
        // replacement devices.
        let superblock = superblocks
            .iter()
            .zip(missing.iter())
            .find(|(_, m)| !**m)
            .map(|(sb, _)| sb.clone())
            .unwrap_or_else(|| superblocks[0].clone());
        Self {
            device_reconstructions: (0..layout.device_count)
                .map(|_| Default::default())
                .collect(),
            stripe_cache: Mutex::new(redundancy::StripeCache::new(
                cfg.limits.degraded_cache_bytes_max,
            )),
            replacing: AtomicBool::new(false),
            rebuild: Mutex::new(rebuild),
            superblock,
            device_paths: RwLock::new(paths),
        }
    }
}

/// The dataset side of a store being opened: the catalog brought up to
/// the devices' root (the truth; a catalog behind it, lost, damaged or
/// restored, is brought up to it before anything uses it), the allocator
/// rebuilt from every extent a dataset owns, and a handle per dataset.
fn open_dataset_side(
    cfg: &StoreConfig,
    catalog_path: &std::path::Path,
    catalog: Catalog,
    meta_devices: crate::poolmeta::MetaDevices,
    layout: StripeLayout,
    pool_id: [u8; 16],
) -> Result<
    (
        DatasetSide,
        pool_root::Recovery,
        Option<discard::DiscardWorker>,
    ),
    OpenError,
> {
    let (root, mut recovery) = pool_root::reconcile(&catalog, &meta_devices, pool_id)?;
    let records = catalog.datasets()?;
    let mut used = Vec::new();
    for (_, r) in &records {
        used.extend(r.owned_extents());
    }
    let alloc = ExtentAllocator::new(layout.capacity_bytes(), &used).map_err(|source| {
        OpenError::Inconsistent {
            path: catalog_path.to_path_buf(),
            source,
        }
    })?;
    let alloc = Arc::new(Mutex::new(alloc));
    let (space, discard_worker) = discard::FreeSpace::new(Arc::clone(&alloc), cfg.discard);
    let space = Arc::new(space);
    let pool_root = pool_root::PoolRoot::new(meta_devices, root);
    pool_root.adopt(&catalog, &space, &mut recovery)?;
    let datasets: BTreeMap<String, Arc<DatasetHandle>> = catalog
        .datasets()?
        .into_iter()
        .map(|(name, record)| {
            let h = Arc::new(DatasetHandle::new(
                name.clone(),
                record,
                layout,
                Arc::clone(&space),
            ));
            (name, h)
        })
        .collect();
    let data = DatasetSide {
        catalog,
        pool_root,
        alloc,
        space,
        datasets: RwLock::new(datasets),
        ingesting: Mutex::new(HashSet::new()),
        quota: quota::QuotaLedger::default(),
    };
    Ok((data, recovery, discard_worker))
}

/// Where replaced devices are (index → path) and the replacement under
/// way, if any: from the catalog, or, without a usable one, from the
/// devices' root. Devices are found by their superblocks; a replaced one
/// where `device replace` put it, in preference to the old one.
#[allow(clippy::type_complexity)]
fn replacement_paths(
    cfg: &StoreConfig,
    catalog_path: &std::path::Path,
) -> Result<(Vec<(u32, PathBuf)>, Option<replace::ReplaceRecord>), OpenError> {
    let from_catalog = if catalog_path.exists() {
        match Catalog::device_overrides(catalog_path) {
            Ok(v) => Some(v),
            // Dealt with once the devices are open (rebuilt from them).
            Err(e) if e.is_damage() => None,
            Err(e) => return Err(e.into()),
        }
    } else {
        None
    };
    let (overrides, pending) = from_catalog.unwrap_or_else(|| {
        crate::poolmeta::peek_root(&cfg.devices)
            .map(|r| {
                (
                    r.replaced
                        .into_iter()
                        .map(|(i, p)| (i, PathBuf::from(p)))
                        .collect(),
                    r.replacing,
                )
            })
            .unwrap_or_default()
    });
    let pending = pending.and_then(|b| replace::ReplaceRecord::decode(&b));
    let mut replacements: Vec<(u32, PathBuf)> = Vec::new();
    for (i, p) in overrides
        .into_iter()
        .chain(pending.iter().map(|r| (r.index, r.new_path.clone())))
    {
        replacements.retain(|(j, _)| *j != i);
        replacements.push((i, p));
    }
    Ok((replacements, pending))
}

/// Opens the data-dir catalog (on `hooks`' storage). A damaged one is set
/// aside as `catalog.redb.damaged-T` (never deleted) and a new one made,
/// to be rebuilt from the devices, if they describe the pool.
fn open_catalog(
    cfg: &StoreConfig,
    hooks: &dyn hooks::IoHooks,
    catalog_path: &std::path::Path,
    pool_id: [u8; 16],
    formatted: bool,
    meta_devices: &crate::poolmeta::MetaDevices,
) -> Result<Catalog, OpenError> {
    let catalog_backend = hooks.catalog(catalog_path);
    let catalog = match Catalog::open_on(catalog_path, pool_id, formatted, catalog_backend.clone())
    {
        Ok(c) => c,
        // A damaged catalog is set aside (never deleted) and rebuilt
        // from the devices, if they describe the pool.
        Err(e) if e.is_damage() && meta_devices.read_newest_root(pool_id).is_some() => {
            let stamp = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let aside = cfg.data_dir.join(format!("catalog.redb.damaged-{stamp}"));
            std::fs::rename(catalog_path, &aside).map_err(|source| OpenError::DataDir {
                path: aside.clone(),
                source,
            })?;
            tracing::error!(error = %e, moved_to = %aside.display(), "the catalog is damaged; rebuilding it from the devices");
            Catalog::open_on(catalog_path, pool_id, false, catalog_backend)?
        }
        Err(e) => return Err(e.into()),
    };
    Ok(catalog)
}

/// The engine of an opened pool: the buffer pool it reads into, its
/// limits, and the engine itself with what wraps it (test hooks, seeded
/// fault injection and its counts, metrics).
#[allow(clippy::type_complexity)]
fn start_engine(
    cfg: &StoreConfig,
    hooks: &dyn hooks::IoHooks,
    files: Vec<std::fs::File>,
    paths: &[PathBuf],
    layout: StripeLayout,
) -> Result<
    (
        Arc<BufferPool>,
        EngineLimits,
        Arc<dyn IoBackend>,
        Option<Arc<engine::fault::InjectedCounts>>,
    ),
    OpenError,
> {
    let pool = BufferPool::new(buffer_classes(
        cfg.buffer_pool_bytes,
        layout.stripe_unit_bytes,
    ))
    .map_err(OpenError::Engine)?;
    let engine_limits = EngineLimits {
        queue_depth_per_device_max: cfg.queue_depth_per_device_max,
        psync_threads: (layout.device_count * 2).clamp(2, 16),
    };
    let engine = engine::build(cfg.engine, files, Arc::clone(&pool), engine_limits)
        .map_err(OpenError::Engine)?;
    let mut engine = hooks.engine(engine, paths);
    let mut injected = None;
    if let Some(spec) = &cfg.fault_inject {
        let seeded = engine::fault::SeededBackend::new(engine, spec.clone());
        injected = Some(Arc::clone(&seeded.injected));
        engine = Arc::new(seeded);
    }
    if cfg.io_metrics {
        engine = Arc::new(engine::metered::MeteredBackend::new(engine));
    }
    Ok((pool, engine_limits, engine, injected))
}
