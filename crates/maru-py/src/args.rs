//! The arguments of the Python API, checked at the call: every refusal is an
//! `InvalidArgumentError` (or `InvalidKeyError`) whose message names the call and the
//! argument, and no call silently drops an argument it was given.

use std::borrow::Cow;

use maru_client::{MaruConfig, PageId};
use maru_proto::MAX_KEY_LEN;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyInt, PyList, PyString, PyTuple};

use crate::buffer::RawBuf;
use crate::errors::{invalid, invalid_key};
use crate::types::{AllocHandle, MemoryInfo};

/// The type name of `obj`, for messages.
fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map_or_else(|_| "?".to_owned(), |n| n.to_string())
}

/// A key as bytes: `str` (UTF-8), `bytes`, or `int` (its decimal string, so `key=12345`
/// works as in the documented examples); not empty and at most `MAX_KEY_LEN` bytes.
pub fn key_bytes<'a>(obj: &'a Bound<'_, PyAny>) -> PyResult<Cow<'a, [u8]>> {
    // SAFETY: `obj` is borrowed for 'a, and the reference it stands for keeps the object alive
    // for that long.
    unsafe { key_of(obj) }
}

/// [`key_bytes`] of `obj`, with the bytes of a `str` or `bytes` borrowed for `'a` (no copy):
/// a str's UTF-8 form and a bytes object's bytes never change and live as long as the object.
///
/// # Safety
/// Something must keep `obj` alive for `'a` (a reference the caller holds, or a tuple holding
/// it).
unsafe fn key_of<'a>(obj: &Bound<'_, PyAny>) -> PyResult<Cow<'a, [u8]>> {
    // The exact types first: a type-pointer comparison, where the subclass checks are calls
    // into the interpreter.
    let borrowed = if let Ok(s) = obj.cast_exact::<PyString>() {
        Some(s.to_str()?.as_bytes())
    } else if let Ok(b) = obj.cast_exact::<PyBytes>() {
        Some(b.as_bytes())
    } else if let Ok(s) = obj.cast::<PyString>() {
        Some(s.to_str()?.as_bytes())
    } else if let Ok(b) = obj.cast::<PyBytes>() {
        Some(b.as_bytes())
    } else {
        None
    };
    let key: Cow<'a, [u8]> = match borrowed {
        // SAFETY: the bytes belong to the object (its UTF-8 form or its bytes), which the
        // caller keeps alive for 'a and which never changes them.
        Some(b) => Cow::Borrowed(unsafe { std::slice::from_raw_parts(b.as_ptr(), b.len()) }),
        None if obj.is_instance_of::<PyInt>() && !obj.is_instance_of::<PyBool>() => {
            Cow::Owned(obj.str()?.to_str()?.as_bytes().to_vec())
        }
        None => {
            return Err(invalid_key(format!(
                "key must be str, bytes or int, not {}",
                type_name(obj)
            )))
        }
    };
    if key.is_empty() {
        return Err(invalid_key("key must not be empty"));
    }
    if key.len() > MAX_KEY_LEN {
        return Err(invalid_key(format!(
            "key of {} bytes is longer than the limit of {MAX_KEY_LEN} bytes",
            key.len()
        )));
    }
    Ok(key)
}

/// The items of an iterable as a tuple: a tuple as it is, a list in one C call, anything else
/// by iterating it; what is not iterable is the InvalidArgumentError "`what`, not <type>". A
/// tuple holds a strong reference to every item and none can be replaced, so what is borrowed
/// from its items stays valid while it lives, also while the GIL is released and other
/// threads change the caller's list.
pub fn items<'py>(obj: &Bound<'py, PyAny>, what: &str) -> PyResult<Bound<'py, PyTuple>> {
    if let Ok(t) = obj.cast::<PyTuple>() {
        return Ok(t.clone());
    }
    if let Ok(l) = obj.cast_exact::<PyList>() {
        return Ok(l.to_tuple());
    }
    let iter = obj
        .try_iter()
        .map_err(|_| invalid(format!("{what}, not {}", type_name(obj))))?;
    PyTuple::new(obj.py(), iter.collect::<PyResult<Vec<_>>>()?)
}

/// `f` of the keys of an iterable, borrowed from their objects: no copy and no allocation per
/// key (a call answered from the key index costs less than an allocation per key). The keys
/// stay valid inside `f` also if it releases the GIL.
pub fn with_keys<T>(
    keys: &Bound<'_, PyAny>,
    f: impl FnOnce(&[&[u8]]) -> PyResult<T>,
) -> PyResult<T> {
    let tuple = items(keys, "keys must be an iterable of keys")?;
    let mut owned: Vec<Cow<'_, [u8]>> = Vec::with_capacity(tuple.len());
    for i in 0..tuple.len() {
        let item = tuple.get_borrowed_item(i)?;
        // SAFETY: `tuple` holds a strong reference to its item and outlives `owned` (declared
        // after it, so dropped first), and nothing borrowed from `owned` leaves this function.
        owned.push(unsafe { key_of(&item) }?);
    }
    let refs: Vec<&[u8]> = owned.iter().map(|k| k.as_ref()).collect();
    f(&refs)
}

/// Region, page and size of an `AllocHandle` passed as `what` (ours, or any object with
/// those attributes: integrations build handles from a region id and page index to free
/// them).
pub fn page_of(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<(PageId, u64)> {
    if let Ok(h) = obj.cast::<AllocHandle>() {
        let h = h.borrow();
        let page = PageId {
            region_id: h.region_id,
            page_index: h.page_index,
        };
        return Ok((page, h.size));
    }
    let not_a_handle = || {
        invalid(format!(
            "{what} must be an AllocHandle from alloc() (or an object with region_id and \
             page_index), not {}",
            if obj.is_none() {
                "None".to_owned()
            } else {
                type_name(obj)
            }
        ))
    };
    let get = |a: &str, b: &str| -> Option<PyResult<u64>> {
        let v = obj.getattr(a).or_else(|_| obj.getattr(b)).ok()?;
        Some(
            v.extract::<u64>()
                .map_err(|_| invalid(format!("{what}.{a} must be a non-negative int, got {v}"))),
        )
    };
    let region_id = get("region_id", "_region_id").ok_or_else(not_a_handle)??;
    let page_index = get("page_index", "_page_index").ok_or_else(not_a_handle)??;
    let size = get("size", "_size").transpose()?.unwrap_or(0);
    Ok((
        PageId {
            region_id,
            page_index,
        },
        size,
    ))
}

/// The object whose bytes to store: a MemoryInfo's view, or the object itself.
pub fn data_object<'py>(obj: &Bound<'py, PyAny>) -> Bound<'py, PyAny> {
    match obj.cast::<MemoryInfo>() {
        Ok(info) => info.borrow().view.bind(obj.py()).clone(),
        Err(_) => obj.clone(),
    }
}

/// The bytes of `obj`, passed as `what` (any object with the buffer protocol, or a
/// MemoryInfo).
pub fn buffer(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<RawBuf> {
    RawBuf::get(&data_object(obj)).map_err(|_| {
        invalid(format!(
            "{what} must be a MemoryInfo or an object with the buffer protocol (bytes, \
             memoryview, …), not {}",
            type_name(obj)
        ))
    })
}

/// A destination buffer of a copy-out read.
pub fn writable(obj: &Bound<'_, PyAny>) -> PyResult<RawBuf> {
    RawBuf::get_writable(obj).map_err(|_| not_writable(obj, "the buffer"))
}

/// The refusal of `obj`, passed as `what`, as a destination of a copy.
pub fn not_writable(obj: &Bound<'_, PyAny>, what: &str) -> PyErr {
    invalid(format!(
        "{what} must be a writable object with the buffer protocol (bytearray, numpy array, \
         …), not {}",
        type_name(obj)
    ))
}

/// `alloc(size)`: an int from 1 to the chunk size.
pub fn alloc_size(obj: &Bound<'_, PyAny>, chunk: u64) -> PyResult<u64> {
    if !obj.is_instance_of::<PyInt>() || obj.is_instance_of::<PyBool>() {
        return Err(invalid(format!(
            "alloc: size must be an int, not {}",
            type_name(obj)
        )));
    }
    match obj.extract::<u64>() {
        Ok(size) if (1..=chunk).contains(&size) => Ok(size),
        _ => Err(invalid(format!(
            "alloc: size must be from 1 to the chunk size ({chunk} bytes), got {obj}"
        ))),
    }
}

/// What `store` was asked to store.
pub enum StoreSource {
    /// A page from alloc(), registered as written (zero copy).
    Page(PageId, u64),
    /// Bytes to copy into a fresh page, after an optional prefix.
    Copy {
        data: RawBuf,
        prefix: Option<RawBuf>,
    },
}

/// `store(key, info, prefix, *, data, handle)`: exactly one of `info`, `data` and `handle`
/// (an AllocHandle passed as `info` is a handle); `prefix` only with copied bytes; something
/// to store.
pub fn store_source(
    info: Option<Bound<'_, PyAny>>,
    prefix: Option<Bound<'_, PyAny>>,
    data: Option<Bound<'_, PyAny>>,
    handle: Option<Bound<'_, PyAny>>,
) -> PyResult<StoreSource> {
    let given = [("info", &info), ("data", &data), ("handle", &handle)]
        .iter()
        .filter(|(_, v)| v.is_some())
        .map(|(n, _)| *n)
        .collect::<Vec<_>>();
    if given.len() > 1 {
        return Err(invalid(format!(
            "store: pass one of info, data or handle, not {}",
            given.join(" and ")
        )));
    }
    let handle = handle.or_else(|| info.clone().filter(|i| i.is_instance_of::<AllocHandle>()));
    if let Some(handle) = handle {
        if prefix.is_some() {
            return Err(invalid(
                "store: prefix is copied in front of data; a handle's page is stored as \
                 written, so pass the prefix with data, or write it into handle.buf",
            ));
        }
        let (page, size) = page_of(&handle, "store: handle")?;
        return Ok(StoreSource::Page(page, size));
    }
    let Some(src) = data.or(info) else {
        return Err(invalid("store: needs data, info or handle"));
    };
    let data = buffer(&src, "store: data")?;
    let prefix = prefix.map(|p| buffer(&p, "store: prefix")).transpose()?;
    let len = data.as_slice().len() + prefix.as_ref().map_or(0, |p| p.as_slice().len());
    if len == 0 {
        return Err(invalid(
            "store: data is empty (a value has at least 1 byte)",
        ));
    }
    Ok(StoreSource::Copy { data, prefix })
}

/// An optional argument, with an explicit None treated as absent.
pub fn some<'py>(o: Option<&Bound<'py, PyAny>>) -> Option<Bound<'py, PyAny>> {
    o.filter(|x| !x.is_none()).cloned()
}

fn attr<'py, T: for<'a> FromPyObject<'a, 'py>>(obj: &Bound<'py, PyAny>, name: &str) -> PyResult<T> {
    let v = obj
        .getattr(name)
        .map_err(|_| invalid(format!("config has no {name} (pass a maru.MaruConfig)")))?;
    v.extract::<T>().map_err(|e| {
        invalid(format!(
            "config.{name}: invalid value {v}: {}",
            Into::<PyErr>::into(e)
        ))
    })
}

/// Reads a `maru.MaruConfig` (or any object with its attributes) into the Rust config.
pub fn read_config(obj: &Bound<'_, PyAny>) -> PyResult<MaruConfig> {
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
    // Maru's own fields: a configuration object of the original Maru does not have them.
    if obj.hasattr("busy_poll")? {
        c.busy_poll = attr(obj, "busy_poll")?;
    }
    if obj.hasattr("write_behind")? {
        c.write_behind = attr(obj, "write_behind")?;
    }
    if obj.hasattr("namespace")? {
        c.namespace = attr(obj, "namespace")?;
    }
    if obj.hasattr("reconnect_after_fork")? {
        c.reconnect_after_fork = attr(obj, "reconnect_after_fork")?;
    }
    if obj.hasattr("secret_file")? {
        c.secret_file = attr(obj, "secret_file")?;
    }
    if obj.hasattr("pool_path")? {
        c.pool_path = attr(obj, "pool_path")?;
    }
    if let Ok(us) = std::env::var("MARU_REPLY_GRACE_US") {
        let us: u64 = us
            .trim()
            .parse()
            .map_err(|_| invalid(format!("MARU_REPLY_GRACE_US={us:?} is not a number")))?;
        c.reply_grace = std::time::Duration::from_micros(us);
    }
    Ok(c)
}
