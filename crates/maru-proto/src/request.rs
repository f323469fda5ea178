//! Request encodings. Requests borrow keys and strings from the frame they were decoded
//! from (no copy per key on the server's hot path).

use crate::catalog::{decode_request_payload, Request};
use crate::codec::{Reader, Writer};
use crate::error::{DecodeError, EncodeError};
use crate::frame::{check_version, encode_with};
use crate::header::Header;
use crate::types::{
    get_entry, put_entry, put_handle, put_ids, put_key_counts, put_keys, put_pages,
    put_resume_holds, Hello, RegisterEntry, Role, MIN_KEY,
};

/// Appends a request frame to `buf`. On error `buf` is left as it was.
pub fn encode_request(
    buf: &mut Vec<u8>,
    request_id: u64,
    req: &Request,
) -> Result<(), EncodeError> {
    encode_with(buf, req.msg_type(), 0, request_id, |w| {
        encode_request_payload(w, req)
    })
}

/// Decodes a request payload whose header was already read.
pub fn decode_request<'a>(header: &Header, payload: &'a [u8]) -> Result<Request<'a>, DecodeError> {
    check_version(header)?;
    if header.is_response() {
        return Err(DecodeError::BadHeader(
            "response where a request was expected",
        ));
    }
    let mut r = Reader::new(payload);
    let req = decode_request_payload(header.msg_type, &mut r)?;
    r.finish()?;
    Ok(req)
}

fn encode_request_payload(w: &mut Writer, req: &Request) -> Result<(), EncodeError> {
    match req {
        Request::Hello(h) => put_hello(w, h)?,
        Request::Resume {
            hello,
            regions,
            pins,
            holds,
        } => {
            put_hello(w, hello)?;
            put_ids(w, regions)?;
            put_key_counts(w, pins)?;
            put_resume_holds(w, holds)?;
        }
        Request::Heartbeat
        | Request::Goodbye
        | Request::RmStats
        | Request::RmList
        | Request::ListAllocations
        | Request::Stats
        | Request::ListRegions
        | Request::RenewPins
        | Request::Watch => {}
        Request::ReleaseHolds { pages } => put_pages(w, pages)?,
        Request::PageCurrent { page, generation } => {
            w.u64(page.region_id);
            w.u64(page.offset);
            w.u64(*generation);
        }
        Request::RmAlloc { size, pool } => {
            w.u64(*size);
            match pool {
                Some(p) => {
                    w.bool(true);
                    w.str(p)?;
                }
                None => w.bool(false),
            }
        }
        Request::RmFree { handle } | Request::RmGetAccess { handle } => put_handle(w, handle)?,
        Request::RequestRegion { size } => w.u64(*size),
        Request::Descriptor {
            region_id,
            writable,
        } => {
            w.u64(*region_id);
            w.bool(*writable);
        }
        Request::MakeRoom { pages } => w.u32(*pages),
        Request::Ahead { in_us } => w.u32(*in_us),
        Request::ReturnRegion { region_id }
        | Request::GetRegion { region_id }
        | Request::GiveBack { region_id } => w.u64(*region_id),
        Request::Register(e) => put_entry(w, e)?,
        Request::BatchRegister(entries) => {
            w.count(entries.len())?;
            for e in entries {
                put_entry(w, e)?;
            }
        }
        Request::Lookup { key }
        | Request::Exists { key }
        | Request::Delete { key }
        | Request::Pin { key }
        | Request::Unpin { key } => w.key(key)?,
        Request::BatchLookup { keys }
        | Request::BatchExists { keys }
        | Request::BatchDelete { keys }
        | Request::BatchPin { keys }
        | Request::BatchUnpin { keys }
        | Request::Touch { keys } => put_keys(w, keys)?,
        Request::Hit { hits } => put_key_counts(w, hits)?,
    }
    Ok(())
}

fn put_hello(w: &mut Writer, h: &Hello) -> Result<(), EncodeError> {
    w.u8(h.role as u8);
    w.str(h.instance_id)?;
    w.str(h.host)?;
    w.u32(h.pid);
    w.u64(h.start_time);
    match &h.session_token {
        Some(t) => {
            w.bool(true);
            w.raw(t);
        }
        None => w.bool(false),
    }
    w.str(h.namespace)?;
    Ok(())
}

pub(crate) fn get_hello<'a>(r: &mut Reader<'a>) -> Result<Hello<'a>, DecodeError> {
    Ok(Hello {
        role: Role::from_u8(r.u8()?)?,
        instance_id: r.str()?,
        host: r.str()?,
        pid: r.u32()?,
        start_time: r.u64()?,
        session_token: if r.bool()? { Some(r.fixed()?) } else { None },
        namespace: {
            let ns = r.str()?;
            if ns.len() > crate::MAX_NAMESPACE_LEN {
                return Err(DecodeError::InvalidField("namespace"));
            }
            ns
        },
    })
}

pub(crate) fn get_optional_str<'a>(r: &mut Reader<'a>) -> Result<Option<&'a str>, DecodeError> {
    Ok(if r.bool()? { Some(r.str()?) } else { None })
}

pub(crate) fn get_entries<'a>(r: &mut Reader<'a>) -> Result<Vec<RegisterEntry<'a>>, DecodeError> {
    let n = r.count(MIN_KEY + 24)?;
    (0..n).map(|_| get_entry(r)).collect()
}
