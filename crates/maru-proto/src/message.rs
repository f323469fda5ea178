//! Message types and their payload encodings.
//!
//! Requests borrow keys and strings from the frame they were decoded from (no copy per key on
//! the server's hot path); responses are owned (the client keeps region descriptions).

use crate::codec::{Reader, Writer};
use crate::error::{DecodeError, EncodeError, ErrorCode, WireError};
use crate::header::{Header, FLAG_ERROR, FLAG_RESPONSE, HEADER_LEN};
use crate::{MAX_FRAME, PROTOCOL_VERSION, SESSION_TOKEN_LEN, TOKEN_LEN};

/// Who is speaking on a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Role {
    /// A `MaruHandler` talking to a metadata server.
    Client = 1,
    /// A metadata server (or an embedded one) talking to the resource manager.
    Server = 2,
    /// An operator tool (`maru stats`, `maru top`): may read stats, owns nothing.
    Admin = 3,
}

impl Role {
    fn from_u8(v: u8) -> Result<Role, DecodeError> {
        match v {
            1 => Ok(Role::Client),
            2 => Ok(Role::Server),
            3 => Ok(Role::Admin),
            _ => Err(DecodeError::InvalidField("role")),
        }
    }
}

/// First request on every connection. Identifies the process behind it, which is what the
/// resource manager's reaper watches (pid + start time against pid reuse, host for remote
/// owners).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello<'a> {
    pub role: Role,
    /// Application-level identity (a `MaruHandler`'s instance id); may be empty for admins.
    pub instance_id: &'a str,
    /// Hostname of the peer process.
    pub host: &'a str,
    pub pid: u32,
    /// Start time of the peer process in clock ticks since boot (`/proc/PID/stat` field 22);
    /// 0 lets a same-host resource manager read it itself.
    pub start_time: u64,
    /// Present when attaching another connection to an existing instance session.
    pub session_token: Option<[u8; SESSION_TOKEN_LEN]>,
}

/// Answer to [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloOk {
    /// Name and version of the answering daemon, for people.
    pub server: String,
    pub hostname: String,
    /// Secret that lets further connections of the same instance join its session.
    pub session_token: [u8; SESSION_TOKEN_LEN],
}

/// A region as handed out by the resource manager. The token is a keyed hash over every
/// other field; only the resource manager can mint one.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Handle {
    pub region_id: u64,
    /// Pool the region was carved from (the pool's path).
    pub pool: String,
    /// Offset of the region inside its pool.
    pub offset: u64,
    pub len: u64,
    /// `host:pid` of the process that allocated it.
    pub owner: String,
    pub token: [u8; TOKEN_LEN],
}

/// How to map a region: `mmap(path, offset, len)`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Access {
    pub path: String,
    pub offset: u64,
    pub len: u64,
    /// Page size backing the file (4 KiB on tmpfs, 2 MiB on hugetlbfs).
    pub page_size: u64,
}

/// A region with what a client needs to map it, in one message.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RegionInfo {
    pub handle: Handle,
    pub access: Access,
}

/// Where a key's bytes are: inside `region`, at `offset` (relative to the region's start).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub region: RegionInfo,
    pub offset: u64,
    pub len: u64,
}

/// One entry of a batch lookup: an index into the reply's region table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub region_index: u32,
    pub offset: u64,
    pub len: u64,
}

/// Registration of a key at a location inside a region the caller owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegisterEntry<'a> {
    pub key: &'a [u8],
    pub region_id: u64,
    pub offset: u64,
    pub len: u64,
}

/// Outcome of a delete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum DeleteStatus {
    NotFound = 0,
    Deleted = 1,
    /// The key exists but is pinned; it stays.
    Pinned = 2,
}

/// An allocation as the resource manager lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RmAllocation {
    pub handle: Handle,
    pub owner_host: String,
    pub owner_pid: u32,
    pub owner_start_time: u64,
    /// Whether the owner currently has a connection to the resource manager.
    pub connected: bool,
}

/// A region as the metadata server lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionRecord {
    pub handle: Handle,
    pub instance_id: String,
    /// Number of keys that point into the region.
    pub ref_count: u64,
    pub owner_connected: bool,
}

macro_rules! msg_types {
    ($($name:ident = $v:literal,)*) => {
        /// Wire numbers of every message. Requests are below `0x8000`, responses above.
        pub mod msg_type { $(pub const $name: u16 = $v;)* }
    };
}

msg_types! {
    HELLO = 0x0001,
    HEARTBEAT = 0x0002,
    GOODBYE = 0x0003,
    RM_ALLOC = 0x0101,
    RM_FREE = 0x0102,
    RM_GET_ACCESS = 0x0103,
    RM_STATS = 0x0104,
    RM_LIST = 0x0105,
    REQUEST_REGION = 0x0201,
    RETURN_REGION = 0x0202,
    REGISTER = 0x0203,
    BATCH_REGISTER = 0x0204,
    LOOKUP = 0x0205,
    BATCH_LOOKUP = 0x0206,
    EXISTS = 0x0207,
    BATCH_EXISTS = 0x0208,
    DELETE = 0x0209,
    BATCH_DELETE = 0x020A,
    PIN = 0x020B,
    BATCH_PIN = 0x020C,
    UNPIN = 0x020D,
    BATCH_UNPIN = 0x020E,
    LIST_ALLOCATIONS = 0x020F,
    STATS = 0x0210,
    GET_REGION = 0x0211,
    LIST_REGIONS = 0x0212,
    R_HELLO = 0x8001,
    R_OK = 0x8002,
    R_ERROR = 0x8003,
    R_HANDLE = 0x8101,
    R_ACCESS = 0x8102,
    R_RM_STATS = 0x8103,
    R_RM_ALLOCATIONS = 0x8104,
    R_REGION = 0x8201,
    R_BOOL = 0x8202,
    R_BOOLS = 0x8203,
    R_LOOKUP = 0x8204,
    R_BATCH_LOOKUP = 0x8205,
    R_DELETE = 0x8206,
    R_BATCH_DELETE = 0x8207,
    R_ALLOCATIONS = 0x8208,
    R_STATS = 0x8209,
    R_REGIONS = 0x820A,
}

/// Every request. Resource-manager requests are prefixed `Rm`; the rest go to a metadata
/// server. `Hello`, `Heartbeat` and `Goodbye` are understood by both.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request<'a> {
    Hello(Hello<'a>),
    Heartbeat,
    /// The sender is leaving on purpose: its regions may be released (deferred freeing).
    Goodbye,
    /// Allocate a region for the connection's owner (from its [`Hello`]).
    RmAlloc {
        size: u64,
        pool: Option<&'a str>,
    },
    RmFree {
        handle: Handle,
    },
    RmGetAccess {
        handle: Handle,
    },
    RmStats,
    RmList,
    /// A client asks for a new region of `size` bytes; the reply says how to map it.
    RequestRegion {
        size: u64,
    },
    /// A client gives back one of its regions (freed once no key references it).
    ReturnRegion {
        region_id: u64,
    },
    Register(RegisterEntry<'a>),
    BatchRegister(Vec<RegisterEntry<'a>>),
    Lookup {
        key: &'a [u8],
    },
    BatchLookup {
        keys: Vec<&'a [u8]>,
    },
    Exists {
        key: &'a [u8],
    },
    BatchExists {
        keys: Vec<&'a [u8]>,
    },
    Delete {
        key: &'a [u8],
    },
    BatchDelete {
        keys: Vec<&'a [u8]>,
    },
    Pin {
        key: &'a [u8],
    },
    BatchPin {
        keys: Vec<&'a [u8]>,
    },
    Unpin {
        key: &'a [u8],
    },
    BatchUnpin {
        keys: Vec<&'a [u8]>,
    },
    ListAllocations,
    Stats,
    GetRegion {
        region_id: u64,
    },
    /// Every live region (for clients that map everything at connect, `eager_map`).
    ListRegions,
}

/// Every response. Errors travel as [`Response::Error`] with [`FLAG_ERROR`] set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    HelloOk(HelloOk),
    Ok,
    Error(WireError),
    Handle(Handle),
    Access(Access),
    /// JSON of [`crate::stats::RmStats`].
    RmStats(String),
    RmAllocations(Vec<RmAllocation>),
    Region(RegionInfo),
    /// Register: whether the key was new. Exists / Pin: whether the key exists.
    /// Unpin: whether the key was pinned.
    Bool(bool),
    Bools(Vec<bool>),
    Lookup(Option<Location>),
    /// A deduplicated region table and one entry per key.
    BatchLookup {
        regions: Vec<RegionInfo>,
        entries: Vec<Option<Slot>>,
    },
    Delete(DeleteStatus),
    BatchDelete(Vec<DeleteStatus>),
    Allocations(Vec<RegionRecord>),
    /// JSON of [`crate::stats::ServerStats`].
    Stats(String),
    Regions(Vec<RegionInfo>),
}

impl Request<'_> {
    pub fn msg_type(&self) -> u16 {
        use msg_type::*;
        match self {
            Request::Hello(_) => HELLO,
            Request::Heartbeat => HEARTBEAT,
            Request::Goodbye => GOODBYE,
            Request::RmAlloc { .. } => RM_ALLOC,
            Request::RmFree { .. } => RM_FREE,
            Request::RmGetAccess { .. } => RM_GET_ACCESS,
            Request::RmStats => RM_STATS,
            Request::RmList => RM_LIST,
            Request::RequestRegion { .. } => REQUEST_REGION,
            Request::ReturnRegion { .. } => RETURN_REGION,
            Request::Register(_) => REGISTER,
            Request::BatchRegister(_) => BATCH_REGISTER,
            Request::Lookup { .. } => LOOKUP,
            Request::BatchLookup { .. } => BATCH_LOOKUP,
            Request::Exists { .. } => EXISTS,
            Request::BatchExists { .. } => BATCH_EXISTS,
            Request::Delete { .. } => DELETE,
            Request::BatchDelete { .. } => BATCH_DELETE,
            Request::Pin { .. } => PIN,
            Request::BatchPin { .. } => BATCH_PIN,
            Request::Unpin { .. } => UNPIN,
            Request::BatchUnpin { .. } => BATCH_UNPIN,
            Request::ListAllocations => LIST_ALLOCATIONS,
            Request::Stats => STATS,
            Request::GetRegion { .. } => GET_REGION,
            Request::ListRegions => LIST_REGIONS,
        }
    }

    /// A stable, short name for logs, stats and metrics.
    pub fn name(&self) -> &'static str {
        request_name(self.msg_type())
    }
}

/// Name of a request message type (`"unknown"` for anything else).
pub fn request_name(t: u16) -> &'static str {
    use msg_type::*;
    match t {
        HELLO => "hello",
        HEARTBEAT => "heartbeat",
        GOODBYE => "goodbye",
        RM_ALLOC => "rm_alloc",
        RM_FREE => "rm_free",
        RM_GET_ACCESS => "rm_get_access",
        RM_STATS => "rm_stats",
        RM_LIST => "rm_list",
        REQUEST_REGION => "request_region",
        RETURN_REGION => "return_region",
        REGISTER => "register",
        BATCH_REGISTER => "batch_register",
        LOOKUP => "lookup",
        BATCH_LOOKUP => "batch_lookup",
        EXISTS => "exists",
        BATCH_EXISTS => "batch_exists",
        DELETE => "delete",
        BATCH_DELETE => "batch_delete",
        PIN => "pin",
        BATCH_PIN => "batch_pin",
        UNPIN => "unpin",
        BATCH_UNPIN => "batch_unpin",
        LIST_ALLOCATIONS => "list_allocations",
        STATS => "stats",
        GET_REGION => "get_region",
        LIST_REGIONS => "list_regions",
        _ => "unknown",
    }
}

impl Response {
    pub fn msg_type(&self) -> u16 {
        use msg_type::*;
        match self {
            Response::HelloOk(_) => R_HELLO,
            Response::Ok => R_OK,
            Response::Error(_) => R_ERROR,
            Response::Handle(_) => R_HANDLE,
            Response::Access(_) => R_ACCESS,
            Response::RmStats(_) => R_RM_STATS,
            Response::RmAllocations(_) => R_RM_ALLOCATIONS,
            Response::Region(_) => R_REGION,
            Response::Bool(_) => R_BOOL,
            Response::Bools(_) => R_BOOLS,
            Response::Lookup(_) => R_LOOKUP,
            Response::BatchLookup { .. } => R_BATCH_LOOKUP,
            Response::Delete(_) => R_DELETE,
            Response::BatchDelete(_) => R_BATCH_DELETE,
            Response::Allocations(_) => R_ALLOCATIONS,
            Response::Stats(_) => R_STATS,
            Response::Regions(_) => R_REGIONS,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Field encodings

fn put_handle(w: &mut Writer, h: &Handle) -> Result<(), EncodeError> {
    w.u64(h.region_id);
    w.str(&h.pool)?;
    w.u64(h.offset);
    w.u64(h.len);
    w.str(&h.owner)?;
    w.raw(&h.token);
    Ok(())
}

fn get_handle(r: &mut Reader) -> Result<Handle, DecodeError> {
    Ok(Handle {
        region_id: r.u64()?,
        pool: r.str()?.to_owned(),
        offset: r.u64()?,
        len: r.u64()?,
        owner: r.str()?.to_owned(),
        token: r.fixed()?,
    })
}

fn put_access(w: &mut Writer, a: &Access) -> Result<(), EncodeError> {
    w.str(&a.path)?;
    w.u64(a.offset);
    w.u64(a.len);
    w.u64(a.page_size);
    Ok(())
}

fn get_access(r: &mut Reader) -> Result<Access, DecodeError> {
    Ok(Access {
        path: r.str()?.to_owned(),
        offset: r.u64()?,
        len: r.u64()?,
        page_size: r.u64()?,
    })
}

fn put_region(w: &mut Writer, region: &RegionInfo) -> Result<(), EncodeError> {
    put_handle(w, &region.handle)?;
    put_access(w, &region.access)
}

fn get_region(r: &mut Reader) -> Result<RegionInfo, DecodeError> {
    Ok(RegionInfo {
        handle: get_handle(r)?,
        access: get_access(r)?,
    })
}

// Smallest encodings, used to bound batch counts by the bytes actually present.
const MIN_KEY: usize = 4;
const MIN_HANDLE: usize = 8 + 4 + 8 + 8 + 4 + TOKEN_LEN;
const MIN_REGION: usize = MIN_HANDLE + 4 + 8 + 8 + 8;

fn put_keys(w: &mut Writer, keys: &[&[u8]]) -> Result<(), EncodeError> {
    w.count(keys.len())?;
    for k in keys {
        w.key(k)?;
    }
    Ok(())
}

fn get_keys<'a>(r: &mut Reader<'a>) -> Result<Vec<&'a [u8]>, DecodeError> {
    let n = r.count(MIN_KEY)?;
    (0..n).map(|_| r.key()).collect()
}

fn put_entry(w: &mut Writer, e: &RegisterEntry) -> Result<(), EncodeError> {
    w.key(e.key)?;
    w.u64(e.region_id);
    w.u64(e.offset);
    w.u64(e.len);
    Ok(())
}

fn get_entry<'a>(r: &mut Reader<'a>) -> Result<RegisterEntry<'a>, DecodeError> {
    Ok(RegisterEntry {
        key: r.key()?,
        region_id: r.u64()?,
        offset: r.u64()?,
        len: r.u64()?,
    })
}

fn delete_status(v: u8) -> Result<DeleteStatus, DecodeError> {
    match v {
        0 => Ok(DeleteStatus::NotFound),
        1 => Ok(DeleteStatus::Deleted),
        2 => Ok(DeleteStatus::Pinned),
        _ => Err(DecodeError::InvalidField("delete status")),
    }
}

fn encode_request_payload(w: &mut Writer, req: &Request) -> Result<(), EncodeError> {
    match req {
        Request::Hello(h) => {
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
        }
        Request::Heartbeat
        | Request::Goodbye
        | Request::RmStats
        | Request::RmList
        | Request::ListAllocations
        | Request::Stats
        | Request::ListRegions => {}
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
        Request::ReturnRegion { region_id } | Request::GetRegion { region_id } => w.u64(*region_id),
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
        | Request::BatchUnpin { keys } => put_keys(w, keys)?,
    }
    Ok(())
}

fn decode_request_payload<'a>(t: u16, r: &mut Reader<'a>) -> Result<Request<'a>, DecodeError> {
    use msg_type::*;
    Ok(match t {
        HELLO => Request::Hello(Hello {
            role: Role::from_u8(r.u8()?)?,
            instance_id: r.str()?,
            host: r.str()?,
            pid: r.u32()?,
            start_time: r.u64()?,
            session_token: if r.bool()? { Some(r.fixed()?) } else { None },
        }),
        HEARTBEAT => Request::Heartbeat,
        GOODBYE => Request::Goodbye,
        RM_ALLOC => {
            let size = r.u64()?;
            let pool = if r.bool()? { Some(r.str()?) } else { None };
            Request::RmAlloc { size, pool }
        }
        RM_FREE => Request::RmFree {
            handle: get_handle(r)?,
        },
        RM_GET_ACCESS => Request::RmGetAccess {
            handle: get_handle(r)?,
        },
        RM_STATS => Request::RmStats,
        RM_LIST => Request::RmList,
        REQUEST_REGION => Request::RequestRegion { size: r.u64()? },
        RETURN_REGION => Request::ReturnRegion {
            region_id: r.u64()?,
        },
        REGISTER => Request::Register(get_entry(r)?),
        BATCH_REGISTER => {
            let n = r.count(MIN_KEY + 24)?;
            Request::BatchRegister((0..n).map(|_| get_entry(r)).collect::<Result<_, _>>()?)
        }
        LOOKUP => Request::Lookup { key: r.key()? },
        BATCH_LOOKUP => Request::BatchLookup { keys: get_keys(r)? },
        EXISTS => Request::Exists { key: r.key()? },
        BATCH_EXISTS => Request::BatchExists { keys: get_keys(r)? },
        DELETE => Request::Delete { key: r.key()? },
        BATCH_DELETE => Request::BatchDelete { keys: get_keys(r)? },
        PIN => Request::Pin { key: r.key()? },
        BATCH_PIN => Request::BatchPin { keys: get_keys(r)? },
        UNPIN => Request::Unpin { key: r.key()? },
        BATCH_UNPIN => Request::BatchUnpin { keys: get_keys(r)? },
        LIST_ALLOCATIONS => Request::ListAllocations,
        STATS => Request::Stats,
        GET_REGION => Request::GetRegion {
            region_id: r.u64()?,
        },
        LIST_REGIONS => Request::ListRegions,
        other => return Err(DecodeError::UnknownMessage(other)),
    })
}

fn encode_response_payload(w: &mut Writer, resp: &Response) -> Result<(), EncodeError> {
    match resp {
        Response::HelloOk(h) => {
            w.str(&h.server)?;
            w.str(&h.hostname)?;
            w.raw(&h.session_token);
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
    }
    Ok(())
}

fn decode_response_payload(t: u16, r: &mut Reader) -> Result<Response, DecodeError> {
    use msg_type::*;
    Ok(match t {
        R_HELLO => Response::HelloOk(HelloOk {
            server: r.str()?.to_owned(),
            hostname: r.str()?.to_owned(),
            session_token: r.fixed()?,
        }),
        R_OK => Response::Ok,
        R_ERROR => {
            let raw = r.u16()?;
            let code = ErrorCode::from_u16(raw).ok_or(DecodeError::InvalidField("error code"))?;
            Response::Error(WireError {
                code,
                message: r.str()?.to_owned(),
            })
        }
        R_HANDLE => Response::Handle(get_handle(r)?),
        R_ACCESS => Response::Access(get_access(r)?),
        R_RM_STATS | R_STATS => {
            let json = std::str::from_utf8(r.blob()?)
                .map_err(|_| DecodeError::InvalidField("utf-8 stats"))?
                .to_owned();
            if t == R_STATS {
                Response::Stats(json)
            } else {
                Response::RmStats(json)
            }
        }
        R_RM_ALLOCATIONS => {
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
            Response::RmAllocations(list)
        }
        R_REGION => Response::Region(get_region(r)?),
        R_BOOL => Response::Bool(r.bool()?),
        R_BOOLS => {
            let n = r.count(1)?;
            Response::Bools((0..n).map(|_| r.bool()).collect::<Result<_, _>>()?)
        }
        R_LOOKUP => Response::Lookup(if r.bool()? {
            Some(Location {
                region: get_region(r)?,
                offset: r.u64()?,
                len: r.u64()?,
            })
        } else {
            None
        }),
        R_BATCH_LOOKUP => {
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
                    };
                    if slot.region_index as usize >= regions.len() {
                        return Err(DecodeError::InvalidField("region index"));
                    }
                    Some(slot)
                } else {
                    None
                });
            }
            Response::BatchLookup { regions, entries }
        }
        R_DELETE => Response::Delete(delete_status(r.u8()?)?),
        R_BATCH_DELETE => {
            let n = r.count(1)?;
            Response::BatchDelete(
                (0..n)
                    .map(|_| delete_status(r.u8()?))
                    .collect::<Result<_, _>>()?,
            )
        }
        R_ALLOCATIONS => {
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
            Response::Allocations(list)
        }
        R_REGIONS => {
            let n = r.count(MIN_REGION)?;
            Response::Regions((0..n).map(|_| get_region(r)).collect::<Result<_, _>>()?)
        }
        other => return Err(DecodeError::UnknownMessage(other)),
    })
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

// ---------------------------------------------------------------------------------------------
// Frames

/// A decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame<'a> {
    pub header: Header,
    pub body: Body<'a>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body<'a> {
    Request(Request<'a>),
    Response(Response),
}

fn encode_with(
    buf: &mut Vec<u8>,
    msg_type: u16,
    flags: u16,
    request_id: u64,
    payload: impl FnOnce(&mut Writer) -> Result<(), EncodeError>,
) -> Result<(), EncodeError> {
    let start = buf.len();
    buf.extend_from_slice(&[0u8; HEADER_LEN]);
    if let Err(e) = payload(&mut Writer::new(buf)) {
        buf.truncate(start);
        return Err(e);
    }
    let len = buf.len() - start - HEADER_LEN;
    if len > MAX_FRAME as usize {
        buf.truncate(start);
        return Err(EncodeError::FrameTooLarge {
            len,
            max: MAX_FRAME,
        });
    }
    let header = Header::new(msg_type, flags, request_id, len as u32);
    buf[start..start + HEADER_LEN].copy_from_slice(&header.encode());
    Ok(())
}

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

fn check_version(header: &Header) -> Result<(), DecodeError> {
    if header.version != PROTOCOL_VERSION {
        return Err(DecodeError::UnsupportedVersion {
            got: header.version,
            ours: PROTOCOL_VERSION,
        });
    }
    Ok(())
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

/// Decodes exactly one whole frame (header and payload, nothing after). A pure function of
/// its input: this is what the fuzz target drives.
pub fn decode_frame(bytes: &[u8]) -> Result<Frame<'_>, DecodeError> {
    let header = Header::decode(bytes)?;
    let payload = &bytes[HEADER_LEN..];
    let len = header.payload_len as usize;
    if payload.len() < len {
        return Err(DecodeError::Truncated {
            needed: HEADER_LEN + len,
            got: bytes.len(),
        });
    }
    if payload.len() > len {
        return Err(DecodeError::TrailingBytes(payload.len() - len));
    }
    let body = if header.is_response() {
        Body::Response(decode_response(&header, payload)?)
    } else {
        Body::Request(decode_request(&header, payload)?)
    };
    Ok(Frame { header, body })
}
