"""The pure-gRPC example (tools/examples/grpc_client.py) against a live
storaged: stubs generated from proto/, Read and ReadBatch, every CRC."""

import subprocess
import sys

from conftest import ROOT


def test_pure_grpc_example_reads_and_verifies(daemon, files):
    out = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "examples" / "grpc_client.py"),
         "--server", daemon.url.removeprefix("http://"), "ds", "--batch", "16"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert f"{len(files)} objects" in out.stdout and "every CRC-32 matches" in out.stdout


def test_the_example_reader_class_round_trips(daemon, files):
    sys.path.insert(0, str(ROOT / "tools" / "examples"))
    import grpc_client

    r = grpc_client.StoragedReader(daemon.url.removeprefix("http://"))
    assert r.read("ds", "big/shard.bin") == files["big/shard.bin"]
    assert r.read("ds", "big/shard.bin", 10, 20) == files["big/shard.bin"][10:30]
    got = r.read_batch("ds", ["edge/one", "edge/4097"], any_order=True)
    assert got == {0: b"x", 1: files["edge/4097"]}
