//! A seeded mutation fuzzer over every method of `storaged.v1.Storaged`,
//! against the real daemon, over TCP and the Unix socket. Each round takes
//! a valid request of one method, encodes it, mutates the bytes (bit
//! flips, byte overwrites with edge values, truncation, insertion,
//! duplication of a slice, a varint of extremes) and sends them raw. For
//! the client stream (Ingest) the messages are also dropped, repeated and
//! reordered. Afterwards storaged must be alive, logged no panic, hold
//! bounded memory, and still serve the protected dataset byte for byte.
//!
//! Admin-only methods are also sent over the Unix socket without a token,
//! as the operator (uid), to reach past the rights check. Then hellos and
//! `ReadInto` frames of the bulk channel, mutated the same way, raw on its
//! socket.
//!
//! Bounded by rounds and by time (`STORAGED_FUZZ_ROUNDS`, default 4000;
//! at most 60 s); `STORAGED_FUZZ_SEED` replays a run.

use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes};
use prost::Message;
use storaged_proto::auth::{bearer, token_sha256_hex};
use storaged_proto::pb;
use storaged_tests::{Daemon, ingest_msg, pattern, rss_bytes, test_seed, write_tree};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::{Channel, Endpoint};

const FUZZER: &str = "sdt_fuzzer_0123456789abcdef0123456789abcdef0123456789abcdef01234567";
const METHODS: [&str; 13] = [
    "Ingest",
    "ListDatasets",
    "ListObjects",
    "Stat",
    "Read",
    "ReadBatch",
    "DeleteDataset",
    "Status",
    "RegisterRegion",
    "ReadInto",
    "Hint",
    "Scrub",
    "ReplaceDevice",
];

/// SplitMix64: a whole run replays from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Bytes in, bytes out: the fuzzer sends what it made and reads whatever
/// comes back.
#[derive(Debug, Clone, Default)]
struct Raw;

impl Encoder for Raw {
    type Item = Bytes;
    type Error = tonic::Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Bytes;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, tonic::Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

impl Codec for Raw {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = Raw;
    type Decoder = Raw;

    fn encoder(&mut self) -> Raw {
        Raw
    }

    fn decoder(&mut self) -> Raw {
        Raw
    }
}

/// A valid request of `method` (the ingest's messages for Ingest).
fn valid(method: &str, rng: &mut Rng) -> Vec<Bytes> {
    let name = ["data", "fz-new", "fz-x", "", "../data"][rng.below(5)];
    let one = |m: &dyn Fn() -> Bytes| vec![m()];
    match method {
        "Ingest" => vec![
            ingest_msg::begin(&format!("fz-{}", rng.below(1000)), rng.below(4) as i32),
            ingest_msg::object("a/b", 10),
            ingest_msg::data(Bytes::from_static(b"0123456789")),
            pb::IngestRequest {
                msg: Some(pb::ingest_request::Msg::Commit(pb::IngestCommit {
                    object_count: 1,
                    total_bytes: 10,
                })),
            },
        ]
        .into_iter()
        .map(|m| m.encode_to_vec().into())
        .collect(),
        "ListDatasets" => one(&|| pb::ListDatasetsRequest::default().encode_to_vec().into()),
        "ListObjects" => one(&|| {
            pb::ListObjectsRequest {
                dataset: name.into(),
                prefix: "a".into(),
                page_size: 7,
                page_token: String::new(),
            }
            .encode_to_vec()
            .into()
        }),
        "Stat" => one(&|| {
            pb::StatRequest {
                dataset: name.into(),
                path: "f0".into(),
                include_extents: true,
            }
            .encode_to_vec()
            .into()
        }),
        "Read" => one(&|| {
            pb::ReadRequest {
                dataset: name.into(),
                path: "f1".into(),
                offset: 10,
                length: Some(100_000),
                dataset_id: None,
            }
            .encode_to_vec()
            .into()
        }),
        "ReadBatch" => one(&|| {
            pb::ReadBatchRequest {
                dataset: name.into(),
                items: (0..3)
                    .map(|i| pb::ReadItem {
                        path: format!("f{i}"),
                        offset: 0,
                        length: None,
                    })
                    .collect(),
                max_in_flight: 4,
                any_order: true,
                dataset_id: None,
            }
            .encode_to_vec()
            .into()
        }),
        "DeleteDataset" => one(&|| {
            pb::DeleteDatasetRequest {
                dataset: name.into(),
            }
            .encode_to_vec()
            .into()
        }),
        "Status" => one(&|| pb::StatusRequest::default().encode_to_vec().into()),
        "RegisterRegion" => one(&|| {
            pb::RegisterRegionRequest {
                path: String::new(),
                size_bytes: 1 << 20,
                memfd: Some(0),
            }
            .encode_to_vec()
            .into()
        }),
        "ReadInto" => one(&|| {
            pb::ReadIntoRequest {
                region_id: 1,
                dataset: name.into(),
                items: vec![pb::ReadIntoItem {
                    path: "f2".into(),
                    offset: 0,
                    length: Some(4096),
                    region_offset: 0,
                }],
                max_in_flight: 2,
                dataset_id: None,
            }
            .encode_to_vec()
            .into()
        }),
        "Hint" => one(&|| {
            pb::HintRequest {
                dataset: name.into(),
                paths: vec!["f0".into(), "f1".into()],
            }
            .encode_to_vec()
            .into()
        }),
        "Scrub" => one(&|| {
            pb::ScrubRequest {
                dataset: name.into(),
                rate_mib_s: 1,
            }
            .encode_to_vec()
            .into()
        }),
        "ReplaceDevice" => one(&|| {
            pb::ReplaceDeviceRequest {
                old: "0".into(),
                new_path: "/tmp/fz-device".into(),
                allow_healthy: true,
                overwrite: true,
            }
            .encode_to_vec()
            .into()
        }),
        other => panic!("no base request for {other}"),
    }
}

/// One mutation of `msg`.
fn mutate(msg: &Bytes, rng: &mut Rng) -> Bytes {
    let mut b = msg.to_vec();
    let edges: [u8; 6] = [0x00, 0xff, 0x7f, 0x80, 0x0a, 0x12];
    for _ in 0..=rng.below(4) {
        let at = rng.below(b.len().max(1));
        match rng.below(7) {
            0 if !b.is_empty() => b[at] ^= 1 << rng.below(8),
            1 if !b.is_empty() => b[at] = edges[rng.below(edges.len())],
            2 => b.truncate(at),
            3 => {
                let n = rng.below(16);
                for _ in 0..n {
                    b.insert(at.min(b.len()), rng.next() as u8);
                }
            }
            4 if !b.is_empty() => {
                let end = (at + 1 + rng.below(32)).min(b.len());
                let slice = b[at..end].to_vec();
                b.splice(at..at, slice);
            }
            5 => {
                // A field of a random number with an extreme varint.
                b.push((rng.below(15) as u8 + 1) << 3);
                b.extend_from_slice(&[0xff; 9]);
                b.push(0x01);
            }
            _ => {
                // A length-delimited field claiming far more than follows.
                b.push(((rng.below(15) as u8 + 1) << 3) | 2);
                b.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x0f]);
            }
        }
    }
    Bytes::from(b)
}

async fn channel(url: &str) -> Channel {
    let endpoint = Endpoint::from_shared(if url.starts_with("unix://") {
        "http://storaged.local".to_owned()
    } else {
        url.to_owned()
    })
    .unwrap();
    match url.strip_prefix("unix://") {
        None => endpoint.connect().await.unwrap(),
        Some(path) => {
            let path = path.to_owned();
            endpoint
                .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                    let path = path.clone();
                    async move {
                        let s = tokio::net::UnixStream::connect(path).await?;
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                    }
                }))
                .await
                .unwrap()
        }
    }
}

/// `r` with a 2 s deadline, and the fuzzer's token unless `as_operator`.
fn with_auth<T>(mut r: tonic::Request<T>, as_operator: bool) -> tonic::Request<T> {
    if !as_operator {
        r.metadata_mut()
            .insert("authorization", bearer(FUZZER).parse().unwrap());
    }
    r.set_timeout(Duration::from_secs(2));
    r
}

/// Sends `messages` to `method` and reads at most a few messages back;
/// every outcome but a hang is fine here (what counts is the daemon).
async fn send(ch: &Channel, method: &str, messages: Vec<Bytes>, as_operator: bool) {
    let mut grpc = tonic::client::Grpc::new(ch.clone());
    if grpc.ready().await.is_err() {
        return;
    }
    let path: http::uri::PathAndQuery = format!("/storaged.v1.Storaged/{method}").parse().unwrap();
    let call = async {
        match method {
            "Ingest" => {
                let req = with_auth(
                    tonic::Request::new(futures::stream::iter(messages)),
                    as_operator,
                );
                let _ = grpc.client_streaming(req, path, Raw).await;
            }
            "ListDatasets" | "ListObjects" | "Stat" | "DeleteDataset" | "Status" | "Hint" => {
                let req = with_auth(tonic::Request::new(messages[0].clone()), as_operator);
                let _ = grpc.unary(req, path, Raw).await;
            }
            _ => {
                let req = with_auth(tonic::Request::new(messages[0].clone()), as_operator);
                if let Ok(resp) = grpc.server_streaming(req, path, Raw).await {
                    let mut s = resp.into_inner();
                    for _ in 0..3 {
                        match s.message().await {
                            Ok(Some(_)) => {}
                            _ => break,
                        }
                    }
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .unwrap_or_else(|_| panic!("{method} hung past its deadline"));
}

/// One round on the bulk channel: a hello (mutated one time in four;
/// the fuzzer's token or none, as the operator's uid), then a ReadInto
/// frame into `region_id`, mutated, then whatever comes back within a
/// moment.
async fn send_bulk(socket: &std::path::Path, region_id: u64, rng: &mut Rng) {
    use storaged_proto::bulk::{Hello, ReadIntoFrame, ReadIntoFrameItem, VERSION};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::UnixStream::connect(socket).await else {
        return;
    };
    let token = (rng.below(2) == 0).then(|| bearer(FUZZER));
    let hello = Bytes::from(
        Hello {
            version: VERSION,
            token,
        }
        .encode()
        .unwrap(),
    );
    let hello = if rng.below(4) == 0 {
        mutate(&hello, rng)
    } else {
        hello
    };
    let items = (0..=rng.below(4))
        .map(|i| ReadIntoFrameItem {
            path: format!("f{}", rng.below(4)),
            offset: [0, 1, 4096, 299_999, u64::MAX][rng.below(5)],
            length: [None, Some(0), Some(1), Some(100_000), Some(u64::MAX)][rng.below(5)],
            region_offset: [0, 4096 * i as u64, 1 << 20, u64::MAX - 4095][rng.below(4)],
        })
        .collect();
    let frame = ReadIntoFrame {
        region_id,
        dataset: ["data", "fz-x", ""][rng.below(3)].into(),
        dataset_id: (rng.below(2) == 0).then(|| rng.next() % 4),
        max_in_flight: [0, 1, u32::MAX][rng.below(3)],
        items,
    };
    let frame = mutate(&Bytes::from(frame.encode().unwrap()), rng);
    let mut sink = vec![0u8; 1 << 16];
    let exchange = async {
        s.write_all(&hello).await?;
        s.write_all(&frame).await?;
        while s.read(&mut sink).await? > 0 {}
        Ok::<_, std::io::Error>(())
    };
    let _ = tokio::time::timeout(Duration::from_millis(100), exchange).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutated_requests_to_every_method_leave_storaged_whole() {
    // Guards against a request any client can send crashing, hanging or
    // bloating storaged, or touching data its tenant may not: mutated
    // requests of all 13 methods, over TCP and the Unix socket.
    let seed = test_seed("STORAGED_FUZZ_SEED", "fuzz");
    let rounds: usize = std::env::var("STORAGED_FUZZ_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4000);
    let mut rng = Rng(seed);
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("storaged.toml");
    // The fuzzer may read everything and write only fz-*: the protected
    // dataset must come through intact.
    std::fs::write(
        &config,
        format!(
            "stream_stall_timeout_s = 5\n\n[[tenant]]\nname = \"fuzzer\"\ntokens_sha256 = [\"{}\"]\nread = [\"\"]\nwrite = [\"fz-\"]\n\n[[tenant]]\nname = \"owner\"\nuids = [{}]\nwrite = [\"\"]\nadmin = true\n",
            token_sha256_hex(FUZZER),
            // SAFETY: getuid(2) cannot fail.
            unsafe { libc::getuid() }
        ),
    )
    .unwrap();
    let d = Daemon::start_with_config(&tmp.path().join("data"), &config);
    let src = tmp.path().join("src");
    let files: Vec<(String, Vec<u8>)> = (0..3)
        .map(|i| (format!("f{i}"), pattern(i, 300_000 + i as usize)))
        .collect();
    write_tree(&src, &files);
    let out = std::process::Command::new(storaged_tests::storagectl_bin())
        .args(["--server", &d.unix_url(), "ingest", "data"])
        .arg(&src)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pid = d.child.as_ref().unwrap().id();
    let tcp = channel(&d.url).await;
    let unix = channel(&d.unix_url()).await;
    let rss_before = rss_bytes(pid);

    let started = Instant::now();
    let mut sent = [0usize; 13];
    for round in 0..rounds {
        if started.elapsed() > Duration::from_secs(60) {
            eprintln!("fuzz: time bound reached after {round} rounds");
            break;
        }
        let m = round % METHODS.len();
        let method = METHODS[m];
        let mut messages = valid(method, &mut rng);
        let k = rng.below(messages.len());
        messages[k] = mutate(&messages[k], &mut rng);
        if method == "Ingest" && rng.below(3) == 0 {
            match rng.below(3) {
                0 => {
                    messages.remove(rng.below(messages.len()));
                }
                1 => {
                    let again = messages[rng.below(messages.len())].clone();
                    messages.insert(rng.below(messages.len() + 1), again);
                }
                _ => {
                    let (a, b) = (rng.below(messages.len()), rng.below(messages.len()));
                    messages.swap(a, b);
                }
            }
            if messages.is_empty() {
                messages.push(Bytes::new());
            }
        }
        // The operator only for methods that cannot remove the protected
        // data (admin paths: Scrub, ReplaceDevice; and reads).
        let as_operator = matches!(
            method,
            "Scrub" | "ReplaceDevice" | "Status" | "ListDatasets"
        ) && rng.below(2) == 0;
        let ch = if as_operator || rng.below(2) == 0 {
            &unix
        } else {
            &tcp
        };
        send(ch, method, messages, as_operator).await;
        sent[m] += 1;
    }
    eprintln!("fuzz: seed {seed}, requests per method {sent:?}");
    assert!(sent.iter().all(|n| *n > 0), "every method was fuzzed");

    // The bulk channel: mutated hellos and ReadInto frames, raw, each on
    // a connection of its own, into a region the operator registered.
    let operator = storaged_client::Client::connect_with(
        &d.unix_url(),
        &storaged_client::ConnectOptions::default(),
    )
    .await
    .unwrap();
    let region = operator.register_region(1 << 20).await.unwrap();
    let bulk_socket = tmp.path().join("data").join("storaged.sock.bulk");
    let bulk_started = Instant::now();
    let mut bulk_sent = 0;
    while bulk_sent < rounds / 8 && bulk_started.elapsed() < Duration::from_secs(30) {
        send_bulk(&bulk_socket, region.id(), &mut rng).await;
        bulk_sent += 1;
    }
    eprintln!("fuzz: {bulk_sent} bulk channel rounds");
    drop(region);

    // Alive, no panic, bounded, and the protected data intact.
    let client = storaged_client::Client::connect_with(
        &d.unix_url(),
        &storaged_client::ConnectOptions::default(),
    )
    .await
    .unwrap();
    let status = client.status().await.unwrap();
    assert!(status.datasets.iter().any(|ds| ds.name == "data"));
    let bulk_answered = status.connections.as_ref().map_or(0, |c| c.bulk_requests);
    assert!(
        bulk_answered > 0,
        "no bulk channel frame got past the hello"
    );
    eprintln!("fuzz: the bulk channel answered {bulk_answered} frames");
    let ds = client.dataset("data").unwrap();
    for (name, bytes) in &files {
        assert!(
            ds.read(name).await.unwrap() == bytes.as_slice(),
            "{name} changed"
        );
    }
    let stderr = d.stderr();
    assert!(
        !stderr.contains("panicked"),
        "storaged panicked (seed {seed}): {stderr}"
    );
    let grown = rss_bytes(pid).saturating_sub(rss_before);
    assert!(
        grown < 256 << 20,
        "storaged grew by {} MiB under fuzzing (seed {seed})",
        grown >> 20
    );
}
