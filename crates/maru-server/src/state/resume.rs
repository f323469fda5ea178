//! Sessions that come back after a restart. The tokens of the live sessions are kept in a
//! file beside the key index (`INDEX.sessions`, 0600, rewritten whole when a session starts
//! or ends), so a server started again on the index knows which tokens were real. For its
//! *reconnect grace* it keeps every region a returning session may still claim: the adopted
//! regions no key names (they are not given back at the reconcile) and the regions the
//! rebuild restored (they are not freed with their last key, nor evicted to make room). A
//! handler presenting one of those tokens in a [`maru_proto::Request::Resume`] gets its session
//! back, with the regions it lists that the server holds and no other session claimed; the
//! rest are refused. It also gets back the pins of its books on keys that exist, leased
//! from now, and the holds of its live views on pages that still hold the registration the
//! view was taken of; what it does not get back is named in the answer, so the handler drops
//! it from its books. At the end of the grace the tokens are forgotten and what nobody claimed
//! goes the way a dead session's regions go.
//!
//! The file is not synced: it matters only while the pool's shared memory survives, and a
//! process killed after a write leaves the write in the page cache.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use maru_proto::{
    ErrorCode, Handle, Hello, HelloOk, RegionInfo, ResumeHold, ResumePin, Role, WireError,
};

use super::holds::Claim;
use super::sessions::{Peer, Session, SessionRec};
use super::{err, lock, ServerState};

type Token = [u8; maru_proto::SESSION_TOKEN_LEN];

/// What a resuming handler claims from its books: the regions it owns, its pins (keys
/// without the namespace, with their counts) and the holds of its live views.
pub struct ResumeClaim<'a> {
    pub regions: &'a [u64],
    pub pins: &'a [ResumePin<'a>],
    pub holds: &'a [ResumeHold<'a>],
}

/// The answer to a resume: the hello's, and the positions of what the session does not have
/// again (region ids; positions in the claim's pins and holds, ascending).
#[derive(Debug)]
pub struct Resumed {
    pub hello: HelloOk,
    pub refused_regions: Vec<u64>,
    pub refused_pins: Vec<u32>,
    pub refused_holds: Vec<u32>,
}

/// What a restarted server keeps for the sessions of the process before it.
#[derive(Default)]
pub(super) struct ResumeBook {
    /// How long the grace lasts from the rebuild (zero: no grace).
    pub(super) grace: Duration,
    /// Where the live sessions' tokens are kept (`None`: no lasting index, nothing to keep).
    pub(super) file: Option<PathBuf>,
    /// The end of the grace (`None`: none is running).
    until: Option<Instant>,
    /// Tokens of the previous process's sessions that have not come back yet.
    tokens: HashSet<Token>,
    /// Adopted regions no key names, by id, not claimed yet.
    unnamed: HashMap<u64, Handle>,
    /// Ids of restored regions (keys name them) not claimed yet.
    restored: HashSet<u64>,
    /// Resumes between taking their token and booking their holds: parking lasts while any
    /// is under way (see `parking`).
    resuming: usize,
}

impl ResumeBook {
    fn active(&self, now: Instant) -> bool {
        self.until.is_some_and(|u| now < u)
    }
}

impl ServerState {
    /// Keeps the live sessions' tokens in `file` and, after a restart on the index, keeps
    /// what the previous process's sessions may claim for `grace`. Reads the tokens the
    /// previous process left there; call before [`ServerState::restore_from_index`].
    pub fn with_resume(self, file: PathBuf, grace: Duration) -> ServerState {
        {
            let mut book = lock(&self.resume);
            book.grace = grace;
            match std::fs::read(&file) {
                Ok(bytes) => {
                    book.tokens = bytes
                        .chunks_exact(maru_proto::SESSION_TOKEN_LEN)
                        .filter_map(|c| Token::try_from(c).ok())
                        .collect();
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!(
                    "cannot read the session tokens at {} ({e}); no session can resume",
                    file.display()
                ),
            }
            book.file = Some(file);
        }
        self
    }

    /// Called by the rebuild with the adopted regions no key names and the ids of the
    /// regions it restored: starts the reconnect grace when some session may come back.
    /// Returns whether it did (the restored regions then stay until the grace ends).
    pub(super) fn keep_for_resume(&self, unnamed: Vec<Handle>, restored: Vec<u64>) -> bool {
        let mut book = lock(&self.resume);
        if book.grace.is_zero() || book.tokens.is_empty() {
            book.tokens.clear();
            return false;
        }
        book.until = Some(Instant::now() + book.grace);
        book.unnamed = unnamed.into_iter().map(|h| (h.region_id, h)).collect();
        book.restored = restored.into_iter().collect();
        tracing::info!(
            sessions = book.tokens.len(),
            unnamed = book.unnamed.len(),
            restored = book.restored.len(),
            grace_s = book.grace.as_secs_f64(),
            "waiting for the previous sessions to resume"
        );
        true
    }

    /// Whether some session of the previous process may still resume (or is resuming).
    pub(super) fn resume_pending(&self) -> bool {
        let book = lock(&self.resume);
        book.active(Instant::now()) && (!book.tokens.is_empty() || book.resuming > 0)
    }

    /// As a restart on an index whose tokens file named `tokens` would: the grace and the
    /// parking begin (tests of what happens before those sessions resume).
    #[cfg(test)]
    pub(super) fn expect_resume(&self, tokens: &[Token], grace: Duration) {
        {
            let mut book = lock(&self.resume);
            book.grace = grace;
            book.tokens = tokens.iter().copied().collect();
        }
        assert!(self.keep_for_resume(Vec::new(), Vec::new()));
        let next = self
            .next_generation
            .load(std::sync::atomic::Ordering::Relaxed);
        self.start_parking(next);
    }

    /// Whether `token` is one of a session that may still resume.
    pub(super) fn token_may_resume(&self, token: &Token) -> bool {
        let book = lock(&self.resume);
        book.active(Instant::now()) && book.tokens.contains(token)
    }

    /// Ids of adopted regions kept for a session that may resume (the reconcile leaves them).
    pub(super) fn kept_for_resume(&self) -> Vec<u64> {
        let book = lock(&self.resume);
        book.unnamed.keys().copied().collect()
    }

    /// Records `session` under `token` with its first connection, and the tokens file with it
    /// (with the sessions' lock held, as [`ServerState::save_tokens`] wants).
    pub(super) fn keep_session(
        &self,
        sessions: &mut HashMap<Token, SessionRec>,
        token: Token,
        session: &Arc<Session>,
    ) {
        sessions.insert(
            token,
            SessionRec {
                session: session.clone(),
                connections: 1,
            },
        );
        self.save_tokens(sessions);
    }

    /// Rewrites the tokens file: the live sessions and those that may still resume. Called
    /// with the sessions' lock held, so writes follow the order of the changes.
    pub(super) fn save_tokens(&self, sessions: &HashMap<Token, SessionRec>) {
        let book = lock(&self.resume);
        let Some(file) = &book.file else { return };
        // Tokens of the previous process count only while they may still come back: a
        // server that started without a grace must not hand them to a later one.
        let waiting = book.tokens.iter().filter(|_| book.until.is_some());
        let mut bytes = Vec::with_capacity((sessions.len() + book.tokens.len()) * 16);
        for t in sessions.keys().chain(waiting) {
            bytes.extend_from_slice(t);
        }
        if let Err(e) = crate::private_file::replace(file, "sessions.tmp", &bytes, false) {
            tracing::warn!(
                "cannot keep the session tokens at {} ({e}); after a restart these sessions \
                 cannot resume",
                file.display()
            );
        }
    }

    /// Ends the reconnect grace once it is over: the tokens that did not come back are
    /// forgotten, the adopted regions nobody claimed go back and the restored ones nobody
    /// claimed go with their last key.
    pub fn end_reconnect_grace_if_due(&self, now: Instant) {
        let (unnamed, restored) = {
            let mut book = lock(&self.resume);
            match book.until {
                Some(u) if now >= u => {}
                _ => return,
            }
            book.until = None;
            book.tokens.clear();
            (
                std::mem::take(&mut book.unnamed),
                std::mem::take(&mut book.restored),
            )
        };
        tracing::info!(
            unnamed = unnamed.len(),
            restored = restored.len(),
            "reconnect grace over; unclaimed regions are released"
        );
        for id in restored {
            if let Some(region) = self.region_by_id(id) {
                if region.session() == 0 {
                    self.release(&region);
                }
            }
        }
        for (_, h) in unnamed {
            self.free_at_rm(h);
        }
        // The sessions that did not come back are forgotten: nothing of theirs is viewed.
        self.end_parking();
        let sessions = lock(&self.sessions);
        self.save_tokens(&sessions);
    }

    /// A handler takes its session up again after a restart (see the module docs), with the
    /// pins and view holds of its books that still stand (`leases::restore_pins`,
    /// `holds::restore_holds`). Returns the hello's answer and what of the claim the session
    /// does not have again. A refusal of the whole (no grace, an unknown token) changes
    /// nothing.
    pub fn resume(
        &self,
        peer: &mut Peer,
        hello: &Hello,
        claim: &ResumeClaim,
    ) -> Result<Resumed, WireError> {
        let regions = claim.regions;
        if !matches!(peer, Peer::New) {
            return Err(err(
                ErrorCode::InvalidArgument,
                "this connection already said hello",
            ));
        }
        if hello.role != Role::Client || hello.instance_id.is_empty() {
            return Err(err(
                ErrorCode::InvalidArgument,
                "a resume is a client's, with an instance id",
            ));
        }
        let Some(token) = hello.session_token else {
            return Err(err(
                ErrorCode::InvalidArgument,
                "a resume needs the session's token",
            ));
        };
        let mut sessions = lock(&self.sessions);
        let mut book = lock(&self.resume);
        if !book.active(Instant::now()) || !book.tokens.contains(&token) {
            return Err(err(
                ErrorCode::SessionConflict,
                "no session with this token may resume here (it never existed, it already \
                 resumed, or the server's reconnect grace is over); connect without a token \
                 to start a new one",
            ));
        }
        if sessions.contains_key(&token) {
            return Err(err(
                ErrorCode::SessionConflict,
                "a live session already has this token",
            ));
        }
        book.tokens.remove(&token);
        book.resuming += 1;
        let session = self.new_session(hello, token);
        let mut refused = Vec::new();
        let mut to_table = Vec::new();
        let mut to_own = Vec::new();
        let mut seen = HashSet::new();
        for &id in regions {
            if !seen.insert(id) {
                continue;
            }
            if let Some(h) = book.unnamed.remove(&id) {
                to_table.push(h);
            } else if book.restored.remove(&id) {
                to_own.push(id);
            } else {
                refused.push(id);
            }
        }
        drop(book);
        self.keep_session(&mut sessions, token, &session);
        drop(sessions);
        for id in to_own {
            match self.region_by_id(id) {
                Some(region) => region.set_owner(&session),
                None => refused.push(id),
            }
        }
        for handle in to_table {
            let id = handle.region_id;
            let info = match self.rm.access(&handle) {
                Ok(access) => RegionInfo { handle, access },
                Err(e) => {
                    tracing::warn!(region = id, "cannot describe a resumed region ({e})");
                    self.free_at_rm(handle);
                    refused.push(id);
                    continue;
                }
            };
            if self.insert_owned(&session, info).is_err() {
                refused.push(id);
            }
        }
        let scoped = |key: &[u8]| [session.scope(), key].concat();
        let pins: Vec<(Vec<u8>, u32)> = claim
            .pins
            .iter()
            .map(|p| (scoped(p.key), p.count))
            .collect();
        let refused_pins = self.restore_pins(&session, &pins);
        let holds: Vec<(Vec<u8>, Claim)> = claim
            .holds
            .iter()
            .map(|h| {
                let c = Claim {
                    page: h.page,
                    generation: h.generation,
                    count: h.count,
                };
                (scoped(h.key), c)
            })
            .collect();
        let refused_holds = self.restore_holds(&session, &holds);
        let all_back = {
            let mut book = lock(&self.resume);
            book.resuming -= 1;
            book.tokens.is_empty() && book.resuming == 0
        };
        if all_back {
            // Every listed session is back with its holds: no absent view can show a page.
            self.end_parking();
        }
        tracing::info!(
            instance = %session.instance_id,
            session = session.id,
            claimed = regions.len() - refused.len().min(regions.len()),
            refused = refused.len(),
            pins = pins.len() - refused_pins.len(),
            refused_pins = refused_pins.len(),
            holds = holds.len() - refused_holds.len(),
            refused_holds = refused_holds.len(),
            "session resumed"
        );
        let ok = self.hello_ok(hello.namespace, token, session.lane);
        *peer = Peer::Client(session);
        Ok(Resumed {
            hello: ok,
            refused_regions: refused,
            refused_pins,
            refused_holds,
        })
    }
}
