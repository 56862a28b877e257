//! Unit tests of `device`.

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
    // Guards the superblock decoder against damaged bytes: a valid
    // CRC over random contents decodes to a superblock that encodes
    // to one that decodes to itself, or to a named error; never a
    // panic.
    #[test]
    fn superblocks_decode_or_refuse(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 4096), magic in proptest::prelude::any::<bool>()) {
        let mut b = bytes;
        if magic {
            b[..8].copy_from_slice(&SUPERBLOCK_MAGIC);
            b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
            b[88..4092].fill(0);
            let crc = crc32fast::hash(&b[..4092]);
            b[4092..].copy_from_slice(&crc.to_le_bytes());
        }
        let path = Path::new("fuzz");
        if let Ok(Probe::Ours(sb)) = Superblock::probe(&b, path) {
            // Fields the decoder does not keep (constants, reserved
            // bytes) are written afresh; what it keeps round-trips.
            let mut again = vec![0u8; 4096];
            sb.encode(&mut again);
            let back = Superblock::probe(&again, path);
            proptest::prop_assert!(matches!(back, Ok(Probe::Ours(ref s)) if *s == sb));
        }
        let _ = Superblock::probe(&b[..100], path);
    }
}

use super::*;

fn spec(dir: &Path, n: usize) -> PoolSpec {
    PoolSpec {
        devices: (0..n).map(|i| dir.join(format!("dev{i}.img"))).collect(),
        create_size_bytes: Some(8 << 20),
        stripe_unit_bytes: 1 << 20,
        force: false,
        replacements: Vec::new(),
    }
}

#[test]
fn superblock_round_trip_and_checksum() {
    let sb = Superblock {
        format_version: 1,
        pool_id: [7; 16],
        device_index: 2,
        device_count: 4,
        stripe_unit_bytes: 1 << 20,
        data_offset_bytes: DATA_OFFSET_BYTES,
        device_data_bytes: 7 << 20,
        device_size_bytes: 8 << 20,
        created_unix_ms: 42,
        checksum_block_bytes: CHECKSUM_BLOCK_BYTES,
        block_bytes: 4096,
    };
    let mut buf = vec![0u8; SUPERBLOCK_BYTES];
    sb.encode(&mut buf);
    match Superblock::probe(&buf, Path::new("x")).unwrap() {
        Probe::Ours(back) => assert_eq!(back, sb),
        other => panic!("{other:?}"),
    }
    buf[40] ^= 1;
    assert!(matches!(
        Superblock::probe(&buf, Path::new("x")),
        Err(DeviceError::BadChecksum { .. })
    ));
}

#[test]
fn formats_then_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let p = open_pool(&spec(dir.path(), 3)).unwrap();
    assert!(p.formatted);
    assert_eq!(p.layout.device_count, 3);
    assert_eq!(p.layout.device_data_bytes, 7 << 20);
    let id = p.pool_id;
    drop(p);
    let p = open_pool(&spec(dir.path(), 3)).unwrap();
    assert!(!p.formatted);
    assert_eq!(p.pool_id, id);
}

// Guards against silently re-formatting a device that holds someone
// else's data.
#[test]
fn refuses_foreign_data_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let s = spec(dir.path(), 2);
    std::fs::write(&s.devices[1], vec![0xabu8; 2 << 20]).unwrap();
    let err = open_pool(&s).unwrap_err();
    assert!(matches!(err, DeviceError::Foreign { .. }), "{err}");
    assert!(err.to_string().contains("dev1.img"));
    let forced = PoolSpec { force: true, ..s };
    assert!(open_pool(&forced).unwrap().formatted);
}

#[test]
// Guards assembly by identity: devices given in any order are put in
// superblock order; one left out is missing (degraded); a device of
// another pool or one device twice are refused by name; a blank or
// absent device next to a complete pool is left alone.
fn assembles_by_identity_and_refuses_strangers() {
    let dir = tempfile::tempdir().unwrap();
    let s = spec(dir.path(), 3);
    open_pool(&s).unwrap();
    let swapped = PoolSpec {
        devices: vec![
            s.devices[2].clone(),
            s.devices[0].clone(),
            s.devices[1].clone(),
        ],
        ..s.clone()
    };
    let p = open_pool(&swapped).unwrap();
    assert_eq!(p.paths, s.devices);
    assert_eq!(p.missing, vec![false; 3]);
    let short = PoolSpec {
        devices: vec![s.devices[2].clone(), s.devices[0].clone()],
        ..s.clone()
    };
    let p = open_pool(&short).unwrap();
    assert_eq!(p.missing, vec![false, true, false]);
    assert_eq!(p.paths[0], s.devices[0]);
    assert_eq!(p.paths[2], s.devices[2]);

    let other_dir = tempfile::tempdir().unwrap();
    let other = spec(other_dir.path(), 2);
    open_pool(&other).unwrap();
    let mixed = PoolSpec {
        devices: vec![
            s.devices[0].clone(),
            s.devices[1].clone(),
            other.devices[1].clone(),
        ],
        ..s.clone()
    };
    match open_pool(&mixed).unwrap_err() {
        DeviceError::WrongPool { path, .. } => assert_eq!(path, other.devices[1]),
        e => panic!("{e}"),
    }
    // The same device through another name (a symlink, as by-id).
    let link = dir.path().join("link0");
    std::os::unix::fs::symlink(&s.devices[0], &link).unwrap();
    let twice = PoolSpec {
        devices: vec![s.devices[0].clone(), link, s.devices[1].clone()],
        ..s.clone()
    };
    assert!(
        matches!(open_pool(&twice).unwrap_err(), DeviceError::Config(m) if m.contains("given twice"))
    );
    // A copy of a device claims the same index.
    let copy = dir.path().join("copy1.img");
    std::fs::copy(&s.devices[1], &copy).unwrap();
    let dup = PoolSpec {
        devices: vec![s.devices[0].clone(), s.devices[1].clone(), copy],
        ..s.clone()
    };
    assert!(matches!(
        open_pool(&dup).unwrap_err(),
        DeviceError::DuplicateIndex { index: 1, .. }
    ));
    let grown = PoolSpec {
        devices: vec![
            s.devices[0].clone(),
            s.devices[1].clone(),
            s.devices[2].clone(),
            dir.path().join("new.img"),
        ],
        ..s.clone()
    };
    // A device that is no member is left alone (and not created).
    let p = open_pool(&grown).unwrap();
    assert_eq!(p.paths, s.devices);
    assert!(!dir.path().join("new.img").exists());
}

#[test]
fn a_damaged_superblock_is_rebuilt_from_its_copy() {
    // Guards metadata bit rot: one flipped superblock byte must not
    // take a device out of the pool.
    let dir = tempfile::tempdir().unwrap();
    let s = spec(dir.path(), 2);
    let first = open_pool(&s).unwrap();
    assert_eq!(first.superblocks_repaired, 0);
    drop(first);
    let f = OpenOptions::new().write(true).open(&s.devices[1]).unwrap();
    f.write_all_at(&[0x55], 40).unwrap();
    drop(f);
    let again = open_pool(&s).unwrap();
    assert_eq!(again.superblocks_repaired, 1);
    assert!(!again.missing.iter().any(|m| *m));
    drop(again);
    assert_eq!(open_pool(&s).unwrap().superblocks_repaired, 0, "rewritten");
    // Guards against a rotted magic byte making a device "foreign":
    // the reliability campaign's seeded flips hit one (storaged then
    // refused to start).
    let f = OpenOptions::new().write(true).open(&s.devices[1]).unwrap();
    f.write_all_at(b"X", 2).unwrap();
    drop(f);
    let again = open_pool(&s).unwrap();
    assert_eq!(again.superblocks_repaired, 1);
    drop(again);
    // Something else written over the primary stays foreign.
    let f = OpenOptions::new().write(true).open(&s.devices[1]).unwrap();
    f.write_all_at(&[0xAB; 512], 0).unwrap();
    drop(f);
    assert!(matches!(
        open_pool(&s).unwrap_err(),
        DeviceError::Foreign { .. }
    ));
    let f = OpenOptions::new().write(true).open(&s.devices[1]).unwrap();
    let mut good = vec![0u8; 4096];
    std::fs::File::open(&s.devices[1])
        .unwrap()
        .read_exact_at(&mut good, SUPERBLOCK_COPY_OFFSET)
        .unwrap();
    f.write_all_at(&good, 0).unwrap();
    drop(f);
    // Both copies damaged: a clear error.
    let f = OpenOptions::new().write(true).open(&s.devices[0]).unwrap();
    f.write_all_at(&[0x55], 40).unwrap();
    f.write_all_at(&[0x55], SUPERBLOCK_COPY_OFFSET + 40)
        .unwrap();
    drop(f);
    assert!(matches!(
        open_pool(&s).unwrap_err(),
        DeviceError::BadChecksum { .. }
    ));
}

#[test]
fn rejects_bad_geometry_and_missing() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = spec(dir.path(), 1);
    s.stripe_unit_bytes = 3 << 20;
    assert!(matches!(open_pool(&s).unwrap_err(), DeviceError::Config(_)));
    let mut s = spec(dir.path(), 1);
    s.create_size_bytes = None;
    assert!(matches!(
        open_pool(&s).unwrap_err(),
        DeviceError::Missing { .. }
    ));
    let mut s = spec(dir.path(), 1);
    s.create_size_bytes = Some(1 << 20);
    assert!(matches!(
        open_pool(&s).unwrap_err(),
        DeviceError::TooSmall { .. }
    ));
}
