//! `storagectl mount` end to end: the real daemon, the real mount (FUSE,
//! /dev/fuse; the test command installs fuse3), and the tools training
//! code uses on it (find, sha256sum, Python, mmap, pread).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use storaged_tests::{Daemon, DaemonOpts, pattern, write_tree};

/// A running `storagectl mount`, unmounted (SIGTERM) when dropped.
struct Mounted {
    child: Option<Child>,
    path: PathBuf,
    stderr: PathBuf,
}

impl Mounted {
    /// Mounts with `args` (before the mount point) and waits for "ready".
    fn start(d: &Daemon, path: &Path, args: &[&str]) -> Mounted {
        // A dead mount (kill -9) exists but cannot be stat'ed.
        if let Err(e) = std::fs::create_dir_all(path) {
            assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists, "{e}");
        }
        let stderr = path.with_extension(format!(
            "{}.stderr",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let mut command = Command::new(storaged_tests::storagectl_bin());
        command
            .arg("--server")
            .arg(&d.url)
            .arg("mount")
            .args(args)
            .arg(path)
            .env("RUST_LOG", "info")
            .stderr(std::fs::File::create(&stderr).unwrap());
        let ready = |line: &str| Ok(line.ends_with("ready").then_some(()));
        let (child, ()) =
            storaged::testkit::spawn_until_ready(command, Duration::from_secs(60), ready)
                .unwrap_or_else(|e| {
                    panic!(
                        "storagectl mount: {e}: {}",
                        std::fs::read_to_string(&stderr).unwrap_or_default()
                    )
                });
        Mounted {
            child: Some(child),
            path: path.to_path_buf(),
            stderr,
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn signal(&mut self, signal: i32) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        // SAFETY: our own child, not yet reaped.
        unsafe { libc::kill(child.id() as libc::pid_t, signal) };
        wait_exit(&mut child, Duration::from_secs(30))
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: our own child, not yet reaped.
            unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
            if c.try_wait().ok().flatten().is_none() {
                let deadline = Instant::now() + Duration::from_secs(10);
                while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        if is_mounted(&self.path) {
            let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        }
    }
}

fn wait_exit(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "process did not exit in {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether /proc/mounts lists `path`.
fn is_mounted(path: &Path) -> bool {
    let want = path.to_str().unwrap();
    std::fs::read_to_string("/proc/mounts")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(1) == Some(want))
}

/// A setting of the FUSE connection behind the mount at `mnt`, from the
/// fusectl file system (mounted here if it is not yet).
fn fuse_connection_setting(mnt: &Path, name: &str) -> u64 {
    use std::os::linux::fs::MetadataExt;
    let connections = Path::new("/sys/fs/fuse/connections");
    if std::fs::read_dir(connections).unwrap().next().is_none() {
        sh("mount -t fusectl none /sys/fs/fuse/connections");
    }
    // A FUSE mount's device is anonymous (major 0); its minor names the
    // connection.
    let dev = std::fs::metadata(mnt).unwrap().st_dev();
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    let file = connections.join(minor.to_string()).join(name);
    std::fs::read_to_string(&file)
        .unwrap_or_else(|e| panic!("{}: {e}", file.display()))
        .trim()
        .parse()
        .unwrap()
}

/// Runs a shell command, asserting success; returns stdout.
fn sh(cmd: &str) -> String {
    let out = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs a Python script with `args`; returns (success, stdout + stderr).
fn python(script: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .expect("python3");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Reads the file `argv[1]` whole, printing `True` when it fails with
/// EIO (and failing when it reads).
const READ_EXPECTING_EIO: &str = "import errno, sys\ntry:\n    open(sys.argv[1], 'rb').read()\nexcept OSError as e:\n    print(e.errno == errno.EIO)\n    sys.exit(0)\nsys.exit(1)";

/// A storaged in a fresh temporary directory with `files` written under
/// `src` and ingested as dataset `name` (`ingest_args` go before the
/// name: `--class stripe`), and where to mount. The daemon goes first.
struct Setup {
    d: Daemon,
    src: PathBuf,
    mnt: PathBuf,
    tmp: tempfile::TempDir,
}

fn with_dataset(name: &str, ingest_args: &[&str], files: &[(String, Vec<u8>)]) -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write_tree(&src, files);
    let d = daemon(tmp.path());
    let mut args = vec!["ingest"];
    args.extend_from_slice(ingest_args);
    args.extend([name, src.to_str().unwrap()]);
    d.ctl_ok(&args);
    let mnt = tmp.path().join("mnt");
    Setup { d, src, mnt, tmp }
}

fn daemon(tmp: &Path) -> Daemon {
    Daemon::start(
        &tmp.join("data"),
        &DaemonOpts {
            device_size: "256MiB".into(),
            ..DaemonOpts::default()
        },
    )
}

/// The generated tree: empty files, odd sizes, unicode and deep names, a
/// 1-file and a 10 000-file directory.
/// The generated tree ingested as dataset `tree` (stripe class), which
/// `check_tree` checks a mount of.
fn with_generated_tree() -> (Vec<(String, Vec<u8>)>, Setup) {
    let files = generated_tree();
    let setup = with_dataset("tree", &["--class", "stripe"], &files);
    (files, setup)
}

fn generated_tree() -> Vec<(String, Vec<u8>)> {
    let mut files = vec![
        ("empty".to_owned(), Vec::new()),
        ("one/only".to_owned(), pattern(1, 1)),
        ("données/ñandú 🦙.txt".to_owned(), pattern(2, 4095)),
        ("données/日本語".to_owned(), pattern(3, 4097)),
        ("sizes/block_plus_one".to_owned(), pattern(4, 32 * 1024 + 1)),
        ("sizes/mib_plus_three".to_owned(), pattern(5, (1 << 20) + 3)),
        (
            "sizes/three_mib_odd".to_owned(),
            pattern(6, 3 * (1 << 20) + 12_345),
        ),
        ("sizes/empty_too".to_owned(), Vec::new()),
    ];
    let deep: Vec<String> = (0..24).map(|i| format!("level{i}")).collect();
    files.push((format!("{}/leaf", deep.join("/")), pattern(7, 777)));
    for i in 0..10_000u64 {
        files.push((
            format!("many/f{i:05}"),
            pattern(100 + i, (i as usize * 37) % 700),
        ));
    }
    files
}

#[test]
fn the_mount_serves_the_tree_exactly() {
    // Guards the mount's tree and bytes: find lists exactly the source,
    // every file hashes the same, preads and mmap match, Python works,
    // stat shows sizes, modes, stable inodes and the creation time, and
    // statfs and the xattrs say what storaged says.
    let (files, setup) = with_generated_tree();
    let Setup { d, src, mnt, .. } = &setup;
    // Files over 2 MiB bypass the page cache: both read paths are served.
    let m = Mounted::start(d, mnt, &["--cache-files-up-to-mib", "2"]);
    let ino = check_tree(d, src, mnt, &files);
    drop(m);
    let _m = Mounted::start(d, mnt, &["--cache-files-up-to-mib", "2"]);
    let root = mnt.join("tree");
    assert_eq!(
        std::fs::metadata(root.join("sizes/three_mib_odd"))
            .unwrap()
            .ino(),
        ino,
        "the same inode at the next mount"
    );
}

/// The fuse module's `enable_uring`, set for a test and put back after.
struct EnableUring {
    before: String,
}

const ENABLE_URING: &str = "/sys/module/fuse/parameters/enable_uring";

impl EnableUring {
    fn set(on: bool) -> EnableUring {
        let before = std::fs::read_to_string(ENABLE_URING).unwrap_or_else(|e| {
            panic!(
                "{ENABLE_URING}: {e} (this kernel lacks CONFIG_FUSE_IO_URING; the test needs it)"
            )
        });
        std::fs::write(ENABLE_URING, if on { "1" } else { "0" }).unwrap();
        EnableUring { before }
    }
}

impl Drop for EnableUring {
    fn drop(&mut self) {
        let _ = std::fs::write(ENABLE_URING, self.before.trim());
    }
}

/// Voluntary context switches of `pid`'s threads whose name starts with
/// `prefix`: each request a thread waits for costs it one.
fn thread_switches(pid: u32, prefix: &str) -> u64 {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().path();
        let comm = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
        if !comm.starts_with(prefix) {
            continue;
        }
        let status = std::fs::read_to_string(task.join("status")).unwrap_or_default();
        total += status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .map_or(0, |v| v.trim().parse::<u64>().unwrap());
    }
    total
}

#[test]
fn the_mount_serves_the_tree_exactly_through_fuse_over_io_uring() {
    // Guards the io_uring queues (`--fuse-io-uring on`): the same tree,
    // bytes, preads, mmap, xattrs, statfs and stat as through /dev/fuse,
    // with the requests taken by the queue threads; and `on` where the
    // kernel does not offer it fails the mount with a clear message.
    let (files, setup) = with_generated_tree();
    let Setup { d, src, mnt, .. } = &setup;
    std::fs::create_dir_all(mnt).unwrap();
    {
        let _off = EnableUring::set(false);
        let out = Command::new(storaged_tests::storagectl_bin())
            .arg("--server")
            .arg(&d.url)
            .args(["mount", "--fuse-io-uring", "on"])
            .arg(mnt)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "mounted without io_uring: {stderr}");
        assert!(
            stderr.contains("does not offer FUSE over io_uring") && stderr.contains("enable_uring"),
            "{stderr}"
        );
        assert!(!is_mounted(mnt), "the refused mount is gone");
    }
    let _on = EnableUring::set(true);
    let m = Mounted::start(
        d,
        mnt,
        &["--cache-files-up-to-mib", "2", "--fuse-io-uring", "on"],
    );
    let pid = m.child.as_ref().unwrap().id();
    let before = (
        thread_switches(pid, "fuse-ring"),
        thread_switches(pid, "fuser"),
    );
    check_tree(d, src, mnt, &files);
    let after = (
        thread_switches(pid, "fuse-ring"),
        thread_switches(pid, "fuser"),
    );
    let ring = after.0 - before.0;
    let dev = after.1 - before.1;
    // Thousands of requests (10 000 files looked up, opened, read): the
    // queue threads took them; /dev/fuse carries forgets at most.
    assert!(ring > 10_000, "ring threads woke {ring} times");
    assert!(
        dev < ring / 10,
        "fuser threads woke {dev} times, ring {ring}"
    );
    assert!(m.stderr().contains("FUSE over io_uring"), "{}", m.stderr());
}

/// Checks the mounted `tree` dataset at `mnt` against `src` and `files`
/// (find, sha256sum, fincore, preads, Python, statfs, stat); returns the
/// inode of `sizes/three_mib_odd`.
fn check_tree(d: &Daemon, src: &Path, mnt: &Path, files: &[(String, Vec<u8>)]) -> u64 {
    let root = mnt.join("tree");

    // find: the same paths, files and directories alike.
    let list = |dir: &Path| {
        let mut v: Vec<String> = sh(&format!("cd '{}' && find . -mindepth 1", dir.display()))
            .lines()
            .map(str::to_owned)
            .collect();
        v.sort();
        v
    };
    assert_eq!(list(&root), list(src));
    // sha256sum of every file.
    let sums = |dir: &Path| {
        sh(&format!(
            "cd '{}' && find . -type f -print0 | sort -z | xargs -0 sha256sum",
            dir.display()
        ))
    };
    assert_eq!(sums(&root), sums(src));
    // Guards against the kernel's default of 16 read-ahead requests at
    // once (cold small files, one request each, waited in line; 256
    // readers read at half the rate with 64).
    assert_eq!(fuse_connection_setting(mnt, "max_background"), 256);
    // Guards against large files going through the page cache (a copy and
    // a page allocation per 4 KiB more than direct reads): after the reads
    // above, the 3 MiB file has no cached pages, the 1 MiB one does.
    let resident = |rel: &str| -> u64 {
        sh(&format!(
            "fincore --bytes --noheadings --output RES '{}'",
            root.join(rel).display()
        ))
        .trim()
        .parse()
        .unwrap()
    };
    assert_eq!(resident("sizes/three_mib_odd"), 0, "a direct file");
    assert!(resident("sizes/mib_plus_three") > 0, "a cached file");

    // Random preads against the source bytes.
    let mut rng = storaged::testkit::XorShift::new(42);
    for (path, data) in files.iter().filter(|(_, d)| d.len() > 1000).take(6) {
        let f = std::fs::File::open(root.join(path)).unwrap();
        for _ in 0..50 {
            let at = rng.below(data.len() as u64) as usize;
            let len = 1 + rng.below(200_000) as usize;
            let mut buf = vec![0u8; len];
            let n = f.read_at(&mut buf, at as u64).unwrap();
            let want = &data[at..(at + len).min(data.len())];
            assert_eq!(&buf[..n], want, "{path} at {at}");
        }
    }

    // Python: listdir, open().read(), mmap, xattrs, statvfs.
    let script = r#"
import mmap, os, sys, zlib
root, src = sys.argv[1], sys.argv[2]
assert sorted(os.listdir(os.path.join(root, "many"))) == sorted(os.listdir(os.path.join(src, "many")))
for rel in ["données/ñandú 🦙.txt", "sizes/three_mib_odd", "empty"]:
    data = open(os.path.join(root, rel), "rb").read()
    assert data == open(os.path.join(src, rel), "rb").read(), rel
    assert os.getxattr(os.path.join(root, rel), "user.storaged.crc32").decode() == "%08x" % zlib.crc32(data), rel
    assert os.getxattr(os.path.join(root, rel), "user.storaged.class") == b"stripe"
for rel in ["sizes/mib_plus_three", "sizes/three_mib_odd"]:
    with open(os.path.join(root, rel), "rb") as f:
        # Shared, as numpy's memmap maps: a direct file too.
        m = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        assert m[:] == open(os.path.join(src, rel), "rb").read(), rel
st = os.statvfs(root)
print(st.f_blocks * st.f_frsize)
"#;
    let (ok, out) = python(script, &[root.to_str().unwrap(), src.to_str().unwrap()]);
    assert!(ok, "python on the mount: {out}");
    let status = d.status_json();
    let capacity = status["capacity_bytes"].as_u64().unwrap();
    assert_eq!(
        out.trim().parse::<u64>().unwrap(),
        capacity,
        "statfs is the pool's capacity"
    );

    // stat: sizes, modes, the dataset's creation time, stable inodes.
    let created_ms = status["datasets"][0]["created_unix_ms"]
        .as_str()
        .map(|s| s.parse::<i64>().unwrap())
        .or_else(|| status["datasets"][0]["created_unix_ms"].as_i64())
        .unwrap();
    let meta = std::fs::metadata(root.join("sizes/three_mib_odd")).unwrap();
    assert_eq!(meta.len(), 3 * (1 << 20) + 12_345);
    assert_eq!(meta.permissions().mode() & 0o7777, 0o444);
    assert_eq!(
        meta.mtime() * 1000 + meta.mtime_nsec() / 1_000_000,
        created_ms
    );
    let dir = std::fs::metadata(root.join("données")).unwrap();
    assert!(dir.is_dir());
    assert_eq!(dir.permissions().mode() & 0o7777, 0o555);
    let ino = meta.ino();
    assert_eq!(
        std::fs::metadata(root.join("sizes/three_mib_odd"))
            .unwrap()
            .ino(),
        ino
    );
    ino
}

#[test]
fn eight_concurrent_readers_get_the_right_bytes() {
    // Guards concurrent reads: 8 processes hash different and the same
    // files at once, through read-ahead windows and exact reads alike.
    let files: Vec<(String, Vec<u8>)> = (0..4)
        .map(|i| {
            (
                format!("f{i}"),
                pattern(50 + i, 6 * (1 << 20) + i as usize * 4099),
            )
        })
        .collect();
    let Setup {
        d,
        src,
        mnt,
        tmp: _tmp,
    } = with_dataset("ds", &[], &files);
    // Through the page cache (6 MiB files are under the default), then
    // straight into the readers' buffers.
    for cache_mib in ["16", "1"] {
        let m = Mounted::start(
            &d,
            &mnt,
            &[
                "--dataset",
                "ds",
                "--read-ahead-mib",
                "2",
                "--cache-files-up-to-mib",
                cache_mib,
            ],
        );
        hash_with_eight_readers(&mnt, &src);
        // Guards against a mount hoarding its user's region slots (64 by
        // default) once idle: another client of the same user must still
        // get regions.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let registered = d.status_json()["regions"]["registered"]
                .as_u64()
                .unwrap_or(0);
            if registered <= 8 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "an idle mount still holds {registered} regions"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        drop(m);
    }
}

/// Eight `sha256sum`s at once, 0-3 of f0-f3 and 4-7 all of f0, each
/// checked against the source.
fn hash_with_eight_readers(mnt: &Path, src: &Path) {
    let readers: Vec<(usize, Child)> = (0..8)
        .map(|k| {
            // Readers 0-3 each their own file; 4-7 all on f0.
            let i = if k < 4 { k } else { 0 };
            let child = Command::new("sha256sum")
                .arg(mnt.join(format!("f{i}")))
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            (i, child)
        })
        .collect();
    for (i, child) in readers {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        let got = String::from_utf8(out.stdout).unwrap();
        let want = sh(&format!(
            "sha256sum '{}'",
            src.join(format!("f{i}")).display()
        ));
        assert_eq!(got.split(' ').next(), want.split(' ').next(), "f{i}");
    }
}

#[test]
fn every_kind_of_write_fails_with_erofs() {
    // Guards the read-only promise: every call that would change the tree
    // fails with EROFS, and the mount stays up.
    let Setup {
        d,
        src,
        mnt,
        tmp: _tmp,
    } = with_dataset("ds", &[], &[("dir/file".into(), pattern(9, 100))]);
    let _m = Mounted::start(&d, &mnt, &[]);
    let script = r#"
import errno, os, sys
root = sys.argv[1]
f = os.path.join(root, "ds/dir/file")
d = os.path.join(root, "ds/dir")
attempts = {
    "open w": lambda: open(f, "wb"),
    "open a": lambda: open(f, "ab"),
    "open r+": lambda: open(f, "r+b"),
    "create": lambda: open(os.path.join(d, "new"), "xb"),
    "O_CREAT": lambda: os.open(os.path.join(d, "new2"), os.O_CREAT | os.O_WRONLY),
    "O_TRUNC": lambda: os.open(f, os.O_RDONLY | os.O_TRUNC),
    "mkdir": lambda: os.mkdir(os.path.join(d, "sub")),
    "mkdir top": lambda: os.mkdir(os.path.join(root, "newds")),
    "rename": lambda: os.rename(f, os.path.join(d, "moved")),
    "unlink": lambda: os.remove(f),
    "rmdir": lambda: os.rmdir(d),
    "symlink": lambda: os.symlink("file", os.path.join(d, "link")),
    "link": lambda: os.link(f, os.path.join(d, "hard")),
    "chmod": lambda: os.chmod(f, 0o644),
    "chown": lambda: os.chown(f, 1, 1),
    "truncate": lambda: os.truncate(f, 0),
    "utime": lambda: os.utime(f, (1, 1)),
    "setxattr": lambda: os.setxattr(f, "user.x", b"1"),
    "removexattr": lambda: os.removexattr(f, "user.storaged.crc32"),
    "mknod": lambda: os.mkfifo(os.path.join(d, "fifo")),
}
bad = []
for name, call in attempts.items():
    try:
        call()
        bad.append(name + ": succeeded")
    except OSError as e:
        if e.errno != errno.EROFS:
            bad.append("%s: %s" % (name, e))
assert open(f, "rb").read() == open(sys.argv[2], "rb").read()
print("\n".join(bad))
sys.exit(1 if bad else 0)
"#;
    let (ok, out) = python(
        script,
        &[
            mnt.to_str().unwrap(),
            src.join("dir/file").to_str().unwrap(),
        ],
    );
    assert!(ok, "writes that did not fail with EROFS:\n{out}");
}

#[test]
fn a_read_waits_out_a_storaged_restart_and_fails_with_eio_past_the_budget() {
    // Guards reads across a restart: a reader paused mid-file carries on
    // after storaged restarts and gets every byte right; with storaged
    // gone past the retry budget, reads fail with EIO instead of hanging.
    let big = pattern(11, 40 << 20);
    let other = pattern(12, 3 << 20);
    let Setup {
        mut d,
        src,
        mnt,
        tmp: _tmp,
    } = with_dataset(
        "ds",
        &[],
        &[("big".into(), big.clone()), ("other".into(), other)],
    );
    d.stop();
    d.restart_same_port();
    let m = Mounted::start(&d, &mnt, &["--dataset", "ds", "--retry-budget-s", "20"]);
    // The reader reads 1 MiB, then waits for a line on stdin before the
    // rest, and prints the SHA-256 of all it read.
    let script = r#"
import hashlib, sys
h = hashlib.sha256()
with open(sys.argv[1], "rb") as f:
    h.update(f.read(1 << 20))
    print("paused", flush=True)
    sys.stdin.readline()
    while True:
        b = f.read(1 << 20)
        if not b:
            break
        h.update(b)
print(h.hexdigest(), flush=True)
"#;
    let mut reader = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(mnt.join("big"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(reader.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "paused");
    d.stop();
    d.restart_same_port();
    writeln!(reader.stdin.take().unwrap(), "go").unwrap();
    let digest = lines.next().unwrap().unwrap();
    assert!(wait_exit(&mut reader, Duration::from_secs(120)).success());
    let want = sh(&format!("sha256sum '{}'", src.join("big").display()));
    assert_eq!(
        Some(digest.as_str()),
        want.split(' ').next(),
        "bytes across the restart"
    );

    // Gone for good: a file never read fails with EIO within the budget.
    d.stop();
    let started = Instant::now();
    let (ok, out) = python(READ_EXPECTING_EIO, &[mnt.join("other").to_str().unwrap()]);
    assert!(ok && out.trim() == "True", "expected EIO: {out}");
    assert!(
        started.elapsed() < Duration::from_secs(90),
        "EIO took {:?}",
        started.elapsed()
    );
    assert!(m.stderr().contains("read failed"), "{}", m.stderr());
}

#[test]
fn a_storaged_that_stops_answering_fails_reads_with_eio_in_time_and_reads_resume() {
    // Guards against a storaged that is there but silent (stopped, as a
    // hung process is) holding readers and the kernel's threads forever: a
    // small file (read on a FUSE thread of its own), a large one (read
    // ahead on the runtime) and a dataset not listed yet all fail with EIO
    // once the retry budget has passed, `df` answers, and everything reads
    // exactly once storaged runs again.
    let small = pattern(13, 150_000);
    let large = pattern(14, 24 << 20);
    let Setup {
        d,
        src: _src,
        mnt,
        tmp,
    } = with_dataset(
        "ds",
        &[],
        &[
            ("small".into(), small.clone()),
            ("large".into(), large.clone()),
        ],
    );
    let more = tmp.path().join("more");
    write_tree(&more, &[("m".to_owned(), pattern(15, 1000))]);
    d.ctl_ok(&["ingest", "more", more.to_str().unwrap()]);
    let _m = Mounted::start(&d, &mnt, &["--retry-budget-s", "2"]);
    // Listed while storaged answers: the reads below reach it.
    assert_eq!(
        std::fs::metadata(mnt.join("ds/small")).unwrap().len(),
        150_000
    );
    let pid = d.child.as_ref().unwrap().id() as i32;
    // SAFETY: signals a child process of this test; no memory involved.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    let started = Instant::now();
    let failed: Vec<_> = ["ds/small", "ds/large", "more/m"]
        .iter()
        .map(|f| python(READ_EXPECTING_EIO, &[mnt.join(f).to_str().unwrap()]))
        .collect();
    let df = Command::new("df").arg(&mnt).output().unwrap();
    let waited = started.elapsed();
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
    for (file, result) in ["ds/small", "ds/large", "more/m"].iter().zip(failed) {
        assert_eq!(result, (true, "True\n".to_owned()), "{file}");
    }
    assert!(!df.status.success(), "df without storaged");
    assert!(waited < Duration::from_secs(60), "EIO took {waited:?}");
    assert_eq!(std::fs::read(mnt.join("ds/small")).unwrap(), small);
    assert_eq!(std::fs::read(mnt.join("ds/large")).unwrap(), large);
    assert_eq!(
        std::fs::read(mnt.join("more/m")).unwrap(),
        pattern(15, 1000)
    );
}

#[test]
fn a_corrupt_stripe_object_reads_as_eio() {
    // Guards verification through the mount: a flipped bit under a stripe
    // object is EIO (DATA_LOSS logged), never wrong bytes.
    let Setup {
        d, mnt, tmp: _tmp, ..
    } = with_dataset(
        "ds",
        &["--class", "stripe"],
        &[
            ("victim".into(), pattern(13, 700_000)),
            ("fine".into(), pattern(14, 5000)),
        ],
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let extent = rt.block_on(async {
        let st = d
            .client()
            .await
            .dataset("ds")
            .unwrap()
            .stat("victim")
            .await
            .unwrap();
        st.extents[0]
    });
    storaged_tests::flip_byte(
        &d.data_dir.join(format!("dev{}.img", extent.device_index)),
        extent.device_offset + 100,
        0x40,
    );
    let m = Mounted::start(&d, &mnt, &["--dataset", "ds"]);
    let err = std::fs::read(mnt.join("victim")).expect_err("corrupt bytes must not be served");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert_eq!(std::fs::read(mnt.join("fine")).unwrap(), pattern(14, 5000));
    assert!(
        m.stderr().contains("DATA_LOSS") || m.stderr().contains("checksum mismatch"),
        "{}",
        m.stderr()
    );
}

#[test]
fn datasets_come_and_go_while_mounted_and_never_serve_wrong_bytes() {
    // Guards a dataset removed (and created again) while mounted: its open
    // file gets ENOENT or EIO, never the new dataset's bytes; the top
    // level follows within the refresh interval. `f` is over the size a
    // mount fetches whole at its open, so its read goes to storaged; `s`
    // is under it: its bytes may already have been fetched when the
    // dataset goes, and then it reads exactly as it was, never the new one.
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    let size = 2 << 20;
    write_tree(
        &a,
        &[
            ("f".into(), pattern(20, size)),
            ("s".into(), pattern(22, 300_000)),
        ],
    );
    write_tree(
        &b,
        &[
            ("f".into(), pattern(21, size)),
            ("s".into(), pattern(23, 300_000)),
        ],
    );
    let d = daemon(tmp.path());
    let mnt = tmp.path().join("mnt");
    // Over gRPC (ReadBatch: it had no pin to the dataset's id and read the
    // new dataset's bytes), then on the same host (ReadInto); the last
    // mount stays for the top level's checks below.
    let mut mounted = None;
    for transport in ["as-given", "auto"] {
        if let Some(m) = mounted.take() {
            drop::<Mounted>(m);
            d.ctl_ok(&["rm", "-y", "gone"]);
        }
        d.ctl_ok(&["ingest", "gone", a.to_str().unwrap()]);
        let m = Mounted::start(&d, &mnt, &["--refresh-s", "1", "--transport", transport]);
        let old = std::fs::File::open(mnt.join("gone/f")).unwrap();
        let old_small = std::fs::File::open(mnt.join("gone/s")).unwrap();
        d.ctl_ok(&["rm", "-y", "gone"]);
        d.ctl_ok(&["ingest", "gone", b.to_str().unwrap()]);
        let mut small = vec![0u8; 300_000];
        match old_small.read_exact_at(&mut small, 0) {
            Ok(()) => assert!(
                small == pattern(22, 300_000),
                "over {transport}: an open small file read other bytes than its own"
            ),
            Err(e) => assert!(
                matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::EIO)),
                "over {transport}: {e}"
            ),
        }
        let mut buf = vec![0u8; 4096];
        let err = old
            .read_at(&mut buf, 0)
            .expect_err("the old dataset's open file must not read the new one");
        assert!(
            matches!(err.raw_os_error(), Some(libc::ENOENT) | Some(libc::EIO)),
            "over {transport}: {err}"
        );
        mounted = Some(m);
    }
    let _m = mounted;
    d.ctl_ok(&["ingest", "new", b.to_str().unwrap()]);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let names: Vec<String> = std::fs::read_dir(&mnt)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        let fresh = std::fs::read(mnt.join("gone/f")).ok();
        if names.contains(&"new".to_owned()) && fresh.as_deref() == Some(&pattern(21, size)[..]) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "top level never caught up: {names:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    d.ctl_ok(&["rm", "-y", "new"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while mnt.join("new").exists() {
        assert!(Instant::now() < deadline, "removed dataset still listed");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_small_file_is_fetched_as_it_opens_unless_the_page_cache_holds_it() {
    // Guards the fetch at open: the read that follows uses it (one request
    // to storaged for the file, not two); an open whose fetch went unused
    // (the page cache held the file) makes the next open skip it; a file
    // opened and never read is fetched all the same, and once a read
    // reaches the mount again, fetching at open resumes.
    let files = vec![
        ("a".to_owned(), pattern(30, 150_000)),
        ("b".to_owned(), pattern(31, 90_000)),
    ];
    let Setup {
        d,
        src: _src,
        mnt,
        tmp: _tmp,
    } = with_dataset("ds", &[], &files);
    // The fetch at open is the runtime's path (storaged on another host);
    // on this host reads go directly unless asked not to.
    let _m = Mounted::start(&d, &mnt, &["--dataset", "ds", "--no-direct-reads"]);
    let served = || {
        d.status_json()["connections"]["bulk_requests"]
            .as_u64()
            .unwrap_or(0)
    };
    let wait_for = |want: u64| {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let got = served();
            if got == want {
                return;
            }
            assert!(
                got < want && Instant::now() < deadline,
                "storaged served {got} bulk requests, expected {want}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    // The kernel sends a close's RELEASE in the background: each step
    // waits until the mount has answered every request (fusectl's
    // `waiting`), so the next open sees what the release told.
    let settled = || {
        let deadline = Instant::now() + Duration::from_secs(20);
        while fuse_connection_setting(&mnt, "waiting") != 0 {
            assert!(Instant::now() < deadline, "requests stay unanswered");
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    let read = |name: &str, want: &[u8]| {
        assert!(std::fs::read(mnt.join(name)).unwrap() == want, "{name}");
        settled();
    };
    // Opened, fetched at the open (waited for while open), read from the
    // page cache, closed.
    let read_held = |name: &str, want: &[u8], fetches: u64| {
        let mut f = std::fs::File::open(mnt.join(name)).unwrap();
        wait_for(fetches);
        let mut got = Vec::new();
        std::io::Read::read_to_end(&mut f, &mut got).unwrap();
        assert!(got == want, "{name}");
        drop(f);
        settled();
    };
    let before = served();
    read("a", &files[0].1);
    wait_for(before + 1);
    // From the page cache: the open's fetch goes unused...
    read_held("a", &files[0].1, before + 2);
    // ...so the next open fetches nothing.
    read("a", &files[0].1);
    let opened = std::fs::File::open(mnt.join("b")).unwrap();
    wait_for(before + 3);
    drop(opened);
    settled();
    // b's fetch went unused too: its next open skips it, and its read
    // fetches.
    read("b", &files[1].1);
    wait_for(before + 4);
    // That read reached the mount: b is fetched at its opens again (the
    // page cache holds it now, so this one goes unused).
    read_held("b", &files[1].1, before + 5);
    read("a", &files[0].1);
    read("b", &files[1].1);
    assert_eq!(served(), before + 5);
}

#[test]
fn sigterm_and_sigint_unmount_and_a_killed_mount_does_not_block_the_next() {
    // Guards the mount's life cycle: SIGTERM and SIGINT unmount cleanly
    // (exit 0, gone from /proc/mounts); after kill -9 the next mount at
    // the same path works.
    let Setup {
        d, mnt, tmp: _tmp, ..
    } = with_dataset("ds", &[], &[("f".into(), pattern(30, 1000))]);
    for signal in [libc::SIGTERM, libc::SIGINT] {
        let mut m = Mounted::start(&d, &mnt, &[]);
        assert!(is_mounted(&mnt));
        assert!(m.signal(signal).success(), "{}", m.stderr());
        assert!(!is_mounted(&mnt), "still mounted after signal {signal}");
    }
    let mut m = Mounted::start(&d, &mnt, &[]);
    let status = m.signal(libc::SIGKILL);
    assert!(!status.success());
    let again = Mounted::start(&d, &mnt, &[]);
    assert_eq!(std::fs::read(mnt.join("ds/f")).unwrap(), pattern(30, 1000));
    assert!(again.stderr().contains("dead mount"), "{}", again.stderr());
}

#[test]
fn the_top_level_answers_quickly_while_storaged_is_away() {
    // Guards against a top-level `ls` that hangs for the whole retry
    // budget (60 s) when storaged is away: the mount tries briefly, then
    // shows the datasets it knew.
    let Setup {
        mut d,
        mnt,
        tmp: _tmp,
        ..
    } = with_dataset("ds", &[], &[("f".into(), pattern(40, 100))]);
    let _m = Mounted::start(&d, &mnt, &["--refresh-s", "0", "--retry-budget-s", "60"]);
    assert_eq!(sh(&format!("ls '{}'", mnt.display())).trim(), "ds");
    d.stop();
    let started = Instant::now();
    let listed = sh(&format!("ls '{}'", mnt.display()));
    assert_eq!(listed.trim(), "ds", "the last list it had");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "ls took {:?} with storaged away",
        started.elapsed()
    );
}

#[test]
fn a_mount_with_a_tenants_token_shows_and_reads_only_what_the_token_may() {
    // Guards the mount's credentials: against a storaged with tenants, a
    // mount without credentials fails at once with storaged's reason and
    // leaves nothing mounted; one with a token lists the datasets that
    // token may read and no others, and reads them exactly, small files
    // through the bulk channel (its hello carries the token) and a large
    // one through read-ahead.
    const VISION: &str = "sdt_vision_0123456789abcdef0123456789abcdef0123456789abcdef01234567";
    const OPS: &str = "sdt_ops_0123456789abcdef0123456789abcdef0123456789abcdef0123456789a";
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("storaged.toml");
    std::fs::write(
        &config,
        format!(
            "[[tenant]]\nname = \"vision\"\ntokens_sha256 = [\"{}\"]\nread = [\"shared-\"]\n\n\
             [[tenant]]\nname = \"ops\"\ntokens_sha256 = [\"{}\"]\nwrite = [\"\"]\nadmin = true\n",
            storaged_proto::auth::token_sha256_hex(VISION),
            storaged_proto::auth::token_sha256_hex(OPS),
        ),
    )
    .unwrap();
    let d = Daemon::start_with_config(&tmp.path().join("data"), &config);
    let files: Vec<(String, Vec<u8>)> = (0..40)
        .map(|i| {
            (
                format!("s/{i:03}.bin"),
                pattern(i, 50_000 + 997 * i as usize),
            )
        })
        .chain([("big.bin".to_string(), pattern(99, 5 << 20))])
        .collect();
    let src = tmp.path().join("src");
    write_tree(&src, &files);
    for name in ["shared-a", "secret-b"] {
        d.ctl_ok(&["--token", OPS, "ingest", name, src.to_str().unwrap()]);
    }
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();

    // No credentials: storaged's refusal, nothing mounted.
    let out = d.ctl(&["mount", mnt.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "mounted without credentials");
    assert!(
        stderr.to_lowercase().contains("unauthenticated"),
        "{stderr}"
    );
    assert!(!is_mounted(&mnt));

    let bulk_requests = || {
        let out = d.ctl_ok(&["--token", OPS, "status", "--json"]);
        let status: serde_json::Value = serde_json::from_str(&out).unwrap();
        status["connections"]["bulk_requests"].as_u64().unwrap()
    };
    let before = bulk_requests();
    let _m = Mounted::start(&d, &mnt, &["--token", VISION]);
    let top: Vec<String> = std::fs::read_dir(&mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(
        top,
        vec!["shared-a".to_string()],
        "only what vision may read"
    );
    assert_eq!(
        std::fs::metadata(mnt.join("secret-b")).unwrap_err().kind(),
        std::io::ErrorKind::NotFound
    );
    let root = mnt.join("shared-a");
    assert_eq!(
        sh(&format!(
            "cd '{}' && find . -type f | sort | xargs sha256sum",
            root.display()
        )),
        sh(&format!(
            "cd '{}' && find . -type f | sort | xargs sha256sum",
            src.display()
        ))
    );
    assert!(
        bulk_requests() >= before + 40,
        "the small files went through the bulk channel with the token"
    );
}

#[test]
fn a_cluster_dataset_mounts_through_any_node_and_reads_on_without_one() {
    // Guards against a mount of a cluster node showing cluster datasets it
    // cannot read (NOT_FOUND from the node's local Read path), and
    // against a node's death failing reads that parity can serve.
    let cluster = storaged_tests::cluster::Cluster::start();
    let mut nodes = cluster.nodes(&["n1", "n2", "n3"]);
    let src = cluster.data_dir("src");
    let mut files = vec![
        ("empty".to_owned(), Vec::new()),
        ("one".to_owned(), pattern(1, 1)),
        (
            "big/three_mib_odd".to_owned(),
            pattern(2, 3 * (1 << 20) + 12_345),
        ),
    ];
    for i in 0..40u64 {
        files.push((
            format!("train/{i:03}.jpg"),
            pattern(10 + i, 1000 + (i as usize * 7919) % 60_000),
        ));
    }
    write_tree(&src, &files);
    nodes[0].ctl_ok(&[
        "ingest",
        "--class",
        "ec:2+1",
        "imagenet",
        src.to_str().unwrap(),
    ]);

    let mnt = cluster.data_dir("mnt");
    let mounted = Mounted::start(&nodes[1], &mnt, &[]);
    let check = |what: &str| {
        assert_eq!(
            storaged_tests::read_tree(&mnt.join("imagenet")),
            files.iter().cloned().collect(),
            "{what}: the mounted cluster dataset is the source"
        );
        // A pread across the chunk (1 MiB) and stripe (2 MiB) boundaries.
        let big = &files[2].1;
        let f = std::fs::File::open(mnt.join("imagenet/big/three_mib_odd")).unwrap();
        let mut buf = vec![0u8; (1 << 20) + 200];
        f.read_exact_at(&mut buf, (1 << 20) - 100).unwrap();
        assert_eq!(buf, big[(1 << 20) - 100..(2 << 20) + 100], "{what}: pread");
    };
    check("all nodes up");

    // n3 dies; what the mount reads next comes from parity for its chunks.
    let mut n3 = nodes.pop().unwrap();
    n3.kill9();
    // The kernel's page cache may hold files read above: drop it so the
    // reads reach the mount.
    sh("sync; echo 3 > /proc/sys/vm/drop_caches");
    check("n3 killed");
    assert!(
        !mounted.stderr().contains("ERROR"),
        "no read failed: {}",
        mounted.stderr()
    );
}
