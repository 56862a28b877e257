//! Pools assemble by identity with the real binary: devices in any order,
//! one left out, given through a glob; devices of another pool and one
//! device given twice are refused by name.

use storaged_tests::{Daemon, DaemonOpts, check_all, pattern, write_tree};

fn args_with(data: &std::path::Path, devices: &[String]) -> Vec<String> {
    let mut a: Vec<String> = [
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data.to_str().unwrap(),
        "--device-size",
        "64MiB",
        "--stripe-unit",
        "64KiB",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for d in devices {
        a.push("--device".into());
        a.push(d.clone());
    }
    a
}

// Guards against pools that only start with their devices in the original
// order and all present: NVMe names move between boots and dead drives
// vanish, while every device names its pool and index in its superblock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_are_found_by_identity_and_strangers_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let files: Vec<(String, Vec<u8>)> = (0..12)
        .map(|i| (format!("s{i:02}"), pattern(i, 90_000 + i as usize * 1000)))
        .collect();
    let src = tmp.path().join("src");
    write_tree(&src, &files);
    let mut d = Daemon::start(&data, &DaemonOpts::default());
    d.ctl_ok(&["ingest", "train", src.to_str().unwrap()]);
    d.stop();
    let dev = |i: usize| data.join(format!("dev{i}.img")).display().to_string();

    // Shuffled.
    let mut d = Daemon::start_args(&data, args_with(&data, &[dev(2), dev(0), dev(3), dev(1)]));
    let status = d.ctl_ok(&["status"]);
    for i in 0..4 {
        assert!(
            status
                .lines()
                .any(|l| l.trim_start().starts_with(&format!("{i} "))
                    && l.contains(&format!("dev{i}.img"))),
            "device {i} at its index: {status}"
        );
    }
    check_all(&d, "train", &files);
    d.stop();

    // One left out: degraded, every byte served.
    let mut d = Daemon::start_args(&data, args_with(&data, &[dev(3), dev(0), dev(1)]));
    let status = d.ctl_ok(&["status"]);
    assert!(
        status.contains("DEGRADED") && status.contains("device 2 not given"),
        "{status}"
    );
    check_all(&d, "train", &files);
    d.stop();

    // Through a glob.
    let glob = data.join("dev*.img").display().to_string();
    let mut d = Daemon::start_args(&data, args_with(&data, &[glob]));
    assert_eq!(d.status_json()["degraded"], false);
    check_all(&d, "train", &files);
    d.stop();

    // A device of another pool.
    let other = tmp.path().join("other");
    let mut o = Daemon::start(&other, &DaemonOpts::default());
    o.stop();
    let stranger = other.join("dev1.img").display().to_string();
    let f = Daemon::try_start_args(
        &data,
        args_with(&data, &[dev(0), dev(1), dev(2), dev(3), stranger.clone()]),
    )
    .err()
    .expect("another pool's device is refused");
    assert!(
        f.stderr.contains(&stranger) && f.stderr.contains("belongs to pool"),
        "{}",
        f.stderr
    );

    // One device twice, by another name.
    let link = tmp.path().join("by-id-link");
    std::os::unix::fs::symlink(data.join("dev1.img"), &link).unwrap();
    let f = Daemon::try_start_args(
        &data,
        args_with(
            &data,
            &[dev(0), dev(1), dev(2), dev(3), link.display().to_string()],
        ),
    )
    .err()
    .expect("a device given twice is refused");
    assert!(f.stderr.contains("given twice"), "{}", f.stderr);
}
