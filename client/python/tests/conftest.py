"""A real storaged for the tests: started on loopback with its own data
dir, and a dataset ingested with storagectl."""

import hashlib
import os
import pathlib
import subprocess
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[3]
BIN = pathlib.Path(os.environ.get("STORAGED_BIN_DIR", ROOT / "target" / "debug"))


def pattern(seed: int, n: int) -> bytes:
    out = bytearray()
    i = 0
    while len(out) < n:
        out += hashlib.sha256(f"{seed}:{i}".encode()).digest()
        i += 1
    return bytes(out[:n])


class Daemon:
    def __init__(self, data: pathlib.Path, extra=()):
        self.data = data
        self.extra = list(extra)
        self.start()

    def start(self):
        args = [
            str(BIN / "storaged"), "serve", "--listen", "127.0.0.1:0",
            "--data-dir", str(self.data), "--device-size", "256MiB",
            "--stripe-unit", "64KiB", *self.extra,
        ]
        self.proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=open(self.data.with_suffix(".log"), "ab")
        )
        line = self.proc.stdout.readline().decode()
        assert line.startswith("storaged listening on "), f"storaged did not start: {line!r}"
        self.url = "http://" + line.split()[-1]
        self.unix_url = f"unix://{self.data / 'storaged.sock'}"

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)

    def ctl(self, *args):
        return subprocess.run(
            [str(BIN / "storagectl"), "--server", self.url, *args],
            check=True, capture_output=True, text=True,
        ).stdout


def write_tree(root: pathlib.Path, files: dict):
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


@pytest.fixture(scope="session")
def files():
    """A small ImageNet-like tree: 64 samples of 1-40 KiB and a few larger
    objects, including the edge sizes."""
    f = {f"train/{i // 16:02d}/img_{i:03d}.jpg": pattern(i, 1000 + (i * 613) % 40000) for i in range(64)}
    f["edge/empty"] = b""
    f["edge/one"] = b"x"
    f["edge/4095"] = pattern(1001, 4095)
    f["edge/4096"] = pattern(1002, 4096)
    f["edge/4097"] = pattern(1003, 4097)
    f["big/shard.bin"] = pattern(1004, 3 << 20)
    return f


@pytest.fixture(scope="session")
def daemon(tmp_path_factory, files):
    tmp = tmp_path_factory.mktemp("storaged")
    write_tree(tmp / "src", files)
    d = Daemon(tmp / "data")
    d.ctl("ingest", "ds", str(tmp / "src"))
    samples = {k: v for k, v in files.items() if k.startswith("train/")}
    write_tree(tmp / "samples", samples)
    d.ctl("ingest", "samples", str(tmp / "samples"))
    yield d
    d.stop()


@pytest.fixture
def fresh_daemon(tmp_path):
    """A daemon of the test's own (for restarts and corruption)."""
    d = Daemon(tmp_path / "data")
    yield d
    if d.proc.poll() is None:
        d.stop()


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Etcd:
    """A one-member etcd on loopback (Debian's etcd-server, which the test
    command installs; a missing etcd fails the test, never skips it)."""

    def __init__(self, root: pathlib.Path):
        self.root = root
        self.client_port, self.peer_port = free_port(), free_port()
        client = f"http://127.0.0.1:{self.client_port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        root.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            ["etcd", "--name", "test", "--data-dir", str(root / "data"),
             "--listen-client-urls", client, "--advertise-client-urls", client,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"test={peer}"],
            stdout=subprocess.DEVNULL, stderr=open(root / "etcd.log", "ab"),
        )
        deadline = time.monotonic() + 60
        while True:
            ok = subprocess.run(
                ["etcdctl", "--endpoints", f"127.0.0.1:{self.client_port}",
                 "--dial-timeout", "1s", "--command-timeout", "2s", "endpoint", "health"],
                env={**os.environ, "ETCDCTL_API": "3"}, capture_output=True,
            ).returncode == 0
            if ok:
                break
            assert self.proc.poll() is None, f"etcd exited; see {root / 'etcd.log'}"
            assert time.monotonic() < deadline, "etcd did not become healthy in 60 s"
            time.sleep(0.1)
        self.url = f"etcd://127.0.0.1:{self.client_port}"

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


# Short leases and sweeps, so a node killed is seen down within seconds.
CLUSTER_CONFIG = ("cluster_lease_ttl_s = 2\ncluster_request_timeout_s = 2\ncluster_sweep_interval_s = 1\n"
                  "cluster_rebalance = false\n")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, files):
    """Three nodes on one etcd, with `ds` (the `files` tree) ingested as
    ec:2+1 through n1. Yields (etcd, {id: Daemon}); tests that kill a node
    restart it."""
    tmp = tmp_path_factory.mktemp("cluster")
    write_tree(tmp / "src", files)
    (tmp / "node.toml").write_text(CLUSTER_CONFIG)
    etcd = Etcd(tmp / "etcd")
    nodes = {}
    try:
        for n in ("n1", "n2", "n3"):
            nodes[n] = Daemon(tmp / n, ["--cluster", etcd.url, "--node-id", n,
                                        "--config", str(tmp / "node.toml")])
        nodes["n1"].ctl("ingest", "--class", "ec:2+1", "ds", str(tmp / "src"))
        yield etcd, nodes
    finally:
        for d in nodes.values():
            if d.proc.poll() is None:
                d.stop()
        etcd.stop()
