//! The bulk channel (`ReadInto` without HTTP/2 on the same host): the
//! client library's reads through it against the same reads over gRPC,
//! and a hostile peer speaking the framing by hand. Real daemon.

use std::time::Duration;

use storaged_client::region::RegionRead;
use storaged_client::{Client, ConnectOptions};
use storaged_proto::bulk::{
    HELLO_BYTES, Hello, HelloReply, ReadIntoFrame, ReadIntoFrameItem, ReadIntoReply, VERSION,
};
use storaged_tests::{Daemon, eventually, write_tree};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tonic::Code;

fn files() -> Vec<(String, Vec<u8>)> {
    storaged_tests::size_class_files()
}

fn daemon_with(tmp: &tempfile::TempDir, config: &str) -> Daemon {
    let src = tmp.path().join("src");
    write_tree(&src, &files());
    let d = Daemon::start_with_config_text(tmp.path(), config);
    d.ctl_ok(&["ingest", "ds", src.to_str().unwrap()]);
    d
}

/// The bulk socket as Status names it.
fn bulk_socket(d: &Daemon) -> String {
    let path = d.status_json()["connections"]["bulk_socket_path"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        path.ends_with("storaged.sock.bulk"),
        "Status names the bulk socket: {path:?}"
    );
    path
}

/// Every file read into one region by `client`, as (path, bytes).
async fn read_all(client: &Client) -> Vec<(String, Vec<u8>)> {
    let ds = client.dataset("ds").unwrap();
    let reads: Vec<RegionRead> = files()
        .iter()
        .map(|(p, b)| RegionRead::whole(p.clone(), b.len() as u64))
        .collect();
    let mut region = client.register_region(16 << 20).await.unwrap();
    let batch = ds.read_into(&mut region, &reads).await.unwrap();
    reads
        .iter()
        .enumerate()
        .map(|(i, r)| (r.path.clone(), batch.get(i).unwrap().to_vec()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_reads_through_the_bulk_channel_exactly_as_over_grpc() {
    // Guards the bulk channel's bytes: every size class lands exact, the
    // same as ReadInto over gRPC; the client takes the channel, and reads
    // over gRPC when it cannot open it.
    let tmp = tempfile::tempdir().unwrap();
    let d = daemon_with(&tmp, "");
    let socket = bulk_socket(&d);
    let bulk = d.local_client().await;
    assert_eq!(read_all(&bulk).await, files());
    let over_grpc = Client::connect_with(
        &d.unix_url(),
        &ConnectOptions {
            read_into_over_grpc: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(read_all(&over_grpc).await, files());
    // The gRPC client left the channel alone; the bulk one used it.
    let served = || {
        d.status_json()["connections"]["bulk_requests"]
            .as_u64()
            .unwrap_or(0)
    };
    assert_eq!(served(), 1);
    // With the channel's socket gone, a new client reads over gRPC.
    let moved = format!("{socket}.moved");
    std::fs::rename(&socket, &moved).unwrap();
    let fresh = d.local_client().await;
    assert_eq!(read_all(&fresh).await, files());
    assert_eq!(served(), 1);
    std::fs::rename(&moved, &socket).unwrap();
    // The first client's pooled connections still serve.
    assert_eq!(read_all(&bulk).await, files());
    assert_eq!(served(), 2);
}

/// A raw connection past a hello of `version`; the server's answer.
async fn hello(socket: &str, version: u16, token: Option<&str>) -> (UnixStream, u32, String) {
    let mut s = UnixStream::connect(socket).await.unwrap();
    let hello = Hello {
        version,
        token: token.map(str::to_owned),
    };
    s.write_all(&hello.encode().unwrap()).await.unwrap();
    let (code, message) = hello_reply(&mut s).await;
    (s, code, message)
}

async fn hello_reply(s: &mut UnixStream) -> (u32, String) {
    let mut fixed = [0u8; HelloReply::FIXED_BYTES];
    s.read_exact(&mut fixed).await.unwrap();
    let (version, code, len) = HelloReply::decode_fixed(&fixed).unwrap();
    assert_eq!(version, VERSION);
    let mut message = vec![0u8; len];
    s.read_exact(&mut message).await.unwrap();
    (code, String::from_utf8(message).unwrap())
}

/// Sends `bytes` as a request and reads one reply.
async fn exchange(s: &mut UnixStream, bytes: &[u8]) -> ReadIntoReply {
    s.write_all(bytes).await.unwrap();
    let mut len = [0u8; 4];
    s.read_exact(&mut len).await.unwrap();
    let mut body = vec![0u8; u32::from_le_bytes(len) as usize];
    s.read_exact(&mut body).await.unwrap();
    ReadIntoReply::decode(&body).unwrap()
}

/// Whether the server closed `s` (EOF) within a few seconds.
async fn closed(s: &mut UnixStream) -> bool {
    let mut b = [0u8; 64];
    matches!(
        tokio::time::timeout(Duration::from_secs(10), s.read(&mut b)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

fn frame(region_id: u64, items: Vec<ReadIntoFrameItem>) -> ReadIntoFrame {
    ReadIntoFrame {
        region_id,
        dataset: "ds".into(),
        dataset_id: None,
        max_in_flight: 0,
        items,
    }
}

fn item(path: &str, region_offset: u64) -> ReadIntoFrameItem {
    ReadIntoFrameItem {
        path: path.into(),
        offset: 0,
        length: None,
        region_offset,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_bulk_requests_get_clear_errors_and_nothing_else() {
    // Guards the channel against a hostile peer: wrong magic, version or
    // framing, a frame claiming 4 GiB, unknown regions, items out of
    // bounds, a stale dataset id. Each gets its own status; a broken
    // frame ends the connection; a good request on the same connection
    // is still served after a failed one.
    let tmp = tempfile::tempdir().unwrap();
    let d = daemon_with(&tmp, "");
    let socket = bulk_socket(&d);
    let local = d.local_client().await;
    let region = local.register_region(64 << 10).await.unwrap();
    let id = region.id();

    // An HTTP/2 client on the wrong socket.
    let mut s = UnixStream::connect(&socket).await.unwrap();
    let mut preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    preface.resize(HELLO_BYTES, 0);
    s.write_all(&preface).await.unwrap();
    let (code, message) = hello_reply(&mut s).await;
    assert_eq!(code, Code::InvalidArgument as u32, "{message}");
    assert!(message.contains("magic"), "{message}");
    assert!(closed(&mut s).await);

    // A version this server does not speak: both are named.
    let (mut s, code, message) = hello(&socket, VERSION + 1, None).await;
    assert_eq!(code, Code::FailedPrecondition as u32, "{message}");
    assert!(
        message.contains(&format!("version {}", VERSION + 1))
            && message.contains(&format!("speaks {VERSION}")),
        "{message}"
    );
    assert!(closed(&mut s).await);

    // A frame claiming 4 GiB: refused by its length, nothing allocated.
    let (mut s, code, _) = hello(&socket, VERSION, None).await;
    assert_eq!(code, 0);
    let reply = exchange(&mut s, &u32::MAX.to_le_bytes()).await;
    assert_eq!(
        reply.code,
        Code::InvalidArgument as u32,
        "{}",
        reply.message
    );
    assert!(reply.message.contains("limit"), "{}", reply.message);
    assert!(closed(&mut s).await);

    // A frame of an unknown kind, and one cut short.
    let (mut s, _, _) = hello(&socket, VERSION, None).await;
    let reply = exchange(&mut s, &[1, 0, 0, 0, 9]).await;
    assert_eq!(reply.code, Code::InvalidArgument as u32);
    assert!(reply.message.contains("kind"), "{}", reply.message);
    assert!(closed(&mut s).await);
    let (mut s, _, _) = hello(&socket, VERSION, None).await;
    let mut cut = frame(id, vec![item("f1", 0)]).encode().unwrap();
    cut.truncate(cut.len() - 3);
    let body = (cut.len() as u32 - 4).to_le_bytes();
    cut[..4].copy_from_slice(&body);
    let reply = exchange(&mut s, &cut).await;
    assert_eq!(
        reply.code,
        Code::InvalidArgument as u32,
        "{}",
        reply.message
    );
    assert!(closed(&mut s).await);

    // On one connection: an unknown region (marked so: a client registers
    // anew), then items of which one does not fit the region, one is
    // misaligned and one is missing, then a stale dataset id, then a bad
    // dataset name, then too many items; then a good request.
    let (mut s, _, _) = hello(&socket, VERSION, None).await;
    let reply = exchange(
        &mut s,
        &frame(id + 1000, vec![item("f1", 0)]).encode().unwrap(),
    )
    .await;
    assert_eq!(reply.code, Code::NotFound as u32, "{}", reply.message);
    assert!(reply.region_unknown);
    let reply = exchange(
        &mut s,
        &frame(
            id,
            vec![
                item("f5", 61_440),
                item("f1", 0),
                item("f2", 100),
                item("nope", 4096),
            ],
        )
        .encode()
        .unwrap(),
    )
    .await;
    assert_eq!(reply.code, 0, "{}", reply.message);
    assert_eq!(reply.items[0].code, Code::OutOfRange as u32);
    assert!(
        reply.items[0].message.contains("65536"),
        "{}",
        reply.items[0].message
    );
    assert_eq!(reply.items[1].code, 0);
    assert_eq!(reply.items[1].length, 1);
    assert_eq!(reply.items[2].code, Code::InvalidArgument as u32);
    assert_eq!(reply.items[3].code, Code::NotFound as u32);
    let stale = ReadIntoFrame {
        dataset_id: Some(999),
        ..frame(id, vec![item("f1", 0)])
    };
    let reply = exchange(&mut s, &stale.encode().unwrap()).await;
    assert_eq!(reply.code, Code::NotFound as u32, "{}", reply.message);
    assert!(!reply.region_unknown);
    let bad_name = ReadIntoFrame {
        dataset: "../etc".into(),
        ..frame(id, vec![item("f1", 0)])
    };
    let reply = exchange(&mut s, &bad_name.encode().unwrap()).await;
    assert_eq!(
        reply.code,
        Code::InvalidArgument as u32,
        "{}",
        reply.message
    );
    // More items than a batch may hold (100 000): the whole call.
    let many = frame(id, (0..100_001).map(|_| item("f1", 0)).collect());
    let reply = exchange(&mut s, &many.encode().unwrap()).await;
    assert_eq!(
        reply.code,
        Code::ResourceExhausted as u32,
        "{}",
        reply.message
    );
    assert!(reply.message.contains("100000"), "{}", reply.message);
    let reply = exchange(&mut s, &frame(id, vec![item("f3", 0)]).encode().unwrap()).await;
    assert_eq!(reply.code, 0, "{}", reply.message);
    assert_eq!(reply.items[0].code, 0, "{}", reply.items[0].message);
    assert_eq!(reply.items[0].length, 32 * 1024 - 1);
    drop(region);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bulk_channel_authenticates_like_grpc_and_closes_silent_peers() {
    // Guards the channel's door: with tenants, a peer that is no tenant's
    // uid and brings no token is refused, a wrong token too, a good token
    // gets in; a peer that sends nothing is closed at the preface deadline.
    let tmp = tempfile::tempdir().unwrap();
    let token = "sdt_0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    // Root is no tenant's uid here: on the Unix socket it needs a token.
    let config = format!(
        "preface_timeout_s = 2\n\n[[tenant]]\nname = \"ops\"\ntokens_sha256 = [\"{}\"]\nadmin = true\n",
        storaged_proto::auth::token_sha256_hex(token)
    );
    let cfg = tmp.path().join("storaged.toml");
    std::fs::write(&cfg, config).unwrap();
    let data = tmp.path().join("data");
    let _d = Daemon::start_with_config(&data, &cfg);
    let socket = data.join("storaged.sock.bulk").display().to_string();
    let (mut s, code, message) = hello(&socket, VERSION, None).await;
    assert_eq!(code, Code::Unauthenticated as u32, "{message}");
    assert!(closed(&mut s).await);
    let (mut s, code, message) = hello(&socket, VERSION, Some("Bearer sdt_wrong")).await;
    assert_eq!(code, Code::Unauthenticated as u32, "{message}");
    assert!(closed(&mut s).await);
    let (_s, code, message) =
        hello(&socket, VERSION, Some(&storaged_proto::auth::bearer(token))).await;
    assert_eq!(code, 0, "{message}");

    let mut silent = UnixStream::connect(&socket).await.unwrap();
    assert!(closed(&mut silent).await, "a silent peer is closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stops_reading_replies_is_closed() {
    // Guards against a peer that sends requests and never reads a reply:
    // storaged stops reading its requests once its replies fill the
    // socket, and closes it after the stall timeout, holding nothing more;
    // and against one that sends a frame's length and then trickles.
    let tmp = tempfile::tempdir().unwrap();
    let d = daemon_with(&tmp, "stream_stall_timeout_s = 2\n");
    let socket = bulk_socket(&d);
    let local = d.local_client().await;
    let region = local.register_region(1 << 20).await.unwrap();
    let open = || d.status_json()["connections"]["open"].as_u64().unwrap();
    let open_before = open();
    let (s, code, _) = hello(&socket, VERSION, None).await;
    assert_eq!(code, 0);
    let (mut rx, mut tx) = s.into_split();
    // Each reply names 100 missing objects: several KiB.
    let request = frame(
        region.id(),
        (0..100).map(|i| item(&format!("missing/{i}"), 0)).collect(),
    )
    .encode()
    .unwrap();
    let writer = tokio::spawn(async move {
        for _ in 0..5000 {
            if tx.write_all(&request).await.is_err() {
                return;
            }
        }
    });
    // storaged ends the connection (its count drops back)...
    assert!(
        eventually(Duration::from_secs(30), async || open() <= open_before).await,
        "the connection was not closed"
    );
    // ...and the replies sent before are there to read, then its end.
    let mut sink = Vec::new();
    let drained = tokio::time::timeout(Duration::from_secs(20), rx.read_to_end(&mut sink)).await;
    assert!(
        matches!(drained, Ok(Ok(_)) | Ok(Err(_))),
        "the connection was not closed"
    );
    assert!(sink.len() > 64 << 10, "replies were sent: {}", sink.len());
    writer.abort();
    // A frame whose length came but whose bytes never do is no hold
    // either: closed after the stall timeout.
    let (mut s, code, _) = hello(&socket, VERSION, None).await;
    assert_eq!(code, 0);
    s.write_all(&1000u32.to_le_bytes()).await.unwrap();
    s.write_all(&[1, 0, 0, 0]).await.unwrap();
    assert!(closed(&mut s).await, "a trickled frame was closed");
    // storaged still serves.
    assert_eq!(read_all(&local).await, files());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocking_reader_reads_exactly_and_gives_up_on_a_silent_server_in_time() {
    // Guards the blocking reads of the mount's FUSE threads: every size
    // class lands exact through a thread's own connection and region, a
    // missing object is that item's NOT_FOUND, and a storaged that stops
    // answering (SIGSTOP) fails the call DEADLINE_EXCEEDED after the
    // reader's timeout instead of holding the thread forever.
    let tmp = tempfile::tempdir().unwrap();
    let d = daemon_with(&tmp, "");
    let client = d.local_client().await;
    let ds = client.dataset("ds").unwrap();
    let timeout = Duration::from_millis(800);
    let mut reader = client.blocking_reader(16 << 20, timeout).await.unwrap();
    let served = || {
        d.status_json()["connections"]["bulk_requests"]
            .as_u64()
            .unwrap_or(0)
    };
    let before = served();
    let (mut reader, got) = tokio::task::spawn_blocking({
        let ds = ds.clone();
        move || {
            let mut got = Vec::new();
            for (path, bytes) in files() {
                let read = RegionRead::whole(path.clone(), bytes.len() as u64);
                let batch = reader.read_into(&ds, &[read]).unwrap();
                got.push((path, batch.get(0).unwrap().to_vec()));
            }
            // A range: exactly its bytes.
            let (path, bytes) = &files()[7];
            let range = RegionRead {
                path: path.clone(),
                offset: 70_001,
                length: Some(5),
                object_size: bytes.len() as u64,
            };
            let batch = reader.read_into(&ds, &[range]).unwrap();
            assert_eq!(batch.get(0).unwrap(), &bytes[70_001..70_006]);
            // A missing object: its own error; the reader goes on.
            let missing = RegionRead::whole("nope", 10);
            let batch = reader.read_into(&ds, &[missing]).unwrap();
            assert_eq!(batch.get(0).unwrap_err().code(), Code::NotFound);
            (reader, got)
        }
    })
    .await
    .unwrap();
    assert_eq!(got, files());
    assert_eq!(served() - before, files().len() as u64 + 2);

    let pid = d.child.as_ref().unwrap().id() as i32;
    // SAFETY: signals a child process of this test; no memory involved.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    let waited = tokio::task::spawn_blocking(move || {
        let started = std::time::Instant::now();
        let read = RegionRead::whole("f1", 1);
        let err = reader.read_into(&ds, &[read]).map(|_| ()).unwrap_err();
        (err, started.elapsed())
    })
    .await
    .unwrap();
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
    let (err, elapsed) = waited;
    assert_eq!(err.code(), Some(Code::DeadlineExceeded), "{err}");
    assert!(
        elapsed >= timeout && elapsed < timeout * 10,
        "gave up after {elapsed:?}"
    );
    // Running again, a new reader reads.
    let mut reader = client.blocking_reader(4 << 20, timeout).await.unwrap();
    let ds = client.dataset("ds").unwrap();
    let (path, bytes) = files()[5].clone();
    let got = tokio::task::spawn_blocking(move || {
        let read = RegionRead::whole(path, bytes.len() as u64);
        reader
            .read_into(&ds, &[read])
            .unwrap()
            .get(0)
            .unwrap()
            .to_vec()
    })
    .await
    .unwrap();
    assert_eq!(got, files()[5].1);
}
