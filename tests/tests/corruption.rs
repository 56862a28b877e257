//! A byte flipped in a device file under a stored object gives DATA_LOSS
//! naming the dataset, object and device, while other objects still read.

use std::os::unix::fs::FileExt;

use storaged_tests::{Daemon, DaemonOpts, pattern, write_tree};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipped_byte_gives_data_loss_for_that_object_only() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let victim = pattern(1, 500_000);
    let bystander = pattern(2, 500_000);
    write_tree(
        &src,
        &[
            ("victim".into(), victim.clone()),
            ("bystander".into(), bystander.clone()),
        ],
    );
    let data = tmp.path().join("data");
    let d = Daemon::start(&data, &DaemonOpts::default());
    d.ctl_ok(&["ingest", "ds", src.to_str().unwrap()]);

    let client = d.client().await;
    let st = client.dataset("ds").unwrap().stat("victim").await.unwrap();
    let e = &st.extents[st.extents.len() / 2];
    let at = e.device_offset + e.length / 2;
    let dev = data.join(format!("dev{}.img", e.device_index));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&dev)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    b[0] ^= 0x01;
    f.write_all_at(&b, at).unwrap();
    f.sync_all().unwrap();

    let out = d.ctl(&["cat", "ds", "victim"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("DATA_LOSS"), "{err}");
    assert!(
        err.contains("\"victim\"") && err.contains("\"ds\""),
        "{err}"
    );
    assert!(err.contains(&format!("device {}", e.device_index)), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one-line error: {err}");
    // No wrong byte was written out before the error.
    let good_prefix = (e.object_offset + e.length / 2) / 32768 * 32768;
    assert!(out.stdout.len() as u64 <= good_prefix);
    assert_eq!(out.stdout[..], victim[..out.stdout.len()]);

    let err = client
        .dataset("ds")
        .unwrap()
        .read("victim")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::DataLoss));
    assert_eq!(d.ctl(&["cat", "ds", "bystander"]).stdout, bystander);
    // Ranges of the victim away from the bad block still read.
    let head = client
        .dataset("ds")
        .unwrap()
        .read_range("victim", 0, 4096)
        .await
        .unwrap();
    assert_eq!(&head[..], &victim[..4096]);
}
