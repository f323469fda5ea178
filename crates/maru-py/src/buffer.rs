//! Buffers in both directions: [`ShmBuffer`] exports a piece of a mapping to Python (what
//! `handle.buf` and `retrieve(...).view` are memoryviews of), and [`RawBuf`] borrows the bytes
//! of any Python buffer (bytes, bytearray, memoryview, numpy/torch) for a copy in.

use std::ffi::c_int;
use std::mem::MaybeUninit;
use std::os::raw::{c_char, c_void};

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
        let ptr = me.view.as_ptr();
        let len = me.view.len();
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
        self.view.len()
    }

    fn __repr__(&self) -> String {
        format!(
            "<maru._maru.ShmBuffer region={} offset={} len={} {}>",
            self.view.region_id(),
            self.view.offset(),
            self.view.len(),
            if self.view.is_writable() { "rw" } else { "ro" }
        )
    }
}

/// A `memoryview` over `view`, sized exactly to it (no Python-level slicing).
pub fn memoryview(py: Python<'_>, view: View) -> PyResult<Bound<'_, PyMemoryView>> {
    let exporter = Bound::new(py, ShmBuffer { view })?;
    PyMemoryView::from(exporter.as_any())
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

impl Drop for RawBuf {
    fn drop(&mut self) {
        Python::attach(|_| {
            // SAFETY: the buffer was obtained by PyObject_GetBuffer and is released once, with
            // the GIL held.
            unsafe { ffi::PyBuffer_Release(&mut *self.view) }
        });
    }
}
