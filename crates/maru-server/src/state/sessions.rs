//! Sessions: every connection of one instance (one `MaruHandler`) belongs to one session. The
//! instance's first connection creates it with its hello and gets a random token back; later
//! connections join by presenting that token, so another process cannot claim an instance id
//! that is in use. A session ends with a goodbye or when its last connection closes, and its
//! end releases the regions it owns (see `regions` for when they are freed).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use maru_proto::{ErrorCode, Hello, HelloOk, Role, WireError, SESSION_TOKEN_LEN};

use super::regions::TableRegion;
use super::{err, lock, ServerState};

/// An instance's session: created by its first connection, joined by later ones with the
/// token, ended by goodbye or when its last connection drops.
pub(crate) struct Session {
    pub(super) id: u64,
    pub(super) instance_id: String,
    token: [u8; SESSION_TOKEN_LEN],
    ended: AtomicBool,
}

impl Session {
    pub fn is_ended(&self) -> bool {
        self.ended.load(Ordering::SeqCst)
    }
}

/// A live session and how many connections it has.
pub(super) struct SessionRec {
    pub(super) session: Arc<Session>,
    pub(super) connections: usize,
}

/// Who is on the other end of a connection.
pub(crate) enum Peer {
    /// Nothing but a Hello is accepted yet.
    New,
    Client(Arc<Session>),
    /// An operator tool: reads only.
    Admin,
}

impl ServerState {
    pub fn hello(&self, peer: &mut Peer, hello: &Hello) -> Result<HelloOk, WireError> {
        if !matches!(peer, Peer::New) {
            return Err(err(
                ErrorCode::InvalidArgument,
                "this connection already said hello",
            ));
        }
        let ok = |token| HelloOk {
            server: format!("maru-server {}", env!("CARGO_PKG_VERSION")),
            hostname: self.hostname.clone(),
            session_token: token,
        };
        match hello.role {
            Role::Admin => {
                *peer = Peer::Admin;
                return Ok(ok([0; SESSION_TOKEN_LEN]));
            }
            Role::Server => return Err(err(
                ErrorCode::InvalidArgument,
                "role 'server' is for talking to a resource manager; connect as a client or admin",
            )),
            Role::Client => {}
        }
        if hello.instance_id.is_empty() {
            return Err(err(
                ErrorCode::InvalidArgument,
                "a client hello needs an instance id",
            ));
        }
        let mut sessions = lock(&self.sessions);
        let session = match (sessions.get_mut(hello.instance_id), hello.session_token) {
            (None, None) => {
                let mut token = [0u8; SESSION_TOKEN_LEN];
                getrandom::fill(&mut token).map_err(|e| {
                    err(
                        ErrorCode::Internal,
                        format!("no randomness for a session token: {e}"),
                    )
                })?;
                let session = Arc::new(Session {
                    id: self.next_session.fetch_add(1, Ordering::Relaxed),
                    instance_id: hello.instance_id.to_owned(),
                    token,
                    ended: AtomicBool::new(false),
                });
                sessions.insert(
                    hello.instance_id.to_owned(),
                    SessionRec {
                        session: session.clone(),
                        connections: 1,
                    },
                );
                session
            }
            (Some(rec), Some(token)) if constant_time_eq(&rec.session.token, &token) => {
                rec.connections += 1;
                rec.session.clone()
            }
            (Some(_), _) => {
                return Err(err(
                    ErrorCode::SessionConflict,
                    format!(
                        "instance id {:?} already has a live session; further connections must \
                         present its session token",
                        hello.instance_id
                    ),
                ))
            }
            (None, Some(_)) => {
                return Err(err(
                    ErrorCode::SessionConflict,
                    format!(
                        "instance {:?} has no live session (it ended); connect without a token \
                         to start a new one",
                        hello.instance_id
                    ),
                ))
            }
        };
        drop(sessions);
        let token = session.token;
        *peer = Peer::Client(session);
        Ok(ok(token))
    }

    /// A connection closed (for any reason). The last connection of a session ends it.
    pub fn disconnect(&self, peer: &mut Peer) {
        let Peer::Client(session) = std::mem::replace(peer, Peer::New) else {
            return;
        };
        let mut sessions = lock(&self.sessions);
        let last = match sessions.get_mut(&session.instance_id) {
            Some(rec) if rec.session.id == session.id => {
                rec.connections -= 1;
                rec.connections == 0
            }
            // Already ended by a goodbye (and maybe replaced by a newer session).
            _ => false,
        };
        if last {
            sessions.remove(&session.instance_id);
        }
        drop(sessions);
        if last {
            self.end_session(&session);
        }
    }

    /// Goodbye: the instance leaves on purpose. Its session ends for every connection.
    pub fn goodbye(&self, peer: &mut Peer) {
        let Peer::Client(session) = std::mem::replace(peer, Peer::New) else {
            *peer = Peer::New;
            return;
        };
        let mut sessions = lock(&self.sessions);
        if matches!(sessions.get(&session.instance_id), Some(rec) if rec.session.id == session.id) {
            sessions.remove(&session.instance_id);
        }
        drop(sessions);
        self.end_session(&session);
    }

    fn end_session(&self, session: &Session) {
        if session.ended.swap(true, Ordering::SeqCst) {
            return;
        }
        let owned: Vec<Arc<TableRegion>> = self
            .table()
            .by_slot
            .values()
            .filter(|r| r.session == session.id)
            .cloned()
            .collect();
        tracing::debug!(instance = %session.instance_id, regions = owned.len(), "session ended");
        // Every region is disowned before any goes back, so whoever sees one of them freed at
        // the resource manager sees the whole session ended.
        let to_free: Vec<_> = owned.iter().filter_map(|r| self.disown(r)).collect();
        for handle in to_free {
            self.free_at_rm(handle);
        }
    }

    /// Number of live instance sessions.
    pub fn session_count(&self) -> usize {
        lock(&self.sessions).len()
    }
}

pub(super) fn session_ended() -> WireError {
    err(
        ErrorCode::NotHandshaken,
        "this instance's session has ended (goodbye); reconnect to start a new one",
    )
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    use crate::state::fixtures::*;

    #[test]
    fn sessions_need_their_token_and_end_with_the_last_connection() {
        let (st, rm) = state(&[]);
        let (mut a1, sa, token) = client(&st, "a");
        let mut other = Peer::New;
        let e = st.hello(&mut other, &hello("a", None)).unwrap_err();
        assert_eq!(e.code, ErrorCode::SessionConflict);
        let e = st
            .hello(&mut other, &hello("a", Some([0; 16])))
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::SessionConflict);
        assert!(
            matches!(other, Peer::New),
            "a refused hello changes nothing"
        );
        let mut a2 = Peer::New;
        st.hello(&mut a2, &hello("a", Some(token))).unwrap();
        let e = st.hello(&mut a2, &hello("a", Some(token))).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidArgument, "second hello");

        let region = st.request_region(&sa, MIB).unwrap();
        assert_eq!(rm.live().len(), 1);
        st.disconnect(&mut a1);
        assert_eq!(
            rm.live().len(),
            1,
            "one connection of the instance is still open"
        );
        st.disconnect(&mut a2);
        assert!(
            rm.live().is_empty(),
            "last connection gone: unreferenced region freed"
        );
        assert!(st.get_region(region.info.handle.region_id).is_err());
        // A new session may start under the same instance id, but not with the old token.
        let mut late = Peer::New;
        let e = st.hello(&mut late, &hello("a", Some(token))).unwrap_err();
        assert_eq!(e.code, ErrorCode::SessionConflict);
        client(&st, "a");
    }

    /// A session's end is seen all at once: while any of its regions goes back to the
    /// resource manager, none of them still counts its owner as connected.
    #[test]
    fn a_session_ends_for_all_its_regions_before_any_is_freed() {
        let (st, rm) = state(&[]);
        let st = Arc::new(st);
        let (mut peer, s, _) = client(&st, "a");
        // Half the regions hold a key (they stay), half are empty (they go back at once).
        for i in 0..8u64 {
            let r = st.request_region(&s, MIB).unwrap();
            if i % 2 == 0 {
                let key = format!("k{i}");
                assert!(st.register(&s, &reg(key.as_bytes(), &r, 0, 1)).unwrap());
            }
        }
        let still_owned = Arc::new(Mutex::new(Vec::new()));
        {
            let (st, still_owned) = (Arc::downgrade(&st), still_owned.clone());
            *rm.on_free.lock().unwrap() = Some(Box::new(move |_| {
                let Some(st) = st.upgrade() else { return };
                let owned = st.allocations().into_iter().filter(|r| r.owner_connected);
                still_owned
                    .lock()
                    .unwrap()
                    .extend(owned.map(|r| r.handle.region_id));
            }));
        }
        st.goodbye(&mut peer);
        assert_eq!(rm.freed.lock().unwrap().len(), 4);
        assert_eq!(rm.live().len(), 4);
        let still_owned = still_owned.lock().unwrap();
        assert!(
            still_owned.is_empty(),
            "regions {still_owned:?} were still owned while others were freed"
        );
    }
}
