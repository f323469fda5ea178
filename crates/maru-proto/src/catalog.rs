//! Every message type, listed once: its variant and fields, wire number, name (requests),
//! which daemon answers it (requests) and how its payload decodes (nothing, for a request
//! whose fields decode by their types in the order listed: see [`Field`]). The message enums,
//! the [`msg_type`] numbers, [`request_name`], [`SERVER_REQUESTS`], [`RM_REQUESTS`] and the decode
//! dispatch are generated from this table; the encoders match on the enums, so the compiler
//! holds them to it too.

use crate::codec::Reader;
use crate::error::{DecodeError, WireError};
use crate::request::{get_entries, get_hello, get_optional_str};
use crate::response::{
    get_batch_lookup, get_bools, get_delete_statuses, get_hello_ok, get_json, get_location,
    get_region_records, get_regions, get_rm_allocations, get_wire_error,
};
use crate::types::{
    delete_status, get_access, get_entry, get_handle, get_ids, get_key_counts, get_keys, get_pages,
    get_positions, get_region, get_resume_holds, Access, DeleteStatus, Handle, Hello, HelloOk,
    KeyCount, Location, PageRef, RegionInfo, RegionRecord, RegisterEntry, ResumeHold, ResumePin,
    RmAllocation, Slot,
};

/// Which daemon answers a request.
#[derive(Clone, Copy)]
enum AnsweredBy {
    Rm,
    Server,
    Both,
}

impl AnsweredBy {
    const fn includes(self, server: bool) -> bool {
        match self {
            AnsweredBy::Both => true,
            AnsweredBy::Server => server,
            AnsweredBy::Rm => !server,
        }
    }
}

/// A request's payload decoded: by its explicit decoder when the catalog gives one, else field
/// by field in the order listed, each by its type ([`Field`]).
macro_rules! decode_request {
    ($r:ident, $var:ident [$($f:ident),*] $decode:expr) => {
        $decode
    };
    ($r:ident, $var:ident [$($f:ident),+]) => {
        Request::$var { $($f: Field::decode($r)?),+ }
    };
    ($r:ident, $var:ident []) => {
        Request::$var
    };
}

/// A request field whose type says how it decodes: integers as themselves, a byte slice as
/// a key, a list of byte slices as a batch of keys, a handle, a page or a list of them, an
/// optional string.
trait Field<'a>: Sized {
    fn decode(r: &mut Reader<'a>) -> Result<Self, DecodeError>;
}

impl<'a> Field<'a> for u32 {
    fn decode(r: &mut Reader<'a>) -> Result<Self, DecodeError> {
        r.u32()
    }
}

impl<'a> Field<'a> for u64 {
    fn decode(r: &mut Reader<'a>) -> Result<Self, DecodeError> {
        r.u64()
    }
}

impl<'a> Field<'a> for &'a [u8] {
    fn decode(r: &mut Reader<'a>) -> Result<Self, DecodeError> {
        r.key()
    }
}

impl<'a> Field<'a> for Vec<&'a [u8]> {
    fn decode(r: &mut Reader<'a>) -> Result<Self, DecodeError> {
        get_keys(r)
    }
}

impl<'a> Field<'a> for bool {
    fn decode(r: &mut Reader<'a>) -> Result<Self, DecodeError> {
        r.bool()
    }
}

impl<'a> Field<'a> for Option<&'a str> {
    fn decode(r: &mut Reader<'a>) -> Result<Self, DecodeError> {
        get_optional_str(r)
    }
}

impl<'a> Field<'a> for Handle {
    fn decode(r: &mut Reader<'a>) -> Result<Self, DecodeError> {
        get_handle(r)
    }
}

impl<'a> Field<'a> for PageRef {
    fn decode(r: &mut Reader<'a>) -> Result<Self, DecodeError> {
        Ok(PageRef {
            region_id: r.u64()?,
            offset: r.u64()?,
        })
    }
}

impl<'a> Field<'a> for Vec<PageRef> {
    fn decode(r: &mut Reader<'a>) -> Result<Self, DecodeError> {
        get_pages(r)
    }
}

macro_rules! catalog {
    (
        $(#[$req_meta:meta])*
        pub enum Request<$lt:lifetime>, decoded from $rr:ident {
            $(
                $(#[$rmeta:meta])*
                $rvar:ident $(($($rtuple:ty),+))? $({ $($rfield:ident: $rfty:ty),+ $(,)? })?
                    = $rconst:ident $rnum:literal $rname:literal $by:ident $(=> $rdecode:expr)?,
            )*
        }

        $(#[$resp_meta:meta])*
        pub enum Response, decoded from $sr:ident {
            $(
                $(#[$smeta:meta])*
                $svar:ident $(($($stuple:ty),+))? $({ $($sfield:ident: $sfty:ty),+ $(,)? })?
                    = $sconst:ident $snum:literal => $sdecode:expr,
            )*
        }
    ) => {
        $(#[$req_meta])*
        pub enum Request<$lt> {
            $( $(#[$rmeta])* $rvar $(($($rtuple),+))? $({ $($rfield: $rfty),+ })?, )*
        }

        $(#[$resp_meta])*
        pub enum Response {
            $( $(#[$smeta])* $svar $(($($stuple),+))? $({ $($sfield: $sfty),+ })?, )*
        }

        /// Wire numbers of every message. Requests are below `0x8000`, responses above.
        pub mod msg_type {
            $(pub const $rconst: u16 = $rnum;)*
            $(pub const $sconst: u16 = $snum;)*
        }

        impl Request<'_> {
            pub fn msg_type(&self) -> u16 {
                match self {
                    $(Request::$rvar { .. } => msg_type::$rconst,)*
                }
            }

            /// A stable, short name for logs, stats and metrics.
            pub fn name(&self) -> &'static str {
                request_name(self.msg_type())
            }
        }

        impl Response {
            pub fn msg_type(&self) -> u16 {
                match self {
                    $(Response::$svar { .. } => msg_type::$sconst,)*
                }
            }
        }

        /// Name of a request message type (`"unknown"` for anything else).
        pub fn request_name(t: u16) -> &'static str {
            match t {
                $(msg_type::$rconst => $rname,)*
                _ => "unknown",
            }
        }

        /// Every request type with the daemon that answers it, in catalog order.
        const REQUESTS: &[(u16, AnsweredBy)] = &[$((msg_type::$rconst, AnsweredBy::$by),)*];

        pub(crate) fn decode_request_payload<$lt>(
            t: u16,
            $rr: &mut Reader<$lt>,
        ) -> Result<Request<$lt>, DecodeError> {
            Ok(match t {
                $(msg_type::$rconst => decode_request!(
                    $rr, $rvar [$($($rfield),+)?] $($rdecode)?
                ),)*
                other => return Err(DecodeError::UnknownMessage(other)),
            })
        }

        pub(crate) fn decode_response_payload(
            t: u16,
            $sr: &mut Reader,
        ) -> Result<Response, DecodeError> {
            Ok(match t {
                $(msg_type::$sconst => $sdecode,)*
                other => return Err(DecodeError::UnknownMessage(other)),
            })
        }
    };
}

catalog! {
    /// Every request. Resource-manager requests are prefixed `Rm`; the rest go to a metadata
    /// server. `Hello`, `Heartbeat` and `Goodbye` are understood by both.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Request<'a>, decoded from r {
        Hello(Hello<'a>) = HELLO 0x0001 "hello" Both => Request::Hello(get_hello(r)?),
        Heartbeat = HEARTBEAT 0x0002 "heartbeat" Both,
        /// The sender is leaving on purpose: its regions may be released (deferred freeing).
        Goodbye = GOODBYE 0x0003 "goodbye" Both,
        /// Allocate a region for the connection's owner (from its [`Hello`]).
        RmAlloc { size: u64, pool: Option<&'a str> } = RM_ALLOC 0x0101 "rm_alloc" Rm,
        RmFree { handle: Handle } = RM_FREE 0x0102 "rm_free" Rm,
        RmGetAccess { handle: Handle } = RM_GET_ACCESS 0x0103 "rm_get_access" Rm,
        RmStats = RM_STATS 0x0104 "rm_stats" Rm,
        RmList = RM_LIST 0x0105 "rm_list" Rm,
        /// A client asks for a new region of `size` bytes; the reply says how to map it.
        RequestRegion { size: u64 } = REQUEST_REGION 0x0201 "request_region" Server,
        /// A client gives back one of its regions (freed once no key references it).
        ReturnRegion { region_id: u64 } = RETURN_REGION 0x0202 "return_region" Server,
        /// A client whose regions have no free page and that got no new region asks for room
        /// in its own regions: the server evicts up to `pages` victims there (policy order, no
        /// pins, no holds) and answers with the pages it freed ([`Response::ReturnPages`],
        /// possibly empty).
        MakeRoom { pages: u32 } = MAKE_ROOM 0x0230 "make_room" Server,
        Register(RegisterEntry<'a>) = REGISTER 0x0203 "register" Server
            => Request::Register(get_entry(r)?),
        BatchRegister(Vec<RegisterEntry<'a>>) = BATCH_REGISTER 0x0204 "batch_register" Server
            => Request::BatchRegister(get_entries(r)?),
        Lookup { key: &'a [u8] } = LOOKUP 0x0205 "lookup" Server,
        BatchLookup { keys: Vec<&'a [u8]> } = BATCH_LOOKUP 0x0206 "batch_lookup" Server,
        Exists { key: &'a [u8] } = EXISTS 0x0207 "exists" Server,
        BatchExists { keys: Vec<&'a [u8]> } = BATCH_EXISTS 0x0208 "batch_exists" Server,
        Delete { key: &'a [u8] } = DELETE 0x0209 "delete" Server,
        BatchDelete { keys: Vec<&'a [u8]> } = BATCH_DELETE 0x020A "batch_delete" Server,
        Pin { key: &'a [u8] } = PIN 0x020B "pin" Server,
        BatchPin { keys: Vec<&'a [u8]> } = BATCH_PIN 0x020C "batch_pin" Server,
        Unpin { key: &'a [u8] } = UNPIN 0x020D "unpin" Server,
        BatchUnpin { keys: Vec<&'a [u8]> } = BATCH_UNPIN 0x020E "batch_unpin" Server,
        ListAllocations = LIST_ALLOCATIONS 0x020F "list_allocations" Server,
        Stats = STATS 0x0210 "stats" Server,
        GetRegion { region_id: u64 } = GET_REGION 0x0211 "get_region" Server,
        /// Every live region (for clients that map everything at connect, `eager_map`).
        ListRegions = LIST_REGIONS 0x0212 "list_regions" Server,
        /// Moves the deadline of every pin of the session to now + the pin TTL.
        RenewPins = RENEW_PINS 0x0213 "renew_pins" Server,
        /// Makes this connection the session's watch connection, where the server sends its
        /// notices ([`Response::ReturnPages`], request id 0); answered (`Ok`) on it after
        /// every notice queued before the request, so a client can wait for them.
        Watch = WATCH 0x0214 "watch" Server,
        /// The session's views of these pages are gone (one hold each). Answered with
        /// nothing: it travels in front of the session's next request.
        ReleaseHolds { pages: Vec<PageRef> } = RELEASE_HOLDS 0x0215 "release_holds" Server,
        /// Whether the page still holds the registration of that generation (for readers
        /// that kept only an address).
        PageCurrent { page: PageRef, generation: u64 } = PAGE_CURRENT 0x0216 "page_current"
            Server,
        /// The owner gives back a region the server asked for ([`Response::Reclaim`]), once
        /// none of its pages is in the owner's hands. Sent on the watch connection and
        /// answered with nothing, like [`Request::ReleaseHolds`].
        GiveBack { region_id: u64 } = GIVE_BACK 0x0217 "give_back" Server,
        /// A descriptor of the file that holds the region, passed over the Unix socket with
        /// the reply ([`Response::Descriptor`], SCM_RIGHTS): read-only, or read-write for a
        /// region the session owns. Refused over TCP and for a pool that is a device.
        Descriptor { region_id: u64, writable: bool } = DESCRIPTOR 0x0218 "descriptor"
            Server,
        /// These keys were read without asking the server (copied out through the key
        /// index): each counts as a use for eviction, as a lookup's would. Answered with
        /// nothing, like [`Request::ReleaseHolds`]: it travels in front of the session's next
        /// request.
        Touch { keys: Vec<&'a [u8]> } = TOUCH 0x021A "touch" Server,
        /// These keys were found without asking the server (views held in the session's
        /// hold lane), each `count` times: a use and `count` hits, as the lookups that found
        /// it would be. Answered with nothing, like [`Request::Touch`].
        Hit { hits: Vec<KeyCount<'a>> } = HIT 0x021B "hit" Server
            => Request::Hit { hits: get_key_counts(r, "hit count")? },
        /// A request follows on this connection in about `in_us` microseconds (a store that
        /// begins the copy of a large chunk says when its copy should end): answered with
        /// nothing; the thread that serves the connection is awake for it when it comes, so
        /// the request does not wait for that thread to wake.
        Ahead { in_us: u32 } = AHEAD 0x021C "ahead" Server,
        /// The first request of a connection of a handler whose server restarted: the hello
        /// of its session (token required), the RM region ids it owns, its pins with their
        /// counts and the holds of its live views, from its own books. Within the server's
        /// reconnect grace the session comes back with the regions the server holds and
        /// nobody else claims, the pins of keys that exist and the holds of pages that still
        /// hold the same registration of the same key; answered with [`Response::Resumed`].
        Resume {
            hello: Hello<'a>,
            regions: Vec<u64>,
            pins: Vec<ResumePin<'a>>,
            holds: Vec<ResumeHold<'a>>,
        } = RESUME 0x0219 "resume" Server
            => Request::Resume {
                hello: get_hello(r)?,
                regions: get_ids(r)?,
                pins: get_key_counts(r, "pin count")?,
                holds: get_resume_holds(r)?,
            },
    }

    /// Every response. Errors travel as [`Response::Error`] with [`crate::FLAG_ERROR`] set.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Response, decoded from r {
        HelloOk(HelloOk) = R_HELLO 0x8001 => Response::HelloOk(get_hello_ok(r)?),
        Ok = R_OK 0x8002 => Response::Ok,
        Error(WireError) = R_ERROR 0x8003 => Response::Error(get_wire_error(r)?),
        Handle(Handle) = R_HANDLE 0x8101 => Response::Handle(get_handle(r)?),
        Access(Access) = R_ACCESS 0x8102 => Response::Access(get_access(r)?),
        /// JSON of [`crate::stats::RmStats`].
        RmStats(String) = R_RM_STATS 0x8103 => Response::RmStats(get_json(r)?),
        RmAllocations(Vec<RmAllocation>) = R_RM_ALLOCATIONS 0x8104
            => Response::RmAllocations(get_rm_allocations(r)?),
        Region(RegionInfo) = R_REGION 0x8201 => Response::Region(get_region(r)?),
        /// Register: whether the key was new. Exists / Pin: whether the key exists.
        /// Unpin: whether this session had pinned the key.
        Bool(bool) = R_BOOL 0x8202 => Response::Bool(r.bool()?),
        Bools(Vec<bool>) = R_BOOLS 0x8203 => Response::Bools(get_bools(r)?),
        Lookup(Option<Location>) = R_LOOKUP 0x8204 => Response::Lookup(get_location(r)?),
        /// A deduplicated region table and one entry per key.
        BatchLookup { regions: Vec<RegionInfo>, entries: Vec<Option<Slot>> }
            = R_BATCH_LOOKUP 0x8205 => get_batch_lookup(r)?,
        Delete(DeleteStatus) = R_DELETE 0x8206 => Response::Delete(delete_status(r.u8()?)?),
        BatchDelete(Vec<DeleteStatus>) = R_BATCH_DELETE 0x8207
            => Response::BatchDelete(get_delete_statuses(r)?),
        Allocations(Vec<RegionRecord>) = R_ALLOCATIONS 0x8208
            => Response::Allocations(get_region_records(r)?),
        /// JSON of [`crate::stats::ServerStats`].
        Stats(String) = R_STATS 0x8209 => Response::Stats(get_json(r)?),
        Regions(Vec<RegionInfo>) = R_REGIONS 0x820A => Response::Regions(get_regions(r)?),
        /// Notice to a region's owner (on its watch connection, request id 0): these pages
        /// are free again — their key is gone and no view holds them.
        ReturnPages(Vec<PageRef>) = R_RETURN_PAGES 0x820B
            => Response::ReturnPages(get_pages(r)?),
        /// Notice to a region's owner (on its watch connection, request id 0): the pool is
        /// full and the server evicted this region's keys; give the region back
        /// ([`Request::GiveBack`]) once no page of it is allocated.
        Reclaim { region_id: u64 } = R_RECLAIM 0x820C
            => Response::Reclaim { region_id: r.u64()? },
        /// The answer to [`Request::Descriptor`]; the descriptor travels as SCM_RIGHTS
        /// ancillary data with the frame's bytes. The region is `len` bytes at `offset` of
        /// the file the descriptor opens; `writable`: it was opened read-write.
        Descriptor { offset: u64, len: u64, writable: bool } = R_DESCRIPTOR 0x820D
            => Response::Descriptor { offset: r.u64()?, len: r.u64()?, writable: r.bool()? },
        /// The answer to [`Request::Resume`]: the regions of the request the session does
        /// not own again (the handler detaches them), the positions (ascending) of the
        /// request's pins and holds the session does not have again (the handler drops them
        /// from its books), then the hello's answer.
        Resumed {
            refused: Vec<u64>,
            refused_pins: Vec<u32>,
            refused_holds: Vec<u32>,
            hello: HelloOk,
        } = R_RESUMED 0x820E
            => Response::Resumed {
                refused: get_ids(r)?,
                refused_pins: get_positions(r)?,
                refused_holds: get_positions(r)?,
                hello: get_hello_ok(r)?,
            },
    }
}

const fn count_answered(server: bool) -> usize {
    let mut n = 0;
    let mut i = 0;
    while i < REQUESTS.len() {
        if REQUESTS[i].1.includes(server) {
            n += 1;
        }
        i += 1;
    }
    n
}

const fn answered<const N: usize>(server: bool) -> [u16; N] {
    let mut out = [0; N];
    let (mut i, mut n) = (0, 0);
    while i < REQUESTS.len() {
        if REQUESTS[i].1.includes(server) {
            out[n] = REQUESTS[i].0;
            n += 1;
        }
        i += 1;
    }
    out
}

/// Every request a metadata server answers, in catalog order.
pub const SERVER_REQUESTS: &[u16] = &answered::<{ count_answered(true) }>(true);

/// Every request the resource manager answers, in catalog order.
pub const RM_REQUESTS: &[u16] = &answered::<{ count_answered(false) }>(false);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_daemon_answers_its_own_requests_and_the_shared_ones() {
        let names = |l: &[u16]| l.iter().map(|t| request_name(*t)).collect::<Vec<_>>();
        assert_eq!(
            names(RM_REQUESTS),
            [
                "hello",
                "heartbeat",
                "goodbye",
                "rm_alloc",
                "rm_free",
                "rm_get_access",
                "rm_stats",
                "rm_list"
            ]
        );
        assert_eq!(SERVER_REQUESTS.len(), 32);
        assert!(SERVER_REQUESTS[..3] == RM_REQUESTS[..3]);
        assert!(SERVER_REQUESTS[3..]
            .iter()
            .all(|t| !RM_REQUESTS.contains(t)));
        assert_eq!(request_name(0x7777), "unknown");
    }
}
