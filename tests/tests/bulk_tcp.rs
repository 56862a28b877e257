//! The TCP bulk channel (`Read` with its payload on the connection, for
//! clients on other hosts): the client library's reads through it, a
//! window damaged in flight, storaged dying mid-read, and a hostile peer
//! speaking the framing by hand (lies in its descriptors, a version it
//! does not speak, a frame that is not one, a peer that stops receiving).
//! Real daemon on loopback.

use std::time::Duration;

use storaged_client::region::RegionRead;
use storaged_client::{BulkTcp, Client, ConnectOptions};
use storaged_proto::bulk::{
    HELLO_BYTES, Hello, HelloReply, ItemHeader, ReadAnswer, ReadEnd, ReadFrame, ReadIntoFrame,
    ReadIntoFrameItem, VERSION,
};
use storaged_tests::{Daemon, DaemonOpts, eventually, write_tree};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tonic::Code;

fn files() -> Vec<(String, Vec<u8>)> {
    storaged_tests::size_class_files()
}

/// A daemon with `files()` ingested as `ds`, 1 MiB of staging per bulk
/// connection, and `config` added.
fn daemon_with(tmp: &tempfile::TempDir, config: &str) -> Daemon {
    let src = tmp.path().join("src");
    write_tree(&src, &files());
    let d =
        Daemon::start_with_config_text(tmp.path(), &format!("bulk_staging = \"1MiB\"\n{config}"));
    d.ctl_ok(&["ingest", "ds", src.to_str().unwrap()]);
    d
}

/// The TCP bulk channel's address, from Status.
fn bulk_addr(d: &Daemon) -> String {
    let port = d.status_json()["connections"]["bulk_tcp_port"]
        .as_u64()
        .unwrap_or(0);
    assert_ne!(port, 0, "Status names the TCP bulk channel's port");
    format!("127.0.0.1:{port}")
}

/// A TCP client of `d` that must read over the TCP bulk channel (at
/// `addr`, when given: a proxy).
async fn remote_client(d: &Daemon, addr: Option<String>) -> Client {
    Client::connect_with(
        &d.url,
        &ConnectOptions {
            bulk_tcp: BulkTcp::Required,
            bulk_tcp_addr: addr,
            ..Default::default()
        },
    )
    .await
    .unwrap()
}

/// `reads` into a region of `client`'s own, as bytes (or the item's error
/// code).
async fn read(client: &Client, reads: &[RegionRead]) -> Vec<Result<Vec<u8>, Code>> {
    let ds = client.dataset("ds").unwrap();
    let mut region = client.register_region(16 << 20).await.unwrap();
    assert!(!region.is_shared(), "a TCP client's region is its own");
    let batch = ds.read_into(&mut region, reads).await.unwrap();
    (0..reads.len())
        .map(|i| batch.get(i).map(<[u8]>::to_vec).map_err(|s| s.code()))
        .collect()
}

fn whole_files() -> Vec<RegionRead> {
    files()
        .iter()
        .map(|(p, b)| RegionRead::whole(p.clone(), b.len() as u64))
        .collect()
}

/// Every size class and odd ranges read through `client` land exact:
/// inside a block, across blocks, across the staging size, to the end,
/// past the end (clamped), one of nothing; a missing object fails alone.
async fn assert_exact_reads(client: &Client) {
    let got = read(client, &whole_files()).await;
    for ((path, want), got) in files().iter().zip(&got) {
        assert!(got.as_ref().is_ok_and(|g| g == want), "{path} differs");
    }
    // Ranges: inside a block, across blocks, across the staging size, to
    // the end, past the end (clamped), and one of nothing.
    let big = &files()[8].1;
    let ranges = [
        (8usize, 5u64, Some(17u64)),
        (5, 32_760, Some(20)),
        (8, 1000, Some(3 << 20)),
        (8, (2 << 20) + 5, None),
        (7, 1 << 20, Some(100)),
        (6, 3, Some(0)),
    ];
    let reads: Vec<RegionRead> = ranges
        .iter()
        .map(|&(f, offset, length)| RegionRead {
            path: files()[f].0.clone(),
            offset,
            length,
            object_size: files()[f].1.len() as u64,
        })
        .collect();
    let got = read(client, &reads).await;
    for ((f, offset, length), got) in ranges.iter().zip(&got) {
        let data = &files()[*f].1;
        let start = (*offset as usize).min(data.len());
        let end = length.map_or(data.len(), |l| (start + l as usize).min(data.len()));
        assert_eq!(got.as_ref().unwrap(), &data[start..end], "{f} {offset}");
    }
    assert_eq!(big.len(), 5 * (1 << 20) + 12_345);
    // A missing object fails alone.
    let mut reads = whole_files()[..2].to_vec();
    reads.push(RegionRead::whole("nope", 10));
    let got = read(client, &reads).await;
    assert_eq!(got[2], Err(Code::NotFound));
    assert_eq!(got[1].as_ref().unwrap(), &files()[1].1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_reads_over_the_tcp_bulk_channel_are_exact_for_every_size_class() {
    // Guards the TCP bulk channel's bytes: every size class and odd ranges
    // land exact (ranges longer than storaged's staging go in pieces that
    // land back to back), nothing of a neighbour shows, and storaged and
    // the client count what went through it.
    let tmp = tempfile::tempdir().unwrap();
    let d = daemon_with(&tmp, "");
    let client = remote_client(&d, None).await;
    assert!(!client.is_local());
    assert_exact_reads(&client).await;

    let status = d.status_json();
    assert!(status["connections"]["bulk_requests"].as_u64().unwrap() >= 3);
    assert!(status["reads"]["bulk_bytes_served"].as_u64().unwrap() > 5 << 20);
    let stats = client.bulk_tcp_stats();
    assert!(stats.bytes_received > 5 << 20, "{stats:?}");
    assert_eq!((stats.wire_mismatches, stats.device_mismatches), (0, 0));

    // storagectl takes it when told to, and says why it cannot.
    let out = d.ctl_ok(&["--transport", "bulk", "verify", "ds", "--via", "bulk"]);
    assert!(out.contains("verified via bulk"), "{out}");
    let out = d.ctl_ok(&[
        "--transport",
        "bulk",
        "verify",
        "ds",
        "--via",
        "bulk",
        "--region-mib",
        "1",
    ]);
    assert!(out.contains("verified via bulk"), "{out}");
    // cat and export take it too (and shm on the same host when told).
    let before = d.status_json()["reads"]["bulk_bytes_served"]
        .as_u64()
        .unwrap();
    for transport in ["bulk", "shm"] {
        let out = d.ctl(&["--transport", transport, "cat", "ds", "f8"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.stdout == files()[8].1, "cat over {transport} differs");
        let out = d.ctl(&[
            "--transport",
            transport,
            "cat",
            "ds",
            "f8",
            "--offset",
            "100",
            "--length",
            "3000000",
        ]);
        assert!(
            out.stdout == files()[8].1[100..3_000_100],
            "ranged cat over {transport}"
        );
        // Past the end: the server's own OUT_OF_RANGE.
        let out = d.ctl(&["--transport", transport, "cat", "ds", "f1", "--offset", "2"]);
        assert!(String::from_utf8_lossy(&out.stderr).contains("OUT_OF_RANGE"));
    }
    let after = d.status_json()["reads"]["bulk_bytes_served"]
        .as_u64()
        .unwrap();
    assert!(
        after >= before + files()[8].1.len() as u64,
        "cat went over the bulk channel"
    );
    let export = tmp.path().join("export");
    d.ctl_ok(&[
        "--transport",
        "bulk",
        "export",
        "ds",
        export.to_str().unwrap(),
    ]);
    for (path, want) in files() {
        assert!(
            std::fs::read(export.join(&path)).unwrap() == want,
            "exported {path}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_tcp_bulk_channel_a_required_one_is_refused_clearly() {
    // Guards against `--transport bulk` quietly reading over gRPC.
    let tmp = tempfile::tempdir().unwrap();
    let d = daemon_with(&tmp, "bulk_listen = \"off\"\n");
    assert_eq!(d.status_json()["connections"]["bulk_tcp_port"], 0);
    let out = d.ctl(&["--transport", "bulk", "verify", "ds", "--via", "bulk"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("offers no TCP bulk channel"), "{err}");
    let client = remote_client(&d, None).await;
    assert!(!client.reads_into_regions().await);
    // gRPC still serves the same client's other calls.
    assert_eq!(
        client.dataset("ds").unwrap().read("f1").await.unwrap()[..],
        files()[1].1[..]
    );
}

/// A proxy to `upstream` that flips the byte at `flip_at` of the first
/// connection's server-to-client stream; returns its address.
async fn flipping_proxy(upstream: String, flip_at: usize) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        let mut first = true;
        while let Ok((client, _)) = listener.accept().await {
            let server = TcpStream::connect(&upstream).await.unwrap();
            let flip = first.then_some(flip_at);
            first = false;
            tokio::spawn(async move {
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let up = tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut cr, &mut sw).await;
                });
                let mut seen = 0usize;
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    let n = match sr.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if let Some(at) = flip
                        && (seen..seen + n).contains(&at)
                    {
                        buf[at - seen] ^= 0x40;
                    }
                    seen += n;
                    if cw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                up.abort();
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_damaged_in_flight_is_caught_by_the_client_and_read_again() {
    // Guards the end-to-end check: storaged leaves its own check to the
    // client, so a byte damaged between its memory and ours must be caught
    // here, never handed out, read again through the verified path, and
    // counted as the wire's.
    let tmp = tempfile::tempdir().unwrap();
    let d = daemon_with(&tmp, "");
    // One 100 000-byte object: the hello's answer (16 bytes), the item's
    // header (4 + 54 + 4 CRCs), then its window: flip a byte inside it.
    let flip_at = HelloReply::FIXED_BYTES + 4 + 54 + 16 + 5_000;
    let proxy = flipping_proxy(bulk_addr(&d), flip_at).await;
    let client = remote_client(&d, Some(proxy)).await;
    let reads = [RegionRead::whole("f5", 100_000)];
    let got = read(&client, &reads).await;
    assert_eq!(
        got[0].as_ref().unwrap(),
        &files()[5].1,
        "the bytes handed out are right"
    );
    let stats = client.bulk_tcp_stats();
    assert_eq!(stats.wire_mismatches, 1, "{stats:?}");
    assert_eq!(stats.device_mismatches, 0, "{stats:?}");
    // The next read, on a connection the proxy leaves alone, is clean.
    let got = read(&client, &reads).await;
    assert_eq!(got[0].as_ref().unwrap(), &files()[5].1);
    assert_eq!(client.bulk_tcp_stats().wire_mismatches, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storaged_dying_mid_read_fails_the_read_promptly() {
    // Guards against a remote read hanging when storaged goes away under
    // it: the call fails (UNAVAILABLE) within seconds, no wrong bytes.
    let tmp = tempfile::tempdir().unwrap();
    let mut d = daemon_with(&tmp, "");
    let client = remote_client(&d, None).await;
    let reads: Vec<RegionRead> = (0..200)
        .map(|_| RegionRead::whole("f8", 5 * (1 << 20) + 12_345))
        .collect();
    let ds = client.dataset("ds").unwrap();
    let reading = tokio::spawn(async move {
        let mut region = client.register_region(1 << 30).await.unwrap();
        ds.read_into(&mut region, &reads)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    });
    // Wait until bytes are flowing, then kill it.
    assert!(
        eventually(
            Duration::from_secs(30),
            async || d.status_json()["reads"]["bulk_bytes_served"]
                .as_u64()
                .unwrap_or(0)
                > 0
        )
        .await
    );
    d.kill9();
    let outcome = tokio::time::timeout(Duration::from_secs(20), reading)
        .await
        .expect("the read ended within 20 s of storaged dying")
        .unwrap();
    let err = outcome.expect_err("a read cut short is an error");
    assert!(
        err.contains("UNAVAILABLE") || err.contains("bulk channel"),
        "{err}"
    );
}

/// A raw TCP connection past a hello of `version`; the server's answer.
async fn hello(addr: &str, version: u16, token: Option<&str>) -> (TcpStream, u32, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let hello = Hello {
        version,
        token: token.map(str::to_owned),
    };
    s.write_all(&hello.encode().unwrap()).await.unwrap();
    let mut fixed = [0u8; HelloReply::FIXED_BYTES];
    s.read_exact(&mut fixed).await.unwrap();
    let (server_version, code, len) = HelloReply::decode_fixed(&fixed).unwrap();
    assert_eq!(server_version, VERSION);
    let mut message = vec![0u8; len];
    s.read_exact(&mut message).await.unwrap();
    (s, code, String::from_utf8(message).unwrap())
}

/// One answer frame and, for an item that carries one, its window.
async fn answer(s: &mut TcpStream) -> (ReadAnswer, Vec<u8>) {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).await.unwrap();
    let mut body = vec![0u8; u32::from_le_bytes(len) as usize];
    s.read_exact(&mut body).await.unwrap();
    let frame = ReadAnswer::decode(&body).unwrap();
    let mut window = Vec::new();
    if let ReadAnswer::Item(ItemHeader {
        code: 0,
        window_bytes,
        ..
    }) = &frame
    {
        window = vec![0u8; *window_bytes as usize];
        s.read_exact(&mut window).await.unwrap();
    }
    (frame, window)
}

/// Every frame of one answer: the items' headers and windows, and the end.
async fn answers(s: &mut TcpStream) -> (Vec<(ItemHeader, Vec<u8>)>, ReadEnd) {
    let mut items = Vec::new();
    loop {
        match answer(s).await {
            (ReadAnswer::Item(h), w) => items.push((h, w)),
            (ReadAnswer::End(end), _) => return (items, end),
        }
    }
}

fn item(path: &str, offset: u64, length: Option<u64>, region_offset: u64) -> ReadIntoFrameItem {
    ReadIntoFrameItem {
        path: path.into(),
        offset,
        length,
        region_offset,
    }
}

fn read_frame(items: Vec<ReadIntoFrameItem>) -> Vec<u8> {
    ReadFrame {
        dataset: "ds".into(),
        dataset_id: None,
        max_in_flight: 0,
        client_verifies: false,
        items,
    }
    .encode()
    .unwrap()
}

/// Whether `s` was closed by the server (EOF or reset) within 10 s.
async fn closed(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 1];
    matches!(
        tokio::time::timeout(Duration::from_secs(10), s.read(&mut b)).await,
        Ok(Ok(0) | Err(_))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_speaking_the_tcp_framing_by_hand_gets_clear_errors_and_only_what_it_asked() {
    // Guards against a hostile peer: another version, a region request over
    // TCP, descriptors that lie (out of range, missing, overlapping, too
    // many), a frame that is not one. Each gets a named error; nothing
    // crashes; what is served is exactly the asked-for checksum blocks.
    let tmp = tempfile::tempdir().unwrap();
    let d = daemon_with(&tmp, "");
    let addr = bulk_addr(&d);

    let (_s, code, message) = hello(&addr, VERSION - 1, None).await;
    assert_eq!(code, Code::FailedPrecondition as u32, "{message}");
    assert!(
        message.contains(&format!("version {}", VERSION - 1)),
        "{message}"
    );

    // A region of this host over TCP: no such thing.
    let (mut s, code, _) = hello(&addr, VERSION, None).await;
    assert_eq!(code, 0);
    let frame = ReadIntoFrame {
        region_id: 1,
        dataset: "ds".into(),
        dataset_id: None,
        max_in_flight: 0,
        items: vec![item("f1", 0, None, 0)],
    };
    s.write_all(&frame.encode().unwrap()).await.unwrap();
    let mut len = [0u8; 4];
    s.read_exact(&mut len).await.unwrap();
    let mut body = vec![0u8; u32::from_le_bytes(len) as usize];
    s.read_exact(&mut body).await.unwrap();
    let reply = storaged_proto::bulk::ReadIntoReply::decode(&body).unwrap();
    assert_eq!(
        reply.code,
        Code::FailedPrecondition as u32,
        "{}",
        reply.message
    );

    // Lies: past the end, a missing object, two items over the same
    // region bytes (the client's own business: both served, each exact),
    // and a huge region offset (echoed only).
    let (mut s, _, _) = hello(&addr, VERSION, None).await;
    let f5 = &files()[5].1;
    s.write_all(&read_frame(vec![
        item("f5", 200_000, Some(10), 0),
        item("nope", 0, None, 0),
        item("f5", 40_000, Some(100), 0),
        item("f5", 40_000, Some(100), 0),
        item("f1", 0, None, u64::MAX - 7),
    ]))
    .await
    .unwrap();
    let (items, end) = answers(&mut s).await;
    assert_eq!((end.code, end.items), (0, 5), "{}", end.message);
    let by_index = |i: u32| items.iter().find(|(h, _)| h.index == i).unwrap();
    assert_eq!(
        by_index(0).0.code,
        Code::OutOfRange as u32,
        "{}",
        by_index(0).0.message
    );
    assert_eq!(by_index(1).0.code, Code::NotFound as u32);
    for i in [2, 3] {
        let (h, window) = by_index(i);
        assert_eq!(h.code, 0, "{}", h.message);
        // Exactly the one checksum block holding the range: 32 KiB from
        // 32 768, checked against its CRC.
        assert_eq!(h.window_bytes, 32_768);
        assert_eq!((h.lead, h.length), (40_000 - 32_768, 100));
        assert_eq!(&window[..], &f5[32_768..65_536]);
        assert!(h.check_window(window).is_ok());
    }
    let (h, window) = by_index(4);
    assert_eq!(
        (h.region_offset, window.as_slice()),
        (u64::MAX - 7, &files()[1].1[..])
    );

    // Too many items (storaged's batch_items_max is 100 000): the call
    // fails as a whole, by name.
    let many = (0..100_001).map(|_| item("f1", 0, None, 0)).collect();
    s.write_all(&read_frame(many)).await.unwrap();
    let (items, end) = answers(&mut s).await;
    assert!(items.is_empty());
    assert_eq!(end.code, Code::ResourceExhausted as u32, "{}", end.message);

    // A frame that is not one: INVALID_ARGUMENT, then the connection ends.
    let mut bad = read_frame(vec![item("f1", 0, None, 0)]);
    bad[5] = 0x80; // a flag nobody defined
    s.write_all(&bad).await.unwrap();
    let (items, end) = answers(&mut s).await;
    assert!(items.is_empty());
    assert_eq!(end.code, Code::InvalidArgument as u32, "{}", end.message);
    assert!(
        closed(&mut s).await,
        "the connection ends after a bad frame"
    );

    // Garbage instead of a hello.
    let mut s = TcpStream::connect(&addr).await.unwrap();
    s.write_all(&[b'G'; HELLO_BYTES]).await.unwrap();
    let mut fixed = [0u8; HelloReply::FIXED_BYTES];
    s.read_exact(&mut fixed).await.unwrap();
    let (_, code, _) = HelloReply::decode_fixed(&fixed).unwrap();
    assert_eq!(code, Code::InvalidArgument as u32);

    // storaged is fine after all of it.
    let client = remote_client(&d, None).await;
    let got = read(&client, &whole_files()).await;
    assert!(
        got.iter()
            .zip(files())
            .all(|(g, (_, want))| g.as_ref() == Ok(&want))
    );
}

/// A `ConnectionStats` counter of `d` (u64::MAX when absent).
fn connections(d: &Daemon, field: &str) -> u64 {
    d.status_json()["connections"][field]
        .as_u64()
        .unwrap_or(u64::MAX)
}

/// A peer that asks for 500 objects of 196 615 bytes (rounds of the 1 MiB
/// staging, far more than the sockets' buffers hold) and never reads the
/// answer; returned once its connection holds its staging.
async fn stalled_peer(d: &Daemon) -> TcpStream {
    let (mut hog, _, _) = hello(&bulk_addr(d), VERSION, None).await;
    let many = (0..500).map(|_| item("f6", 0, None, 0)).collect();
    hog.write_all(&read_frame(many)).await.unwrap();
    assert!(
        eventually(Duration::from_secs(10), async || connections(
            d,
            "bulk_tcp_staging_bytes"
        ) == 1 << 20)
        .await
    );
    hog
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stops_receiving_loses_its_connection_and_its_staging() {
    // Guards against a client that asks and never takes the answer holding
    // storaged's staging memory: past the stall timeout its connection
    // closes and the memory returns; meanwhile another connection past the
    // staging total is refused by name, not left waiting.
    let tmp = tempfile::tempdir().unwrap();
    let d = daemon_with(
        &tmp,
        "bulk_staging_total = \"1MiB\"\nstream_stall_timeout_s = 2\n",
    );
    let addr = bulk_addr(&d);
    let _hog = stalled_peer(&d).await;
    let staging = || connections(&d, "bulk_tcp_staging_bytes");
    let (mut other, _, _) = hello(&addr, VERSION, None).await;
    other
        .write_all(&read_frame(vec![item("f1", 0, None, 0)]))
        .await
        .unwrap();
    let (items, end) = answers(&mut other).await;
    assert!(items.is_empty());
    assert_eq!(end.code, Code::ResourceExhausted as u32, "{}", end.message);
    assert!(
        end.message.contains("bulk_staging_total"),
        "{}",
        end.message
    );
    // The hog, never reading, is cut off and its staging comes back.
    assert!(eventually(Duration::from_secs(20), async || staging() == 0).await);
    other
        .write_all(&read_frame(vec![item("f1", 0, None, 0)]))
        .await
        .unwrap();
    let (items, end) = answers(&mut other).await;
    assert_eq!((end.code, items.len()), (0, 1), "{}", end.message);
    assert_eq!(items[0].1, files()[1].1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_copy_sends_are_exact_and_counted() {
    // Guards bulk_send_zerocopy: windows sent by reference land exact
    // (the staging is not rewritten while the kernel holds its pages),
    // and Status counts the sends and says loopback copied them.
    let tmp = tempfile::tempdir().unwrap();
    let d = daemon_with(&tmp, "bulk_send_zerocopy = true\n");
    let client = remote_client(&d, None).await;
    assert_exact_reads(&client).await;
    // Again: the second round of each connection reuses its staging.
    assert_exact_reads(&client).await;
    let c = &d.status_json()["connections"];
    let sends = c["bulk_tcp_zerocopy_sends"].as_u64().unwrap_or(0);
    assert!(sends >= 4, "{c}");
    assert_eq!(c["bulk_tcp_zerocopy_copied"].as_u64(), Some(sends), "{c}");
    let out = d.ctl_ok(&["status"]);
    assert!(out.contains("zero-copy sends"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_peers_zero_copy_staging_is_never_given_to_another() {
    // Guards against the kernel sending a stalled peer pages that another
    // connection's reads have since rewritten: staging with zero-copy
    // sends outstanding is unmapped when its connection ends, not pooled.
    let tmp = tempfile::tempdir().unwrap();
    let d = daemon_with(
        &tmp,
        "bulk_send_zerocopy = true\nstream_stall_timeout_s = 2\n",
    );
    let addr = bulk_addr(&d);
    let _hog = stalled_peer(&d).await;
    let connections = |field: &str| connections(&d, field);
    // Cut off after the stall timeout: its staging is unmapped, not kept
    // idle for the next connection (bulk_staging_keep_s is 60 s).
    assert!(
        eventually(Duration::from_secs(20), async || connections(
            "bulk_tcp_staging_mapped_bytes"
        ) == 0)
        .await
    );
    assert!(connections("bulk_tcp_zerocopy_sends") > 0);
    // The next connection maps fresh staging and reads exact.
    let (mut other, _, _) = hello(&addr, VERSION, None).await;
    other
        .write_all(&read_frame(vec![item("f6", 0, None, 0)]))
        .await
        .unwrap();
    let (items, end) = answers(&mut other).await;
    assert_eq!((end.code, items.len()), (0, 1), "{}", end.message);
    assert_eq!(items[0].1, files()[6].1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_staging_stays_mapped_for_the_keep_time_then_is_unmapped() {
    // Guards against staging being unmapped and zeroed again at every
    // burst of reads (a fresh 16 MiB costs zeroing and pinning: a fifth of
    // the bulk path's CPU in a harness run that paused 10 s between
    // bursts), and against idle staging never being given back.
    let tmp = tempfile::tempdir().unwrap();
    let d = daemon_with(&tmp, "bulk_staging_keep_s = 4\n");
    let client = remote_client(&d, None).await;
    assert_eq!(read(&client, &whole_files()).await.len(), files().len());
    let connections = |field: &str| connections(&d, field);
    // The connections give their staging back after 2 s idle; it stays
    // mapped for the next one ...
    assert!(
        eventually(Duration::from_secs(10), async || connections(
            "bulk_tcp_staging_bytes"
        ) == 0)
        .await
    );
    let mapped = connections("bulk_tcp_staging_mapped_bytes");
    assert!(mapped >= 1 << 20, "idle staging kept mapped: {mapped}");
    let out = d.ctl_ok(&["status"]);
    assert!(out.contains("mapped)"), "{out}");
    // ... and a read now takes it rather than mapping more ...
    assert_eq!(read(&client, &whole_files()[..1]).await.len(), 1);
    assert!(connections("bulk_tcp_staging_mapped_bytes") <= mapped);
    // ... until it has been idle for bulk_staging_keep_s.
    assert!(
        eventually(Duration::from_secs(20), async || connections(
            "bulk_tcp_staging_mapped_bytes"
        ) == 0)
        .await
    );
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_need_their_token_and_their_rights_on_the_tcp_bulk_channel() {
    // Guards against the TCP bulk channel reading around authentication:
    // no token is UNAUTHENTICATED at the hello; a tenant's token reads its
    // own datasets and is PERMISSION_DENIED elsewhere.
    let tmp = tempfile::tempdir().unwrap();
    let token = "sdt_0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    let hash = storaged_proto::auth::token_sha256_hex(token);
    let admin = "sdt_fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210";
    let admin_hash = storaged_proto::auth::token_sha256_hex(admin);
    let config = format!(
        "[[tenant]]\nname = \"ops\"\nadmin = true\nwrite = [\"ds\", \"vision-\"]\ntokens_sha256 = [\"{admin_hash}\"]\n\n[[tenant]]\nname = \"vision\"\ntokens_sha256 = [\"{hash}\"]\nread = [\"vision-\"]\n"
    );
    let src = tmp.path().join("src");
    write_tree(&src, &files());
    let path = tmp.path().join("storaged.toml");
    std::fs::write(&path, config).unwrap();
    let d = Daemon::start(
        &tmp.path().join("data"),
        &DaemonOpts {
            extra: vec!["--config".into(), path.display().to_string()],
            ..Default::default()
        },
    );
    let ctl = |args: &[&str]| {
        let out = std::process::Command::new(storaged_tests::storagectl_bin())
            .args(["--server", &d.url, "--token", admin])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    ctl(&["ingest", "ds", src.to_str().unwrap()]);
    ctl(&["ingest", "vision-a", src.to_str().unwrap()]);
    let port = {
        let out = std::process::Command::new(storaged_tests::storagectl_bin())
            .args(["--server", &d.url, "--token", admin, "status", "--json"])
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["connections"]["bulk_tcp_port"].as_u64().unwrap()
    };
    let addr = format!("127.0.0.1:{port}");
    let (_s, code, message) = hello(&addr, VERSION, None).await;
    assert_eq!(code, Code::Unauthenticated as u32, "{message}");
    let bearer = format!("Bearer {token}");
    let (mut s, code, _) = hello(&addr, VERSION, Some(&bearer)).await;
    assert_eq!(code, 0);
    s.write_all(&read_frame(vec![item("f1", 0, None, 0)]))
        .await
        .unwrap();
    let (items, end) = answers(&mut s).await;
    assert!(items.is_empty());
    assert_eq!(end.code, Code::PermissionDenied as u32, "{}", end.message);
    let frame = ReadFrame {
        dataset: "vision-a".into(),
        dataset_id: None,
        max_in_flight: 0,
        client_verifies: true,
        items: vec![item("f5", 0, None, 0)],
    };
    s.write_all(&frame.encode().unwrap()).await.unwrap();
    let (items, end) = answers(&mut s).await;
    assert_eq!((end.code, items.len()), (0, 1), "{}", end.message);
    assert_eq!(items[0].1, files()[5].1);
    assert!(items[0].0.check_window(&items[0].1).is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_bulk_channel_falls_back_to_grpc_unless_required() {
    // Guards against a firewall that blocks the bulk port (or a NAT that
    // hides it) failing every read of a client that could read over gRPC:
    // `auto` reads on over gRPC, exact; `required` fails clearly.
    let tmp = tempfile::tempdir().unwrap();
    let d = daemon_with(&tmp, "");
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let auto = Client::connect_with(
        &d.url,
        &ConnectOptions {
            bulk_tcp_addr: Some(closed.clone()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let ds = auto.dataset("ds").unwrap();
    let mut region = auto.register_region(16 << 20).await.unwrap();
    assert!(!region.is_shared());
    for _ in 0..2 {
        let batch = ds.read_into(&mut region, &whole_files()).await.unwrap();
        for (i, (path, want)) in files().iter().enumerate() {
            assert_eq!(batch.get(i).unwrap(), &want[..], "{path}");
        }
    }
    assert_eq!(auto.bulk_tcp_stats().bytes_received, 0);
    // Loaders see no region path while the address is left alone.
    assert!(!auto.reads_into_regions().await);

    let required = remote_client(&d, Some(closed.clone())).await;
    let ds = required.dataset("ds").unwrap();
    let mut region = required.register_region(16 << 20).await.unwrap();
    let err = ds
        .read_into(&mut region, &whole_files())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("UNAVAILABLE") && err.contains(&closed),
        "{err}"
    );
}
