//! `maru.MaruHandler`: the seed's API over [`maru_client::MaruHandler`].
//!
//! GIL policy: single-key calls run with the GIL held and a [`PyHook`], so the reply is
//! awaited briefly with the GIL held and the GIL is released only when the server is slow.
//! Batch calls and copies of more than [`DETACH_COPY_BYTES`] release the GIL from the start.

use std::borrow::Cow;
use std::sync::Arc;

use maru_client::{DeleteStatus, MaruConfig, MaruHandler, PageId, RegionCallback, StoreItem, View};
use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyInt, PyList, PyString};

use crate::buffer::{memoryview, RawBuf, RegionViews};
use crate::errors::{py_err, to_py};
use crate::types::{
    region_stats_dict, store_regions_dict, AllocHandle, MaruHandle, MemoryInfo, OwnedRegionManager,
    PagedMemoryAllocator,
};
use crate::PyHook;

/// Copies larger than this release the GIL for the whole call: at ~10 GB/s, 64 KiB is
/// ~6 µs, about what releasing and re-taking the GIL may cost when nobody else wants it.
pub const DETACH_COPY_BYTES: usize = 64 * 1024;

/// A key as bytes: `str` (UTF-8), `bytes`, or `int` (its decimal string, so `key=12345`
/// works as in the seed).
fn key_bytes<'a>(obj: &'a Bound<'_, PyAny>) -> PyResult<Cow<'a, [u8]>> {
    if let Ok(s) = obj.cast::<PyString>() {
        return Ok(Cow::Borrowed(s.to_str()?.as_bytes()));
    }
    if obj.is_instance_of::<PyInt>() {
        return Ok(Cow::Owned(obj.str()?.to_str()?.as_bytes().to_vec()));
    }
    if let Ok(b) = obj.cast::<PyBytes>() {
        return Ok(Cow::Borrowed(b.as_bytes()));
    }
    Err(PyTypeError::new_err(format!(
        "key must be str or int, not {}",
        obj.get_type().name()?
    )))
}

fn keys_vec(keys: &Bound<'_, PyAny>) -> PyResult<Vec<Vec<u8>>> {
    keys.try_iter()?
        .map(|k| Ok(key_bytes(&k?)?.into_owned()))
        .collect()
}

/// Region, page and size of an `AllocHandle` (ours, or any object with those attributes:
/// integrations build handles from a region id and page index to free them).
fn page_of(obj: &Bound<'_, PyAny>) -> PyResult<(PageId, u64)> {
    if let Ok(h) = obj.cast::<AllocHandle>() {
        let h = h.borrow();
        return Ok((
            PageId {
                region_id: h.region_id,
                page_index: h.page_index,
            },
            h.size,
        ));
    }
    let get = |a: &str, b: &str| -> PyResult<u64> {
        match obj.getattr(a) {
            Ok(v) => v.extract(),
            Err(_) => obj.getattr(b)?.extract(),
        }
    };
    Ok((
        PageId {
            region_id: get("region_id", "_region_id")?,
            page_index: get("page_index", "_page_index")?,
        },
        get("size", "_size").unwrap_or(0),
    ))
}

/// The object whose bytes to store: a MemoryInfo's view, or the object itself.
fn data_object<'py>(obj: &Bound<'py, PyAny>) -> Bound<'py, PyAny> {
    match obj.cast::<MemoryInfo>() {
        Ok(info) => info.borrow().view.bind(obj.py()).clone(),
        Err(_) => obj.clone(),
    }
}

fn attr<'py, T: for<'a> FromPyObject<'a, 'py>>(obj: &Bound<'py, PyAny>, name: &str) -> PyResult<T> {
    let v = obj
        .getattr(name)
        .map_err(|e| PyValueError::new_err(format!("config has no {name}: {e}")))?;
    v.extract::<T>()
        .map_err(|e| PyValueError::new_err(format!("invalid {name}: {}", Into::<PyErr>::into(e))))
}

/// Reads a `maru.MaruConfig` (or any object with its attributes) into the Rust config.
fn read_config(obj: &Bound<'_, PyAny>) -> PyResult<MaruConfig> {
    let mut c = MaruConfig {
        server_url: attr(obj, "server_url")?,
        instance_id: attr(obj, "instance_id")?,
        pool_size: attr(obj, "pool_size")?,
        chunk_size_bytes: attr(obj, "chunk_size_bytes")?,
        auto_connect: attr(obj, "auto_connect")?,
        timeout_ms: attr(obj, "timeout_ms")?,
        use_async_rpc: attr(obj, "use_async_rpc")?,
        max_inflight: attr(obj, "max_inflight")?,
        eager_map: attr(obj, "eager_map")?,
        auto_expand: attr(obj, "auto_expand")?,
        expand_size: attr(obj, "expand_size")?,
        ..MaruConfig::default()
    };
    // Maru's own field: a configuration object of the original Maru does not have it.
    if obj.hasattr("busy_poll")? {
        c.busy_poll = attr(obj, "busy_poll")?;
    }
    if obj.hasattr("write_behind")? {
        c.write_behind = attr(obj, "write_behind")?;
    }
    if let Ok(us) = std::env::var("MARU_REPLY_GRACE_US") {
        let us: u64 = us.trim().parse().map_err(|_| {
            PyValueError::new_err(format!("MARU_REPLY_GRACE_US={us:?} is not a number"))
        })?;
        c.reply_grace = std::time::Duration::from_micros(us);
    }
    Ok(c)
}

/// An optional argument, with an explicit None treated as absent.
fn some<'py>(o: Option<&Bound<'py, PyAny>>) -> Option<Bound<'py, PyAny>> {
    o.filter(|x| !x.is_none()).cloned()
}

fn warn(py: Python<'_>, msg: &str) {
    let logged = py
        .import("logging")
        .and_then(|m| m.call_method1("getLogger", ("maru",)))
        .and_then(|l| l.call_method1("warning", (msg,)));
    if let Err(e) = logged {
        e.write_unraisable(py, None);
    }
}

fn memory_info(py: Python<'_>, view: View) -> PyResult<Py<MemoryInfo>> {
    let (region_id, page_index) = (view.region_id(), view.page_index());
    let mv = memoryview(py, view)?;
    Py::new(
        py,
        MemoryInfo {
            view: mv.into_any().unbind(),
            region_id: Some(region_id),
            page_index: Some(page_index),
        },
    )
}

/// Main interface: stores, retrieves and deletes KV-cache chunks in shared memory through a
/// Maru metadata server. Reads run concurrently; writes are serialised.
#[pyclass(module = "maru", name = "MaruHandler", subclass)]
pub struct PyMaruHandler {
    h: Arc<MaruHandler>,
    auto_connect: bool,
}

impl PyMaruHandler {
    fn hook<'py>(py: Python<'py>) -> PyHook<'py> {
        PyHook(py)
    }
}

#[pymethods]
impl PyMaruHandler {
    #[new]
    #[pyo3(signature = (config=None))]
    fn new(py: Python<'_>, config: Option<&Bound<'_, PyAny>>) -> PyResult<Self> {
        let config = match config {
            Some(c) if !c.is_none() => c.clone(),
            _ => py.import("maru.config")?.getattr("MaruConfig")?.call0()?,
        };
        let cfg = read_config(&config)?;
        let auto_connect = cfg.auto_connect;
        let h = MaruHandler::new(cfg).map_err(|e| PyValueError::new_err(e.to_string()))?;
        let me = PyMaruHandler {
            h: Arc::new(h),
            auto_connect,
        };
        if auto_connect {
            me.connect(py)?;
        }
        Ok(me)
    }

    /// Connects to the server and takes the first owned region. True on success; False (with
    /// a warning on the `maru` logger) when the server cannot be reached or refuses.
    fn connect(&self, py: Python<'_>) -> PyResult<bool> {
        if self.h.is_closed() {
            return Err(PyRuntimeError::new_err(
                "MaruHandler is closed; create a new handler",
            ));
        }
        match self.h.with_hook(&Self::hook(py)).connect() {
            Ok(()) => Ok(true),
            Err(e) => {
                warn(
                    py,
                    &format!(
                        "maru: connect to {} failed: {e}",
                        self.h.config().server_url
                    ),
                );
                Ok(false)
            }
        }
    }

    /// Rejects new operations, waits for in-flight writes, says goodbye. Views still alive
    /// stay readable (their mappings are released with the last view).
    fn close(&self, py: Python<'_>) {
        self.h.with_hook(&Self::hook(py)).close();
    }

    /// Allocates a page; write into `handle.buf`, then `store(key, handle=handle)`.
    fn alloc(&self, py: Python<'_>, size: i64) -> PyResult<AllocHandle> {
        let size = u64::try_from(size)
            .map_err(|_| PyValueError::new_err(format!("size must be >= 0, got {size}")))?;
        let handle = self
            .h
            .with_hook(&Self::hook(py))
            .alloc(size)
            .map_err(py_err(py))?;
        let (region_id, page_index) = (handle.region_id(), handle.page_index());
        let buf = memoryview(py, handle.view().clone())?;
        Ok(AllocHandle {
            buf: buf.into_any().unbind(),
            region_id,
            page_index,
            size,
        })
    }

    /// Frees a page from alloc() (before store: discard; after: eviction, which also deletes
    /// the key so no reader sees the page reused). ValueError if the page is not tracked.
    fn free(&self, py: Python<'_>, handle: &Bound<'_, PyAny>) -> PyResult<()> {
        let (page, _) = page_of(handle)?;
        self.h
            .with_hook(&Self::hook(py))
            .free(page)
            .map_err(py_err(py))
    }

    /// Stores `key`. With `handle` (zero copy) only the key is registered; otherwise the
    /// bytes of `data` / `info` (MemoryInfo or any buffer), after `prefix`, are copied into a
    /// fresh page and registered. An existing key is left as it is (True: deduplicated).
    /// With `write_behind` the registration is sent and not waited for (True: sent).
    #[pyo3(signature = (key, info=None, prefix=None, *, data=None, handle=None))]
    fn store(
        &self,
        py: Python<'_>,
        key: &Bound<'_, PyAny>,
        info: Option<&Bound<'_, PyAny>>,
        prefix: Option<&Bound<'_, PyAny>>,
        data: Option<&Bound<'_, PyAny>>,
        handle: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<bool> {
        let key = key_bytes(key)?;
        let handle = some(handle).or_else(|| {
            // An AllocHandle passed positionally is a zero-copy store too.
            some(info).filter(|i| i.is_instance_of::<AllocHandle>())
        });
        if let Some(handle) = handle {
            let (page, size) = page_of(&handle)?;
            return self
                .h
                .with_hook(&Self::hook(py))
                .store_page(&key, page, size)
                .map(|_| true)
                .map_err(py_err(py));
        }
        let src = some(data)
            .or_else(|| some(info))
            .ok_or_else(|| PyValueError::new_err("store() needs data, info or handle"))?;
        let data = RawBuf::get(&data_object(&src))?;
        let prefix = match some(prefix) {
            Some(p) => Some(RawBuf::get(&p)?),
            None => None,
        };
        let (d, p) = (
            data.as_slice(),
            prefix.as_ref().map_or(&[][..], |p| p.as_slice()),
        );
        let result = if d.len() + p.len() > DETACH_COPY_BYTES {
            let h = &self.h;
            py.detach(|| h.store_bytes(&key, p, d))
        } else {
            self.h.with_hook(&Self::hook(py)).store_bytes(&key, p, d)
        };
        result.map(|_| true).map_err(py_err(py))
    }

    /// A MemoryInfo whose `view` is a zero-copy memoryview of the value (read-only for other
    /// instances' regions), or None if the key does not exist.
    fn retrieve(&self, py: Python<'_>, key: &Bound<'_, PyAny>) -> PyResult<Option<Py<MemoryInfo>>> {
        let key = key_bytes(key)?;
        match self
            .h
            .with_hook(&Self::hook(py))
            .retrieve(&key)
            .map_err(py_err(py))?
        {
            Some(view) => Ok(Some(memory_info(py, view)?)),
            None => Ok(None),
        }
    }

    fn exists(&self, py: Python<'_>, key: &Bound<'_, PyAny>) -> PyResult<bool> {
        let key = key_bytes(key)?;
        self.h
            .with_hook(&Self::hook(py))
            .exists(&key)
            .map_err(py_err(py))
    }

    /// Deletes `key` and frees its page if it is ours. False if the key did not exist or is
    /// pinned.
    fn delete(&self, py: Python<'_>, key: &Bound<'_, PyAny>) -> PyResult<bool> {
        let key = key_bytes(key)?;
        let status = self
            .h
            .with_hook(&Self::hook(py))
            .delete(&key)
            .map_err(py_err(py))?;
        Ok(status == DeleteStatus::Deleted)
    }

    /// Pins `key` against deletion. False if the key does not exist.
    fn pin(&self, py: Python<'_>, key: &Bound<'_, PyAny>) -> PyResult<bool> {
        let key = key_bytes(key)?;
        self.h
            .with_hook(&Self::hook(py))
            .pin(&key)
            .map_err(py_err(py))
    }

    /// Unpins `key`. False if it was not pinned.
    fn unpin(&self, py: Python<'_>, key: &Bound<'_, PyAny>) -> PyResult<bool> {
        let key = key_bytes(key)?;
        self.h
            .with_hook(&Self::hook(py))
            .unpin(&key)
            .map_err(py_err(py))
    }

    /// Waits until every write-behind store (`MaruConfig(write_behind=True)`) has been
    /// registered, so other instances can see the keys. Raises the error of the first one
    /// that failed since the last flush (those keys are not stored). Without write-behind
    /// there is nothing to wait for.
    fn flush(&self, py: Python<'_>) -> PyResult<()> {
        self.h
            .with_hook(&Self::hook(py))
            .flush()
            .map_err(py_err(py))
    }

    /// Connected, and the server answered a heartbeat.
    fn healthcheck(&self, py: Python<'_>) -> bool {
        self.h.with_hook(&Self::hook(py)).healthcheck()
    }

    /// Server statistics in the original's shape (`kv_manager`, `allocation_manager`,
    /// `store_regions`, `allocator`), plus the full server document under `server`.
    fn get_stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let stats = self
            .h
            .with_hook(&Self::hook(py))
            .stats()
            .map_err(py_err(py))?;
        let s = &stats.server;
        let out = PyDict::new(py);
        let kv = PyDict::new(py);
        kv.set_item("total_entries", s.keys)?;
        kv.set_item("total_size", s.bytes)?;
        out.set_item("kv_manager", kv)?;
        let am = PyDict::new(py);
        am.set_item("num_allocations", s.regions)?;
        am.set_item("total_allocated", s.region_bytes)?;
        am.set_item(
            "active_clients",
            s.clients.iter().filter(|c| c.connected).count(),
        )?;
        out.set_item("allocation_manager", am)?;
        out.set_item("store_regions", store_regions_dict(py, &stats.regions)?)?;
        if let Some(first) = stats.regions.first() {
            out.set_item("allocator", region_stats_dict(py, first)?)?;
        }
        let json = serde_json::to_string(s).map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
        out.set_item("server", py.import("json")?.call_method1("loads", (json,))?)?;
        Ok(out)
    }

    /// One round trip for all keys (per 4096); the GIL is released for the whole call.
    fn batch_retrieve<'py>(
        &self,
        py: Python<'py>,
        keys: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyList>> {
        let keys = keys_vec(keys)?;
        let refs: Vec<&[u8]> = keys.iter().map(|k| k.as_slice()).collect();
        let h = &self.h;
        let views = py.detach(|| h.batch_retrieve(&refs)).map_err(py_err(py))?;
        // One exporter and memoryview per region touched; each key's view is a slice of it.
        let mut regions = RegionViews::new(py);
        let mut out = Vec::with_capacity(views.len());
        for v in views {
            out.push(match v {
                Some(view) => {
                    let (region_id, page_index) = (view.region_id(), view.page_index());
                    let info = MemoryInfo {
                        view: regions.view(view)?.unbind(),
                        region_id: Some(region_id),
                        page_index: Some(page_index),
                    };
                    Bound::new(py, info)?.into_any()
                }
                None => py.None().into_bound(py),
            });
        }
        PyList::new(py, out)
    }

    /// Stores many entries with one round trip (per 4096). Items are MemoryInfo, any buffer
    /// (copied into fresh pages, after the matching prefix) or AllocHandle (zero copy).
    /// `handles=` is the original's zero-copy form: every item is a page from alloc() (or an
    /// object with its region_id, page_index and size), never copied.
    #[pyo3(signature = (keys, infos=None, prefixes=None, *, handles=None))]
    fn batch_store(
        &self,
        py: Python<'_>,
        keys: &Bound<'_, PyAny>,
        infos: Option<&Bound<'_, PyAny>>,
        prefixes: Option<&Bound<'_, PyAny>>,
        handles: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Vec<bool>> {
        let keys = keys_vec(keys)?;
        let (infos, all_pages) = match (some(infos), some(handles)) {
            (Some(infos), None) => (infos, false),
            (None, Some(handles)) => (handles, true),
            (Some(_), Some(_)) => {
                return Err(PyValueError::new_err(
                    "batch_store: pass infos or handles, not both",
                ))
            }
            (None, None) => {
                return Err(PyValueError::new_err(
                    "batch_store() needs infos or handles",
                ))
            }
        };
        if all_pages && some(prefixes).is_some() {
            return Err(PyValueError::new_err(
                "batch_store: handles are stored as they are; prefixes need infos",
            ));
        }
        let infos: Vec<Bound<'_, PyAny>> = infos.try_iter()?.collect::<PyResult<_>>()?;
        let prefixes: Vec<Bound<'_, PyAny>> = match prefixes.filter(|p| !p.is_none()) {
            Some(p) => p.try_iter()?.collect::<PyResult<_>>()?,
            None => Vec::new(),
        };
        if keys.len() != infos.len() || (!prefixes.is_empty() && prefixes.len() != keys.len()) {
            return Err(PyValueError::new_err(format!(
                "batch_store: {} keys, {} infos and {} prefixes do not match",
                keys.len(),
                infos.len(),
                prefixes.len()
            )));
        }
        enum Src {
            Page(PageId, u64),
            Copy(RawBuf, Option<RawBuf>),
        }
        let mut srcs = Vec::with_capacity(infos.len());
        for (i, info) in infos.iter().enumerate() {
            if all_pages || info.is_instance_of::<AllocHandle>() {
                let (page, size) = page_of(info)?;
                srcs.push(Src::Page(page, size));
                continue;
            }
            let prefix = match prefixes.get(i).filter(|p| !p.is_none()) {
                Some(p) => Some(RawBuf::get(p)?),
                None => None,
            };
            srcs.push(Src::Copy(RawBuf::get(&data_object(info))?, prefix));
        }
        let items: Vec<(&[u8], StoreItem<'_>)> = keys
            .iter()
            .zip(&srcs)
            .map(|(k, s)| {
                let item = match s {
                    Src::Page(page, len) => StoreItem::Page {
                        page: *page,
                        len: *len,
                    },
                    Src::Copy(data, prefix) => StoreItem::Bytes {
                        prefix: prefix.as_ref().map_or(&[][..], |p| p.as_slice()),
                        data: data.as_slice(),
                    },
                };
                (k.as_slice(), item)
            })
            .collect();
        let h = &self.h;
        let outcomes = py.detach(|| h.batch_store(&items)).map_err(py_err(py))?;
        drop(items);
        drop(srcs);
        Ok(vec![true; outcomes.len()])
    }

    fn batch_exists(&self, py: Python<'_>, keys: &Bound<'_, PyAny>) -> PyResult<Vec<bool>> {
        let keys = keys_vec(keys)?;
        let refs: Vec<&[u8]> = keys.iter().map(|k| k.as_slice()).collect();
        let h = &self.h;
        py.detach(|| h.batch_exists(&refs)).map_err(py_err(py))
    }

    fn batch_pin(&self, py: Python<'_>, keys: &Bound<'_, PyAny>) -> PyResult<Vec<bool>> {
        let keys = keys_vec(keys)?;
        let refs: Vec<&[u8]> = keys.iter().map(|k| k.as_slice()).collect();
        let h = &self.h;
        py.detach(|| h.batch_pin(&refs)).map_err(py_err(py))
    }

    fn batch_unpin(&self, py: Python<'_>, keys: &Bound<'_, PyAny>) -> PyResult<Vec<bool>> {
        let keys = keys_vec(keys)?;
        let refs: Vec<&[u8]> = keys.iter().map(|k| k.as_slice()).collect();
        let h = &self.h;
        py.detach(|| h.batch_unpin(&refs)).map_err(py_err(py))
    }

    fn get_chunk_size(&self) -> u64 {
        self.h.chunk_size()
    }

    /// A memoryview of `size` bytes at `offset` of a mapped region (writable for owned
    /// regions), or None if the region is not mapped or the range is outside it.
    fn get_buffer_view<'py>(
        &self,
        py: Python<'py>,
        region_id: u64,
        offset: u64,
        size: u64,
    ) -> PyResult<Option<Bound<'py, PyAny>>> {
        match self
            .h
            .with_hook(&Self::hook(py))
            .buffer(region_id, offset, size)
        {
            Some(view) => Ok(Some(memoryview(py, view)?.into_any())),
            None => Ok(None),
        }
    }

    fn get_region_page_count(&self, py: Python<'_>, region_id: u64) -> Option<u64> {
        self.h
            .with_hook(&Self::hook(py))
            .region_page_count(region_id)
    }

    fn get_owned_region_ids(&self, py: Python<'_>) -> Vec<u64> {
        self.h
            .with_hook(&Self::hook(py))
            .owned_regions()
            .iter()
            .map(|r| r.region_id)
            .collect()
    }

    /// `callback(region_id, page_count)` for every region this handler owns from now on;
    /// called at once for the regions it already owns. None unregisters.
    fn set_on_region_added(&self, py: Python<'_>, callback: Option<Py<PyAny>>) {
        let cb: Option<RegionCallback> = callback.filter(|c| !c.is_none(py)).map(|cb| {
            Arc::new(move |region_id: u64, pages: u64| {
                Python::attach(|py| {
                    if let Err(e) = cb.call1(py, (region_id, pages)) {
                        e.write_unraisable(py, None);
                    }
                })
            }) as RegionCallback
        });
        self.h.with_hook(&Self::hook(py)).set_on_region_added(cb);
    }

    /// The first owned region's handle (region_id, offset, length, auth_token), or None.
    #[getter]
    fn pool_handle(&self, py: Python<'_>) -> Option<MaruHandle> {
        let regions = self.h.with_hook(&Self::hook(py)).owned_regions();
        regions.first().map(|r| MaruHandle::from_stats(py, r))
    }

    /// The first owned region's page allocator, or None when not connected.
    #[getter]
    fn allocator(&self, py: Python<'_>) -> Option<PagedMemoryAllocator> {
        let regions = self.h.with_hook(&Self::hook(py)).owned_regions();
        regions.first().map(|r| PagedMemoryAllocator {
            handler: self.h.clone(),
            region_id: r.region_id,
        })
    }

    /// The owned-region manager, or None when not connected.
    #[getter]
    fn owned_region_manager(&self) -> Option<OwnedRegionManager> {
        self.h.is_connected().then(|| OwnedRegionManager {
            handler: self.h.clone(),
        })
    }

    #[getter]
    fn instance_id(&self) -> &str {
        self.h.instance_id()
    }

    #[getter]
    fn connected(&self) -> bool {
        self.h.is_connected()
    }

    fn __enter__(slf: Bound<'_, Self>) -> PyResult<Bound<'_, Self>> {
        {
            let me = slf.borrow();
            if me.auto_connect && !me.h.is_connected() && !me.h.is_closed() {
                me.connect(slf.py())?;
            }
        }
        Ok(slf)
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, pyo3::types::PyTuple>) -> bool {
        self.close(py);
        false
    }

    fn __repr__(&self) -> String {
        format!(
            "MaruHandler(instance_id={:?}, server_url={:?}, connected={})",
            self.h.instance_id(),
            self.h.config().server_url,
            self.h.is_connected()
        )
    }
}

impl Drop for PyMaruHandler {
    fn drop(&mut self) {
        // Close here, with the GIL-aware wait, rather than in the client's Drop (which cannot
        // release the GIL): compat objects may keep the Rust handler alive longer.
        Python::attach(|py| self.h.with_hook(&PyHook(py)).close());
    }
}

/// Errors of helper calls that are not handler operations.
pub fn helper_err(py: Python<'_>, e: impl std::fmt::Display) -> PyErr {
    to_py(py, maru_client::ErrorKind::Transport, e.to_string())
}
