//! The exact bytes each operation puts on the wire, so its floor is a ping-pong of the same
//! sizes. Computed with the real codec from a real region description.

use maru_proto::{
    encode_request, encode_response, Access, DeleteStatus, Handle, Location, RegionInfo,
    RegisterEntry, Request, Response, Slot,
};

/// Request and reply bytes of one call, and how many calls the operation makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wire {
    pub req: usize,
    pub resp: usize,
    pub trips: u32,
}

fn sizes(req: &Request, resp: &Response) -> (usize, usize) {
    let (mut a, mut b) = (Vec::new(), Vec::new());
    // Encoding a well-formed message of bounded size cannot fail; 0 would only make a floor
    // smaller, never hide a cost.
    let _ = encode_request(&mut a, 1, req);
    let _ = encode_response(&mut b, 1, resp);
    (a.len(), b.len())
}

/// A region description shaped like the embedded server's (used when none could be read).
pub fn synthetic_region(pool_path: &str) -> RegionInfo {
    RegionInfo {
        handle: Handle {
            region_id: 1,
            pool: pool_path.to_owned(),
            offset: 0,
            len: 64 << 20,
            owner: format!(
                "{}:{}",
                maru_transport::local_identity().0,
                std::process::id()
            ),
            token: [0; maru_proto::TOKEN_LEN],
        },
        access: Access {
            path: pool_path.to_owned(),
            offset: 0,
            len: 64 << 20,
            page_size: 4096,
            pool_uuid: [0; 16],
        },
    }
}

/// Wire sizes of `op` over `batch` keys like `key`, for lookups answered with `region`.
/// `None` for operations that are not one request/reply (connect, …).
pub fn wire_of(op: &str, batch: usize, key: &[u8], region: &RegionInfo) -> Option<Wire> {
    let n = batch.max(1);
    let keys: Vec<&[u8]> = vec![key; n];
    let entry = RegisterEntry {
        key,
        region_id: region.handle.region_id,
        offset: 0,
        len: 4096,
    };
    let loc = Location {
        region: region.clone(),
        offset: 0,
        len: 4096,
        generation: 1,
    };
    let slot = Slot {
        region_index: 0,
        offset: 0,
        len: 4096,
        generation: 1,
    };
    let one = |req: Request, resp: Response| {
        let (req, resp) = sizes(&req, &resp);
        Some(Wire {
            req,
            resp,
            trips: 1,
        })
    };
    match op {
        "store" | "store_existing" => one(Request::Register(entry), Response::Bool(true)),
        "retrieve" | "retrieve_copy" | "first_retrieve_1gib" | "retrieve_1gib" => {
            one(Request::Lookup { key }, Response::Lookup(Some(loc)))
        }
        "exists" | "exists_miss" => one(Request::Exists { key }, Response::Bool(true)),
        "delete" => one(
            Request::Delete { key },
            Response::Delete(DeleteStatus::Deleted),
        ),
        "pin" => one(Request::Pin { key }, Response::Bool(true)),
        "unpin" => one(Request::Unpin { key }, Response::Bool(true)),
        "batch_store" => one(
            Request::BatchRegister(vec![entry; n]),
            Response::Bools(vec![true; n]),
        ),
        "batch_retrieve" => one(
            Request::BatchLookup { keys },
            Response::BatchLookup {
                regions: vec![region.clone()],
                entries: vec![Some(slot); n],
            },
        ),
        "batch_exists" => one(
            Request::BatchExists { keys },
            Response::Bools(vec![true; n]),
        ),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_grow_with_batches_and_keys() {
        let r = synthetic_region("/dev/shm/x/bench.pool");
        let one = wire_of("exists", 1, b"k", &r).unwrap();
        let many = wire_of("batch_exists", 256, b"k", &r).unwrap();
        assert!(one.req >= maru_proto::HEADER_LEN && one.resp > maru_proto::HEADER_LEN);
        assert!(many.req > 256 && many.resp >= 256 / 8);
        let lookup = wire_of("retrieve", 1, b"k", &r).unwrap();
        assert!(
            lookup.resp > one.resp + 32,
            "a lookup reply carries the region"
        );
        assert!(wire_of("connect", 1, b"k", &r).is_none());
    }
}
