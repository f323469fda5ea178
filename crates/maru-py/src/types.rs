//! The value types of the Python API (`AllocHandle`, `MemoryInfo`) and the backward-compatible
//! introspection objects (`MaruHandle`, `PagedMemoryAllocator`, `OwnedRegionManager`).
//! They are native classes so that `alloc` and `retrieve` build them without running Python
//! code.

use std::sync::Arc;

use maru_client::{MaruHandler, OwnedRegionStats};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyMemoryView};

use crate::PyHook;

/// Handle returned by `MaruHandler.alloc()` for zero-copy writes: write into `buf` (a
/// writable memoryview over the shared-memory page), then `store(key, handle=handle)`.
#[pyclass(module = "maru", name = "AllocHandle")]
pub struct AllocHandle {
    #[pyo3(get)]
    pub buf: Py<PyAny>,
    pub region_id: u64,
    pub page_index: u64,
    pub size: u64,
}

#[pymethods]
impl AllocHandle {
    #[new]
    #[pyo3(signature = (buf, _region_id, _page_index, _size))]
    fn new(buf: Py<PyAny>, _region_id: u64, _page_index: u64, _size: u64) -> Self {
        AllocHandle {
            buf,
            region_id: _region_id,
            page_index: _page_index,
            size: _size,
        }
    }
    /// Region ID of the allocated page.
    #[getter]
    fn region_id(&self) -> u64 {
        self.region_id
    }
    /// Page index within the region.
    #[getter]
    fn page_index(&self) -> u64 {
        self.page_index
    }
    /// Requested allocation size in bytes.
    #[getter]
    fn size(&self) -> u64 {
        self.size
    }
    // The original exposes its dataclass fields too; integrations read them.
    #[getter(_region_id)]
    fn region_id_field(&self) -> u64 {
        self.region_id
    }
    #[getter(_page_index)]
    fn page_index_field(&self) -> u64 {
        self.page_index
    }
    #[getter(_size)]
    fn size_field(&self) -> u64 {
        self.size
    }
    fn __repr__(&self) -> String {
        format!(
            "AllocHandle(region_id={}, page_index={}, size={})",
            self.region_id, self.page_index, self.size
        )
    }
}

/// Zero-copy data descriptor: `view` is a memoryview (into shared memory when it comes from
/// `retrieve`; read-only for other instances' regions). `region_id` and `page_index` say
/// where it points when known.
#[pyclass(module = "maru", name = "MemoryInfo")]
pub struct MemoryInfo {
    #[pyo3(get, set)]
    pub view: Py<PyAny>,
    #[pyo3(get, set)]
    pub region_id: Option<u64>,
    #[pyo3(get, set)]
    pub page_index: Option<u64>,
    /// The registration's generation, from a lookup (see `MaruHandler.generation_matches`).
    #[pyo3(get, set)]
    pub generation: Option<u64>,
}

#[pymethods]
impl MemoryInfo {
    #[new]
    #[pyo3(signature = (view, region_id=None, page_index=None, generation=None))]
    fn new(
        view: &Bound<'_, PyAny>,
        region_id: Option<u64>,
        page_index: Option<u64>,
        generation: Option<u64>,
    ) -> PyResult<Self> {
        // Anything with the buffer protocol is accepted and kept as a memoryview.
        let view = if view.is_instance_of::<PyMemoryView>() {
            view.clone()
        } else {
            PyMemoryView::from(view)?.into_any()
        };
        Ok(MemoryInfo {
            view: view.unbind(),
            region_id,
            page_index,
            generation,
        })
    }
    fn __repr__(&self, py: Python<'_>) -> String {
        let len = self.view.bind(py).len().unwrap_or(0);
        let show = |v: Option<u64>| v.map_or_else(|| "None".to_owned(), |v| v.to_string());
        format!(
            "MemoryInfo(len={len}, region_id={}, page_index={})",
            show(self.region_id),
            show(self.page_index)
        )
    }
}

/// A region handle as the resource manager issued it (what the original's `pool_handle`
/// returns): region id, offset inside the pool, length and auth token.
#[pyclass(module = "maru", name = "MaruHandle", frozen, get_all)]
pub struct MaruHandle {
    pub region_id: u64,
    pub offset: u64,
    pub length: u64,
    pub auth_token: Py<PyBytes>,
    pub pool: String,
    pub owner: String,
}

#[pymethods]
impl MaruHandle {
    fn __repr__(&self) -> String {
        format!(
            "MaruHandle(region_id={}, offset={}, length={}, pool={:?})",
            self.region_id, self.offset, self.length, self.pool
        )
    }
}

impl MaruHandle {
    pub fn from_stats(py: Python<'_>, r: &OwnedRegionStats) -> MaruHandle {
        MaruHandle {
            region_id: r.region_id,
            offset: r.handle.offset,
            length: r.handle.len,
            auth_token: PyBytes::new(py, &r.handle.token).unbind(),
            pool: r.handle.pool.clone(),
            owner: r.handle.owner.clone(),
        }
    }
}

/// The stats dict of one region's allocator, in the original's shape.
pub fn region_stats_dict<'py>(
    py: Python<'py>,
    r: &OwnedRegionStats,
) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("region_id", r.region_id)?;
    d.set_item("region_key", r.region_id)?;
    d.set_item("pool_size", r.pool_size)?;
    d.set_item("chunk_size", r.chunk_size)?;
    d.set_item("page_count", r.page_count)?;
    d.set_item("free_pages", r.free_pages)?;
    d.set_item("allocated_pages", r.allocated_pages)?;
    d.set_item("utilization", utilization(r.allocated_pages, r.page_count))?;
    Ok(d)
}

fn utilization(allocated: u64, total: u64) -> f64 {
    if total == 0 {
        0.0
    } else {
        allocated as f64 / total as f64
    }
}

/// The owned-regions summary dict (the original's `OwnedRegionManager.get_stats()`).
pub fn store_regions_dict<'py>(
    py: Python<'py>,
    regions: &[OwnedRegionStats],
) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    let (mut size, mut pages, mut free, mut alloc) = (0u64, 0u64, 0u64, 0u64);
    let list = PyList::empty(py);
    for r in regions {
        size += r.pool_size;
        pages += r.page_count;
        free += r.free_pages;
        alloc += r.allocated_pages;
        list.append(region_stats_dict(py, r)?)?;
    }
    d.set_item("num_regions", regions.len())?;
    d.set_item("total_pool_size", size)?;
    d.set_item("total_page_count", pages)?;
    d.set_item("total_free_pages", free)?;
    d.set_item("total_allocated_pages", alloc)?;
    d.set_item("utilization", utilization(alloc, pages))?;
    d.set_item("regions", list)?;
    Ok(d)
}

/// Live view of one owned region's page allocator (the original's `PagedMemoryAllocator`).
#[pyclass(module = "maru", name = "PagedMemoryAllocator", frozen)]
pub struct PagedMemoryAllocator {
    pub handler: Arc<MaruHandler>,
    pub region_id: u64,
}

impl PagedMemoryAllocator {
    fn current(&self, py: Python<'_>) -> Option<OwnedRegionStats> {
        self.handler
            .with_hook(&PyHook(py))
            .owned_regions()
            .into_iter()
            .find(|r| r.region_id == self.region_id)
    }
}

#[pymethods]
impl PagedMemoryAllocator {
    #[getter]
    fn region_id(&self) -> u64 {
        self.region_id
    }
    #[getter]
    fn chunk_size(&self) -> u64 {
        self.handler.chunk_size()
    }
    #[getter]
    fn page_count(&self, py: Python<'_>) -> u64 {
        self.current(py).map_or(0, |r| r.page_count)
    }
    #[getter]
    fn num_free_pages(&self, py: Python<'_>) -> u64 {
        self.current(py).map_or(0, |r| r.free_pages)
    }
    #[getter]
    fn num_allocated(&self, py: Python<'_>) -> u64 {
        self.current(py).map_or(0, |r| r.allocated_pages)
    }
    fn get_stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        match self.current(py) {
            Some(r) => region_stats_dict(py, &r),
            None => {
                let d = PyDict::new(py);
                d.set_item("region_id", self.region_id)?;
                d.set_item("chunk_size", self.handler.chunk_size())?;
                for k in ["pool_size", "page_count", "free_pages", "allocated_pages"] {
                    d.set_item(k, 0)?;
                }
                d.set_item("utilization", 0.0)?;
                Ok(d)
            }
        }
    }
    fn __repr__(&self, py: Python<'_>) -> String {
        let r = self.current(py);
        format!(
            "PagedMemoryAllocator(region_id={}, page_count={}, free={})",
            self.region_id,
            r.as_ref().map_or(0, |r| r.page_count),
            r.as_ref().map_or(0, |r| r.free_pages)
        )
    }
}

/// Live view of the handler's owned regions (the original's `OwnedRegionManager`).
#[pyclass(module = "maru", name = "OwnedRegionManager", frozen)]
pub struct OwnedRegionManager {
    pub handler: Arc<MaruHandler>,
}

impl OwnedRegionManager {
    fn regions(&self, py: Python<'_>) -> Vec<OwnedRegionStats> {
        self.handler.with_hook(&PyHook(py)).owned_regions()
    }
}

#[pymethods]
impl OwnedRegionManager {
    fn get_region_ids(&self, py: Python<'_>) -> Vec<u64> {
        self.regions(py).iter().map(|r| r.region_id).collect()
    }
    fn get_first_region_id(&self, py: Python<'_>) -> Option<u64> {
        self.regions(py).first().map(|r| r.region_id)
    }
    fn get_chunk_size(&self) -> u64 {
        self.handler.chunk_size()
    }
    fn is_owned(&self, py: Python<'_>, region_id: u64) -> bool {
        self.regions(py).iter().any(|r| r.region_id == region_id)
    }
    #[getter]
    fn is_full(&self, py: Python<'_>) -> bool {
        self.regions(py).iter().all(|r| r.free_pages == 0)
    }
    fn get_first_allocator(&self, py: Python<'_>) -> Option<PagedMemoryAllocator> {
        self.get_first_region_id(py)
            .map(|region_id| PagedMemoryAllocator {
                handler: self.handler.clone(),
                region_id,
            })
    }
    fn get_stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        store_regions_dict(py, &self.regions(py))
    }
    fn __repr__(&self, py: Python<'_>) -> String {
        format!("OwnedRegionManager(regions={:?})", self.get_region_ids(py))
    }
}
