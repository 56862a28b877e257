//! Rot scattered over every unit of ec stripes, through the real binary:
//! flipped bytes in a different 32 KiB row of each of the 4 units of
//! several `ec:3+1` stripes are rebuilt row by row on read and repaired
//! by scrub; two bad units in one row are DATA_LOSS, never wrong bytes.

use storaged_tests::{Daemon, DaemonOpts, flip_byte, pattern, write_tree};

fn flip(path: &std::path::Path, at: u64) {
    flip_byte(path, at, 0x08);
}

// Guards against whole-unit reconstruction: single flipped bytes in
// different units of one ec:3+1 stripe, at different 32 KiB rows, made
// the stripe unrecoverable although every row kept K good units.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rot_in_every_unit_of_a_stripe_is_repaired_row_by_row() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let files: Vec<(String, Vec<u8>)> = std::iter::once(("big".to_string(), pattern(1, 3 << 20)))
        .chain((0..8).map(|i| (format!("s{i}"), pattern(10 + i, 20_000 + i as usize * 999))))
        .collect();
    let src = tmp.path().join("src");
    write_tree(&src, &files);
    let opts = DaemonOpts {
        stripe_unit: "128KiB".into(),
        ..Default::default()
    };
    let mut d = Daemon::start(&data, &opts);
    d.ctl_ok(&["ingest", "train", src.to_str().unwrap()]);
    let unit = 128u64 << 10;
    // With 4 devices an ec:3+1 stripe is one row: its 4 units sit at the
    // same offset on every device.
    let stat = d
        .client()
        .await
        .dataset("train")
        .unwrap()
        .stat("big")
        .await
        .unwrap();
    let mut rows: Vec<u64> = stat
        .extents
        .iter()
        .map(|e| e.device_offset / unit * unit)
        .collect();
    rows.sort_unstable();
    rows.dedup();
    assert!(rows.len() >= 4, "{rows:?}");
    d.stop();
    let dev = |i: u64| data.join(format!("dev{i}.img"));
    for (k, row) in rows.iter().take(3).enumerate() {
        for unit_on in 0..4u64 {
            // Unit on device i rots in row i of the unit.
            flip(&dev(unit_on), row + unit_on * (32 << 10) + 77 + k as u64);
        }
    }
    d = Daemon::start_args(&data, d.args.clone());
    for (p, bytes) in &files {
        let out = d.ctl(&["cat", "train", p]);
        assert!(
            out.status.success() && out.stdout == *bytes,
            "{p}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = d.ctl_ok(&["scrub"]);
    assert!(
        out.contains("12 corrupt, 12 repaired, 0 unrecoverable")
            && out.contains("rows: 12 corrupt, 12 repaired"),
        "{out}"
    );
    let out = d.ctl_ok(&["scrub"]);
    assert!(out.contains("0 corrupt, 0 repaired"), "{out}");
    d.stop();

    // Two bad units in one row: more than M = 1.
    let row = rows[1];
    flip(&dev(0), row + 500);
    flip(&dev(1), row + 500);
    d = Daemon::start_args(&data, d.args.clone());
    let out = d.ctl(&["cat", "train", "big"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("DATA_LOSS"), "{err}");
    // What came before the error is the object's own bytes, and it stops
    // short of the lost range.
    assert!(out.stdout.len() < 3 << 20);
    assert!(
        out.stdout[..] == files[0].1[..out.stdout.len()],
        "no wrong bytes in place of the lost ones"
    );
}
