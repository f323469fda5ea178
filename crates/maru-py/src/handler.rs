//! `maru.MaruHandler`: the documented Python API over [`maru_client::MaruHandler`].
//!
//! GIL policy: calls, single-key and batches alike, run with the GIL held and a [`PyHook`], so
//! the reply is awaited for a grace with the GIL held (its length follows the reply times the
//! session measures) and the GIL is released only when the server is slow. Copies of more
//! than [`DETACH_COPY_BYTES`] release it from the start.

use std::sync::Arc;

use maru_client::{DeleteStatus, Hooked, MaruHandler, PageId, RegionCallback, StoreItem, View};
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use crate::args::{
    alloc_size, buffer, items, key_bytes, not_writable, page_of, read_config, some, store_source,
    with_keys, writable, StoreSource,
};
use crate::buffer::{memoryview, RawBuf, RegionViews, WritableBufs};
use crate::errors::{invalid, py_err, raise};
use crate::types::{
    region_stats_dict, store_regions_dict, AllocHandle, MaruHandle, MemoryInfo, OwnedRegionManager,
    PagedMemoryAllocator,
};
use crate::PyHook;

/// Copies larger than this release the GIL for the whole call: at ~10 GB/s, 64 KiB is
/// ~6 µs, about what releasing and re-taking the GIL may cost when nobody else wants it.
pub const DETACH_COPY_BYTES: usize = 64 * 1024;

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
    let generation = view.generation();
    let mv = memoryview(py, view)?;
    Py::new(
        py,
        MemoryInfo {
            view: mv.into_any().unbind(),
            region_id: Some(region_id),
            page_index: Some(page_index),
            generation: Some(generation),
        },
    )
}

/// The list of a copy-out batch's answers: each length as an int, None for a miss. Equal
/// lengths share one int object (ints are immutable), so a batch of same-sized chunks makes
/// one int rather than one per chunk.
fn lengths_list<'py>(py: Python<'py>, got: &[Option<usize>]) -> PyResult<Bound<'py, PyList>> {
    let mut last: Option<(usize, Bound<'py, PyAny>)> = None;
    let mut out = Vec::with_capacity(got.len());
    for n in got {
        out.push(match *n {
            None => py.None().into_bound(py),
            Some(n) => match &last {
                Some((m, obj)) if *m == n => obj.clone(),
                _ => {
                    let obj = n.into_pyobject(py)?.into_any();
                    last = Some((n, obj.clone()));
                    obj
                }
            },
        });
    }
    PyList::new(py, out)
}

/// Main interface: stores, retrieves and deletes KV-cache chunks in shared memory through a
/// Maru metadata server. Reads run concurrently; writes are serialised. Errors are the
/// classes of `maru.errors`. After `os.fork()` the handler stays the parent's: the child's
/// calls raise ForkedHandlerError unless `MaruConfig(reconnect_after_fork=True)`.
#[pyclass(module = "maru", name = "MaruHandler", subclass)]
pub struct PyMaruHandler {
    h: Arc<MaruHandler>,
    auto_connect: bool,
}

impl PyMaruHandler {
    fn hook<'py>(py: Python<'py>) -> PyHook<'py> {
        PyHook(py)
    }

    /// Runs `op` on the handler with waits that release the GIL; its error as the Python
    /// exception of its kind.
    fn call<T>(
        &self,
        py: Python<'_>,
        op: impl FnOnce(&Hooked<'_>) -> maru_client::Result<T>,
    ) -> PyResult<T> {
        op(&self.h.with_hook(&Self::hook(py))).map_err(py_err(py))
    }

    /// [`call`](Self::call) of an operation on one key (any key form Python passes).
    fn keyed<T>(
        &self,
        py: Python<'_>,
        key: &Bound<'_, PyAny>,
        op: impl FnOnce(&Hooked<'_>, &[u8]) -> maru_client::Result<T>,
    ) -> PyResult<T> {
        let key = key_bytes(key)?;
        self.call(py, |h| op(h, &key))
    }

    fn delete_with_status(&self, py: Python<'_>, key: &Bound<'_, PyAny>) -> PyResult<DeleteStatus> {
        self.keyed(py, key, |h, k| h.delete(k))
    }

    /// `batch_store` with its keys converted.
    fn batch_store_keys(
        &self,
        py: Python<'_>,
        keys: &[&[u8]],
        infos: Option<&Bound<'_, PyAny>>,
        prefixes: Option<&Bound<'_, PyAny>>,
        handles: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Vec<bool>> {
        let (infos, all_pages) = match (some(infos), some(handles)) {
            (Some(infos), None) => (infos, false),
            (None, Some(handles)) => (handles, true),
            (Some(_), Some(_)) => {
                return Err(invalid("batch_store: pass infos or handles, not both"))
            }
            (None, None) => return Err(invalid("batch_store: needs infos or handles")),
        };
        if all_pages && some(prefixes).is_some() {
            return Err(invalid(
                "batch_store: handles are stored as they are; prefixes need infos",
            ));
        }
        let infos: Vec<Bound<'_, PyAny>> = infos.try_iter()?.collect::<PyResult<_>>()?;
        let prefixes: Vec<Bound<'_, PyAny>> = match prefixes.filter(|p| !p.is_none()) {
            Some(p) => p.try_iter()?.collect::<PyResult<_>>()?,
            None => Vec::new(),
        };
        if keys.len() != infos.len() || (!prefixes.is_empty() && prefixes.len() != keys.len()) {
            return Err(invalid(format!(
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
            let prefix = prefixes.get(i).filter(|p| !p.is_none());
            if all_pages || info.is_instance_of::<AllocHandle>() {
                if prefix.is_some() {
                    return Err(invalid(format!(
                        "batch_store: infos[{i}] is a handle, stored as written; prefixes[{i}] \
                         must be None"
                    )));
                }
                let (page, size) = page_of(info, &format!("batch_store: handles[{i}]"))?;
                srcs.push(Src::Page(page, size));
                continue;
            }
            let data = buffer(info, &format!("batch_store: infos[{i}]"))?;
            let prefix = prefix
                .map(|p| buffer(p, &format!("batch_store: prefixes[{i}]")))
                .transpose()?;
            if data.as_slice().is_empty() && prefix.as_ref().is_none_or(|p| p.as_slice().is_empty())
            {
                return Err(invalid(format!(
                    "batch_store: infos[{i}] is empty (a value has at least 1 byte)"
                )));
            }
            srcs.push(Src::Copy(data, prefix));
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
                (*k, item)
            })
            .collect();
        let copied: usize = items.iter().map(|(_, item)| item.copy_len()).sum();
        let h = &self.h;
        let outcomes = if copied > DETACH_COPY_BYTES {
            py.detach(|| h.batch_store(&items))
        } else {
            h.with_hook(&Self::hook(py)).batch_store(&items)
        }
        .map_err(py_err(py))?;
        drop(items);
        drop(srcs);
        Ok(vec![true; outcomes.len()])
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
        let h = MaruHandler::new(cfg).map_err(py_err(py))?;
        let me = PyMaruHandler {
            h: Arc::new(h),
            auto_connect,
        };
        if auto_connect {
            // A handler that could not connect is not handed out half-made.
            me.h.with_hook(&Self::hook(py))
                .connect()
                .map_err(py_err(py))?;
        }
        Ok(me)
    }

    /// Connects to the server. No region is taken yet (the first `alloc` or `store` takes one
    /// of `pool_size` bytes), so a handler connects to a full pool and reads there. True on
    /// success; False (with a warning on the `maru` logger, and the reason in later calls'
    /// NotConnectedError) when the server cannot be reached or refuses. `MaruHandler(config)`
    /// with `auto_connect` raises ConnectFailedError instead.
    ///
    /// After `os.fork()` a connected handler belongs to the parent: in the child every call
    /// raises ForkedHandlerError (the parent's session and sockets are never touched), or,
    /// with `MaruConfig(reconnect_after_fork=True)`, the child's first call connects a
    /// session of its own.
    fn connect(&self, py: Python<'_>) -> PyResult<bool> {
        if self.h.is_closed() {
            let msg = "MaruHandler is closed; create a new handler".to_owned();
            return Err(raise(py, "HandlerClosedError", msg, None, "connect"));
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
    fn alloc(&self, py: Python<'_>, size: &Bound<'_, PyAny>) -> PyResult<AllocHandle> {
        let size = alloc_size(size, self.h.chunk_size())?;
        let handle = self.call(py, |h| h.alloc(size))?;
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
        let (page, _) = page_of(handle, "free: handle")?;
        self.call(py, |h| h.free(page))
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
        let (data, prefix) = match store_source(some(info), some(prefix), some(data), some(handle))?
        {
            StoreSource::Page(page, size) => {
                return self.call(py, |h| h.store_page(&key, page, size).map(|_| true));
            }
            StoreSource::Copy { data, prefix } => (data, prefix),
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
        match self.call(py, |h| h.retrieve(&key))? {
            Some(view) => Ok(Some(memory_info(py, view)?)),
            None => Ok(None),
        }
    }

    fn exists(&self, py: Python<'_>, key: &Bound<'_, PyAny>) -> PyResult<bool> {
        self.keyed(py, key, |h, k| h.exists(k))
    }

    /// Deletes `key`. False if the key did not exist or is pinned; `delete_status` tells
    /// which.
    fn delete(&self, py: Python<'_>, key: &Bound<'_, PyAny>) -> PyResult<bool> {
        Ok(self.delete_with_status(py, key)? == DeleteStatus::Deleted)
    }

    /// Deletes `key` and says what happened: "deleted", "not_found", or "pinned" (a handler
    /// holds a pin on it; the key stays).
    fn delete_status(&self, py: Python<'_>, key: &Bound<'_, PyAny>) -> PyResult<&'static str> {
        Ok(match self.delete_with_status(py, key)? {
            DeleteStatus::Deleted => "deleted",
            DeleteStatus::NotFound => "not_found",
            DeleteStatus::Pinned => "pinned",
        })
    }

    /// Whether `info` (a MemoryInfo from retrieve, or any object with region_id, page_index
    /// and generation) still describes the registration it was read for. A retrieved view
    /// needs no check — it holds its page while any buffer over it lives — but a reader that
    /// kept only the address reads through it and then asks this.
    fn generation_matches(&self, py: Python<'_>, info: &Bound<'_, PyAny>) -> PyResult<bool> {
        let field = |name: &str| -> PyResult<u64> {
            info.getattr(name)
                .and_then(|v| v.extract::<u64>())
                .map_err(|_| crate::errors::invalid(format!("info has no integer {name}")))
        };
        let (region_id, page_index, generation) = (
            field("region_id")?,
            field("page_index")?,
            field("generation")?,
        );
        let offset = page_index
            .checked_mul(self.h.config().page_stride())
            .ok_or_else(|| crate::errors::invalid("info.page_index is out of range"))?;
        self.call(py, |h| h.page_current(region_id, offset, generation))
    }

    /// Renews every pin this handler holds (a pin is a lease: it ends when the server's pin
    /// TTL passes without a renewal).
    fn renew_pins(&self, py: Python<'_>) -> PyResult<()> {
        self.call(py, |h| h.renew_pins())
    }

    /// Pins `key` against deletion and eviction, for this handler, until `unpin`, `close` or
    /// the server's pin TTL (renew with `renew_pins`). False if the key does not exist.
    fn pin(&self, py: Python<'_>, key: &Bound<'_, PyAny>) -> PyResult<bool> {
        self.keyed(py, key, |h, k| h.pin(k))
    }

    /// Takes away one of this handler's pins of `key`. False if it holds none (another
    /// handler's pins are never affected).
    fn unpin(&self, py: Python<'_>, key: &Bound<'_, PyAny>) -> PyResult<bool> {
        self.keyed(py, key, |h, k| h.unpin(k))
    }

    /// Waits until every write-behind store (`MaruConfig(write_behind=True)`) has been
    /// registered, so other instances can see the keys. Raises the error of the first one
    /// that failed since the last flush (those keys are not stored). Without write-behind
    /// there is nothing to wait for.
    fn flush(&self, py: Python<'_>) -> PyResult<()> {
        self.call(py, |h| h.flush())
    }

    /// Connected, and the server answered a heartbeat.
    fn healthcheck(&self, py: Python<'_>) -> bool {
        self.h.with_hook(&Self::hook(py)).healthcheck()
    }

    /// Server statistics in the original's shape (`kv_manager`, `allocation_manager`,
    /// `store_regions`, `allocator`), plus the full server document under `server`.
    fn get_stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let stats = self.call(py, |h| h.stats())?;
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

    /// One round trip for all keys (per 4096); the GIL is released only if the reply is late.
    fn batch_retrieve<'py>(
        &self,
        py: Python<'py>,
        keys: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyList>> {
        let views = with_keys(keys, |refs| self.call(py, |h| h.batch_retrieve(refs)))?;
        // One exporter and memoryview per region touched; each key's view is a slice of it.
        let mut regions = RegionViews::new(py);
        let mut out = Vec::with_capacity(views.len());
        for v in views {
            out.push(match v {
                Some(view) => {
                    let (region_id, page_index) = (view.region_id(), view.page_index());
                    let generation = view.generation();
                    let info = MemoryInfo {
                        view: regions.view(view)?.unbind(),
                        region_id: Some(region_id),
                        page_index: Some(page_index),
                        generation: Some(generation),
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
        with_keys(keys, |keys| {
            self.batch_store_keys(py, keys, infos, prefixes, handles)
        })
    }

    fn batch_exists<'py>(
        &self,
        py: Python<'py>,
        keys: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyList>> {
        let found = with_keys(keys, |refs| self.call(py, |h| h.batch_exists(refs)))?;
        // True and False are shared objects: the list takes a reference to one of them per key.
        PyList::new(py, found)
    }

    /// How many leading keys of `keys` exist (a prefix match stops at the first miss).
    fn prefix_len(&self, py: Python<'_>, keys: &Bound<'_, PyAny>) -> PyResult<usize> {
        with_keys(keys, |refs| self.call(py, |h| h.prefix_len(refs)))
    }

    /// Whether exists, batch_exists, prefix_len and the *_into reads are answered from the
    /// server's key index in shared memory (no round trip) rather than asked.
    fn reads_index(&self) -> bool {
        self.h.reads_index()
    }

    /// Copies `key`'s value into `buffer` (a writable buffer: bytearray, numpy array, …, at
    /// least the value's size); returns the bytes copied, or None for a missing key.
    fn retrieve_into(
        &self,
        py: Python<'_>,
        key: &Bound<'_, PyAny>,
        buffer: &Bound<'_, PyAny>,
    ) -> PyResult<Option<usize>> {
        let mut buf = writable(buffer)?;
        self.keyed(py, key, |h, k| h.retrieve_into(k, buf.as_mut_slice()))
    }

    /// `retrieve_into` for many keys, `buffers[i]` for `keys[i]`.
    fn batch_retrieve_into<'py>(
        &self,
        py: Python<'py>,
        keys: &Bound<'py, PyAny>,
        buffers: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyList>> {
        let got = with_keys(keys, |refs| {
            let buffers = items(buffers, "buffers must be an iterable of writable buffers")?;
            let mut bufs = WritableBufs::get(&buffers, |i, b| {
                not_writable(b, &format!("batch_retrieve_into: buffers[{i}]"))
            })?;
            let mut slices = bufs.slices("batch_retrieve_into")?;
            let total: usize = slices.iter().map(|s| s.len()).sum();
            let h = &self.h;
            if total > DETACH_COPY_BYTES {
                py.detach(|| h.batch_retrieve_into(refs, &mut slices))
            } else {
                h.with_hook(&Self::hook(py))
                    .batch_retrieve_into(refs, &mut slices)
            }
            .map_err(py_err(py))
        })?;
        lengths_list(py, &got)
    }

    fn batch_pin(&self, py: Python<'_>, keys: &Bound<'_, PyAny>) -> PyResult<Vec<bool>> {
        with_keys(keys, |refs| self.call(py, |h| h.batch_pin(refs)))
    }

    fn batch_unpin(&self, py: Python<'_>, keys: &Bound<'_, PyAny>) -> PyResult<Vec<bool>> {
        with_keys(keys, |refs| self.call(py, |h| h.batch_unpin(refs)))
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
                let py = slf.py();
                me.h.with_hook(&Self::hook(py))
                    .connect()
                    .map_err(py_err(py))?;
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
