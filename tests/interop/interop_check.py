"""Interoperability check with a gRPC stack that is not ours.

Python grpcio calls grpc.health.v1.Health, lists services through server
reflection, then uses only what reflection returned (no generated code) to
call storaged.v1.Storaged/Status and ListDatasets dynamically, as a generic
gRPC tool would. Exits non-zero with a message on any mismatch.

Usage: python interop_check.py HOST:PORT
"""

import sys

import grpc
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)


def main(target: str) -> int:
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

    def call(method_name, fields):
        method = service.FindMethodByName(method_name)
        req_cls = message_factory.GetMessageClass(method.input_type)
        resp_cls = message_factory.GetMessageClass(method.output_type)
        rpc = channel.unary_unary(
            f"/storaged.v1.Storaged/{method_name}",
            request_serializer=req_cls.SerializeToString,
            response_deserializer=resp_cls.FromString,
        )
        return rpc(req_cls(**fields), timeout=10)

    status = call("Status", {})
    if status.engine not in ("io_uring", "psync") or status.capacity_bytes <= 0 or len(status.devices) < 1:
        print(f"unexpected Status: {status}")
        return 1
    datasets = call("ListDatasets", {})
    if "interop" not in [d.name for d in datasets.datasets]:
        print(f"dataset 'interop' missing from {datasets}")
        return 1
    try:
        call("Stat", {"dataset": "interop", "path": "../x"})
        print("a path with .. must be refused")
        return 1
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.INVALID_ARGUMENT:
            print(f"bad path gave {e.code()}, expected INVALID_ARGUMENT")
            return 1
    print(f"interop ok: services {sorted(names)}; engine {status.engine}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
