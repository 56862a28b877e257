"""Interoperability check with a gRPC stack that is not ours.

Python grpcio calls grpc.health.v1.Health, lists services through server
reflection, then uses only what reflection returned (no generated code) to
call storaged.v1.Storaged/Status, ListDatasets, Stat, Read and ReadBatch
dynamically, as a generic gRPC tool would. Read and ReadBatch responses are
framed by storaged itself (zero-copy), so this is also the check that an
independent gRPC stack decodes them, errors in trailers included. Exits
non-zero with a message on any mismatch.

Usage: python interop_check.py HOST:PORT BIG_BYTES
"""

import sys

import grpc
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)


def big_bytes(n: int) -> bytes:
    """The content of object `big`, as tests/tests/interop.rs writes it."""
    return bytes(((i * 7) + i // 4096) & 0xFF for i in range(n))


def main(target: str, big_len: int) -> int:
    channel = grpc.insecure_channel(target)
    grpc.channel_ready_future(channel).result(timeout=20)

    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "storaged.v1.Storaged"):
        resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        if resp.status != health_pb2.HealthCheckResponse.SERVING:
            print(f"health of {service!r} is {resp.status}, expected SERVING")
            return 1
    try:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
        print("health of an unknown service should be NOT_FOUND")
        return 1
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.NOT_FOUND:
            print(f"unknown service gave {e.code()}, expected NOT_FOUND")
            return 1

    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    names = set()
    for resp in reflection.ServerReflectionInfo(iter([request]), timeout=10):
        names.update(s.name for s in resp.list_services_response.service)
    for wanted in ("storaged.v1.Storaged", "grpc.health.v1.Health"):
        if wanted not in names:
            print(f"reflection lists {sorted(names)}, missing {wanted}")
            return 1

    # Call the API using only descriptors fetched by reflection.
    pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
    service = pool.FindServiceByName("storaged.v1.Storaged")
    methods = {m.name for m in service.methods}
    expected = {"Ingest", "ListDatasets", "ListObjects", "Stat", "Read", "ReadBatch", "DeleteDataset", "Status"}
    if not expected <= methods:
        print(f"reflected methods {sorted(methods)} lack {sorted(expected - methods)}")
        return 1

    def rpc(method_name, fields, streaming):
        """Calls a method from its reflected descriptors only."""
        method = service.FindMethodByName(method_name)
        req_cls = message_factory.GetMessageClass(method.input_type)
        resp_cls = message_factory.GetMessageClass(method.output_type)
        kind = channel.unary_stream if streaming else channel.unary_unary
        stub = kind(
            f"/storaged.v1.Storaged/{method_name}",
            request_serializer=req_cls.SerializeToString,
            response_deserializer=resp_cls.FromString,
        )
        if streaming:
            return list(stub(req_cls(**fields), timeout=30))
        return stub(req_cls(**fields), timeout=10)

    def call(method_name, fields):
        return rpc(method_name, fields, streaming=False)

    def stream(method_name, fields):
        return rpc(method_name, fields, streaming=True)

    status = call("Status", {})
    if status.engine not in ("io_uring", "psync") or status.capacity_bytes <= 0 or len(status.devices) < 1:
        print(f"unexpected Status: {status}")
        return 1
    datasets = call("ListDatasets", {})
    if "interop" not in [d.name for d in datasets.datasets]:
        print(f"dataset 'interop' missing from {datasets}")
        return 1
    def refused(what, code, action):
        """None if `action` fails with `code` and names what was wrong, else the complaint."""
        try:
            action()
        except grpc.RpcError as e:
            if e.code() == code and what in e.details():
                return None
            return f"{what}: got {e.code()} {e.details()!r}, expected {code} naming it"
        return f"{what}: must be refused with {code}"

    complaint = refused("..", grpc.StatusCode.INVALID_ARGUMENT, lambda: call("Stat", {"dataset": "interop", "path": "../x"}))
    if complaint:
        print(complaint)
        return 1

    expected_big = big_bytes(big_len)
    parts = stream("Read", {"dataset": "interop", "path": "big"})
    if len(parts) < 2 or any(p.object_size != big_len or p.range_length != big_len for p in parts):
        print(f"Read of big: {len(parts)} messages, sizes {[(p.offset, len(p.data)) for p in parts]}")
        return 1
    got = b"".join(p.data for p in parts)
    if got != expected_big or [p.offset for p in parts][0] != 0:
        print(f"Read of big returned {len(got)} bytes that differ from the object")
        return 1
    ranged = stream("Read", {"dataset": "interop", "path": "big", "offset": 1_000_001, "length": 70_000})
    if b"".join(p.data for p in ranged) != expected_big[1_000_001:1_070_001]:
        print("ranged Read returned the wrong bytes")
        return 1
    complaint = refused("missing", grpc.StatusCode.NOT_FOUND, lambda: stream("Read", {"dataset": "interop", "path": "missing"}))
    if complaint:
        print(complaint)
        return 1

    items = [{"path": "big"}, {"path": "missing"}, {"path": "a", "offset": 1, "length": 3}]
    batch = stream("ReadBatch", {"dataset": "interop", "items": items, "max_in_flight": 2})
    by_index = {}
    errors = {}
    for m in batch:
        by_index.setdefault(m.index, []).append(m.data)
        if m.HasField("error"):
            errors[m.index] = m.error.code
    if b"".join(by_index.get(0, [])) != expected_big or b"".join(by_index.get(2, [])) != b"ell":
        print(f"ReadBatch returned wrong bytes: item sizes {[(i, sum(map(len, d))) for i, d in by_index.items()]}")
        return 1
    if errors != {1: grpc.StatusCode.NOT_FOUND.value[0]}:
        print(f"ReadBatch item errors {errors}, expected only item 1 NOT_FOUND")
        return 1

    print(f"interop ok: services {sorted(names)}; engine {status.engine}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2])))
