//! One request in, one reply out: decoding, the handshake and role rules, and the mapping of
//! every request onto [`ServerState`]. No I/O here: the connection loop owns the socket.

use std::time::Instant;

use maru_proto::{
    decode_request, encode_error, encode_response, request_name, ErrorCode, Header, Request,
    Response, WireError, FLAG_ERROR,
};

use crate::reply;
use crate::state::{Peer, Scratch, ServerState};

/// What one connection remembers between requests.
pub(crate) struct ConnCtx {
    pub peer: Peer,
    scratch: Scratch,
}

impl Default for ConnCtx {
    fn default() -> Self {
        ConnCtx {
            peer: Peer::New,
            scratch: Scratch::default(),
        }
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
    let ok = out
        .get(before + 8..before + 10)
        .map(|f| u16::from_le_bytes([f[0], f[1]]) & FLAG_ERROR == 0)
        .unwrap_or(false);
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
        (Peer::New, _) => return Err(not_handshaken()),
        (_, Request::Goodbye) => {
            state.goodbye(&mut ctx.peer);
            return respond(out, id, &Response::Ok);
        }
        _ => {}
    }
    let ConnCtx { peer, scratch } = ctx;
    let session = match peer {
        Peer::Client(s) => Some(&*s),
        _ => None,
    };
    let client = || session.ok_or_else(read_only);
    match req {
        Request::Hello(_) | Request::Goodbye => Err(WireError::new(
            ErrorCode::Internal,
            "hello and goodbye are answered before dispatch",
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
            let region = state.request_region(client()?, *size)?;
            reply::region(out, id, region.wire());
            Ok(())
        }
        Request::ReturnRegion { region_id } => {
            state.return_region(client()?, *region_id)?;
            respond(out, id, &Response::Ok)
        }
        Request::Register(e) => {
            let new = state.register(client()?, e)?;
            respond(out, id, &Response::Bool(new))
        }
        Request::BatchRegister(entries) => {
            let news = state.batch_register(client()?, entries)?;
            respond(out, id, &Response::Bools(news))
        }
        Request::Lookup { key } => {
            state.write_lookup(out, id, key);
            Ok(())
        }
        Request::BatchLookup { keys } => {
            state.write_batch_lookup(out, id, keys, scratch);
            Ok(())
        }
        Request::Exists { key } => respond(out, id, &Response::Bool(state.exists(key))),
        Request::BatchExists { keys } => respond(
            out,
            id,
            &Response::Bools(keys.iter().map(|k| state.exists(k)).collect()),
        ),
        Request::Delete { key } => {
            client()?;
            respond(out, id, &Response::Delete(state.delete(key)))
        }
        Request::BatchDelete { keys } => {
            client()?;
            let statuses = keys.iter().map(|k| state.delete(k)).collect();
            respond(out, id, &Response::BatchDelete(statuses))
        }
        Request::Pin { key } => {
            client()?;
            respond(out, id, &Response::Bool(state.pin(key)))
        }
        Request::BatchPin { keys } => {
            client()?;
            let found = keys.iter().map(|k| state.pin(k)).collect();
            respond(out, id, &Response::Bools(found))
        }
        Request::Unpin { key } => {
            client()?;
            respond(out, id, &Response::Bool(state.unpin(key)))
        }
        Request::BatchUnpin { keys } => {
            client()?;
            let was = keys.iter().map(|k| state.unpin(k)).collect();
            respond(out, id, &Response::Bools(was))
        }
        Request::ListAllocations => {
            let list = state.allocations();
            if list.len() > maru_proto::MAX_BATCH {
                return Err(WireError::new(
                    ErrorCode::BatchTooLarge,
                    format!(
                        "{} regions exceed the {} one reply may list; use stats",
                        list.len(),
                        maru_proto::MAX_BATCH
                    ),
                ));
            }
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
    }
}
