//! Hand-written encoders for the replies that carry region descriptions (lookup, batch
//! lookup, get/list regions).
//!
//! Why not `encode_response`: it takes an owned [`Response`], which would mean cloning a
//! region's strings (pool path, owner, mapping path) on every lookup, three allocations on
//! the hottest path there is. Instead each region's wire form is encoded once when the region
//! is created, and these functions splice it into replies. The layouts are the protocol's
//! (`maru_proto`'s response encodings); `tests` below decode every one of them with the real
//! decoder and compare against `encode_response` so the two cannot drift apart.

use maru_proto::{
    encode_error, encode_response, msg_type, ErrorCode, Header, RegionInfo, Response, WireError,
    FLAG_RESPONSE, HEADER_LEN, MAX_FRAME,
};

/// The payload of a `Response::Region` for `info`, i.e. the protocol's region encoding.
/// `None` when it does not fit a frame (pathologically long strings).
pub(crate) fn region_wire(info: &RegionInfo) -> Option<Box<[u8]>> {
    let mut buf = Vec::new();
    encode_response(&mut buf, 0, &Response::Region(info.clone())).ok()?;
    Some(buf[HEADER_LEN..].into())
}

/// An in-progress reply frame at the end of a buffer that may already hold earlier replies.
pub(crate) struct Reply<'a> {
    buf: &'a mut Vec<u8>,
    start: usize,
    msg_type: u16,
    request_id: u64,
}

impl<'a> Reply<'a> {
    pub fn begin(buf: &'a mut Vec<u8>, msg_type: u16, request_id: u64) -> Self {
        let start = buf.len();
        buf.extend_from_slice(&[0; HEADER_LEN]);
        Reply {
            buf,
            start,
            msg_type,
            request_id,
        }
    }

    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.push(v);
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn raw(&mut self, v: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(v);
        self
    }
    /// A count, then each of `wires` (regions' wire forms) as it is.
    pub fn wires<'w>(&mut self, wires: impl ExactSizeIterator<Item = &'w [u8]>) -> &mut Self {
        self.u32(wires.len() as u32);
        for wire in wires {
            self.raw(wire);
        }
        self
    }
    /// An optional value: `0`, or `1` followed by what `some` writes of it.
    pub fn option<T>(&mut self, v: Option<T>, some: impl FnOnce(&mut Self, T)) -> &mut Self {
        match v {
            Some(v) => {
                self.u8(1);
                some(self, v);
            }
            None => {
                self.u8(0);
            }
        }
        self
    }

    /// Writes the header. A payload over the frame limit is replaced by an error reply, so
    /// the peer always gets an answer it can decode.
    pub fn finish(self) {
        let len = self.buf.len() - self.start - HEADER_LEN;
        if len > MAX_FRAME as usize {
            self.buf.truncate(self.start);
            encode_error(
                self.buf,
                self.request_id,
                &WireError::new(
                    ErrorCode::FrameTooLarge,
                    format!("reply of {len} bytes exceeds the frame limit of {MAX_FRAME}"),
                ),
            );
            return;
        }
        let header = Header::new(self.msg_type, FLAG_RESPONSE, self.request_id, len as u32);
        self.buf[self.start..self.start + HEADER_LEN].copy_from_slice(&header.encode());
    }
}

/// `Response::Region`.
pub(crate) fn region(buf: &mut Vec<u8>, request_id: u64, wire: &[u8]) {
    let mut r = Reply::begin(buf, msg_type::R_REGION, request_id);
    r.raw(wire);
    r.finish();
}

/// `Response::Lookup`: `found` is the region's wire form, offset, length and generation.
pub(crate) fn lookup(buf: &mut Vec<u8>, request_id: u64, found: Option<(&[u8], u64, u64, u64)>) {
    let mut r = Reply::begin(buf, msg_type::R_LOOKUP, request_id);
    r.option(found, |r, (wire, offset, len, generation)| {
        r.raw(wire).u64(offset).u64(len).u64(generation);
    });
    r.finish();
}

/// `Response::BatchLookup` from a deduplicated region table and per-key slots
/// `(region_index, offset, len, generation)`. Both lists are at most
/// [`MAX_BATCH`](maru_proto::MAX_BATCH) long (callers pass one entry per key of a decoded
/// batch, and at most one region per entry).
pub(crate) fn batch_lookup<'w>(
    buf: &mut Vec<u8>,
    request_id: u64,
    regions: impl ExactSizeIterator<Item = &'w [u8]>,
    entries: &[Option<(u32, u64, u64, u64)>],
) {
    let mut r = Reply::begin(buf, msg_type::R_BATCH_LOOKUP, request_id);
    r.wires(regions);
    r.u32(entries.len() as u32);
    for e in entries {
        r.option(*e, |r, (index, offset, len, generation)| {
            r.u32(index).u64(offset).u64(len).u64(generation);
        });
    }
    r.finish();
}

/// `Response::Regions`; more regions than a batch may carry is an error reply.
pub(crate) fn regions<'w>(
    buf: &mut Vec<u8>,
    request_id: u64,
    regions: impl ExactSizeIterator<Item = &'w [u8]>,
) {
    if let Err(e) = WireError::check_listing(regions.len(), "live regions", "stats") {
        encode_error(buf, request_id, &e);
        return;
    }
    let mut r = Reply::begin(buf, msg_type::R_REGIONS, request_id);
    r.wires(regions);
    r.finish();
}

#[cfg(test)]
mod tests {
    use super::*;
    use maru_proto::{decode_frame, Access, Body, Handle, Location, Slot, MAX_BATCH};

    fn info(id: u64, path: &str) -> RegionInfo {
        RegionInfo {
            handle: Handle {
                region_id: id,
                pool: path.into(),
                offset: id * 4096,
                len: 1 << 20,
                owner: "host:1".into(),
                token: [id as u8; 32],
            },
            access: Access {
                path: path.into(),
                offset: id * 4096,
                len: 1 << 20,
                page_size: 4096,
                pool_uuid: [0; 16],
            },
        }
    }

    fn same(fast: Vec<u8>, slow: &Response) {
        let mut expected = Vec::new();
        encode_response(&mut expected, 9, slow).unwrap();
        assert_eq!(fast, expected);
        let frame = decode_frame(&fast).unwrap();
        assert_eq!(frame.body, Body::Response(slow.clone()));
    }

    #[test]
    fn fast_replies_are_byte_identical_to_the_codec() {
        let a = info(1, "/dev/shm/a");
        let b = info(2, "/dev/shm/bb");
        let (wa, wb) = (region_wire(&a).unwrap(), region_wire(&b).unwrap());

        let mut buf = Vec::new();
        region(&mut buf, 9, &wa);
        same(buf, &Response::Region(a.clone()));

        let mut buf = Vec::new();
        lookup(&mut buf, 9, Some((&wb, 8192, 77, 12)));
        same(
            buf,
            &Response::Lookup(Some(Location {
                region: b.clone(),
                offset: 8192,
                len: 77,
                generation: 12,
            })),
        );
        let mut buf = Vec::new();
        lookup(&mut buf, 9, None);
        same(buf, &Response::Lookup(None));

        let mut buf = Vec::new();
        let entries = [Some((1, 0, 5, 8)), None, Some((0, 4096, 6, 9))];
        batch_lookup(&mut buf, 9, [&wa[..], &wb[..]].into_iter(), &entries);
        same(
            buf,
            &Response::BatchLookup {
                regions: vec![a.clone(), b.clone()],
                entries: entries
                    .iter()
                    .map(|e| {
                        e.map(|(region_index, offset, len, generation)| Slot {
                            region_index,
                            offset,
                            len,
                            generation,
                        })
                    })
                    .collect(),
            },
        );

        let mut buf = Vec::new();
        regions(&mut buf, 9, [&wa[..], &wb[..]].into_iter());
        same(buf, &Response::Regions(vec![a, b]));
    }

    #[test]
    fn oversized_replies_become_errors() {
        let wire = vec![0u8; 1024];
        let many: Vec<&[u8]> = (0..MAX_BATCH + 1).map(|_| &wire[..]).collect();
        let mut buf = Vec::new();
        regions(&mut buf, 3, many.into_iter());
        let frame = decode_frame(&buf).unwrap();
        assert!(matches!(
            frame.body,
            Body::Response(Response::Error(WireError {
                code: ErrorCode::BatchTooLarge,
                ..
            }))
        ));

        let big = vec![0u8; MAX_FRAME as usize / 2 + 1];
        let mut buf = vec![1, 2, 3];
        batch_lookup(&mut buf, 4, [&big[..], &big[..]].into_iter(), &[]);
        assert_eq!(&buf[..3], &[1, 2, 3], "earlier replies are kept");
        let frame = decode_frame(&buf[3..]).unwrap();
        assert_eq!(frame.header.request_id, 4);
        assert!(matches!(
            frame.body,
            Body::Response(Response::Error(WireError {
                code: ErrorCode::FrameTooLarge,
                ..
            }))
        ));
    }
}
