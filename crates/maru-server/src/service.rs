//! One request in, one reply out: decoding, the handshake and role rules, and the mapping of
//! every request onto [`ServerState`]. No I/O here: the connection loop owns the socket.

use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use maru_proto::{
    decode_request, encode_error, encode_response, request_name, ErrorCode, Header, RegisterEntry,
    Request, Response, WireError, FLAG_ERROR,
};

use maru_transport::Stream;

use crate::reply;
use crate::state::{Peer, ResumeClaim, Resumed, Scratch, ServerState};

/// What one connection remembers between requests.
pub(crate) struct ConnCtx {
    pub peer: Peer,
    scratch: Scratch,
    /// A second descriptor of the connection's socket, for it to become its session's watch
    /// connection (where notices are written from other threads).
    watch_socket: Option<Stream>,
    /// Whether the connection is on the Unix socket (the only place descriptors travel).
    pub unix: bool,
    /// Descriptors for replies already in the output buffer, in reply order: the connection
    /// attaches them to the write that carries those replies.
    pub fds: Vec<OwnedFd>,
    /// When the peer said its next request comes (`Ahead`), from the frame just answered;
    /// the connection takes it before waiting for that request (busy_poll.rs).
    pub ahead: Option<Duration>,
}

impl ConnCtx {
    pub fn new(watch_socket: Option<Stream>) -> Self {
        ConnCtx {
            peer: Peer::New,
            scratch: Scratch::default(),
            watch_socket,
            unix: false,
            fds: Vec::new(),
            ahead: None,
        }
    }
}

impl Default for ConnCtx {
    fn default() -> Self {
        ConnCtx::new(None)
    }
}

/// Answers one frame whose header was valid, appending the reply (or an error reply carrying
/// the request id) to `out`, and records the operation's latency.
pub(crate) fn handle_frame(
    state: &ServerState,
    ctx: &mut ConnCtx,
    header: &Header,
    payload: &[u8],
    out: &mut Vec<u8>,
) {
    let started = Instant::now();
    let before = out.len();
    let id = header.request_id;
    let result = match decode_request(header, payload) {
        Ok(req) => dispatch(state, ctx, id, &req, out),
        Err(e) => Err(WireError::new(e.code(), e.to_string())),
    };
    if let Err(e) = result {
        out.truncate(before);
        encode_error(out, id, &e);
    }
    // No reply is an answered request too (release_holds, touch; watch answers on its own
    // path).
    let ok = out.len() == before
        || out
            .get(before + 8..before + 10)
            .is_some_and(|f| u16::from_le_bytes([f[0], f[1]]) & FLAG_ERROR == 0);
    state
        .ops
        .record(request_name(header.msg_type), started.elapsed(), ok);
}

fn respond(out: &mut Vec<u8>, id: u64, resp: &Response) -> Result<(), WireError> {
    encode_response(out, id, resp).map_err(|e| {
        WireError::new(
            ErrorCode::Internal,
            format!("reply could not be encoded: {e}"),
        )
    })
}

fn read_only() -> WireError {
    WireError::new(
        ErrorCode::InvalidArgument,
        "admin connections may only read (stats, lookups, region lists)",
    )
}

fn not_handshaken() -> WireError {
    WireError::new(
        ErrorCode::NotHandshaken,
        "send hello first (and again after goodbye)",
    )
}

fn dispatch(
    state: &ServerState,
    ctx: &mut ConnCtx,
    id: u64,
    req: &Request,
    out: &mut Vec<u8>,
) -> Result<(), WireError> {
    // Hello is the only request a new connection may send; goodbye and reads are open to
    // any handshaken peer; everything that changes state needs a client session.
    match (&ctx.peer, req) {
        (_, Request::Hello(hello)) => {
            let ok = state.hello(&mut ctx.peer, hello)?;
            return respond(out, id, &Response::HelloOk(ok));
        }
        (
            Peer::New,
            Request::Resume {
                hello,
                regions,
                pins,
                holds,
            },
        ) => {
            let claim = ResumeClaim {
                regions,
                pins,
                holds,
            };
            let done: Resumed = state.resume(&mut ctx.peer, hello, &claim)?;
            let answer = Response::Resumed {
                refused: done.refused_regions,
                refused_pins: done.refused_pins,
                refused_holds: done.refused_holds,
                hello: done.hello,
            };
            return respond(out, id, &answer);
        }
        (Peer::New, _) => return Err(not_handshaken()),
        (_, Request::Goodbye) => {
            state.goodbye(&mut ctx.peer);
            return respond(out, id, &Response::Ok);
        }
        _ => {}
    }
    let ConnCtx {
        peer,
        scratch,
        watch_socket,
        unix,
        fds,
        ahead,
    } = ctx;
    let peer: &Peer = peer;
    let session = match peer {
        Peer::Client(s) => Some(&**s),
        _ => None,
    };
    let client = || session.ok_or_else(read_only);
    // Keys travel bare; the registry knows them behind the peer's namespace prefix.
    let scope = peer.scope();
    match req {
        Request::Hello(_) | Request::Goodbye => Err(WireError::new(
            ErrorCode::Internal,
            "hello and goodbye are answered before dispatch",
        )),
        Request::Resume { .. } => Err(WireError::new(
            ErrorCode::InvalidArgument,
            "resume is the first request of a connection",
        )),
        Request::Heartbeat => respond(out, id, &Response::Ok),
        Request::RmAlloc { .. }
        | Request::RmFree { .. }
        | Request::RmGetAccess { .. }
        | Request::RmStats
        | Request::RmList => Err(WireError::new(
            ErrorCode::UnknownMessage,
            format!(
                "{} is a resource-manager request; this is a metadata server",
                req.name()
            ),
        )),
        Request::RequestRegion { size } => {
            let Peer::Client(s) = peer else {
                return Err(read_only());
            };
            let region = state.request_region(s, *size)?;
            reply::region(out, id, region.wire());
            Ok(())
        }
        Request::ReturnRegion { region_id } => {
            state.return_region(client()?, *region_id)?;
            respond(out, id, &Response::Ok)
        }
        Request::Register(e) => {
            let s = client()?;
            let e = RegisterEntry {
                key: scratch.scoped(scope, e.key),
                ..*e
            };
            let new = state.register(s, &e)?;
            respond(out, id, &Response::Bool(new))
        }
        Request::BatchRegister(entries) => {
            let s = client()?;
            let keys: Vec<&[u8]> = entries.iter().map(|e| e.key).collect();
            let (keys, _) = scratch.scoped_all(scope, &keys);
            let scoped: Vec<RegisterEntry> = entries
                .iter()
                .zip(keys)
                .map(|(e, key)| RegisterEntry { key, ..*e })
                .collect();
            let news = state.batch_register(s, &scoped)?;
            respond(out, id, &Response::Bools(news))
        }
        Request::Lookup { key } => {
            state.write_lookup(out, id, session, scratch.scoped(scope, key));
            Ok(())
        }
        Request::BatchLookup { keys } => {
            let (keys, rest) = scratch.scoped_all(scope, keys);
            state.write_batch_lookup(out, id, session, &keys, rest);
            Ok(())
        }
        Request::Exists { key } => {
            let found = state.exists(scratch.scoped(scope, key));
            respond(out, id, &Response::Bool(found))
        }
        Request::BatchExists { keys } => {
            let (keys, _) = scratch.scoped_all(scope, keys);
            let found = keys.iter().map(|k| state.exists(k)).collect();
            respond(out, id, &Response::Bools(found))
        }
        Request::Delete { key } => {
            client()?;
            let status = state.delete(scratch.scoped(scope, key));
            respond(out, id, &Response::Delete(status))
        }
        Request::BatchDelete { keys } => {
            client()?;
            let (keys, _) = scratch.scoped_all(scope, keys);
            let statuses = state.batch_delete(&keys);
            respond(out, id, &Response::BatchDelete(statuses))
        }
        Request::Pin { key } => {
            let found = state.pin(client()?, scratch.scoped(scope, key))?;
            respond(out, id, &Response::Bool(found))
        }
        Request::BatchPin { keys } => {
            let s = client()?;
            let (keys, _) = scratch.scoped_all(scope, keys);
            let found = keys
                .iter()
                .map(|k| state.pin(s, k))
                .collect::<Result<Vec<_>, _>>()?;
            respond(out, id, &Response::Bools(found))
        }
        Request::Unpin { key } => {
            let was = state.unpin(client()?, scratch.scoped(scope, key));
            respond(out, id, &Response::Bool(was))
        }
        Request::BatchUnpin { keys } => {
            let s = client()?;
            let (keys, _) = scratch.scoped_all(scope, keys);
            let was = keys.iter().map(|k| state.unpin(s, k)).collect();
            respond(out, id, &Response::Bools(was))
        }
        Request::RenewPins => {
            state.renew_pins(client()?);
            respond(out, id, &Response::Ok)
        }
        Request::Watch => {
            let Peer::Client(s) = peer else {
                return Err(read_only());
            };
            // An owner whose alloc found no free page asks this before anything else: pages
            // that views in the hold lanes kept and let go since the last tick go back first.
            state.recheck_lanes();
            // Answered on the session's watch connection, in order with its notices.
            state.watch(s, watch_socket.take(), id);
            Ok(())
        }
        Request::MakeRoom { pages } => {
            let freed = state.make_room(client()?, *pages);
            respond(out, id, &Response::ReturnPages(freed))
        }
        Request::ReleaseHolds { pages } => {
            // No reply: releases travel in front of other requests.
            state.release_holds(client()?, pages);
            Ok(())
        }
        Request::Touch { keys } => {
            // No reply, like release_holds.
            client()?;
            let (keys, _) = scratch.scoped_all(scope, keys);
            state.touch(&keys, None);
            Ok(())
        }
        Request::Hit { hits } => {
            // No reply, like touch.
            client()?;
            let keys: Vec<&[u8]> = hits.iter().map(|h| h.key).collect();
            let counts: Vec<u32> = hits.iter().map(|h| h.count).collect();
            let (keys, _) = scratch.scoped_all(scope, &keys);
            state.touch(&keys, Some(&counts));
            Ok(())
        }
        Request::Ahead { in_us } => {
            // No reply: what it asks for is the wait for the next request that follows every
            // frame (busy_poll.rs).
            client()?;
            *ahead = Some(Duration::from_micros(u64::from(*in_us)));
            Ok(())
        }
        Request::GiveBack { region_id } => {
            // No reply, like release_holds: it travels on the watch connection.
            state.give_back(client()?, *region_id);
            Ok(())
        }
        Request::PageCurrent { page, generation } => {
            let current = state.page_current(*page, *generation);
            respond(out, id, &Response::Bool(current))
        }
        Request::ListAllocations => {
            let list = state.allocations();
            WireError::check_listing(list.len(), "regions", "stats")?;
            respond(out, id, &Response::Allocations(list))
        }
        Request::Stats => {
            let json = serde_json::to_string(&state.stats())
                .map_err(|e| WireError::new(ErrorCode::Internal, e.to_string()))?;
            respond(out, id, &Response::Stats(json))
        }
        Request::GetRegion { region_id } => {
            let region = state.get_region(*region_id)?;
            reply::region(out, id, region.wire());
            Ok(())
        }
        Request::ListRegions => {
            state.write_regions(out, id);
            Ok(())
        }
        Request::Descriptor {
            region_id,
            writable,
        } => {
            if !*unix {
                return Err(WireError::new(
                    ErrorCode::InvalidArgument,
                    "descriptors travel only over the Unix socket; map the region by its path",
                ));
            }
            let s = client()?;
            let access = state.descriptor_access(s, *region_id, *writable)?;
            let fd = crate::descriptor::open(&access, *writable)?;
            respond(
                out,
                id,
                &Response::Descriptor {
                    offset: access.offset,
                    len: access.len,
                    writable: *writable,
                },
            )?;
            // Pushed last: a reply that failed above carries no descriptor.
            fds.push(fd);
            Ok(())
        }
    }
}
