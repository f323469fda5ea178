//! Sessions: every connection of one `MaruHandler` belongs to one session. A hello without a
//! token creates a session and gets its random token back; the handler's other connections
//! join by presenting that token. The instance id is a label: several sessions may carry the
//! same one. A session ends with a goodbye or when its last connection closes, and its end
//! releases every claim it holds: its pins at once, its regions (see `regions` for when they
//! are freed).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use maru_proto::{ErrorCode, Hello, HelloOk, Role, WireError, SESSION_TOKEN_LEN};

use super::holds::HoldBook;
use super::leases::Leases;
use super::notices::Outbox;
use super::regions::TableRegion;
use super::{err, lock, ServerState};

/// One handler's session: created by its first connection, joined by later ones with the
/// token, ended by goodbye or when its last connection drops.
pub(crate) struct Session {
    pub(super) id: u64,
    /// A label for people and statistics; not unique.
    pub(super) instance_id: String,
    /// The registry's prefix for this session's namespace (see [`scope_of`]).
    pub(super) scope: Box<[u8]>,
    pub(super) token: [u8; SESSION_TOKEN_LEN],
    ended: AtomicBool,
    /// The session's pins (see `leases`).
    pub(super) leases: Mutex<Leases>,
    /// The session's holds on pages its views are over (see `holds`).
    pub(super) holds: Mutex<HoldBook>,
    /// Page returns for the regions the session owns, and its watch connection.
    pub(super) notices: Mutex<Outbox>,
    /// The session's lane of the hold lanes and its tag (see `lanes`).
    pub(super) lane: Option<(u32, u8)>,
}

impl Session {
    pub fn is_ended(&self) -> bool {
        self.ended.load(Ordering::SeqCst)
    }

    /// The registry prefix of the session's namespace.
    pub fn scope(&self) -> &[u8] {
        &self.scope
    }
}

/// The registry prefix of `namespace`: its length, then its bytes. Every key is stored
/// behind its namespace's prefix, so equal key bytes in two namespaces are two keys and no
/// key of one namespace is a key of another (the length byte makes the prefixes a prefix
/// code: none is the start of another).
pub(crate) fn scope_of(namespace: &str) -> Box<[u8]> {
    // The decoder bounds namespaces to MAX_NAMESPACE_LEN (255) bytes, so the length fits.
    let len = u8::try_from(namespace.len()).unwrap_or(u8::MAX);
    let mut scope = Vec::with_capacity(1 + namespace.len());
    scope.push(len);
    scope.extend_from_slice(&namespace.as_bytes()[..len as usize]);
    scope.into_boxed_slice()
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
    /// An operator tool: reads only, in the namespace whose registry prefix it carries.
    Admin(Box<[u8]>),
}

impl Peer {
    /// The registry prefix of the peer's namespace (the shared one before a hello).
    pub fn scope(&self) -> &[u8] {
        match self {
            Peer::Client(s) => s.scope(),
            Peer::Admin(scope) => scope,
            Peer::New => &[0],
        }
    }
}

impl ServerState {
    pub fn hello(&self, peer: &mut Peer, hello: &Hello) -> Result<HelloOk, WireError> {
        if !matches!(peer, Peer::New) {
            return Err(err(
                ErrorCode::InvalidArgument,
                "this connection already said hello",
            ));
        }
        let ok = |token, lane| self.hello_ok(hello.namespace, token, lane);
        match hello.role {
            Role::Admin => {
                *peer = Peer::Admin(scope_of(hello.namespace));
                return Ok(ok([0; SESSION_TOKEN_LEN], None));
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
        let session = match hello.session_token {
            None => {
                let mut token = [0u8; SESSION_TOKEN_LEN];
                loop {
                    getrandom::fill(&mut token).map_err(|e| {
                        err(
                            ErrorCode::Internal,
                            format!("no randomness for a session token: {e}"),
                        )
                    })?;
                    if !sessions.contains_key(&token) && !self.token_may_resume(&token) {
                        break;
                    }
                }
                let session = self.new_session(hello, token);
                self.keep_session(&mut sessions, token, &session);
                session
            }
            Some(token) => match sessions.get_mut(&token) {
                Some(rec) if *rec.session.scope == *scope_of(hello.namespace) => {
                    rec.connections += 1;
                    rec.session.clone()
                }
                Some(_) => {
                    return Err(err(
                        ErrorCode::InvalidArgument,
                        format!(
                            "namespace {:?} is not the namespace of the session this token \
                             joins",
                            hello.namespace
                        ),
                    ))
                }
                None => {
                    return Err(err(
                        ErrorCode::SessionConflict,
                        "no live session has this token (it ended, or never existed); connect \
                         without a token to start a new one",
                    ))
                }
            },
        };
        drop(sessions);
        let (token, lane) = (session.token, session.lane);
        *peer = Peer::Client(session);
        Ok(ok(token, lane))
    }

    /// The answer to a hello of a session of `namespace` under `token`.
    pub(super) fn hello_ok(
        &self,
        namespace: &str,
        token: [u8; SESSION_TOKEN_LEN],
        lane: Option<(u32, u8)>,
    ) -> HelloOk {
        let mut index = self.index_info(namespace);
        if let Some(ix) = &mut index {
            ix.lane = self.lane_info(lane);
        }
        HelloOk {
            server: format!("maru-server {}", env!("CARGO_PKG_VERSION")),
            hostname: self.hostname.clone(),
            session_token: token,
            index,
        }
    }

    /// A session of `hello`'s instance under `token`, with no claim yet.
    pub(super) fn new_session(
        &self,
        hello: &Hello,
        token: [u8; SESSION_TOKEN_LEN],
    ) -> Arc<Session> {
        Arc::new(Session {
            id: self.next_session.fetch_add(1, Ordering::Relaxed),
            instance_id: hello.instance_id.to_owned(),
            scope: scope_of(hello.namespace),
            token,
            ended: AtomicBool::new(false),
            leases: Mutex::new(Leases::default()),
            holds: Mutex::new(HoldBook::default()),
            notices: Mutex::new(Outbox::default()),
            lane: self.take_lane(),
        })
    }

    /// A connection closed (for any reason). The last connection of a session ends it.
    pub fn disconnect(&self, peer: &mut Peer) {
        let Peer::Client(session) = std::mem::replace(peer, Peer::New) else {
            return;
        };
        let mut sessions = lock(&self.sessions);
        let last = match sessions.get_mut(&session.token) {
            Some(rec) if rec.session.id == session.id => {
                rec.connections -= 1;
                rec.connections == 0
            }
            // Already ended by a goodbye.
            _ => false,
        };
        if last {
            sessions.remove(&session.token);
            self.save_tokens(&sessions);
        }
        drop(sessions);
        if last {
            self.end_session(&session);
        }
    }

    /// Goodbye: the handler leaves on purpose. Its session ends for every connection.
    pub fn goodbye(&self, peer: &mut Peer) {
        let Peer::Client(session) = std::mem::replace(peer, Peer::New) else {
            *peer = Peer::New;
            return;
        };
        let mut sessions = lock(&self.sessions);
        if matches!(sessions.get(&session.token), Some(rec) if rec.session.id == session.id) {
            sessions.remove(&session.token);
            self.save_tokens(&sessions);
        }
        drop(sessions);
        self.end_session(&session);
    }

    fn end_session(&self, session: &Session) {
        if session.ended.swap(true, Ordering::SeqCst) {
            return;
        }
        let pins = self.drop_leases(session);
        let holds = self.drop_holds(session);
        self.give_lane_back(session.lane);
        let owned: Vec<Arc<TableRegion>> = self
            .table()
            .by_slot
            .values()
            .filter(|r| r.session() == session.id)
            .cloned()
            .collect();
        tracing::debug!(
            instance = %session.instance_id,
            session = session.id,
            regions = owned.len(),
            pins,
            holds,
            "session ended"
        );
        // Every region is disowned before any goes back, so whoever sees one of them freed at
        // the resource manager sees the whole session ended.
        let to_free: Vec<_> = owned.iter().filter_map(|r| self.disown(r)).collect();
        for handle in to_free {
            self.free_at_rm(handle);
        }
    }

    /// Number of live sessions.
    pub fn session_count(&self) -> usize {
        lock(&self.sessions).len()
    }
}

pub(super) fn session_ended() -> WireError {
    err(
        ErrorCode::NotHandshaken,
        "this handler's session has ended (goodbye); reconnect to start a new one",
    )
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
        // The same instance id without a token is another session, with its own token.
        let (_other_peer, other_session, other_token) = client(&st, "a");
        assert_ne!(other_session.id, sa.id);
        assert_ne!(other_token, token);
        let mut other = Peer::New;
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
        // The old token joins nothing.
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
