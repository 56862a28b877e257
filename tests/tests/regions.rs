//! The same-host zero-copy path: memory regions registered over the Unix
//! socket and `ReadInto`. Real daemon, real client processes, kill -9.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt;
use std::sync::mpsc;
use std::time::Duration;

use storaged_client::region::RegionRead;
use storaged_proto::pb;
use storaged_tests::{Daemon, DaemonOpts, eventually, pattern, write_tree};
use tonic::Code;

fn files() -> Vec<(String, Vec<u8>)> {
    (0..64)
        .map(|i| {
            let len = 1 + (i * 37_171) % 300_000;
            (format!("part/{i:03}"), pattern(i as u64, len))
        })
        .chain([("big".to_owned(), pattern(999, 3 << 20))])
        .collect()
}

fn daemon(tmp: &tempfile::TempDir) -> Daemon {
    daemon_as(tmp, None)
}

/// A daemon with dataset "ds" of `class` (default: the server's, ec:3+1).
fn daemon_as(tmp: &tempfile::TempDir, class: Option<&str>) -> Daemon {
    let src = tmp.path().join("src");
    write_tree(&src, &files());
    let d = Daemon::start(&tmp.path().join("data"), &DaemonOpts::default());
    let mut args = vec!["ingest", "ds", src.to_str().unwrap()];
    if let Some(c) = class {
        args.extend(["--class", c]);
    }
    d.ctl_ok(&args);
    d
}

/// "big" and "part/002" of "ds", read into `region`.
async fn read_big_and_part<'r>(
    ds: &storaged_client::Dataset,
    region: &'r mut storaged_client::region::Region,
) -> storaged_client::region::RegionBatch<'r> {
    ds.read_into(
        region,
        &[
            RegionRead::whole("big", 3 << 20),
            RegionRead::whole("part/002", 1 + 2 * 37_171),
        ],
    )
    .await
    .unwrap()
}

/// Flips one byte of device data under the first extent of "big".
async fn rot_big(d: &Daemon, tmp: &tempfile::TempDir) {
    let client = d.local_client().await;
    let st = client.dataset("ds").unwrap().stat("big").await.unwrap();
    let e = &st.extents[0];
    let dev = tmp
        .path()
        .join("data")
        .join(format!("dev{}.img", e.device_index));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&dev)
        .unwrap();
    let at = e.device_offset + 100;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    b[0] ^= 0x80;
    f.write_all_at(&b, at).unwrap();
    f.sync_all().unwrap();
}

async fn regions_registered(d: &Daemon) -> u32 {
    d.client()
        .await
        .status()
        .await
        .unwrap()
        .regions()
        .registered
}

/// Waits until the daemon's registered region count is `n`.
async fn assert_regions_drain_to(d: &Daemon, n: u32) {
    assert!(
        eventually(Duration::from_secs(10), async || regions_registered(d)
            .await
            == n)
        .await,
        "registered regions did not return to {n}"
    );
}

/// Lines a child prints, as they come.
fn lines_of(child: &mut std::process::Child) -> mpsc::Receiver<String> {
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn wait_line(rx: &mpsc::Receiver<String>, what: &str) -> String {
    rx.recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("no {what} within 60 s"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_land_in_place_verified_and_uncopied() {
    // Guards the zero-copy promise: every byte arrives exact, and the
    // server's copy counter for this path stays at 0 while the gRPC path's
    // counter does count its copies.
    let tmp = tempfile::tempdir().unwrap();
    let d = daemon(&tmp);
    let out = d.ctl_ok(&["verify", "ds"]);
    assert!(
        out.contains("65 objects") && out.contains("verified via grpc"),
        "{out}"
    );
    let client = d.local_client().await;
    assert!(client.is_local());
    let ds = client.dataset("ds").unwrap();
    let objects = ds.list("").await.unwrap();
    let mut region = client.register_region(8 << 20).await.unwrap();
    assert_eq!(regions_registered(&d).await, 1);
    // As root (CI), storaged may pin the region: it must have registered it
    // as an io_uring fixed buffer, so reads skip per-I/O pinning.
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        assert!(
            eventually(Duration::from_secs(10), async || client
                .status()
                .await
                .unwrap()
                .regions()
                .fixed
                == 1)
            .await,
            "the region was not registered as a fixed buffer"
        );
    }

    let reads: Vec<RegionRead> = objects
        .iter()
        .map(|o| RegionRead::whole(o.path.clone(), o.size))
        .collect();
    let expected: std::collections::BTreeMap<String, Vec<u8>> = files().into_iter().collect();
    let mut served = 0u64;
    // Whole objects, several region-fulls.
    let mut next = 0;
    while next < reads.len() {
        let mut used = 0;
        let mut take = 0;
        while next + take < reads.len()
            && used + region.span(&reads[next + take]) <= region.len() as u64
        {
            used += region.span(&reads[next + take]);
            take += 1;
        }
        let batch = ds
            .read_into(&mut region, &reads[next..next + take])
            .await
            .unwrap();
        for k in 0..take {
            let path = &reads[next + k].path;
            assert_eq!(batch.get(k).unwrap(), &expected[path][..], "{path}");
            served += expected[path].len() as u64;
        }
        next += take;
    }
    // Ranges that start and end mid-block, and an empty one.
    let big = &expected["big"];
    let ranges = [
        (1, 100),
        (32_767, 2),
        (1_000_000, 77_777),
        (big.len() as u64 - 5, 5),
        (10, 0),
    ];
    let reads: Vec<RegionRead> = ranges
        .iter()
        .map(|&(offset, length)| RegionRead {
            path: "big".into(),
            offset,
            length: Some(length),
            object_size: big.len() as u64,
        })
        .collect();
    let batch = ds.read_into(&mut region, &reads).await.unwrap();
    for (k, &(offset, length)) in ranges.iter().enumerate() {
        let want = &big[offset as usize..(offset + length) as usize];
        assert_eq!(batch.get(k).unwrap(), want, "range {offset}+{length}");
        served += length;
    }

    let status = client.status().await.unwrap();
    assert_eq!(status.reads().shm_payload_bytes_copied, 0);
    assert_eq!(status.reads().shm_bytes_served, served);
    // The counter is real: an any-order gRPC read of a multi-window item
    // copies, and says so.
    let mut grpc = Box::pin(ds.read_batch_any_order(
        vec![storaged_client::BatchItem {
            path: "big".into(),
            offset: 0,
            length: None,
        }],
        4,
    ));
    use futures::StreamExt;
    let r = grpc.next().await.unwrap().unwrap();
    assert_eq!(&r.data.unwrap()[..], &big[..]);
    let status = client.status().await.unwrap();
    assert_eq!(status.reads().grpc_payload_bytes_copied, big.len() as u64);
    assert_eq!(status.reads().shm_payload_bytes_copied, 0);

    drop(region);
    assert_regions_drain_to(&d, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_and_one_killed_mid_read() {
    // Guards region lifetime: a client that dies mid-read loses its region
    // (after its reads complete) and never disturbs another client.
    let tmp = tempfile::tempdir().unwrap();
    let d = daemon(&tmp);
    let before = regions_registered(&d).await;
    let args = [
        "verify",
        "ds",
        "--via",
        "shm",
        "--passes",
        "100000",
        "--region-mib",
        "2",
    ];
    let mut victim = d.spawn_local_ctl(&args);
    let mut survivor = d.spawn_local_ctl(&args);
    let victim_lines = lines_of(&mut victim);
    let survivor_lines = lines_of(&mut survivor);
    for (rx, who) in [(&victim_lines, "victim"), (&survivor_lines, "survivor")] {
        let line = wait_line(rx, who);
        assert!(
            line.starts_with("pass 1:") && line.ends_with("via shm"),
            "{who}: {line}"
        );
    }
    assert_eq!(regions_registered(&d).await, before + 2);

    victim.kill().unwrap(); // SIGKILL, mid-read
    victim.wait().unwrap();
    assert!(
        eventually(Duration::from_secs(10), async || regions_registered(&d)
            .await
            == before + 1)
        .await,
        "the dead client's region is gone"
    );
    // The survivor keeps reading and verifying, pass after pass.
    while survivor_lines.try_recv().is_ok() {}
    for _ in 0..3 {
        let line = wait_line(&survivor_lines, "survivor pass after the kill");
        assert!(line.contains("verified via shm"), "{line}");
    }
    assert_eq!(
        survivor.try_wait().unwrap(),
        None,
        "the survivor is still running"
    );
    survivor.kill().unwrap();
    survivor.wait().unwrap();
    assert!(
        eventually(Duration::from_secs(10), async || regions_registered(&d)
            .await
            == before)
        .await
    );
    let status = d.client().await.status().await.unwrap();
    assert_eq!(status.regions().registered_bytes, 0);
    assert_eq!(status.reads().shm_payload_bytes_copied, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regions_leave_no_files_behind() {
    // Guards against region memory that outlives its processes: regions
    // are memfds, never files in /dev/shm.
    let tmp = tempfile::tempdir().unwrap();
    let d = daemon(&tmp);
    let before = shm_entries();
    let client = d.local_client().await;
    let mut region = client.register_region(1 << 20).await.unwrap();
    let ds = client.dataset("ds").unwrap();
    let batch = ds
        .read_into(&mut region, &[RegionRead::whole("part/001", 37_172)])
        .await
        .unwrap();
    assert_eq!(batch.get(0).unwrap(), &pattern(1, 37_172)[..]);
    assert_eq!(shm_entries(), before, "nothing was created in /dev/shm");
}

fn shm_entries() -> std::collections::BTreeSet<std::ffi::OsString> {
    std::fs::read_dir("/dev/shm")
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n.to_string_lossy().starts_with("storaged-"))
        .collect()
}

fn ftruncate(fd: i32, len: u64) -> i32 {
    // SAFETY: a plain syscall on a descriptor the caller owns.
    unsafe { libc::ftruncate(fd, len as libc::off_t) }
}

fn fallocate(fd: i32, mode: i32, len: u64) -> i32 {
    // SAFETY: a plain syscall on a descriptor the caller owns.
    unsafe { libc::fallocate(fd, mode, 0, len as libc::off_t) }
}

/// A memfd of `len` bytes, its pages allocated; sealed against shrinking
/// when `seal`.
fn memfd(len: u64, seal: bool) -> std::fs::File {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // SAFETY: the name is a NUL-terminated literal.
    let fd = unsafe {
        libc::memfd_create(
            c"hostile-region".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    assert!(fd >= 0);
    // SAFETY: a fresh descriptor nothing else owns.
    let file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.set_len(len).unwrap();
    assert_eq!(fallocate(file.as_raw_fd(), 0, len), 0);
    if seal {
        // SAFETY: F_ADD_SEALS on a memfd made with ALLOW_SEALING.
        let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) };
        assert_eq!(rc, 0);
    }
    file
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_cannot_fault_storaged_through_its_region() {
    // Guards against SIGBUS in storaged: a client that registered a region
    // and then shrank, truncated, punched or unmapped its memory killed
    // the daemon on the next ReadInto (fixed, unfixed and read-ahead).
    use std::os::fd::AsRawFd;
    let tmp = tempfile::tempdir().unwrap();
    let d = daemon_as(&tmp, Some("stripe"));
    let local = d.local_client().await;
    let register = |path: String, memfd: Option<i32>, size_bytes| {
        let mut raw = local.raw();
        async move {
            raw.register_region(pb::RegisterRegionRequest {
                path,
                size_bytes,
                memfd,
            })
            .await
            .map(|r| r.into_inner())
        }
    };
    let size = 8u64 << 20;
    // Unsealed memfd: refused, naming the seal.
    let unsealed = memfd(size, false);
    let err = register(String::new(), Some(unsealed.as_raw_fd()), size)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    assert!(err.message().contains("F_SEAL_SHRINK"), "{}", err.message());
    // A /dev/shm file, by path or by descriptor: cannot be sealed, refused.
    let shm = tempfile::Builder::new()
        .prefix("storaged-hostile-")
        .tempfile_in("/dev/shm")
        .unwrap();
    shm.as_file().set_len(size).unwrap();
    let err = register(shm.path().display().to_string(), None, size)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    assert!(err.message().contains("memfd"), "{}", err.message());
    let err = register(String::new(), Some(shm.as_file().as_raw_fd()), size)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());

    // A sealed region, then every hostile move on it, with reads between.
    let sealed = memfd(size, true);
    let mut call = register(String::new(), Some(sealed.as_raw_fd()), size)
        .await
        .unwrap();
    let id = call.message().await.unwrap().unwrap().region_id;
    let fd = sealed.as_raw_fd();
    let read_all = |step: &'static str| {
        let mut raw = local.raw();
        async move {
            let items = (0..8u64)
                .map(|i| pb::ReadIntoItem {
                    path: format!("part/{i:03}"),
                    offset: 0,
                    length: None,
                    region_offset: i << 20,
                })
                .collect();
            let mut s = raw
                .read_into(pb::ReadIntoRequest {
                    region_id: id,
                    dataset: "ds".into(),
                    items,
                    max_in_flight: 0,
                    dataset_id: None,
                })
                .await
                .unwrap()
                .into_inner();
            let mut n = 0;
            while let Some(c) = s.message().await.unwrap() {
                assert!(c.error.is_none(), "{step}: {:?}", c.error);
                n += 1;
            }
            assert_eq!(n, 8, "{step}");
        }
    };
    read_all("registered").await;
    assert_eq!(ftruncate(fd, 0), -1, "shrinking is sealed off");
    assert_eq!(ftruncate(fd, 4096), -1);
    read_all("shrink refused").await;
    let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    assert_eq!(fallocate(fd, punch, size), 0);
    read_all("punched").await;
    // Growing is allowed and harmless.
    assert_eq!(ftruncate(fd, size * 2), 0);
    read_all("grown").await;
    // The same region as read-ahead target: hint, then read into it.
    local
        .dataset("ds")
        .unwrap()
        .hint(&["part/000".into(), "part/001".into()])
        .await
        .unwrap();
    read_all("hinted").await;
    drop(sealed);
    read_all("fd closed").await;
    // storaged is alive and served every read.
    let status = local.status().await.unwrap();
    assert_eq!(status.regions().registered, 1);
    drop(call);
    assert_regions_drain_to(&d, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_region_requests_get_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let d = daemon(&tmp);
    let local = d.local_client().await;
    let mut region = local.register_region(64 << 10).await.unwrap();
    let id = region.id();
    let read_into = |region_id, items: Vec<pb::ReadIntoItem>| {
        let mut raw = local.raw();
        async move {
            let mut s = raw
                .read_into(pb::ReadIntoRequest {
                    region_id,
                    dataset: "ds".into(),
                    items,
                    max_in_flight: 0,
                    dataset_id: None,
                })
                .await?
                .into_inner();
            let mut out = Vec::new();
            while let Some(c) = s.message().await? {
                out.push(c);
            }
            Ok::<_, tonic::Status>(out)
        }
    };
    let item = |path: &str, region_offset| pb::ReadIntoItem {
        path: path.into(),
        offset: 0,
        length: None,
        region_offset,
    };

    // Out of bounds: the item fails, naming the span and the region size.
    let done = read_into(id, vec![item("part/001", 61_440), item("part/000", 0)])
        .await
        .unwrap();
    let by_index = |i: u32| done.iter().find(|c| c.index == i).unwrap();
    let e = by_index(0).error.as_ref().expect("out of bounds fails");
    assert_eq!(e.code, Code::OutOfRange as i32, "{}", e.message);
    assert!(e.message.contains("65536"), "{}", e.message);
    assert!(by_index(1).error.is_none(), "the other item still reads");
    // Misaligned region offset.
    let done = read_into(id, vec![item("part/000", 100)]).await.unwrap();
    assert_eq!(
        done[0].error.as_ref().unwrap().code,
        Code::InvalidArgument as i32
    );
    // Missing object.
    let done = read_into(id, vec![item("nope", 0)]).await.unwrap();
    assert_eq!(done[0].error.as_ref().unwrap().code, Code::NotFound as i32);
    // The client API refuses what does not fit, before asking.
    let err = local
        .dataset("ds")
        .unwrap()
        .read_into(&mut region, &[RegionRead::whole("big", 3 << 20)])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("need"), "{err}");

    // After deregistration the id is unknown.
    drop(region);
    assert_regions_drain_to(&d, 0).await;
    let err = read_into(id, vec![item("part/000", 0)]).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{}", err.message());
    assert!(
        err.message().contains("not registered"),
        "{}",
        err.message()
    );
    // Marked as a region the server does not know (not a missing object or
    // dataset): a loader registers a fresh one on it.
    assert_eq!(
        err.metadata()
            .get(storaged_proto::model::REGION_UNKNOWN_METADATA_KEY)
            .and_then(|v| v.to_str().ok()),
        Some(format!("{id:x}").as_str())
    );

    // Over TCP there are no peer credentials: no regions storaged writes.
    // A TCP client gets a region of its own for the TCP bulk channel, and
    // one told not to use that channel gets none.
    let tcp = d.client().await;
    assert!(!tcp.register_region(4096).await.unwrap().is_shared());
    let grpc_only = storaged_client::Client::connect_with(
        &d.url,
        &storaged_client::ConnectOptions {
            bulk_tcp: storaged_client::BulkTcp::Off,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let err = grpc_only.register_region(4096).await.unwrap_err();
    assert!(err.to_string().contains("unix://"), "{err}");
    let err = tcp
        .raw()
        .register_region(pb::RegisterRegionRequest {
            path: String::new(),
            size_bytes: 4096,
            memfd: Some(0),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    let err = read_into_tcp(&d, id).await;
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    // A file not on tmpfs, a missing memfd, and a size that does not match.
    use std::os::fd::AsRawFd;
    let register = |memfd: Option<i32>, size_bytes| {
        let mut raw = local.raw();
        async move {
            raw.register_region(pb::RegisterRegionRequest {
                path: String::new(),
                size_bytes,
                memfd,
            })
            .await
            .map(|_| ())
        }
    };
    let on_disk = std::fs::File::create(tmp.path().join("region.img")).unwrap();
    on_disk.set_len(4096).unwrap();
    let err = register(Some(on_disk.as_raw_fd()), 4096).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("tmpfs"), "{}", err.message());
    let err = register(None, 4096).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("memfd"), "{}", err.message());
    let err = register(Some(100_000), 4096).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{}", err.message());
    let sealed = memfd(8192, true);
    let err = register(Some(sealed.as_raw_fd()), 4096).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("8192"), "{}", err.message());
}

async fn read_into_tcp(d: &Daemon, region_id: u64) -> tonic::Status {
    d.client()
        .await
        .raw()
        .read_into(pb::ReadIntoRequest {
            region_id,
            dataset: "ds".into(),
            items: vec![],
            max_in_flight: 0,
            dataset_id: None,
        })
        .await
        .unwrap_err()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_block_fails_only_its_item_with_data_loss() {
    // Guards in-place verification: a flipped byte on the device reaches
    // the region but is reported, and the item must not be trusted.
    let tmp = tempfile::tempdir().unwrap();
    let d = daemon_as(&tmp, Some("stripe"));
    let client = d.local_client().await;
    let ds = client.dataset("ds").unwrap();
    rot_big(&d, &tmp).await;

    // storagectl verify names the bad object, over either path.
    for via in ["grpc", "shm"] {
        let out = std::process::Command::new(storaged_tests::storagectl_bin())
            .args(["--server", &d.unix_url(), "verify", "ds", "--via", via])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "verify --via {via} must fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("DATA_LOSS") || err.contains("big"),
            "{via}: {err}"
        );
    }

    let mut region = client.register_region(4 << 20).await.unwrap();
    let batch = read_big_and_part(&ds, &mut region).await;
    let err = batch.get(0).unwrap_err();
    assert_eq!(err.code(), Code::DataLoss);
    assert!(err.message().contains("\"big\""), "{}", err.message());
    assert_eq!(batch.get(1).unwrap(), &pattern(2, 1 + 2 * 37_171)[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_ec_block_is_rebuilt_into_the_region() {
    // Guards the ReadInto fallback: an erasure-coded item whose in-place
    // check fails is rebuilt from parity and delivered exact.
    let tmp = tempfile::tempdir().unwrap();
    let d = daemon(&tmp);
    let client = d.local_client().await;
    let ds = client.dataset("ds").unwrap();
    rot_big(&d, &tmp).await;
    let mut region = client.register_region(4 << 20).await.unwrap();
    let batch = read_big_and_part(&ds, &mut region).await;
    assert!(batch.get(0).unwrap() == &pattern(999, 3 << 20)[..]);
    assert_eq!(batch.get(1).unwrap(), &pattern(2, 1 + 2 * 37_171)[..]);
    drop(batch);
    let st = client.status().await.unwrap();
    let info = st.datasets.iter().find(|x| x.name == "ds").unwrap();
    assert!(info.reconstructions > 0, "{info:?}");
    d.ctl_ok(&["verify", "ds", "--via", "shm"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_registrations_do_not_hold_up_shutdown() {
    // Guards against a SIGTERM that waits out the whole drain deadline
    // because a client keeps a region registered (its call never ends).
    let tmp = tempfile::tempdir().unwrap();
    let mut d = daemon(&tmp);
    let client = d.local_client().await;
    let _region = client.register_region(1 << 20).await.unwrap();
    let started = std::time::Instant::now();
    tokio::task::block_in_place(|| d.stop());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "shutdown took {:?} with a region registered",
        started.elapsed()
    );
    assert!(
        !tmp.path().join("data/storaged.sock").exists(),
        "the socket file is removed on exit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loopback_client_finds_the_unix_socket_by_itself() {
    // Guards transport auto-detection: a same-host client that names the
    // TCP address ends up on the Unix socket (and the zero-copy path), and
    // falls back to TCP, still working, when the socket cannot be reached.
    let tmp = tempfile::tempdir().unwrap();
    let d = daemon(&tmp);
    let tcp = storaged_client::Client::connect(&d.url).await.unwrap();
    assert!(!tcp.is_local());
    let advertised = tcp
        .status()
        .await
        .unwrap()
        .connections()
        .unix_socket_path
        .clone();
    assert_eq!(format!("unix://{advertised}"), d.unix_url());

    let auto = storaged_client::Client::connect_auto(&d.url).await.unwrap();
    assert!(auto.is_local(), "switched to the Unix socket");
    let mut region = auto.register_region(1 << 20).await.unwrap();
    let reads = [RegionRead::whole("part/001", files()[1].1.len() as u64)];
    let batch = auto
        .dataset("ds")
        .unwrap()
        .read_into(&mut region, &reads)
        .await
        .unwrap();
    assert_eq!(batch.get(0).unwrap(), &files()[1].1[..]);
    drop(batch);

    // storagectl does the same by default, keeps TCP when asked (and
    // there takes the TCP bulk channel, as a remote client would), and
    // keeps to gRPC when told.
    let epoch = |transport: &str| {
        d.ctl_ok(&[
            "--transport",
            transport,
            "epoch",
            "ds",
            "--workers",
            "1",
            "--batch",
            "8",
        ])
    };
    let out = epoch("auto");
    assert!(out.contains("via shm 9, via bulk 0, via grpc 0"), "{out}");
    let out = epoch("as-given");
    assert!(out.contains("via shm 0, via bulk 9, via grpc 0"), "{out}");
    let out = epoch("bulk");
    assert!(out.contains("via shm 0, via bulk 9, via grpc 0"), "{out}");
    let out = epoch("grpc");
    assert!(out.contains("via shm 0, via bulk 0, via grpc 9"), "{out}");

    // The socket file gone (the listener itself still runs): TCP it is.
    std::fs::remove_file(&advertised).unwrap();
    let fallback = storaged_client::Client::connect_auto(&d.url).await.unwrap();
    assert!(!fallback.is_local());
    assert_eq!(
        fallback
            .dataset("ds")
            .unwrap()
            .read("part/001")
            .await
            .unwrap(),
        files()[1].1
    );
}
