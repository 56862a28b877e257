//! `storaged._native`: the Rust client (`storaged-client`) for Python.
//!
//! Every call that waits on the network runs with the GIL released
//! (`Python::detach`) on a tokio runtime owned by this module. Bytes come
//! back as [`Buffer`]s: read-only views over the client's `Bytes`, exposed
//! through the buffer protocol, so `memoryview(b)` and
//! `numpy.frombuffer(b, dtype)` see the received bytes without a copy and
//! keep them alive as long as they are referenced.
//!
//! **Fork safety.** A forked process (a DataLoader worker) inherits the
//! parent's runtime and connections, but not their threads, so neither
//! works there. The runtime and each client's connection remember the pid
//! they were made in; the first call in a process with another pid makes
//! fresh ones (the inherited ones are leaked, not dropped: dropping them
//! would wait for threads that do not exist in the child).
//!
//! Errors are Python exceptions named after the gRPC status
//! (`storaged.NotFound`, `storaged.DataLoss`, ...), all subclasses of
//! `storaged.StoragedError`, with the status name and message as text and
//! the name in `.code`.
#![deny(clippy::undocumented_unsafe_blocks)]

mod handoff;

use std::ffi::c_int;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use pyo3::exceptions::{PyBufferError, PyException, PyIndexError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};
use pyo3::{create_exception, ffi};
use storaged_client::cluster::ClusterDataset;
use storaged_client::{
    BatchItem, ClientError, LoaderOptions, ObjectInfo, Plan, PlanSpec, PlanTail,
};
use tonic::Code;

create_exception!(storaged, StoragedError, PyException, "Any storaged error.");
create_exception!(storaged, InvalidArgument, StoragedError, "INVALID_ARGUMENT");
create_exception!(storaged, NotFound, StoragedError, "NOT_FOUND");
create_exception!(storaged, AlreadyExists, StoragedError, "ALREADY_EXISTS");
create_exception!(
    storaged,
    PermissionDenied,
    StoragedError,
    "PERMISSION_DENIED"
);
create_exception!(
    storaged,
    ResourceExhausted,
    StoragedError,
    "RESOURCE_EXHAUSTED"
);
create_exception!(
    storaged,
    FailedPrecondition,
    StoragedError,
    "FAILED_PRECONDITION"
);
create_exception!(storaged, OutOfRange, StoragedError, "OUT_OF_RANGE");
create_exception!(storaged, Unavailable, StoragedError, "UNAVAILABLE");
create_exception!(storaged, DataLoss, StoragedError, "DATA_LOSS");
create_exception!(
    storaged,
    Internal,
    StoragedError,
    "INTERNAL (and other codes)"
);

/// The exception class for an error, by its gRPC code.
fn to_py(e: ClientError) -> PyErr {
    let text = storaged_client::error_chain(&e);
    // The client's one classifier of transient errors: Python's retries
    // (`storaged.torch`) ask it rather than guessing from the class.
    let transient = storaged_client::retry::is_transient(&e);
    let code = match &e {
        ClientError::Status(s) => s.code(),
        ClientError::Connect { .. } => Code::Unavailable,
        ClientError::TransportUnavailable { .. } => Code::FailedPrecondition,
        ClientError::InvalidName(_)
        | ClientError::InvalidArgument(_)
        | ClientError::Plan(_)
        | ClientError::BadUrl { .. } => Code::InvalidArgument,
        _ => Code::Internal,
    };
    let err = match code {
        Code::InvalidArgument => InvalidArgument::new_err(text),
        Code::NotFound => NotFound::new_err(text),
        Code::AlreadyExists => AlreadyExists::new_err(text),
        Code::PermissionDenied | Code::Unauthenticated => PermissionDenied::new_err(text),
        Code::ResourceExhausted => ResourceExhausted::new_err(text),
        Code::FailedPrecondition => FailedPrecondition::new_err(text),
        Code::OutOfRange => OutOfRange::new_err(text),
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Aborted => {
            Unavailable::new_err(text)
        }
        Code::DataLoss => DataLoss::new_err(text),
        _ => Internal::new_err(text),
    };
    Python::attach(|py| {
        let value = err.value(py);
        let _ = value.setattr("code", storaged_client::code_name(code));
        let _ = value.setattr("transient", transient);
    });
    err
}

/// The tokio runtime of this process (see "Fork safety").
struct Runtime {
    pid: u32,
    rt: tokio::runtime::Runtime,
}

static RUNTIME: Mutex<Option<Arc<Runtime>>> = Mutex::new(None);

fn runtime() -> PyResult<Arc<Runtime>> {
    let pid = std::process::id();
    let mut slot = RUNTIME.lock().expect("runtime lock");
    if let Some(rt) = slot.as_ref().filter(|rt| rt.pid == pid) {
        return Ok(Arc::clone(rt));
    }
    if let Some(inherited) = slot.take() {
        // From the parent, before a fork: its threads are not here.
        std::mem::forget(inherited);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("storaged-py")
        .enable_all()
        .build()
        .map_err(|e| Internal::new_err(format!("cannot start the I/O runtime: {e}")))?;
    let rt = Arc::new(Runtime { pid, rt });
    *slot = Some(Arc::clone(&rt));
    Ok(rt)
}

/// Runs `f` on the runtime with the GIL released.
fn block_on<T: Send, F>(py: Python<'_>, f: F) -> PyResult<T>
where
    F: std::future::Future<Output = Result<T, ClientError>> + Send,
{
    let rt = runtime()?;
    py.detach(|| rt.rt.block_on(f)).map_err(to_py)
}

/// A read-only buffer over received bytes (buffer protocol, no copy).
#[pyclass(frozen, module = "storaged")]
pub struct Buffer {
    data: Bytes,
}

#[pymethods]
impl Buffer {
    /// # Safety
    ///
    /// Called by CPython with a valid `view` to fill.
    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        if flags & ffi::PyBUF_WRITABLE == ffi::PyBUF_WRITABLE {
            return Err(PyBufferError::new_err(
                "storaged buffers are read-only (copy them to modify)",
            ));
        }
        let data = &slf.get().data;
        // SAFETY: `view` comes from CPython; the bytes are immutable and owned by `slf`, which the view keeps
        // alive.
        unsafe { export_buffer(slf.as_any(), view, data.as_ptr(), data.len(), true, flags) }
    }

    /// # Safety
    ///
    /// Called by CPython; nothing to release (the view's reference to
    /// `self` is dropped by CPython).
    unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {}

    fn __len__(&self) -> usize {
        self.data.len()
    }

    /// A copy, as `bytes`.
    fn __bytes__<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.data)
    }

    fn __repr__(&self) -> String {
        format!("<storaged.Buffer of {} bytes>", self.data.len())
    }

    /// Pickles as `bytes` (a copy): what crosses from a DataLoader worker
    /// to the main process.
    fn __reduce__<'py>(
        &self,
        py: Python<'py>,
    ) -> PyResult<(Bound<'py, PyAny>, (Bound<'py, PyBytes>,))> {
        let bytes_type = py.import("builtins")?.getattr("bytes")?;
        Ok((bytes_type, (PyBytes::new(py, &self.data),)))
    }
}

/// Fills `view` for `obj`'s buffer export of `len` bytes at `data`.
///
/// # Safety
///
/// `view` must be valid or null (as CPython passes it), and the `len`
/// bytes at `data` must stay valid (and, unless `readonly`, writable by
/// the viewer) as long as `obj` lives: the view holds a new reference to
/// `obj` (PyBuffer_FillInfo stores it in `view.obj`).
unsafe fn export_buffer(
    obj: &Bound<'_, PyAny>,
    view: *mut ffi::Py_buffer,
    data: *const u8,
    len: usize,
    readonly: bool,
    flags: c_int,
) -> PyResult<()> {
    if view.is_null() {
        return Err(PyBufferError::new_err("no buffer view to fill"));
    }
    // SAFETY: the caller's contract above.
    let rc = unsafe {
        ffi::PyBuffer_FillInfo(
            view,
            obj.as_ptr(),
            data as *mut std::ffi::c_void,
            len as ffi::Py_ssize_t,
            c_int::from(readonly),
            flags,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(PyErr::fetch(obj.py()))
    }
}

fn buffer(py: Python<'_>, data: Bytes) -> PyResult<Py<Buffer>> {
    Py::new(py, Buffer { data })
}

/// A connection, remade in a process that forked after it was made.
struct Conn {
    pid: u32,
    client: storaged_client::Client,
}

/// A storaged client: `Client("http://host:port")` or
/// `Client("unix:///path/storaged.sock")`.
#[pyclass(frozen, module = "storaged")]
pub struct Client {
    url: String,
    /// Which read path to take (see `Client.__new__`).
    transport: storaged_client::Transport,
    /// Credentials (a token given, or STORAGED_TOKEN at construction).
    options: storaged_client::ConnectOptions,
    conn: Mutex<Option<Conn>>,
}

impl Client {
    fn client(&self, py: Python<'_>) -> PyResult<storaged_client::Client> {
        let pid = std::process::id();
        {
            let conn = self.conn.lock().expect("conn lock");
            if let Some(c) = conn.as_ref().filter(|c| c.pid == pid) {
                return Ok(c.client.clone());
            }
        }
        let url = self.url.clone();
        let transport = self.transport;
        let options = self.options.clone();
        let client = block_on(py, async move {
            storaged_client::Client::connect_transport(&url, transport, &options).await
        })?;
        let mut conn = self.conn.lock().expect("conn lock");
        if let Some(inherited) = conn.take().filter(|c| c.pid != pid) {
            // Bound to the parent's runtime: leak it rather than wait on
            // threads that are not in this process.
            std::mem::forget(inherited);
        }
        *conn = Some(Conn {
            pid,
            client: client.clone(),
        });
        Ok(client)
    }
}

fn dataset_info<'py>(
    py: Python<'py>,
    d: &storaged_proto::pb::DatasetInfo,
) -> PyResult<Bound<'py, PyDict>> {
    let class = storaged_proto::model::StorageClass::from_wire(
        d.storage_class,
        d.ec_data_units,
        d.ec_parity_units,
    )
    .ok()
    .flatten()
    .map(|c| c.to_string())
    .unwrap_or_else(|| "unknown".into());
    let out = PyDict::new(py);
    out.set_item("name", &d.name)?;
    out.set_item("objects", d.object_count)?;
    out.set_item("bytes", d.total_bytes)?;
    out.set_item("storage_class", class)?;
    out.set_item("created_unix_ms", d.created_unix_ms)?;
    Ok(out)
}

#[pymethods]
impl Client {
    /// `transport`: `"auto"` (default) takes the fastest path there is: a
    /// loopback TCP url moves to the server's Unix socket (shared memory)
    /// when it advertises one, a remote one reads over the TCP bulk
    /// channel where storaged offers it, else gRPC. `"shm"`, `"bulk"` and
    /// `"grpc"` force one path (FailedPrecondition when it is not there);
    /// `"as-given"` keeps the url's transport, with the TCP bulk channel
    /// where offered.
    #[new]
    /// `ca`, `cert`, `key`: PEM files for `https://` (the CA that signed
    /// storaged's certificate; this client's certificate and key when
    /// storaged requires one); default `STORAGED_CA`, `STORAGED_CERT`,
    /// `STORAGED_KEY`.
    #[pyo3(signature = (url, transport="auto", token=None, ca=None, cert=None, key=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        url: String,
        transport: &str,
        token: Option<String>,
        ca: Option<std::path::PathBuf>,
        cert: Option<std::path::PathBuf>,
        key: Option<std::path::PathBuf>,
    ) -> PyResult<Self> {
        let transport: storaged_client::Transport = transport.parse().map_err(to_py)?;
        let mut options = storaged_client::ConnectOptions::from_env();
        if let Some(t) = token.filter(|t| !t.is_empty()) {
            options.token = Some(t);
        }
        options.tls_ca = ca.or(options.tls_ca);
        options.tls_cert = cert.or(options.tls_cert);
        options.tls_key = key.or(options.tls_key);
        let c = Self {
            url,
            transport,
            options,
            conn: Mutex::new(None),
        };
        c.client(py)?;
        Ok(c)
    }

    #[getter]
    fn url(&self) -> &str {
        &self.url
    }

    /// The bearer token this client sends (None without one); workers
    /// that connect again use it.
    #[getter]
    fn token(&self) -> Option<&str> {
        self.options.token.as_deref()
    }

    /// The TLS files this client uses: `(ca, cert, key)`, each a path or
    /// None; workers that connect again use them.
    #[getter]
    fn tls(
        &self,
    ) -> (
        Option<std::path::PathBuf>,
        Option<std::path::PathBuf>,
        Option<std::path::PathBuf>,
    ) {
        (
            self.options.tls_ca.clone(),
            self.options.tls_cert.clone(),
            self.options.tls_key.clone(),
        )
    }

    /// The transport this client was made with (one of "auto", "shm",
    /// "bulk", "grpc", "as-given").
    #[getter]
    fn transport(&self) -> &'static str {
        self.transport.name()
    }

    /// Whether the connection is to this host's storaged over its Unix
    /// socket (the zero-copy shared-memory path is available).
    fn is_local(&self, py: Python<'_>) -> PyResult<bool> {
        Ok(self.client(py)?.is_local())
    }

    /// Every dataset, as dicts (`name`, `objects`, `bytes`,
    /// `storage_class`, `created_unix_ms`).
    fn datasets<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let c = self.client(py)?;
        let list = block_on(py, async move { c.list_datasets().await })?;
        let items = list
            .iter()
            .map(|d| dataset_info(py, d))
            .collect::<PyResult<Vec<_>>>()?;
        PyList::new(py, items)
    }

    /// A dataset by name (checked to exist). On a node of a cluster, a
    /// cluster dataset of that name is read straight from its nodes (see
    /// `Dataset.is_cluster`).
    fn dataset(slf: Bound<'_, Self>, name: String) -> PyResult<Dataset> {
        let py = slf.py();
        let c = slf.get().client(py)?;
        c.dataset(&name).map_err(to_py)?; // the name itself (INVALID_ARGUMENT)
        let list = {
            let c = c.clone();
            block_on(py, async move { c.list_datasets().await })?
        };
        let found: Vec<_> = list.iter().filter(|d| d.name == name).collect();
        if found.is_empty() {
            return Err(to_py(ClientError::Status(tonic::Status::not_found(
                format!("dataset {name:?} not found"),
            ))));
        }
        // A node that holds a dataset of its own under a cluster
        // dataset's name lists both: the cluster's wins, as in storagectl.
        if found.iter().any(|d| !d.cluster_unit.is_empty()) {
            let n = name.clone();
            let cluster = block_on(py, async move { ClusterDataset::open(&c, &n).await })?;
            let cluster = Arc::new(cluster);
            return Ok(Dataset {
                client: slf.unbind(),
                name,
                listing: Mutex::new(Some(cluster.listing())),
                cluster: Some(Mutex::new(ClusterConn {
                    pid: std::process::id(),
                    dataset: cluster,
                })),
            });
        }
        Ok(Dataset {
            client: slf.unbind(),
            name,
            listing: Mutex::new(None),
            cluster: None,
        })
    }

    fn __repr__(&self) -> String {
        format!("storaged.Client({:?})", self.url)
    }
}

/// A dataset: `len(ds)`, `ds.read(path or index)`, `ds.objects()`, ...
#[pyclass(frozen, module = "storaged")]
pub struct Dataset {
    client: Py<Client>,
    name: String,
    /// The whole listing, fetched on first use by index or `len`.
    listing: Mutex<Option<Arc<[ObjectInfo]>>>,
    /// For a cluster dataset: its layout and node connections, opened
    /// again in a process that forked after they were made.
    cluster: Option<Mutex<ClusterConn>>,
}

/// A cluster dataset open in process `pid`.
struct ClusterConn {
    pid: u32,
    dataset: Arc<ClusterDataset>,
}

/// A path, or an index into the dataset's listing.
#[derive(FromPyObject)]
enum PathOrIndex {
    Index(i64),
    Path(String),
}

impl Dataset {
    /// The cluster dataset this is, open in this process; `None` for a
    /// dataset of one node.
    fn cluster(&self, py: Python<'_>) -> PyResult<Option<Arc<ClusterDataset>>> {
        let Some(slot) = self.cluster.as_ref() else {
            return Ok(None);
        };
        let pid = std::process::id();
        {
            let conn = slot.lock().expect("cluster lock");
            if conn.pid == pid {
                return Ok(Some(Arc::clone(&conn.dataset)));
            }
        }
        let c = self.client.get().client(py)?;
        let name = self.name.clone();
        let opened = block_on(py, async move { ClusterDataset::open(&c, &name).await })?;
        let opened = Arc::new(opened);
        let mut conn = slot.lock().expect("cluster lock");
        let inherited = std::mem::replace(
            &mut *conn,
            ClusterConn {
                pid,
                dataset: Arc::clone(&opened),
            },
        );
        if inherited.pid != pid {
            // Its connections belong to the parent's runtime: leak them
            // rather than wait on threads that are not in this process.
            std::mem::forget(inherited);
        }
        Ok(Some(opened))
    }

    fn ds(&self, py: Python<'_>) -> PyResult<storaged_client::Dataset> {
        self.client
            .get()
            .client(py)?
            .dataset(&self.name)
            .map_err(to_py)
    }

    fn listing(&self, py: Python<'_>) -> PyResult<Arc<[ObjectInfo]>> {
        if let Some(l) = self.listing.lock().expect("listing lock").as_ref() {
            return Ok(Arc::clone(l));
        }
        let ds = self.ds(py)?;
        let list: Arc<[ObjectInfo]> = block_on(py, async move { ds.list("").await })?.into();
        *self.listing.lock().expect("listing lock") = Some(Arc::clone(&list));
        Ok(list)
    }

    fn path_of(&self, py: Python<'_>, p: PathOrIndex) -> PyResult<String> {
        match p {
            PathOrIndex::Path(p) => Ok(p),
            PathOrIndex::Index(i) => {
                let l = self.listing(py)?;
                let n = l.len() as i64;
                let at = if i < 0 { i + n } else { i };
                if !(0..n).contains(&at) {
                    return Err(PyIndexError::new_err(format!(
                        "index {i} is out of range for dataset {:?} of {n} objects",
                        self.name
                    )));
                }
                Ok(l[at as usize].path.clone())
            }
        }
    }
}

fn object_info<'py>(py: Python<'py>, o: &ObjectInfo) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("path", &o.path)?;
    d.set_item("size", o.size)?;
    d.set_item("crc32", o.crc32)?;
    Ok(d)
}

/// One `read_batch` item: a path, or `(path, offset, length)`.
#[derive(FromPyObject)]
enum BatchSpec {
    Path(String),
    Range(String, u64, u64),
}

#[pymethods]
impl Dataset {
    #[getter]
    fn name(&self) -> &str {
        &self.name
    }

    /// Whether this is a cluster dataset (read straight from its nodes,
    /// with parity in place of a node that is down).
    #[getter]
    fn is_cluster(&self) -> bool {
        self.cluster.is_some()
    }

    /// Objects (dicts: `path`, `size`, `crc32`) in path order, optionally
    /// only those under `prefix`.
    #[pyo3(signature = (prefix=None))]
    fn objects<'py>(
        &self,
        py: Python<'py>,
        prefix: Option<String>,
    ) -> PyResult<Bound<'py, PyList>> {
        let list: Arc<[ObjectInfo]> = match prefix {
            None => self.listing(py)?,
            Some(p) if self.cluster.is_some() => self
                .listing(py)?
                .iter()
                .filter(|o| o.path.starts_with(&p))
                .cloned()
                .collect(),
            Some(p) => {
                let ds = self.ds(py)?;
                block_on(py, async move { ds.list(&p).await })?.into()
            }
        };
        let items = list
            .iter()
            .map(|o| object_info(py, o))
            .collect::<PyResult<Vec<_>>>()?;
        PyList::new(py, items)
    }

    /// `path`, `size`, `crc32` and the device extents of one object
    /// (none for a cluster dataset's: its bytes are striped over nodes).
    fn stat<'py>(&self, py: Python<'py>, path: String) -> PyResult<Bound<'py, PyDict>> {
        if let Some(cd) = self.cluster(py)? {
            let entry = cd.entry(&path).map_err(|e| to_py(e.into()))?;
            let d = object_info(
                py,
                &ObjectInfo {
                    path: entry.path.clone(),
                    size: entry.size,
                    crc32: entry.crc32,
                },
            )?;
            d.set_item("extents", PyList::empty(py))?;
            return Ok(d);
        }
        let ds = self.ds(py)?;
        let st = block_on(py, async move { ds.stat(&path).await })?;
        let o = st.object.unwrap_or_default();
        let d = object_info(py, &o)?;
        let extents = st
            .extents
            .iter()
            .map(|e| (e.object_offset, e.device_index, e.device_offset, e.length))
            .collect::<Vec<_>>();
        d.set_item("extents", extents)?;
        Ok(d)
    }

    fn __len__(&self, py: Python<'_>) -> PyResult<usize> {
        Ok(self.listing(py)?.len())
    }

    /// The whole object, by path or by index in the listing.
    fn read(&self, py: Python<'_>, path: PathOrIndex) -> PyResult<Py<Buffer>> {
        let path = self.path_of(py, path)?;
        if let Some(cd) = self.cluster(py)? {
            let data = block_on(py, async move { cd.read(&path).await })?;
            return buffer(py, data);
        }
        let ds = self.ds(py)?;
        let data = block_on(py, async move { ds.read(&path).await })?;
        buffer(py, data)
    }

    /// `length` bytes of `path` from `offset`.
    fn read_range(
        &self,
        py: Python<'_>,
        path: String,
        offset: u64,
        length: u64,
    ) -> PyResult<Py<Buffer>> {
        if let Some(cd) = self.cluster(py)? {
            let data = block_on(
                py,
                async move { cd.read_range(&path, offset, length).await },
            )?;
            return buffer(py, data);
        }
        let ds = self.ds(py)?;
        let data = block_on(
            py,
            async move { ds.read_range(&path, offset, length).await },
        )?;
        buffer(py, data)
    }

    /// Whole objects by index in path order, in one call: a list of
    /// buffers. On a same-host connection they are read straight into a
    /// shared-memory region and the buffers are views of it (no copy);
    /// else one ReadBatch. The first item that fails raises its error.
    fn read_objects<'py>(
        &self,
        py: Python<'py>,
        indices: Vec<i64>,
    ) -> PyResult<Bound<'py, PyList>> {
        let listing = self.listing(py)?;
        let n = listing.len() as i64;
        let objects = indices
            .iter()
            .map(|&i| {
                let at = if i < 0 { i + n } else { i };
                if !(0..n).contains(&at) {
                    return Err(PyIndexError::new_err(format!(
                        "index {i} is out of range for {n} objects"
                    )));
                }
                let o = &listing[at as usize];
                Ok((o.path.clone(), o.size))
            })
            .collect::<PyResult<Vec<_>>>()?;
        let datas = match self.cluster(py)? {
            Some(cd) => {
                let paths: Vec<String> = objects.into_iter().map(|(p, _)| p).collect();
                block_on(py, async move { cd.read_objects(&paths).await })?
            }
            None => {
                let ds = self.ds(py)?;
                block_on(py, async move { ds.read_objects(&objects).await })?
            }
        };
        let bufs = datas
            .into_iter()
            .map(|b| buffer(py, b))
            .collect::<PyResult<Vec<_>>>()?;
        PyList::new(py, bufs)
    }

    /// Many objects or ranges in one call: a list of buffers in request
    /// order. The first item that fails raises its error.
    #[pyo3(signature = (items, max_in_flight=64))]
    fn read_batch<'py>(
        &self,
        py: Python<'py>,
        items: Vec<BatchSpec>,
        max_in_flight: u32,
    ) -> PyResult<Bound<'py, PyList>> {
        let items: Vec<BatchItem> = items
            .into_iter()
            .map(|s| match s {
                BatchSpec::Path(path) => BatchItem {
                    path,
                    offset: 0,
                    length: None,
                },
                BatchSpec::Range(path, offset, length) => BatchItem {
                    path,
                    offset,
                    length: Some(length),
                },
            })
            .collect();
        let n = items.len();
        if let Some(cd) = self.cluster(py)? {
            let results = block_on(py, async move {
                let reads: Vec<_> = items
                    .iter()
                    .map(|i| {
                        let cd = &cd;
                        async move {
                            match i.length {
                                None if i.offset == 0 => cd.read(&i.path).await,
                                None => {
                                    let size = cd.entry(&i.path)?.size;
                                    let length = size.saturating_sub(i.offset);
                                    cd.read_range(&i.path, i.offset, length).await
                                }
                                Some(length) => cd.read_range(&i.path, i.offset, length).await,
                            }
                        }
                    })
                    .collect();
                futures::stream::iter(reads)
                    .buffered(max_in_flight.max(1) as usize)
                    .try_collect::<Vec<Bytes>>()
                    .await
            })?;
            let bufs = results
                .into_iter()
                .map(|b| buffer(py, b))
                .collect::<PyResult<Vec<_>>>()?;
            return PyList::new(py, bufs);
        }
        let ds = self.ds(py)?;
        let results = block_on(py, async move {
            let mut out: Vec<Option<Bytes>> = vec![None; n];
            let mut s = std::pin::pin!(ds.read_batch(items, max_in_flight.max(1)));
            while let Some(r) = s.next().await {
                let r = r?;
                out[r.index as usize] = Some(r.data.map_err(ClientError::Status)?);
            }
            Ok(out)
        })?;
        let bufs = results
            .into_iter()
            .map(|b| buffer(py, b.unwrap_or_default()))
            .collect::<PyResult<Vec<_>>>()?;
        PyList::new(py, bufs)
    }

    /// A prefetching reader of this (rank, worker)'s share of an epoch, in
    /// the deterministic shuffled order of the Rust plan; see
    /// `storaged.torch.IterableDataset`. Skips the first `start` samples
    /// of the sequence (a resume). A batch that fails with `UNAVAILABLE`
    /// (storaged restarting) is read again for up to `retry_budget_s`
    /// seconds before the error is raised.
    #[pyo3(signature = (*, seed, epoch, rank, world_size, worker, num_workers, shuffle, drop_last, batch_size, prefetch_bytes, start=0, retry_budget_s=30.0, block_size=1, deal_batches=false))]
    #[allow(clippy::too_many_arguments)]
    fn loader(
        &self,
        py: Python<'_>,
        seed: u64,
        epoch: u64,
        rank: u32,
        world_size: u32,
        worker: u32,
        num_workers: u32,
        shuffle: bool,
        drop_last: bool,
        batch_size: usize,
        prefetch_bytes: u64,
        start: u64,
        retry_budget_s: f64,
        block_size: u32,
        deal_batches: bool,
    ) -> PyResult<Loader> {
        let retry_budget =
            std::time::Duration::try_from_secs_f64(retry_budget_s).map_err(|_| {
                InvalidArgument::new_err(format!(
                    "retry_budget_s must be a finite number of seconds >= 0, not {retry_budget_s}"
                ))
            })?;
        let listing = self.listing(py)?;
        let spec = PlanSpec {
            seed,
            epoch,
            rank,
            world_size,
            worker,
            num_workers,
            shuffle,
            tail: if drop_last {
                PlanTail::DropLast
            } else {
                PlanTail::Pad
            },
            block_size,
        };
        // A resume of this worker alone: skip what it consumed.
        let plan = if deal_batches {
            Plan::batch_dealt(listing, spec, batch_size)
        } else {
            Plan::new(listing, spec, None)
        };
        let plan = plan
            .and_then(|p| p.skip(start))
            .map_err(|e| to_py(ClientError::Plan(e)))?;
        let options = LoaderOptions {
            retry_budget,
            ..LoaderOptions::default()
        };
        let source = match self.cluster(py)? {
            Some(cd) => Ok(cd),
            None => Err(self.ds(py)?),
        };
        let rt = runtime()?;
        let loader = {
            let _guard = rt.rt.enter();
            match source {
                Ok(cd) => cd.loader(plan, batch_size, prefetch_bytes, options),
                Err(ds) => ds.loader_with(plan, batch_size, prefetch_bytes, options),
            }
            .map_err(to_py)?
        };
        Ok(Loader {
            inner: Mutex::new(Some(loader)),
            finished: Mutex::new(None),
            pid: std::process::id(),
        })
    }

    fn __repr__(&self) -> String {
        format!("storaged.Dataset({:?})", self.name)
    }
}

/// Batches of samples `[(object_index, path, Buffer), ...]` in plan order;
/// iterate it.
#[pyclass(module = "storaged")]
pub struct Loader {
    inner: Mutex<Option<storaged_client::Loader>>,
    /// The finished loader's counters (it is dropped at the end, freeing
    /// its connections and regions; `stats()` still answers).
    finished: Mutex<Option<storaged_client::LoaderStats>>,
    pid: u32,
}

impl Loader {
    fn next_batch(&self, py: Python<'_>) -> PyResult<Option<storaged_client::Batch>> {
        if self.pid != std::process::id() {
            return Err(PyTypeError::new_err(
                "a storaged Loader cannot cross a fork; make it in the process that reads",
            ));
        }
        let mut guard = self.inner.lock().expect("loader lock");
        let Some(loader) = guard.as_mut() else {
            return Ok(None);
        };
        let next = block_on(py, async { loader.next().await.transpose() })?;
        if next.is_none() {
            *self.finished.lock().expect("loader stats lock") = Some(loader.stats());
            *guard = None;
        }
        Ok(next)
    }
}

#[pymethods]
impl Loader {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    /// Batches and bytes handed out per read path (`shm_*`: shared memory
    /// on the same host, `bulk_*`: the TCP bulk channel, `grpc_*`: gRPC),
    /// and the read-ahead hints sent and accepted.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = match self.inner.lock().expect("loader lock").as_ref() {
            Some(loader) => loader.stats(),
            None => self
                .finished
                .lock()
                .expect("loader stats lock")
                .unwrap_or_default(),
        };
        let out = PyDict::new(py);
        out.set_item("shm_batches", s.shm_batches)?;
        out.set_item("shm_bytes", s.shm_bytes)?;
        out.set_item("bulk_batches", s.bulk_batches)?;
        out.set_item("bulk_bytes", s.bulk_bytes)?;
        out.set_item("grpc_batches", s.grpc_batches)?;
        out.set_item("grpc_bytes", s.grpc_bytes)?;
        out.set_item("hints_sent", s.hints_sent)?;
        out.set_item("hint_objects_accepted", s.hint_objects_accepted)?;
        out.set_item("hints_failed", s.hints_failed)?;
        Ok(out)
    }

    fn __next__<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyList>>> {
        let Some(batch) = self.next_batch(py)? else {
            return Ok(None);
        };
        let items = batch
            .samples
            .into_iter()
            .map(|s| Ok((s.object_index, s.path, buffer(py, s.data)?)))
            .collect::<PyResult<Vec<_>>>()?;
        Ok(Some(PyList::new(py, items)?))
    }

    /// The next batch packed for another process: every sample's bytes
    /// back to back in one shared-memory buffer (one copy, no pickling of
    /// the bytes; see `Lent`). Returns `(data, indices, paths, offsets)`,
    /// where sample `i` is `data[offsets[i]:offsets[i + 1]]`, or `None` at
    /// the end.
    #[allow(clippy::type_complexity)]
    fn next_packed(
        &self,
        py: Python<'_>,
    ) -> PyResult<Option<(handoff::Lent, Vec<u64>, Vec<String>, Vec<u64>)>> {
        let Some(batch) = self.next_batch(py)? else {
            return Ok(None);
        };
        let mut offsets = Vec::with_capacity(batch.samples.len() + 1);
        let mut at = 0u64;
        offsets.push(0);
        for s in &batch.samples {
            at += s.data.len() as u64;
            offsets.push(at);
        }
        let total = usize::try_from(at)
            .map_err(|_| PyValueError::new_err(format!("a batch of {at} bytes")))?;
        let samples = &batch.samples;
        let lent = handoff::lend(py, total, |dst| {
            let mut at = 0;
            for s in samples {
                dst[at..at + s.data.len()].copy_from_slice(&s.data);
                at += s.data.len();
            }
        })?;
        let (indices, paths) = batch
            .samples
            .into_iter()
            .map(|s| (s.object_index, s.path))
            .unzip();
        Ok(Some((lent, indices, paths, offsets)))
    }
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_class::<Client>()?;
    m.add_class::<Dataset>()?;
    m.add_class::<Buffer>()?;
    m.add_class::<Loader>()?;
    m.add_class::<handoff::Lent>()?;
    m.add_function(wrap_pyfunction!(handoff::_attach_lent, m)?)?;
    // The client's retry backoff, for retries made in Python.
    m.add(
        "RETRY_BACKOFF_INITIAL_S",
        storaged_client::retry::RETRY_BACKOFF_INITIAL.as_secs_f64(),
    )?;
    m.add(
        "RETRY_BACKOFF_MAX_S",
        storaged_client::retry::RETRY_BACKOFF_MAX.as_secs_f64(),
    )?;
    for (name, ty) in [
        ("StoragedError", py.get_type::<StoragedError>()),
        ("InvalidArgument", py.get_type::<InvalidArgument>()),
        ("NotFound", py.get_type::<NotFound>()),
        ("AlreadyExists", py.get_type::<AlreadyExists>()),
        ("PermissionDenied", py.get_type::<PermissionDenied>()),
        ("ResourceExhausted", py.get_type::<ResourceExhausted>()),
        ("FailedPrecondition", py.get_type::<FailedPrecondition>()),
        ("OutOfRange", py.get_type::<OutOfRange>()),
        ("Unavailable", py.get_type::<Unavailable>()),
        ("DataLoss", py.get_type::<DataLoss>()),
        ("Internal", py.get_type::<Internal>()),
    ] {
        m.add(name, ty)?;
    }
    Ok(())
}
