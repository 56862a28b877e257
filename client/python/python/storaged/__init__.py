"""storaged: read training datasets from storaged, from Python.

Built on the Rust client (``storaged._native``, PyO3): every call that
waits releases the GIL, bytes come back as zero-copy read-only buffers
(``memoryview(b)``, ``numpy.frombuffer(b, dtype)``), and a client used in a
forked process (a DataLoader worker) reconnects by itself.

    import storaged
    client = storaged.Client("http://127.0.0.1:7400")   # or "unix:///path/storaged.sock"
    ds = client.dataset("imagenet")
    len(ds), ds.objects(prefix="train/")[:3], ds.stat("train/x.jpg")
    buf = ds.read("train/x.jpg")          # or ds.read(0): by index in path order
    part = ds.read_range("train/x.jpg", 0, 4096)
    many = ds.read_batch(["a", ("b", 0, 100)])

PyTorch datasets are in ``storaged.torch`` (which needs torch; this module
does not).
"""

from ._native import (  # noqa: F401
    AlreadyExists,
    Buffer,
    Client,
    DataLoss,
    Dataset,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    Lent,
    Loader,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ResourceExhausted,
    StoragedError,
    Unavailable,
)

__all__ = [
    "Client",
    "Dataset",
    "Buffer",
    "Loader",
    "Lent",
    "StoragedError",
    "InvalidArgument",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "OutOfRange",
    "Unavailable",
    "DataLoss",
    "Internal",
]
