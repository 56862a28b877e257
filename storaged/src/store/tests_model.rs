//! A proptest reference model of the store: random sequences of ingest,
//! read, rm and reopen against a real store (4 small devices, in memory or
//! on files), each result checked against an in-memory map of what must be
//! there.
//!
//! After every step: the datasets listed are the model's, every read
//! returns the model's bytes or the model's error, and the space used is
//! exactly what the committed datasets own (once freed space is
//! discarded). Reopening must change none of it.

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::tests::{config, discards_settled, ingest_class, owned_bytes, pattern, read_all};
use super::*;
use crate::service::GrpcCode;

/// One step of a sequence.
#[derive(Debug, Clone)]
enum Step {
    /// Ingest dataset `d{name}` (`ec:3+1` or `stripe`) with these objects
    /// (path index, size, pattern seed).
    Ingest {
        name: u8,
        ec: bool,
        objects: Vec<(u8, usize, u64)>,
    },
    /// Read `[offset, offset + len)` (fractions of the object) of object
    /// `object` (an index into the dataset's objects, or past them) of
    /// dataset `d{name}`.
    Read {
        name: u8,
        object: u8,
        from: u8,
        to: u8,
    },
    Rm {
        name: u8,
    },
    Reopen,
}

fn step() -> impl Strategy<Value = Step> {
    let size = prop_oneof![
        Just(0usize),
        1usize..5000,
        Just(4096usize),
        Just(32768usize),
        30_000usize..300_000,
    ];
    prop_oneof![
        4 => (0u8..4, any::<bool>(), prop::collection::vec((0u8..6, size, any::<u64>()), 1..4))
            .prop_map(|(name, ec, objects)| Step::Ingest { name, ec, objects }),
        4 => (0u8..4, 0u8..5, any::<u8>(), any::<u8>())
            .prop_map(|(name, object, from, to)| Step::Read { name, object, from, to }),
        2 => (0u8..4).prop_map(|name| Step::Rm { name }),
        1 => Just(Step::Reopen),
    ]
}

type Model = BTreeMap<String, Vec<(String, Vec<u8>)>>;

/// The model's view and the store's agree: names, and space.
async fn check_invariants(store: &Arc<Store>, model: &Model) -> Result<(), TestCaseError> {
    let mut names: Vec<String> = store
        .list_datasets()
        .iter()
        .map(|d| d.name.clone())
        .collect();
    names.sort();
    let want: Vec<String> = model.keys().cloned().collect();
    prop_assert_eq!(names, want);
    discards_settled(store).await;
    let owned = owned_bytes(store);
    prop_assert_eq!(store.status().used_bytes, owned, "space accounted exactly");
    Ok(())
}

/// Where a model run's device I/O goes.
#[derive(Debug, Clone, Copy)]
enum Devices {
    /// The real engine on device files.
    Files,
    /// A `MemoryDisk`: fast, and the same order every run.
    Memory,
}

async fn run(steps: Vec<Step>, devices: Devices) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 16, 64 << 10);
    let disk = Arc::new(crate::engine::memory::MemoryDisk::default());
    let open = |cfg: &StoreConfig| match devices {
        Devices::Files => Store::open(cfg).unwrap(),
        Devices::Memory => {
            Store::open_hooked(cfg, Arc::new(hooks::MemoryHooks(Arc::clone(&disk)))).unwrap()
        }
    };
    let mut store = open(&cfg);
    if let Devices::Memory = devices {
        prop_assert_eq!(store.status().engine, "memory");
    }
    let mut model = Model::new();
    for step in steps {
        match step {
            Step::Ingest { name, ec, objects } => {
                let name = format!("d{name}");
                // Paths are unique within a dataset: later duplicates are
                // dropped here (a duplicate path is its own test).
                let mut objs: Vec<(String, Vec<u8>)> = Vec::new();
                for (p, size, seed) in objects {
                    let path = format!("dir/o{p}");
                    if objs.iter().all(|(q, _)| *q != path) {
                        objs.push((path, pattern(seed, size)));
                    }
                }
                let refs: Vec<(&str, Vec<u8>)> =
                    objs.iter().map(|(p, b)| (p.as_str(), b.clone())).collect();
                let class = if ec {
                    StorageClass::Ec {
                        data_units: 3,
                        parity_units: 1,
                    }
                } else {
                    StorageClass::Stripe
                };
                let r = ingest_class(&store, &name, class, &refs).await;
                match model.entry(name) {
                    std::collections::btree_map::Entry::Occupied(_) => {
                        let e = r.expect_err("a second ingest of one name is refused");
                        prop_assert_eq!(e.code(), tonic::Code::AlreadyExists, "{}", e);
                    }
                    std::collections::btree_map::Entry::Vacant(v) => {
                        r.map_err(|e| TestCaseError::fail(format!("ingest {}: {e}", v.key())))?;
                        v.insert(objs);
                    }
                }
            }
            Step::Read {
                name,
                object,
                from,
                to,
            } => {
                let name = format!("d{name}");
                let objs = model.get(&name);
                let path = objs
                    .and_then(|o| o.get(usize::from(object)))
                    .map_or_else(|| format!("dir/missing{object}"), |(p, _)| p.clone());
                let bytes = objs.and_then(|o| o.iter().find(|(p, _)| *p == path));
                let size = bytes.map_or(0, |(_, b)| b.len() as u64);
                let (a, b) = (u64::from(from.min(to)), u64::from(from.max(to)));
                let (off, len) = (size * a / 255, size * (b - a) / 255);
                match (read_all(&store, &name, &path, off, Some(len)).await, bytes) {
                    (Ok(got), Some((_, want))) => {
                        prop_assert!(
                            got[..] == want[off as usize..(off + len) as usize],
                            "{}/{} [{}, +{}) differs",
                            name,
                            path,
                            off,
                            len
                        );
                    }
                    (Err(e), None) => prop_assert_eq!(e.code(), tonic::Code::NotFound, "{}", e),
                    (got, want) => {
                        return Err(TestCaseError::fail(format!(
                            "{name}/{path}: got {:?}, model has it: {}",
                            got.map(|g| g.len()),
                            want.is_some()
                        )));
                    }
                }
            }
            Step::Rm { name } => {
                let name = format!("d{name}");
                let r = store.delete(&DatasetName::new(&name).unwrap()).await;
                if model.remove(&name).is_some() {
                    r.map_err(|e| TestCaseError::fail(format!("rm {name}: {e}")))?;
                } else {
                    prop_assert_eq!(r.unwrap_err().code(), tonic::Code::NotFound);
                }
            }
            Step::Reopen => {
                discards_settled(&store).await;
                drop(store);
                store = open(&cfg);
            }
        }
        check_invariants(&store, &model).await?;
    }
    // Everything reads back whole at the end, after one more reopen.
    drop(store);
    let store = open(&cfg);
    check_invariants(&store, &model).await?;
    for (name, objs) in &model {
        for (path, want) in objs {
            let got = read_all(&store, name, path, 0, None).await.unwrap();
            prop_assert!(got == *want, "{}/{}", name, path);
        }
    }
    Ok(())
}

fn run_on(steps: Vec<Step>, devices: Devices) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(steps, devices))
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 64,
        max_shrink_iters: 64,
        ..ProptestConfig::default()
    })]

    // Guards the store's contract as a whole: whatever the order of
    // ingests, reads, deletes and restarts, it holds exactly what was
    // committed and not deleted, reads it back byte for byte, refuses what
    // the model refuses, and accounts space exactly. Device I/O in memory,
    // so many sequences run quickly.
    #[test]
    fn the_store_behaves_like_a_map(steps in prop::collection::vec(step(), 1..24)) {
        run_on(steps, Devices::Memory)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 16,
        max_shrink_iters: 64,
        ..ProptestConfig::default()
    })]

    // Guards the same contract on the real engine and device files.
    #[test]
    fn the_store_behaves_like_a_map_on_device_files(steps in prop::collection::vec(step(), 1..24)) {
        run_on(steps, Devices::Files)?;
    }
}
