//! Response encodings. Responses are owned (the client keeps region descriptions).

use crate::catalog::{decode_response_payload, Response};
use crate::codec::{Reader, Writer};
use crate::error::{DecodeError, EncodeError, ErrorCode, WireError};
use crate::frame::{check_version, encode_with};
use crate::header::{Header, FLAG_ERROR, FLAG_RESPONSE};
use crate::types::{
    delete_status, get_handle, get_region, put_access, put_handle, put_pages, put_region,
    DeleteStatus, HelloOk, Location, RegionInfo, RegionRecord, RmAllocation, Slot, MIN_HANDLE,
    MIN_REGION,
};

/// Appends a response frame to `buf`. On error `buf` is left as it was.
pub fn encode_response(
    buf: &mut Vec<u8>,
    request_id: u64,
    resp: &Response,
) -> Result<(), EncodeError> {
    let flags = match resp {
        Response::Error(_) => FLAG_RESPONSE | FLAG_ERROR,
        _ => FLAG_RESPONSE,
    };
    encode_with(buf, resp.msg_type(), flags, request_id, |w| {
        encode_response_payload(w, resp)
    })
}

/// Appends an error response. Never fails: the message is truncated to fit.
pub fn encode_error(buf: &mut Vec<u8>, request_id: u64, err: &WireError) {
    let resp = Response::Error(WireError {
        code: err.code,
        message: truncate_utf8(&err.message, crate::MAX_STRING_LEN).to_owned(),
    });
    encode_response(buf, request_id, &resp).expect("a truncated error always fits a frame");
}

/// Decodes a response payload whose header was already read.
pub fn decode_response(header: &Header, payload: &[u8]) -> Result<Response, DecodeError> {
    check_version(header)?;
    if !header.is_response() {
        return Err(DecodeError::BadHeader(
            "request where a response was expected",
        ));
    }
    let mut r = Reader::new(payload);
    let resp = decode_response_payload(header.msg_type, &mut r)?;
    r.finish()?;
    if matches!(resp, Response::Error(_)) != (header.flags & FLAG_ERROR != 0) {
        return Err(DecodeError::BadHeader(
            "error flag does not match the message",
        ));
    }
    Ok(resp)
}

fn encode_response_payload(w: &mut Writer, resp: &Response) -> Result<(), EncodeError> {
    match resp {
        Response::HelloOk(h) => put_hello_ok(w, h)?,
        Response::Resumed {
            refused,
            refused_pins,
            refused_holds,
            hello,
        } => {
            crate::types::put_ids(w, refused)?;
            crate::types::put_positions(w, refused_pins)?;
            crate::types::put_positions(w, refused_holds)?;
            put_hello_ok(w, hello)?;
        }
        Response::Ok => {}
        Response::Error(e) => {
            w.u16(e.code as u16);
            w.str(truncate_utf8(&e.message, crate::MAX_STRING_LEN))?;
        }
        Response::Handle(h) => put_handle(w, h)?,
        Response::Access(a) => put_access(w, a)?,
        Response::RmStats(json) | Response::Stats(json) => w.blob(json.as_bytes())?,
        Response::RmAllocations(list) => {
            w.count(list.len())?;
            for a in list {
                put_handle(w, &a.handle)?;
                w.str(&a.owner_host)?;
                w.u32(a.owner_pid);
                w.u64(a.owner_start_time);
                w.bool(a.connected);
            }
        }
        Response::Region(region) => put_region(w, region)?,
        Response::Descriptor {
            offset,
            len,
            writable,
        } => {
            w.u64(*offset);
            w.u64(*len);
            w.bool(*writable);
        }
        Response::Bool(b) => w.bool(*b),
        Response::Bools(v) => {
            w.count(v.len())?;
            for b in v {
                w.bool(*b);
            }
        }
        Response::Lookup(loc) => match loc {
            Some(l) => {
                w.bool(true);
                put_region(w, &l.region)?;
                w.u64(l.offset);
                w.u64(l.len);
                w.u64(l.generation);
            }
            None => w.bool(false),
        },
        Response::BatchLookup { regions, entries } => {
            w.count(regions.len())?;
            for region in regions {
                put_region(w, region)?;
            }
            w.count(entries.len())?;
            for e in entries {
                match e {
                    Some(s) => {
                        w.bool(true);
                        w.u32(s.region_index);
                        w.u64(s.offset);
                        w.u64(s.len);
                        w.u64(s.generation);
                    }
                    None => w.bool(false),
                }
            }
        }
        Response::Delete(s) => w.u8(*s as u8),
        Response::BatchDelete(v) => {
            w.count(v.len())?;
            for s in v {
                w.u8(*s as u8);
            }
        }
        Response::Allocations(list) => {
            w.count(list.len())?;
            for a in list {
                put_handle(w, &a.handle)?;
                w.str(&a.instance_id)?;
                w.u64(a.ref_count);
                w.bool(a.owner_connected);
            }
        }
        Response::Regions(list) => {
            w.count(list.len())?;
            for region in list {
                put_region(w, region)?;
            }
        }
        Response::ReturnPages(pages) => put_pages(w, pages)?,
        Response::Reclaim { region_id } => w.u64(*region_id),
    }
    Ok(())
}

fn put_hello_ok(w: &mut Writer, h: &HelloOk) -> Result<(), EncodeError> {
    w.str(&h.server)?;
    w.str(&h.hostname)?;
    w.raw(&h.session_token);
    if let Some(ix) = &h.index {
        w.str(&ix.path)?;
        w.u32(ix.namespace);
        if let Some(l) = &ix.lane {
            w.str(&l.path)?;
            w.u32(l.lane);
            w.u8(l.tag);
        }
    }
    Ok(())
}

pub(crate) fn get_hello_ok(r: &mut Reader) -> Result<HelloOk, DecodeError> {
    Ok(HelloOk {
        server: r.str()?.to_owned(),
        hostname: r.str()?.to_owned(),
        session_token: r.fixed()?,
        // A reply without the index fields is a daemon that keeps no index.
        index: if r.remaining() == 0 {
            None
        } else {
            Some(crate::IndexInfo {
                path: r.str()?.to_owned(),
                namespace: r.u32()?,
                // Without the lane fields: the server gives the session no lane.
                lane: if r.remaining() == 0 {
                    None
                } else {
                    Some(crate::LaneInfo {
                        path: r.str()?.to_owned(),
                        lane: r.u32()?,
                        tag: r.u8()?,
                    })
                },
            })
        },
    })
}

pub(crate) fn get_wire_error(r: &mut Reader) -> Result<WireError, DecodeError> {
    let raw = r.u16()?;
    let code = ErrorCode::from_u16(raw).ok_or(DecodeError::InvalidField("error code"))?;
    Ok(WireError {
        code,
        message: r.str()?.to_owned(),
    })
}

/// A statistics document.
pub(crate) fn get_json(r: &mut Reader) -> Result<String, DecodeError> {
    Ok(std::str::from_utf8(r.blob()?)
        .map_err(|_| DecodeError::InvalidField("utf-8 stats"))?
        .to_owned())
}

pub(crate) fn get_rm_allocations(r: &mut Reader) -> Result<Vec<RmAllocation>, DecodeError> {
    let n = r.count(MIN_HANDLE + 4 + 4 + 8 + 1)?;
    let mut list = Vec::with_capacity(n);
    for _ in 0..n {
        list.push(RmAllocation {
            handle: get_handle(r)?,
            owner_host: r.str()?.to_owned(),
            owner_pid: r.u32()?,
            owner_start_time: r.u64()?,
            connected: r.bool()?,
        });
    }
    Ok(list)
}

pub(crate) fn get_bools(r: &mut Reader) -> Result<Vec<bool>, DecodeError> {
    let n = r.count(1)?;
    (0..n).map(|_| r.bool()).collect()
}

pub(crate) fn get_location(r: &mut Reader) -> Result<Option<Location>, DecodeError> {
    if !r.bool()? {
        return Ok(None);
    }
    Ok(Some(Location {
        region: get_region(r)?,
        offset: r.u64()?,
        len: r.u64()?,
        generation: r.u64()?,
    }))
}

pub(crate) fn get_batch_lookup(r: &mut Reader) -> Result<Response, DecodeError> {
    let n = r.count(MIN_REGION)?;
    let regions = (0..n)
        .map(|_| get_region(r))
        .collect::<Result<Vec<_>, _>>()?;
    let m = r.count(1)?;
    let mut entries = Vec::with_capacity(m);
    for _ in 0..m {
        entries.push(if r.bool()? {
            let slot = Slot {
                region_index: r.u32()?,
                offset: r.u64()?,
                len: r.u64()?,
                generation: r.u64()?,
            };
            if slot.region_index as usize >= regions.len() {
                return Err(DecodeError::InvalidField("region index"));
            }
            Some(slot)
        } else {
            None
        });
    }
    Ok(Response::BatchLookup { regions, entries })
}

pub(crate) fn get_delete_statuses(r: &mut Reader) -> Result<Vec<DeleteStatus>, DecodeError> {
    let n = r.count(1)?;
    (0..n).map(|_| delete_status(r.u8()?)).collect()
}

pub(crate) fn get_region_records(r: &mut Reader) -> Result<Vec<RegionRecord>, DecodeError> {
    let n = r.count(MIN_HANDLE + 4 + 8 + 1)?;
    let mut list = Vec::with_capacity(n);
    for _ in 0..n {
        list.push(RegionRecord {
            handle: get_handle(r)?,
            instance_id: r.str()?.to_owned(),
            ref_count: r.u64()?,
            owner_connected: r.bool()?,
        });
    }
    Ok(list)
}

pub(crate) fn get_regions(r: &mut Reader) -> Result<Vec<RegionInfo>, DecodeError> {
    let n = r.count(MIN_REGION)?;
    (0..n).map(|_| get_region(r)).collect()
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}
