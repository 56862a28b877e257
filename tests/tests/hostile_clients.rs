//! Clients that hold on to what storaged gives them: ingests that go
//! quiet, connections that never speak, response streams that are never
//! read. Real daemon, raw gRPC clients and raw sockets.

use std::io::Read;
use std::time::{Duration, Instant};

use storaged_proto::auth::{bearer, token_sha256_hex};
use storaged_proto::pb;
use storaged_proto::pb::storaged_client::StoragedClient;
use storaged_tests::{Daemon, OpenIngest, eventually, ingest_msg, pattern, rss_bytes, write_tree};
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

fn daemon_with(tmp: &tempfile::TempDir, config: &str) -> Daemon {
    Daemon::start_with_config_text(tmp.path(), config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_ingests_time_out_and_free_their_slot_and_space() {
    // Guards against 16 ingests that send a begin and one header and then
    // idle locking out every other ingest and reserving space forever.
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write_tree(&src, &[("a".into(), pattern(1, 1000))]);
    let d = daemon_with(&tmp, "ingest_idle_timeout_s = 3\n");
    let client = d.client().await;
    let mut idle = Vec::new();
    for i in 0..16 {
        let open = OpenIngest::start(&client).await;
        open.send(vec![
            ingest_msg::begin(&format!("idle{i}"), 0),
            ingest_msg::object("x", 1 << 20),
        ])
        .await;
        idle.push(open);
    }
    // The slots are full for now...
    assert!(
        eventually(Duration::from_secs(10), async || {
            client.status().await.unwrap().ingests_in_progress == 16
        })
        .await
    );
    let out = d.ctl(&["ingest", "now", src.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("RESOURCE_EXHAUSTED"));
    // ...until the idle ones time out: then ingests work again, and the
    // idle ones were told why.
    assert!(
        eventually(Duration::from_secs(30), async || {
            d.ctl(&["ingest", "later", src.to_str().unwrap()])
                .status
                .success()
        })
        .await,
        "an ingest got a slot"
    );
    for open in idle {
        let err = open.call.await.unwrap().unwrap_err();
        assert_eq!(err.code(), Code::DeadlineExceeded, "{}", err.message());
        assert!(err.message().contains("ingest_idle_timeout_s"));
    }
    let s = client.status().await.unwrap();
    assert_eq!(s.ingests_in_progress, 0);
    assert_eq!(s.datasets.len(), 1);
}

/// A gRPC connection of its own that never opens its flow-control window
/// beyond the HTTP/2 minimum: a client that stops reading.
async fn stingy_client(
    url: &str,
    token: Option<&str>,
) -> StoragedClient<
    tonic::service::interceptor::InterceptedService<
        Channel,
        impl tonic::service::Interceptor + Clone,
    >,
> {
    let channel = Endpoint::from_shared(url.to_owned())
        .unwrap()
        .initial_stream_window_size(65_535)
        .initial_connection_window_size(65_535)
        .connect()
        .await
        .unwrap();
    let auth: Option<tonic::metadata::MetadataValue<_>> = token.map(|t| bearer(t).parse().unwrap());
    StoragedClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
        if let Some(a) = &auth {
            req.metadata_mut().insert("authorization", a.clone());
        }
        Ok(req)
    })
    .max_decoding_message_size(64 << 20)
}

fn read_request(dataset: &str, path: &str) -> pb::ReadRequest {
    pb::ReadRequest {
        dataset: dataset.into(),
        path: path.into(),
        offset: 0,
        length: None,
        dataset_id: None,
    }
}

const HOSTILE: &str = "sdt_hostile_0123456789abcdef0123456789abcdef0123456789abcdef0123456";
const VICTIM: &str = "sdt_victim_0123456789abcdef0123456789abcdef0123456789abcdef01234567";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_streams_do_not_starve_other_tenants() {
    // Guards against streams that never open their flow-control window
    // holding the buffer pool, so that every other client's large reads
    // hit their deadline for as long as the stalled streams stay: 50
    // stalled 64 MiB reads (the pool is 256 MiB) over two connections,
    // while another tenant's reads go on.
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let big = pattern(7, 64 << 20);
    write_tree(&src, &[("big".into(), big.clone())]);
    let d = daemon_with(
        &tmp,
        &format!(
            r#"
stream_stall_timeout_s = 600

[[tenant]]
name = "hostile"
tokens_sha256 = ["{}"]
read = ["data"]

[[tenant]]
name = "victim"
tokens_sha256 = ["{}"]
read = ["data"]
write = ["data"]
"#,
            token_sha256_hex(HOSTILE),
            token_sha256_hex(VICTIM)
        ),
    );
    let out = std::process::Command::new(storaged_tests::storagectl_bin())
        .args(["--server", &d.url, "--token", VICTIM, "ingest", "data"])
        .arg(&src)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut stalled = Vec::new();
    for _ in 0..2 {
        let mut c = stingy_client(&d.url, Some(HOSTILE)).await;
        for _ in 0..25 {
            // Headers come back; the data never gets read.
            stalled.push(
                c.read(read_request("data", "big"))
                    .await
                    .unwrap()
                    .into_inner(),
            );
        }
    }
    let victim = storaged_client::Client::connect_with(
        &d.url,
        &storaged_client::ConnectOptions {
            token: Some(VICTIM.into()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let dataset = victim.dataset("data").unwrap();
    for round in 0..5 {
        let started = Instant::now();
        let got = tokio::time::timeout(Duration::from_secs(60), dataset.read("big"))
            .await
            .unwrap_or_else(|_| panic!("victim read {round} starved behind stalled streams"))
            .unwrap();
        assert!(got == big, "victim read {round} returned wrong bytes");
        eprintln!("victim read {round}: {:?}", started.elapsed());
    }
    let status = tokio::time::timeout(Duration::from_secs(10), victim.status())
        .await
        .expect("Status answered while streams are stalled")
        .unwrap();
    assert_eq!(status.datasets.len(), 1);
    drop(stalled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_stream_ends_its_connection_and_returns_its_buffers() {
    // Guards against a stream whose client stopped reading keeping its
    // buffers (a message handed to HTTP/2 stays there until its
    // connection goes) after the stall timeout.
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write_tree(&src, &[("big".into(), pattern(3, 32 << 20))]);
    let d = daemon_with(&tmp, "stream_stall_timeout_s = 2\n");
    d.ctl_ok(&["ingest", "data", src.to_str().unwrap()]);
    let mut c = stingy_client(&d.url, None).await;
    let mut stalled = Vec::new();
    for _ in 0..4 {
        stalled.push(
            c.read(read_request("data", "big"))
                .await
                .unwrap()
                .into_inner(),
        );
    }
    // After the stall timeout the connection is gone: reading now gets
    // the first (small) part that was in flight, then an error.
    assert!(
        eventually(Duration::from_secs(30), async || d.stderr().contains(
            "closing connection: a response stream's client read nothing"
        ))
        .await,
        "{}",
        d.stderr()
    );
    let mut failed = false;
    while let Some(m) = tokio::time::timeout(Duration::from_secs(30), stalled[0].message())
        .await
        .expect("the stalled stream ended")
        .transpose()
    {
        if m.is_err() {
            failed = true;
            break;
        }
    }
    assert!(failed, "the stalled stream ended with an error");
    // Everyone else is served (the whole pool is back).
    let client = d.client().await;
    let got = client.dataset("data").unwrap().read("big").await.unwrap();
    assert_eq!(got.len(), 32 << 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_are_limited_per_peer_and_closed_after_the_preface_timeout() {
    // Guards against 1000 half-open TCP connections (connect, then send
    // nothing) making storaged unreachable: file descriptors ran out, the
    // accept loop spun, nothing was logged.
    let tmp = tempfile::tempdir().unwrap();
    let d = daemon_with(
        &tmp,
        "connections_per_peer_max = 8\npreface_timeout_s = 2\n",
    );
    let addr = d.url.trim_start_matches("http://").to_owned();
    let silent: Vec<std::net::TcpStream> = (0..8)
        .map(|_| std::net::TcpStream::connect(&addr).unwrap())
        .collect();
    // The ninth from the same address is closed at once, with a log line.
    // Closed: EOF or a reset within `within` (storaged's SETTINGS frame
    // may come first).
    let closed_soon = |mut s: std::net::TcpStream, within: Duration| {
        let until = Instant::now() + within;
        let mut b = [0u8; 256];
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            s.set_read_timeout(Some(left)).unwrap();
            match s.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) => {
                    return !matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    );
                }
            }
        }
    };
    let ninth = std::net::TcpStream::connect(&addr).unwrap();
    assert!(
        closed_soon(ninth, Duration::from_secs(10)),
        "the ninth was closed"
    );
    assert!(
        eventually(Duration::from_secs(10), async || d.stderr().contains(
            "refusing a connection: 127.0.0.1 has 8 connections open (connections_per_peer_max)"
        ))
        .await,
        "{}",
        d.stderr()
    );
    // The Unix socket is another peer: still served.
    let local = d.local_client().await;
    local.status().await.unwrap();
    // The silent ones are closed after the preface timeout...
    for s in silent {
        assert!(
            closed_soon(s, Duration::from_secs(30)),
            "a silent connection was closed"
        );
    }
    assert!(
        d.stderr()
            .contains("no HTTP/2 preface (or bulk channel hello) within preface_timeout_s")
    );
    // ...and TCP clients get in again.
    d.client().await.status().await.unwrap();
}

/// The most resident memory of `pid` seen over `window`, sampled.
async fn rss_peak_over(pid: u32, window: Duration) -> u64 {
    let until = Instant::now() + window;
    let mut peak = 0;
    while Instant::now() < until {
        peak = peak.max(rss_bytes(pid));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    peak
}

fn batch(items: usize, any_order: bool) -> pb::ReadBatchRequest {
    pb::ReadBatchRequest {
        dataset: "data".into(),
        items: (0..items)
            .map(|_| pb::ReadItem {
                path: "big".into(),
                offset: 0,
                length: None,
            })
            .collect(),
        max_in_flight: 512,
        any_order,
        dataset_id: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_and_stalled_batches_hold_bounded_memory() {
    // Guards against ReadBatch amplification: 100 000 items of a 64 MiB
    // object (a 1.1 MB request) planned up front took 1.2-2 GB of RSS and
    // seconds before the first message, two at once stalled Status; a
    // stalled any-order batch held full heap copies of its items (+3 GB
    // at 48 items).
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write_tree(&src, &[("big".into(), pattern(11, 64 << 20))]);
    let d = daemon_with(&tmp, "stream_stall_timeout_s = 600\n");
    d.ctl_ok(&["ingest", "data", src.to_str().unwrap()]);
    let pid = d.child.as_ref().unwrap().id();
    // Touch the whole pool once, so what follows measures only growth.
    let client = d.client().await;
    let ds = client.dataset("data").unwrap();
    for _ in 0..2 {
        ds.read("big").await.unwrap();
    }
    let base = rss_bytes(pid);

    // Two huge ordered batches: each gives its first message at once and
    // is then left unread.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = stingy_client(&d.url, None).await;
        let mut s = c
            .read_batch(batch(100_000, false))
            .await
            .unwrap()
            .into_inner();
        let first = tokio::time::timeout(Duration::from_secs(30), s.message())
            .await
            .expect("the first message of a huge batch comes without planning it all")
            .unwrap()
            .unwrap();
        assert_eq!(first.index, 0);
        held.push((c, s));
    }
    // A stalled any-order batch of 48 whole 64 MiB items.
    let mut c = stingy_client(&d.url, None).await;
    let any = c.read_batch(batch(48, true)).await.unwrap().into_inner();
    // Status and small reads are served meanwhile.
    tokio::time::timeout(Duration::from_secs(10), client.status())
        .await
        .expect("Status answered next to huge batches")
        .unwrap();
    let peak = rss_peak_over(pid, Duration::from_secs(4)).await;
    let grown = peak.saturating_sub(base);
    eprintln!("RSS {base} -> peak {peak} (+{} MiB)", grown >> 20);
    // Budgets: each connection holds at most half of the pool (buffers,
    // already resident) and half of it again in heap copies.
    assert!(
        grown < 400 << 20,
        "storaged grew by {} MiB serving huge and stalled batches",
        grown >> 20
    );
    drop(any);
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_stream_ends_at_the_callers_deadline() {
    // Guards against deadlines honoured only until a stream's response
    // began: a slow reader's Read went on long after its grpc-timeout.
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write_tree(&src, &[("big".into(), pattern(5, 64 << 20))]);
    let d = daemon_with(&tmp, "");
    d.ctl_ok(&["ingest", "data", src.to_str().unwrap()]);
    let client = storaged_client::Client::connect_with(
        &d.url,
        &storaged_client::ConnectOptions {
            call_timeout: Some(Duration::from_secs(1)),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let mut stream = client
        .raw()
        .read(read_request("data", "big"))
        .await
        .unwrap()
        .into_inner();
    // 10 MiB/s against a 32 MiB window: the 64 MiB cannot all be sent
    // within the deadline.
    let mut received = 0usize;
    let err = loop {
        match stream.message().await {
            Ok(Some(m)) => {
                let before = received >> 20;
                received += m.data.len();
                if received >> 20 > before {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            Ok(None) => panic!("the stream finished past its deadline"),
            Err(e) => break e,
        }
    };
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(received < 64 << 20, "{received}");
    // Unary calls carry the deadline too and succeed well within it.
    client.status().await.unwrap();
    // A call that has not answered by its deadline gets DEADLINE_EXCEEDED
    // (tonic alone says CANCELLED), and the ingest behind it is dropped.
    let open = OpenIngest::start(&client).await;
    open.send(vec![ingest_msg::begin("slow", 0)]).await;
    let err = open.call.await.unwrap().unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(
        eventually(Duration::from_secs(10), async || {
            client.status().await.unwrap().ingests_in_progress == 0
        })
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_and_clients_come_back() {
    // Guards against connections that stay open forever without a call
    // (each holds a descriptor and a slot), and against the idle close
    // breaking a well-behaved client's next call.
    let tmp = tempfile::tempdir().unwrap();
    let d = daemon_with(&tmp, "connection_idle_timeout_s = 1\n");
    let sleeper = d.client().await;
    sleeper.status().await.unwrap();
    let watcher = d.local_client().await;
    // The sleeper's connection goes; the watcher's (busy asking) stays.
    assert!(
        eventually(Duration::from_secs(30), async || {
            let s = watcher.status().await.unwrap();
            s.connections().open == 1
        })
        .await,
        "the idle connection was closed"
    );
    // The sleeper's next call connects again.
    let s = sleeper.status().await.unwrap();
    assert!(s.connections().open >= 1);
}
