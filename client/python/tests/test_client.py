"""The storaged package against a live storaged: round trip, zero-copy
buffers, errors, fork safety, restarts."""

import gc
import os

import numpy as np
import pytest

import storaged
from conftest import pattern, write_tree


def test_round_trip_every_object(daemon, files):
    client = storaged.Client(daemon.url)
    assert "ds" in [d["name"] for d in client.datasets()]
    ds = client.dataset("ds")
    listed = ds.objects()
    assert [o["path"] for o in listed] == sorted(files)
    assert len(ds) == len(files)
    for i, o in enumerate(listed):
        want = files[o["path"]]
        assert o["size"] == len(want)
        assert bytes(ds.read(o["path"])) == want
        assert bytes(ds.read(i)) == want
    assert bytes(ds.read(-1)) == files[listed[-1]["path"]]
    big = files["big/shard.bin"]
    assert bytes(ds.read_range("big/shard.bin", 65535, 70000)) == big[65535:135535]
    got = ds.read_batch(["edge/one", ("big/shard.bin", 10, 5), "edge/empty"])
    assert [bytes(b) for b in got] == [b"x", big[10:15], b""]
    assert [o["path"] for o in ds.objects(prefix="edge/")] == sorted(k for k in files if k.startswith("edge/"))
    st = ds.stat("big/shard.bin")
    assert st["size"] == len(big) and st["extents"]


def test_buffers_are_zero_copy_read_only_and_outlive_the_client(daemon, files):
    # Guards the buffer protocol: views see the received bytes without a
    # copy, cannot write them, and keep them alive.
    client = storaged.Client(daemon.url)
    buf = client.dataset("ds").read("big/shard.bin")
    view = memoryview(buf)
    assert view.readonly and view.nbytes == len(buf)
    arr = np.frombuffer(buf, dtype=np.uint8)
    assert not arr.flags.writeable
    assert np.shares_memory(arr, np.frombuffer(view, dtype=np.uint8))
    with pytest.raises((TypeError, ValueError, BufferError)):
        arr[0] = 1
    del client, buf
    gc.collect()
    assert view.tobytes() == files["big/shard.bin"]
    assert bytes(arr[:32]) == files["big/shard.bin"][:32]


def test_errors_are_exceptions_named_after_the_status(daemon, fresh_daemon, tmp_path):
    client = storaged.Client(daemon.url)
    with pytest.raises(storaged.NotFound) as e:
        client.dataset("no-such-dataset")
    assert isinstance(e.value, storaged.StoragedError) and e.value.code == "NOT_FOUND"
    # Guards against Python retrying what the Rust client would not: every
    # error says whether the client's one classifier calls it transient.
    assert e.value.transient is False
    assert "no-such-dataset" in str(e.value)
    ds = client.dataset("ds")
    with pytest.raises(storaged.NotFound, match="nope"):
        ds.read("nope")
    with pytest.raises(storaged.OutOfRange):
        ds.read_range("edge/one", 0, 2)
    with pytest.raises(storaged.InvalidArgument):
        client.dataset("bad name!")
    with pytest.raises(IndexError):
        ds.read(len(ds))
    with pytest.raises(storaged.Unavailable) as e:
        storaged.Client("http://127.0.0.1:1")
    assert e.value.transient is True

    # A corrupt object (class stripe: nothing to rebuild from) is DataLoss.
    write_tree(tmp_path / "c", {"victim": pattern(5, 200_000), "other": b"fine"})
    fresh_daemon.ctl("ingest", "c", str(tmp_path / "c"), "--class", "stripe")
    c = storaged.Client(fresh_daemon.url).dataset("c")
    _, dev, off, length = c.stat("victim")["extents"][1]
    with open(fresh_daemon.data / f"dev{dev}.img", "r+b") as f:
        f.seek(off + length // 2)
        b = f.read(1)
        f.seek(off + length // 2)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(storaged.DataLoss) as e:
        c.read("victim")
    assert e.value.code == "DATA_LOSS" and "victim" in str(e.value)
    assert bytes(c.read("other")) == b"fine"


def test_a_forked_child_reconnects_by_itself(daemon, files):
    # Guards fork safety: the child inherits a client whose runtime threads
    # and connections are not in it; it must make its own, and the parent
    # must keep working.
    ds = storaged.Client(daemon.url).dataset("ds")
    assert bytes(ds.read("edge/4097")) == files["edge/4097"]
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        ok = bytes(ds.read("edge/4096")) == files["edge/4096"] and len(ds) == len(files)
        os.write(w, b"1" if ok else b"0")
        os._exit(0)
    os.close(w)
    assert os.read(r, 1) == b"1"
    os.waitpid(pid, 0)
    assert bytes(ds.read("edge/4095")) == files["edge/4095"]


def test_reads_survive_a_server_restart(fresh_daemon, tmp_path):
    # Guards retries across a restart: the unix socket path stays, and the
    # client reconnects and retries rather than failing.
    write_tree(tmp_path / "r", {"x": pattern(9, 100_000)})
    fresh_daemon.ctl("ingest", "r", str(tmp_path / "r"))
    ds = storaged.Client(fresh_daemon.unix_url).dataset("r")
    assert bytes(ds.read("x")) == pattern(9, 100_000)
    fresh_daemon.stop()
    fresh_daemon.start()
    assert bytes(ds.read("x")) == pattern(9, 100_000)
    fresh_daemon.stop()
    with pytest.raises(storaged.Unavailable):
        ds.read("x")


def test_transport_auto_finds_the_unix_socket_and_as_given_keeps_tcp(daemon, files):
    assert storaged.Client(daemon.url).is_local()
    tcp = storaged.Client(daemon.url, transport="as-given")
    assert not tcp.is_local()
    assert bytes(tcp.dataset("ds").read("edge/4097")) == files["edge/4097"]
    assert storaged.Client(daemon.unix_url, transport="as-given").is_local()
    with pytest.raises(storaged.InvalidArgument, match="transport"):
        storaged.Client(daemon.url, transport="carrier-pigeon")
