//! Unit tests of `catalog`.

use super::records::DATASET_RECORD_VERSION;
use super::*;

fn obj(size: u64, at: u64) -> ObjectRecord {
    ObjectRecord {
        size,
        logical_offset: at,
        crc32: 0xdead_beef,
        block_crcs: vec![1, 2, 3],
    }
}

fn ds() -> DatasetRecord {
    DatasetRecord {
        id: 0,
        class: StorageClass::Stripe,
        checksum_block_bytes: 32768,
        created_unix_ms: 5,
        object_count: 3,
        total_bytes: 30,
        allocated_bytes: 12288,
        extents: vec![Extent {
            offset: 0,
            len: 12288,
        }],
        owner: String::new(),
        manifest: None,
        unit_rows: 1,
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(3000))]
    // Guards the catalog's record decoders against damaged bytes: any
    // input decodes to a record that encodes back to the same bytes
    // (current version) or to itself, or is a named error; never a
    // panic or a huge allocation.
    #[test]
    fn record_decoders_take_any_bytes(
        bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200),
        seed in proptest::prelude::any::<u64>(),
    ) {
        // Mutations of valid records reach deeper than random bytes.
        let mut mutated = ds().encode();
        let mut objrec = obj(70000, 8192).encode();
        if !mutated.is_empty() {
            let i = (seed as usize) % mutated.len();
            mutated[i] ^= (seed >> 32) as u8 | 1;
            let j = (seed as usize >> 8) % objrec.len();
            objrec[j] ^= (seed >> 40) as u8 | 1;
        }
        for b in [&bytes, &mutated, &objrec] {
            if let Ok(r) = DatasetRecord::decode(b) {
                let again = r.encode();
                proptest::prop_assert_eq!(DatasetRecord::decode(&again).unwrap(), r);
                if b[0] == DATASET_RECORD_VERSION {
                    proptest::prop_assert_eq!(&again, b);
                }
            }
            if let Ok(o) = ObjectRecord::decode(b) {
                proptest::prop_assert_eq!(&o.encode(), b);
            }
            let _ = ObjectRecord::decode_summary(b);
        }
    }
}

#[test]
fn records_round_trip() {
    let d = DatasetRecord {
        id: 9,
        owner: "vision".into(),
        manifest: Some(Extent {
            offset: 1 << 20,
            len: 4 << 20,
        }),
        ..ds()
    };
    assert_eq!(DatasetRecord::decode(&d.encode()).unwrap(), d);
    // Version 1 (no owner) and 2 (no manifest) records still read.
    let mut v2 = ds().encode();
    v2[0] = 2;
    v2.truncate(v2.len() - 5);
    assert_eq!(DatasetRecord::decode(&v2).unwrap(), ds());
    let mut v1 = v2.clone();
    v1[0] = 1;
    v1.pop();
    assert_eq!(DatasetRecord::decode(&v1).unwrap(), ds());
    let o = obj(70000, 8192);
    assert_eq!(ObjectRecord::decode(&o.encode()).unwrap(), o);
    assert!(ObjectRecord::decode(&o.encode()[..20]).is_err());
    let mut bad = d.encode();
    bad[1] = 99;
    assert!(DatasetRecord::decode(&bad).is_err());
}

#[test]
fn commit_list_delete() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.redb");
    let c = Catalog::open(&path, [1; 16], false).unwrap();
    let objects: Vec<(String, ObjectRecord)> = ["a/1", "a/2", "b/1"]
        .iter()
        .enumerate()
        .map(|(i, p)| (p.to_string(), obj(10, i as u64 * 4096)))
        .collect();
    let d = c.commit_dataset("ds", ds(), &objects, &[]).unwrap();
    assert_eq!(d.id, 1);
    assert!(matches!(
        c.commit_dataset("ds", ds(), &[], &[]),
        Err(CatalogError::DatasetExists(_))
    ));
    let d2 = c.commit_dataset("other", ds(), &objects, &[]).unwrap();
    assert_eq!(d2.id, 2);
    let (page, more) = c.list_objects(1, "", None, 2).unwrap();
    assert_eq!(
        page.iter().map(|o| o.path.as_str()).collect::<Vec<_>>(),
        ["a/1", "a/2"]
    );
    assert!(more);
    let (page, more) = c.list_objects(1, "", Some("a/2"), 2).unwrap();
    assert_eq!(page.len(), 1);
    assert!(!more);
    let (page, _) = c.list_objects(1, "b/", None, 10).unwrap();
    assert_eq!(page.len(), 1);
    assert_eq!(
        c.get_object(1, "a/2").unwrap().unwrap().logical_offset,
        4096
    );
    assert!(c.get_object(1, "zz").unwrap().is_none());
    drop(c);
    // Reopen: durable, and a different pool is refused.
    assert!(matches!(
        Catalog::open(&path, [2; 16], false),
        Err(CatalogError::PoolMismatch { .. })
    ));
    let c = Catalog::open(&path, [1; 16], false).unwrap();
    assert_eq!(c.datasets().unwrap().len(), 2);
    let gone = c.delete_dataset("ds").unwrap().unwrap();
    assert_eq!(gone.id, 1);
    assert!(c.get_object(1, "a/1").unwrap().is_none());
    assert!(c.get_object(2, "a/1").unwrap().is_some());
    assert!(c.delete_dataset("ds").unwrap().is_none());
}

#[test]
fn ec_record_and_unit_crcs() {
    let dir = tempfile::tempdir().unwrap();
    let c = Catalog::open(&dir.path().join("c.redb"), [1; 16], false).unwrap();
    let mut rec = ds();
    rec.class = StorageClass::Ec {
        data_units: 3,
        parity_units: 1,
    };
    assert_eq!(DatasetRecord::decode(&rec.encode()).unwrap(), rec);
    let id = c.reserve_dataset_id().unwrap();
    assert_eq!(id, 1);
    rec.id = id;
    let crcs: Vec<u32> = (0..12).collect();
    let d = c.commit_dataset("ec", rec, &[], &crcs).unwrap();
    assert_eq!(d.id, 1);
    assert_eq!(c.unit_crcs(1, 4, 0, 3).unwrap(), crcs);
    assert_eq!(c.unit_crcs(1, 4, 1, 1).unwrap(), vec![4, 5, 6, 7]);
    // Past the last stripe, or the wrong width: corrupt, never short.
    assert!(matches!(
        c.unit_crcs(1, 4, 2, 2),
        Err(CatalogError::Corrupt(..))
    ));
    assert!(matches!(
        c.unit_crcs(1, 5, 0, 1),
        Err(CatalogError::Corrupt(..))
    ));
    // The next plain commit does not reuse the reserved id.
    assert_eq!(c.commit_dataset("s", ds(), &[], &[]).unwrap().id, 2);
    c.delete_dataset("ec").unwrap().unwrap();
    assert!(c.unit_crcs(1, 4, 0, 1).is_err());
}
