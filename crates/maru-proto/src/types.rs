//! The values messages carry: who speaks, regions and their handles, registrations,
//! delete outcomes, allocation listings, and their field encodings shared by requests and
//! responses.

use crate::codec::{Reader, Writer};
use crate::error::{DecodeError, EncodeError};
use crate::{SESSION_TOKEN_LEN, TOKEN_LEN};

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
    pub(crate) fn from_u8(v: u8) -> Result<Role, DecodeError> {
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
    /// Present when attaching another connection to an existing session (from
    /// [`HelloOk::session_token`]); absent, the hello starts a new session.
    pub session_token: Option<[u8; SESSION_TOKEN_LEN]>,
    /// The tenant whose keys the session sees ("": the shared default namespace). At most
    /// [`crate::MAX_NAMESPACE_LEN`] bytes.
    pub namespace: &'a str,
}

impl<'a> Hello<'a> {
    /// A hello that names no instance, starts no session and sees the default namespace:
    /// what administrators and a resource manager's clients send.
    pub fn sessionless(role: Role, host: &'a str, pid: u32, start_time: u64) -> Self {
        Hello {
            role,
            instance_id: "",
            host,
            pid,
            start_time,
            session_token: None,
            namespace: "",
        }
    }
}

/// Answer to [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloOk {
    /// Name and version of the answering daemon, for people.
    pub server: String,
    pub hostname: String,
    /// Secret that lets further connections of the same handler join its session.
    pub session_token: [u8; SESSION_TOKEN_LEN],
    /// The metadata server's key index in shared memory, for clients that can map it
    /// (`None`: the server keeps none, or the daemon is a resource manager).
    pub index: Option<IndexInfo>,
}

/// Where a metadata server's key index is and how a session finds its keys in it: a client
/// that can open `path` answers existence checks and copy-out reads without a round trip.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexInfo {
    /// The index file, as the server's host names it.
    pub path: String,
    /// The session's namespace's number in the index.
    pub namespace: u32,
    /// The session's lane in the server's hold lanes, for clients that can map them
    /// read-write (`None`: no lanes, or none free; holds then take a round trip).
    pub lane: Option<LaneInfo>,
}

/// Where a session takes view holds without a round trip: its own lane of the server's hold
/// lanes file (docs/ARCHITECTURE.md §10, *Holds without a round trip*).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaneInfo {
    /// The lanes file, as the server's host names it.
    pub path: String,
    /// The session's lane.
    pub lane: u32,
    /// What the session's client writes its holds with (changes at every assignment of the
    /// lane, so a client of an earlier session of it never matches).
    pub tag: u8,
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
    /// UUID in the header of the pool the region is in: a client checks that the file it
    /// maps belongs to that pool. All zeroes: the granting daemon names no pool identity.
    pub pool_uuid: [u8; 16],
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
    /// The registration's generation: a number the server never gives another registration
    /// (see [`Request::PageCurrent`](crate::Request::PageCurrent)).
    pub generation: u64,
}

/// One entry of a batch lookup: an index into the reply's region table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub region_index: u32,
    pub offset: u64,
    pub len: u64,
    pub generation: u64,
}

/// A page of a region, by the region's id and the page's byte offset in it: what view holds
/// are released for, and what page returns name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PageRef {
    pub region_id: u64,
    pub offset: u64,
}

/// A key (without namespace: the session's) and how many times something happened to it (at
/// least once): a resuming session's pins, hits a session tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyCount<'a> {
    pub key: &'a [u8],
    pub count: u32,
}

/// A pin a resuming session held before its server restarted: how many times the session had
/// pinned the key.
pub type ResumePin<'a> = KeyCount<'a>;

/// View holds a resuming session held before its server restarted: `count` holds on `page`,
/// taken by lookups of `key` that found the registration of `generation` there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResumeHold<'a> {
    pub key: &'a [u8],
    pub page: PageRef,
    pub generation: u64,
    pub count: u32,
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

// ---------------------------------------------------------------------------------------------
// Field encodings

pub(crate) fn put_handle(w: &mut Writer, h: &Handle) -> Result<(), EncodeError> {
    w.u64(h.region_id);
    w.str(&h.pool)?;
    w.u64(h.offset);
    w.u64(h.len);
    w.str(&h.owner)?;
    w.raw(&h.token);
    Ok(())
}

pub(crate) fn get_handle(r: &mut Reader) -> Result<Handle, DecodeError> {
    Ok(Handle {
        region_id: r.u64()?,
        pool: r.str()?.to_owned(),
        offset: r.u64()?,
        len: r.u64()?,
        owner: r.str()?.to_owned(),
        token: r.fixed()?,
    })
}

pub(crate) fn put_access(w: &mut Writer, a: &Access) -> Result<(), EncodeError> {
    w.str(&a.path)?;
    w.u64(a.offset);
    w.u64(a.len);
    w.u64(a.page_size);
    w.raw(&a.pool_uuid);
    Ok(())
}

pub(crate) fn get_access(r: &mut Reader) -> Result<Access, DecodeError> {
    Ok(Access {
        path: r.str()?.to_owned(),
        offset: r.u64()?,
        len: r.u64()?,
        page_size: r.u64()?,
        pool_uuid: r.fixed()?,
    })
}

pub(crate) fn put_region(w: &mut Writer, region: &RegionInfo) -> Result<(), EncodeError> {
    put_handle(w, &region.handle)?;
    put_access(w, &region.access)
}

pub(crate) fn get_region(r: &mut Reader) -> Result<RegionInfo, DecodeError> {
    Ok(RegionInfo {
        handle: get_handle(r)?,
        access: get_access(r)?,
    })
}

// Smallest encodings, used to bound batch counts by the bytes actually present.
pub(crate) const MIN_KEY: usize = 4;
pub(crate) const MIN_HANDLE: usize = 8 + 4 + 8 + 8 + 4 + TOKEN_LEN;
pub(crate) const MIN_REGION: usize = MIN_HANDLE + 4 + 8 + 8 + 8;

pub(crate) fn put_keys(w: &mut Writer, keys: &[&[u8]]) -> Result<(), EncodeError> {
    w.count(keys.len())?;
    for k in keys {
        w.key(k)?;
    }
    Ok(())
}

pub(crate) fn get_keys<'a>(r: &mut Reader<'a>) -> Result<Vec<&'a [u8]>, DecodeError> {
    let n = r.count(MIN_KEY)?;
    (0..n).map(|_| r.key()).collect()
}

pub(crate) fn put_entry(w: &mut Writer, e: &RegisterEntry) -> Result<(), EncodeError> {
    w.key(e.key)?;
    w.u64(e.region_id);
    w.u64(e.offset);
    w.u64(e.len);
    Ok(())
}

pub(crate) fn get_entry<'a>(r: &mut Reader<'a>) -> Result<RegisterEntry<'a>, DecodeError> {
    Ok(RegisterEntry {
        key: r.key()?,
        region_id: r.u64()?,
        offset: r.u64()?,
        len: r.u64()?,
    })
}

pub(crate) fn put_pages(w: &mut Writer, pages: &[PageRef]) -> Result<(), EncodeError> {
    w.count(pages.len())?;
    for p in pages {
        w.u64(p.region_id);
        w.u64(p.offset);
    }
    Ok(())
}

pub(crate) fn get_pages(r: &mut Reader) -> Result<Vec<PageRef>, DecodeError> {
    let n = r.count(16)?;
    (0..n)
        .map(|_| {
            Ok(PageRef {
                region_id: r.u64()?,
                offset: r.u64()?,
            })
        })
        .collect()
}

pub(crate) fn delete_status(v: u8) -> Result<DeleteStatus, DecodeError> {
    match v {
        0 => Ok(DeleteStatus::NotFound),
        1 => Ok(DeleteStatus::Deleted),
        2 => Ok(DeleteStatus::Pinned),
        _ => Err(DecodeError::InvalidField("delete status")),
    }
}

/// A list of region ids (resume claims and refusals).
pub(crate) fn put_ids(w: &mut Writer, ids: &[u64]) -> Result<(), EncodeError> {
    w.count(ids.len())?;
    for id in ids {
        w.u64(*id);
    }
    Ok(())
}

pub(crate) fn get_ids(r: &mut Reader) -> Result<Vec<u64>, DecodeError> {
    let n = r.count(8)?;
    (0..n).map(|_| r.u64()).collect()
}

pub(crate) fn put_key_counts(w: &mut Writer, counts: &[KeyCount]) -> Result<(), EncodeError> {
    w.count(counts.len())?;
    for c in counts {
        w.key(c.key)?;
        w.u32(c.count);
    }
    Ok(())
}

fn claim_count(r: &mut Reader, what: &'static str) -> Result<u32, DecodeError> {
    match r.u32()? {
        0 => Err(DecodeError::InvalidField(what)),
        n => Ok(n),
    }
}

/// Keys with counts, each at least 1 (`what` names a zero count in the error).
pub(crate) fn get_key_counts<'a>(
    r: &mut Reader<'a>,
    what: &'static str,
) -> Result<Vec<KeyCount<'a>>, DecodeError> {
    let n = r.count(MIN_KEY + 4)?;
    (0..n)
        .map(|_| {
            Ok(KeyCount {
                key: r.key()?,
                count: claim_count(r, what)?,
            })
        })
        .collect()
}

pub(crate) fn put_resume_holds(w: &mut Writer, holds: &[ResumeHold]) -> Result<(), EncodeError> {
    w.count(holds.len())?;
    for h in holds {
        w.key(h.key)?;
        w.u64(h.page.region_id);
        w.u64(h.page.offset);
        w.u64(h.generation);
        w.u32(h.count);
    }
    Ok(())
}

pub(crate) fn get_resume_holds<'a>(r: &mut Reader<'a>) -> Result<Vec<ResumeHold<'a>>, DecodeError> {
    let n = r.count(MIN_KEY + 28)?;
    (0..n)
        .map(|_| {
            Ok(ResumeHold {
                key: r.key()?,
                page: PageRef {
                    region_id: r.u64()?,
                    offset: r.u64()?,
                },
                generation: r.u64()?,
                count: claim_count(r, "hold count")?,
            })
        })
        .collect()
}

/// Positions in a request's list (the claims of a resume the server refused), ascending.
pub(crate) fn put_positions(w: &mut Writer, at: &[u32]) -> Result<(), EncodeError> {
    w.count(at.len())?;
    for i in at {
        w.u32(*i);
    }
    Ok(())
}

pub(crate) fn get_positions(r: &mut Reader) -> Result<Vec<u32>, DecodeError> {
    let n = r.count(4)?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let i = r.u32()?;
        // Ascending and below the batch limit: one answer per claim, none out of range.
        if i as usize >= crate::MAX_BATCH || out.last().is_some_and(|&l| i <= l) {
            return Err(DecodeError::InvalidField("claim position"));
        }
        out.push(i);
    }
    Ok(out)
}
