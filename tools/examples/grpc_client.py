#!/usr/bin/env python3
"""Reading from storaged with nothing but grpcio: no native code.

proto/ is the contract. This example generates Python stubs from it with
grpcio-tools at start (into a temporary directory), then lists a dataset,
reads objects with the streaming `Read` call and many at once with
`ReadBatch`, and checks every object against the CRC-32 the server lists.

    pip install grpcio grpcio-tools protobuf
    python tools/examples/grpc_client.py --server 127.0.0.1:7400 DATASET

Any language with gRPC can do the same from proto/proto/storaged/v1/storaged.proto.
"""

import argparse
import importlib
import pathlib
import sys
import tempfile
import zlib

import grpc
from grpc_tools import protoc

PROTO_DIR = pathlib.Path(__file__).resolve().parents[2] / "proto" / "proto" / "storaged" / "v1"

# The server sends read payloads in messages of up to 1 MiB plus framing; a
# client may accept up to 16 MiB.
MESSAGE_BYTES_MAX = 16 << 20


def load_stubs(proto_dir=PROTO_DIR):
    """Generates storaged_pb2 / storaged_pb2_grpc and imports them."""
    out = tempfile.mkdtemp(prefix="storaged-stubs-")
    rc = protoc.main([
        "grpc_tools.protoc", f"-I{proto_dir}", f"--python_out={out}",
        f"--grpc_python_out={out}", str(proto_dir / "storaged.proto"),
    ])
    if rc != 0:
        raise RuntimeError(f"protoc failed ({rc}) on {proto_dir / 'storaged.proto'}")
    sys.path.insert(0, out)
    return importlib.import_module("storaged_pb2"), importlib.import_module("storaged_pb2_grpc")


class StoragedReader:
    """The calls a data loader needs, on a grpcio channel."""

    def __init__(self, target: str):
        self.pb, grpc_mod = load_stubs()
        self.channel = grpc.insecure_channel(target, options=[
            ("grpc.max_receive_message_length", MESSAGE_BYTES_MAX),
            ("grpc.max_send_message_length", MESSAGE_BYTES_MAX),
        ])
        self.stub = grpc_mod.StoragedStub(self.channel)

    def objects(self, dataset: str, prefix: str = ""):
        """Every object (path, size, crc32), following the page tokens."""
        token = ""
        while True:
            page = self.stub.ListObjects(self.pb.ListObjectsRequest(
                dataset=dataset, prefix=prefix, page_size=10_000, page_token=token))
            yield from page.objects
            token = page.next_page_token
            if not token:
                return

    def read(self, dataset: str, path: str, offset: int = 0, length=None) -> bytes:
        """One object (or range): the stream's messages joined."""
        req = self.pb.ReadRequest(dataset=dataset, path=path, offset=offset)
        if length is not None:
            req.length = length
        parts, expected = [], None
        for msg in self.stub.Read(req):
            parts.append(msg.data)
            expected = msg.range_length
        data = b"".join(parts)
        if expected is not None and len(data) != expected:
            raise IOError(f"{path}: short read, {len(data)} of {expected} bytes")
        return data

    def read_batch(self, dataset: str, paths, max_in_flight: int = 64, any_order: bool = False):
        """Many objects in one call: {index: bytes}; an item's error raises."""
        req = self.pb.ReadBatchRequest(
            dataset=dataset, items=[self.pb.ReadItem(path=p) for p in paths],
            max_in_flight=max_in_flight, any_order=any_order)
        parts = {}
        for msg in self.stub.ReadBatch(req):
            if msg.HasField("error"):
                raise IOError(f"item {msg.index} ({paths[msg.index]}): "
                              f"code {msg.error.code}: {msg.error.message}")
            parts.setdefault(msg.index, []).append(msg.data)
        return {i: b"".join(p) for i, p in parts.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--server", default="127.0.0.1:7400", help="host:port of storaged")
    ap.add_argument("dataset")
    ap.add_argument("--batch", type=int, default=64, help="objects per ReadBatch call")
    args = ap.parse_args()
    r = StoragedReader(args.server)
    objects = list(r.objects(args.dataset))
    if not objects:
        print(f"{args.dataset}: no objects")
        return 0
    first = r.read(args.dataset, objects[0].path)
    assert zlib.crc32(first) == objects[0].crc32, objects[0].path
    checked = total = 0
    for at in range(0, len(objects), args.batch):
        chunk = objects[at:at + args.batch]
        got = r.read_batch(args.dataset, [o.path for o in chunk])
        for i, o in enumerate(chunk):
            data = got.get(i, b"")
            if len(data) != o.size or zlib.crc32(data) != o.crc32:
                print(f"MISMATCH {o.path}", file=sys.stderr)
                return 1
            checked += 1
            total += len(data)
    print(f"{args.dataset}: {checked} objects, {total} bytes, every CRC-32 matches "
          f"(Read and ReadBatch over plain grpcio)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
