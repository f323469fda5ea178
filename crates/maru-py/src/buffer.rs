//! Buffers in both directions: [`ShmBuffer`] exports a piece of a mapping to Python (what
//! `handle.buf` and `retrieve(...).view` are memoryviews of), and [`RawBuf`] borrows the bytes
//! of any Python buffer (bytes, bytearray, memoryview, numpy/torch) for a copy in.

use std::ffi::c_int;
use std::mem::MaybeUninit;
use std::os::raw::{c_char, c_void};
use std::sync::{Arc, Mutex};

use maru_client::View;
use pyo3::exceptions::PyBufferError;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::PyMemoryView;

/// Exporter of one view. It owns a [`View`], hence an `Arc` of the mapping: as long as any
/// memoryview made from it lives, the memory stays mapped — even after the handler's
/// `close()`, which only drops the handler's own references.
#[pyclass(module = "maru._maru", frozen)]
pub struct ShmBuffer {
    view: View,
    /// Exports the whole mapping `view` points into instead of `view`'s own bytes (the
    /// region-wide exporter that `batch_retrieve`'s views are slices of).
    whole: bool,
    /// The other views whose pages the exported memory shows (a region-wide exporter's
    /// slices): their page holds last as long as the exporter, i.e. until the last buffer
    /// over any of its slices is released.
    held: Mutex<Vec<View>>,
}

impl ShmBuffer {
    /// Address, length and offset (in the region) of the exported bytes.
    fn range(&self) -> (*const u8, usize, usize) {
        if self.whole {
            let m = self.view.mapping();
            (m.as_ptr() as *const u8, m.len(), 0)
        } else {
            (self.view.as_ptr(), self.view.len(), self.view.offset())
        }
    }
}

#[pymethods]
impl ShmBuffer {
    /// # Safety
    /// Called by CPython with a valid, writable `Py_buffer` (the buffer protocol's contract).
    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        if view.is_null() {
            return Err(PyBufferError::new_err("null Py_buffer"));
        }
        let me = slf.get();
        let writable = me.view.is_writable();
        if flags & ffi::PyBUF_WRITABLE == ffi::PyBUF_WRITABLE && !writable {
            return Err(PyBufferError::new_err(
                "this view is read-only: it points into another instance's region",
            ));
        }
        let (ptr, len, _) = me.range();
        // SAFETY: `view` is non-null and CPython hands us a Py_buffer to fill. `obj` takes a
        // new reference to the exporter, which keeps `me.view` (and its mapping) alive until
        // PyBuffer_Release. `buf`/`len` describe memory inside that mapping (the client
        // checked the range). `shape`/`strides` point into the Py_buffer itself, which the
        // consumer keeps in place while the buffer is exported (as CPython's own exporters do).
        // The format string is a static C string, so nothing needs freeing on release.
        unsafe {
            (*view).obj = slf.into_any().into_ptr();
            (*view).buf = ptr as *mut c_void;
            (*view).len = len as ffi::Py_ssize_t;
            (*view).readonly = c_int::from(!writable);
            (*view).itemsize = 1;
            (*view).format = if flags & ffi::PyBUF_FORMAT == ffi::PyBUF_FORMAT {
                c"B".as_ptr() as *mut c_char
            } else {
                std::ptr::null_mut()
            };
            (*view).ndim = 1;
            (*view).shape = if flags & ffi::PyBUF_ND == ffi::PyBUF_ND {
                &mut (*view).len
            } else {
                std::ptr::null_mut()
            };
            (*view).strides = if flags & ffi::PyBUF_STRIDES == ffi::PyBUF_STRIDES {
                &mut (*view).itemsize
            } else {
                std::ptr::null_mut()
            };
            (*view).suboffsets = std::ptr::null_mut();
            (*view).internal = std::ptr::null_mut();
        }
        Ok(())
    }

    /// # Safety
    /// Called by CPython for a buffer this object exported. Nothing was allocated per export.
    unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {}

    fn __len__(&self) -> usize {
        self.range().1
    }

    fn __repr__(&self) -> String {
        let (_, len, offset) = self.range();
        format!(
            "<maru._maru.ShmBuffer region={} offset={} len={} {}>",
            self.view.region_id(),
            offset,
            len,
            if self.view.is_writable() { "rw" } else { "ro" }
        )
    }
}

/// A `memoryview` over `view`, sized exactly to it (no Python-level slicing).
pub fn memoryview(py: Python<'_>, view: View) -> PyResult<Bound<'_, PyMemoryView>> {
    let exporter = Bound::new(
        py,
        ShmBuffer {
            view,
            whole: false,
            held: Mutex::new(Vec::new()),
        },
    )?;
    PyMemoryView::from(exporter.as_any())
}

/// Memoryviews for many views at once (`batch_retrieve`): one exporter and one region-wide
/// `memoryview` per distinct mapping, and for each view a slice of it made in C. A slice
/// shares its parent's managed buffer, so it keeps the exporter (hence the mapping) alive, and
/// has the same read-only flag, format 'B', one dimension and contiguity as a view of its own.
pub struct RegionViews<'py> {
    py: Python<'py>,
    /// One entry per distinct mapping (one per instance whose region a call touches), so a
    /// scan with the last hit first is enough.
    regions: Vec<RegionEntry<'py>>,
    last: usize,
}

/// A mapping's region-wide memoryview, its exporter, and the views sliced from it since the
/// exporter last took them (under one lock of its list for the whole call).
struct RegionEntry<'py> {
    mapping: *const (),
    writable: bool,
    memoryview: Bound<'py, PyMemoryView>,
    exporter: Bound<'py, ShmBuffer>,
    sliced: Vec<View>,
}

impl<'py> RegionViews<'py> {
    pub fn new(py: Python<'py>) -> Self {
        RegionViews {
            py,
            regions: Vec::new(),
            last: 0,
        }
    }

    /// A memoryview of exactly `view`'s bytes.
    pub fn view(&mut self, view: View) -> PyResult<Bound<'py, PyAny>> {
        let key = (Arc::as_ptr(view.mapping()).cast::<()>(), view.is_writable());
        let hit = |r: &RegionEntry<'py>| (r.mapping, r.writable) == key;
        let (start, len) = (view.offset(), view.len());
        let i = if self.regions.get(self.last).is_some_and(hit) {
            self.last
        } else if let Some(i) = self.regions.iter().position(hit) {
            i
        } else {
            let exporter = Bound::new(
                self.py,
                ShmBuffer {
                    view,
                    whole: true,
                    held: Mutex::new(Vec::new()),
                },
            )?;
            let memoryview = PyMemoryView::from(exporter.as_any())?;
            self.regions.push(RegionEntry {
                mapping: key.0,
                writable: key.1,
                memoryview,
                exporter,
                sliced: Vec::new(),
            });
            self.last = self.regions.len() - 1;
            return self.slice(self.last, start, len);
        };
        self.last = i;
        self.regions[i].sliced.push(view);
        self.slice(i, start, len)
    }

    fn slice(&self, i: usize, start: usize, len: usize) -> PyResult<Bound<'py, PyAny>> {
        let mv = &self.regions[i].memoryview;
        // The client checked offset + len against the mapping, which the parent covers.
        let (lo, hi) = (
            ffi::Py_ssize_t::try_from(start),
            ffi::Py_ssize_t::try_from(start + len),
        );
        let (Ok(lo), Ok(hi)) = (lo, hi) else {
            return Err(PyBufferError::new_err("view out of range"));
        };
        // SAFETY: `mv` is a live memoryview (we hold the GIL through the Bound);
        // PySequence_GetSlice returns a new reference or NULL with an exception set.
        unsafe {
            Bound::from_owned_ptr_or_err(self.py, ffi::PySequence_GetSlice(mv.as_ptr(), lo, hi))
        }
    }
}

impl Drop for RegionViews<'_> {
    /// Each exporter keeps the views sliced from it (they hold their pages) for as long as
    /// any memoryview over it lives.
    fn drop(&mut self) {
        for r in &mut self.regions {
            if !r.sliced.is_empty() {
                r.exporter
                    .get()
                    .held
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .append(&mut r.sliced);
            }
        }
    }
}

/// The bytes of a Python buffer, borrowed (`PyBUF_SIMPLE`: C-contiguous, any item format) for
/// as long as this lives. Released on drop, which must happen with the GIL held (it is: these
/// are created and dropped in binding code that holds it; only the slice crosses into
/// GIL-released sections).
pub struct RawBuf {
    view: Box<ffi::Py_buffer>,
}

impl RawBuf {
    pub fn get(obj: &Bound<'_, PyAny>) -> PyResult<RawBuf> {
        let mut view: Box<MaybeUninit<ffi::Py_buffer>> = Box::new(MaybeUninit::zeroed());
        // SAFETY: `obj` is a live object (we hold the GIL through the Bound); `view` points to
        // writable storage for one Py_buffer. PyBUF_SIMPLE asks for a contiguous byte view;
        // exporters that cannot give one fail with an exception instead.
        let rc =
            unsafe { ffi::PyObject_GetBuffer(obj.as_ptr(), view.as_mut_ptr(), ffi::PyBUF_SIMPLE) };
        if rc != 0 {
            return Err(PyErr::fetch(obj.py()));
        }
        // SAFETY: PyObject_GetBuffer returned 0, so it filled the whole struct.
        let view = unsafe { Box::from_raw(Box::into_raw(view).cast::<ffi::Py_buffer>()) };
        Ok(RawBuf { view })
    }

    pub fn as_slice(&self) -> &[u8] {
        let len = usize::try_from(self.view.len).unwrap_or(0);
        if len == 0 || self.view.buf.is_null() {
            return &[];
        }
        // SAFETY: the exporter guarantees `len` contiguous bytes at `buf` for as long as the
        // buffer is held, i.e. until our drop. Other threads may write the memory meanwhile
        // (Python gives no exclusivity); we only ever copy these bytes out.
        unsafe { std::slice::from_raw_parts(self.view.buf as *const u8, len) }
    }
}

impl RawBuf {
    /// A writable contiguous byte view of `obj` (bytearray, writable memoryview, numpy or
    /// torch CPU tensor) for a copy out; read-only objects raise BufferError.
    pub fn get_writable(obj: &Bound<'_, PyAny>) -> PyResult<RawBuf> {
        let mut view: Box<MaybeUninit<ffi::Py_buffer>> = Box::new(MaybeUninit::zeroed());
        // SAFETY: as in `get`; PyBUF_WRITABLE makes read-only exporters refuse.
        let rc = unsafe {
            ffi::PyObject_GetBuffer(
                obj.as_ptr(),
                view.as_mut_ptr(),
                ffi::PyBUF_SIMPLE | ffi::PyBUF_WRITABLE,
            )
        };
        if rc != 0 {
            return Err(PyErr::fetch(obj.py()));
        }
        // SAFETY: PyObject_GetBuffer returned 0, so it filled the whole struct.
        let view = unsafe { Box::from_raw(Box::into_raw(view).cast::<ffi::Py_buffer>()) };
        Ok(RawBuf { view })
    }

    /// The bytes of a buffer from [`RawBuf::get_writable`], to copy into.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        let len = usize::try_from(self.view.len).unwrap_or(0);
        if len == 0 || self.view.buf.is_null() || self.view.readonly != 0 {
            return &mut [];
        }
        // SAFETY: the exporter guarantees `len` contiguous writable bytes at `buf` while the
        // buffer is held (until our drop); `&mut self` keeps this the only slice we make.
        unsafe { std::slice::from_raw_parts_mut(self.view.buf as *mut u8, len) }
    }
}

impl Drop for RawBuf {
    fn drop(&mut self) {
        Python::attach(|_| {
            // SAFETY: the buffer was obtained by PyObject_GetBuffer and is released once, with
            // the GIL held.
            unsafe { ffi::PyBuffer_Release(&mut *self.view) }
        });
    }
}

/// The writable buffers of many objects (`batch_retrieve_into`'s destinations): each acquired
/// once, all held in one allocation, all released when this drops. It holds the GIL token, so
/// it is dropped where the GIL is held (it cannot enter a GIL-released closure; only the
/// slices do).
pub struct WritableBufs<'py> {
    _py: Python<'py>,
    /// Filled in place and never grown past its capacity, so no `Py_buffer` moves while it is
    /// exported (an exporter may point into its own `Py_buffer`, as `ShmBuffer` does).
    views: Vec<ffi::Py_buffer>,
}

impl<'py> WritableBufs<'py> {
    /// The buffers of every item of `objs`; `refused(i, obj)` is the error of an item that has
    /// no writable contiguous buffer.
    pub fn get(
        objs: &Bound<'py, pyo3::types::PyTuple>,
        refused: impl Fn(usize, &Bound<'py, PyAny>) -> PyErr,
    ) -> PyResult<Self> {
        use pyo3::types::PyTupleMethods;
        let mut me = WritableBufs {
            _py: objs.py(),
            views: Vec::with_capacity(objs.len()),
        };
        for i in 0..objs.len() {
            let obj = objs.get_borrowed_item(i)?;
            let slot = me.views.spare_capacity_mut()[0].as_mut_ptr();
            // SAFETY: `obj` is alive (the tuple holds it) and we hold the GIL; `slot` is
            // writable storage for one Py_buffer inside the vector's capacity (i < capacity).
            let rc = unsafe {
                ffi::PyObject_GetBuffer(obj.as_ptr(), slot, ffi::PyBUF_SIMPLE | ffi::PyBUF_WRITABLE)
            };
            if rc != 0 {
                // The exporter's own reason is replaced by ours, which names the argument.
                drop(PyErr::fetch(objs.py()));
                return Err(refused(i, &obj));
            }
            // SAFETY: PyObject_GetBuffer returned 0, so it filled slot `len`; from here Drop
            // releases it.
            unsafe { me.views.set_len(me.views.len() + 1) };
        }
        Ok(me)
    }

    /// Every buffer's bytes, to copy into. Buffers that share bytes (views of one buffer
    /// given twice) are refused: two copies into one place would leave the earlier key's
    /// bytes overwritten by the later one's with no error, and two `&mut` slices of one
    /// memory are not allowed to exist.
    pub fn slices(&mut self, what: &str) -> PyResult<Vec<&mut [u8]>> {
        if let Some((a, b)) = self.overlapping() {
            return Err(crate::errors::invalid(format!(
                "{what}: buffers[{a}] and buffers[{b}] share memory; each key needs a buffer \
                 of its own"
            )));
        }
        Ok(self.writable_slices())
    }

    /// Two buffers whose bytes overlap, if any. Destinations usually come in address order
    /// (slices of one big buffer), which one pass confirms; other orders are sorted first.
    fn overlapping(&self) -> Option<(usize, usize)> {
        let mut ranges: Vec<(usize, usize, usize)> = self
            .views
            .iter()
            .enumerate()
            .filter(|(_, v)| v.len > 0 && !v.buf.is_null())
            .map(|(i, v)| (v.buf as usize, v.buf as usize + v.len as usize, i))
            .collect();
        if !ranges.is_sorted_by_key(|r| r.0) {
            ranges.sort_unstable_by_key(|r| r.0);
        }
        ranges
            .windows(2)
            .find(|w| w[1].0 < w[0].1)
            .map(|w| (w[0].2.min(w[1].2), w[0].2.max(w[1].2)))
    }

    fn writable_slices(&mut self) -> Vec<&mut [u8]> {
        self.views
            .iter_mut()
            .map(|v| {
                let len = usize::try_from(v.len).unwrap_or(0);
                if len == 0 || v.buf.is_null() || v.readonly != 0 {
                    return &mut [][..];
                }
                // SAFETY: the exporter guarantees `len` contiguous writable bytes at `buf`
                // while the buffer is held (until our drop); `&mut self` keeps these the only
                // slices we make of them, and `slices` refused overlapping buffers. Another
                // thread may still write the bytes (Python gives no exclusivity): the copies
                // only ever store into them.
                unsafe { std::slice::from_raw_parts_mut(v.buf as *mut u8, len) }
            })
            .collect()
    }
}

impl Drop for WritableBufs<'_> {
    fn drop(&mut self) {
        for v in &mut self.views {
            // SAFETY: each view was filled by PyObject_GetBuffer and is released once; the
            // GIL is held (this value holds its token).
            unsafe { ffi::PyBuffer_Release(v) };
        }
    }
}
