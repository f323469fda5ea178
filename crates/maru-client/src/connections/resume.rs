//! Taking a session up again at a restarted metadata server (`maru_proto::Request::Resume`):
//! the first connection of the resumed session's pool.

use std::time::{Duration, Instant};

use maru_proto::{Hello, Request, Response, Role, ServerUrl, SESSION_TOKEN_LEN};

use super::{Books, ConnectionPool, Identity, PooledConn, Sharing, Timing};
use crate::claims::Claims;
use crate::error::{Error, Result};
use crate::wait::{ReplyClock, WaitHook};

/// What a restarted server did not give back to a resumed session: region ids, and the
/// positions of the claim's pins and holds.
pub(crate) struct Refused {
    pub regions: Vec<u64>,
    pub pins: Vec<u32>,
    pub holds: Vec<u32>,
}

impl ConnectionPool {
    /// Takes up the session of `session` again at a restarted server (see
    /// `maru_proto::Request::Resume`), presenting the regions it owns and the pins and holds
    /// of `books` that `claims` took from them: the pool of the resumed session, over the
    /// same books, and what the server refused. Connecting is tried again while the server
    /// is not listening yet, until the handler's timeout; a refusal of the session is
    /// returned as the server's error.
    #[allow(clippy::too_many_arguments)]
    pub fn resume(
        url: ServerUrl,
        identity: Identity,
        session: [u8; SESSION_TOKEN_LEN],
        regions: &[u64],
        claims: &Claims,
        books: Books,
        sharing: Sharing,
        timing: Timing,
        hook: &dyn WaitHook,
    ) -> Result<(ConnectionPool, Refused)> {
        let clock = ReplyClock::new();
        let w = timing.wait(hook, &clock);
        let deadline = Instant::now() + timing.timeout;
        let mut pause = Duration::from_millis(5);
        let mut conn = loop {
            match PooledConn::open(&url, timing.timeout, identity.secret.as_ref()) {
                Ok(c) => break c,
                Err(e) if Instant::now() + pause < deadline => {
                    tracing::debug!("maru: resume: the server is not back yet ({e})");
                    // Bounded by the handler's timeout; the backoff keeps a restart that
                    // takes a while from costing a connect attempt per millisecond.
                    hook.block(&mut || std::thread::sleep(pause));
                    pause = (pause * 2).min(Duration::from_millis(200));
                }
                Err(e) => return Err(e),
            }
        };
        let req = Request::Resume {
            hello: Hello {
                role: Role::Client,
                instance_id: &identity.instance_id,
                host: &identity.host,
                pid: identity.pid,
                start_time: identity.start_time,
                session_token: Some(session),
                namespace: &identity.namespace,
            },
            regions: regions.to_vec(),
            pins: claims.pins(),
            holds: claims.holds(),
        };
        let (refused, server) = match conn.call(&req, &w)? {
            Response::Resumed {
                refused,
                refused_pins,
                refused_holds,
                hello,
            } => {
                let refused = Refused {
                    regions: refused,
                    pins: refused_pins,
                    holds: refused_holds,
                };
                (refused, hello)
            }
            other => return Err(Error::unexpected("resume", &other)),
        };
        let pool =
            ConnectionPool::around(conn, server, url, identity, sharing, timing, clock, books);
        Ok((pool, refused))
    }
}
