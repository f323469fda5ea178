//! Taking a session up again at a restarted metadata server (`maru_proto::Request::Resume`):
//! the first connection of the resumed session's pool.

use std::time::{Duration, Instant};

use maru_proto::{Hello, Request, Response, Role, ServerUrl, SESSION_TOKEN_LEN};

use super::{ConnectionPool, Identity, PooledConn, Timing};
use crate::error::{Error, Result};
use crate::wait::{ReplyClock, WaitHook};

impl ConnectionPool {
    /// Takes up the session of `session` again at a restarted server (see
    /// `maru_proto::Request::Resume`), presenting the regions it owns: the pool of the
    /// resumed session and the regions the server refused. Connecting is tried again while
    /// the server is not listening yet, until the handler's timeout; a refusal of the
    /// session is returned as the server's error.
    pub fn resume(
        url: ServerUrl,
        identity: Identity,
        session: [u8; SESSION_TOKEN_LEN],
        regions: &[u64],
        max_idle: usize,
        timing: Timing,
        hook: &dyn WaitHook,
    ) -> Result<(ConnectionPool, Vec<u64>)> {
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
        };
        let (refused, server) = match conn.call(&req, &w)? {
            Response::Resumed { refused, hello } => (refused, hello),
            other => return Err(Error::unexpected("resume", &other)),
        };
        let pool = ConnectionPool::around(conn, server, url, identity, max_idle, timing, clock);
        Ok((pool, refused))
    }
}
