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
