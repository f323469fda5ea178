//! What the state's unit tests share: a state on an in-memory resource manager, and clients.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use maru_proto::{Hello, RegisterEntry, Role};

use super::regions::TableRegion;
use super::sessions::{Peer, Session};
use super::{KeyIndex, ServerState};
use crate::config::IndexConfig;
use crate::testing::FakeRm;

pub(super) const MIB: u64 = 1 << 20;

/// A state whose regions come from a fresh [`FakeRm`], allocating from `pools`.
pub(super) fn state(pools: &[&str]) -> (ServerState, Arc<FakeRm>) {
    let rm = Arc::new(FakeRm::default());
    let st = ServerState::new(
        Box::new(rm.clone()),
        pools.iter().map(|p| p.to_string()).collect(),
        "test-host".into(),
        super::PIN_TTL,
    );
    (st, rm)
}

/// A client hello for `instance`, joining with `token` if given.
pub(super) fn hello<'a>(instance: &'a str, token: Option<[u8; 16]>) -> Hello<'a> {
    Hello {
        role: Role::Client,
        instance_id: instance,
        host: "h",
        pid: 1,
        start_time: 0,
        session_token: token,
        namespace: "",
    }
}

/// A new client session for `instance`: its connection, session and token.
pub(super) fn client(st: &ServerState, instance: &str) -> (Peer, Arc<Session>, [u8; 16]) {
    let mut peer = Peer::New;
    let ok = st.hello(&mut peer, &hello(instance, None)).unwrap();
    let Peer::Client(s) = &peer else {
        panic!("not a client")
    };
    let s = s.clone();
    (peer, s, ok.session_token)
}

/// A client session's connection, the session and a region it owns.
pub(super) type Owner = (Peer, Arc<Session>, Arc<TableRegion>);

/// A new client session for `instance` and a fresh 1 MiB region it owns: its connection,
/// session and region.
pub(super) fn client_with_region(st: &ServerState, instance: &str) -> Owner {
    let (peer, s, _) = client(st, instance);
    let region = st.request_region(&s, MIB).unwrap();
    (peer, s, region)
}

/// A state without pools (see [`state`]) and a client session of `instance` with a fresh
/// 1 MiB region (see [`client_with_region`]).
pub(super) fn state_with_owner(instance: &str) -> (ServerState, Arc<FakeRm>, Owner) {
    let (st, rm) = state(&[]);
    let owner = client_with_region(&st, instance);
    (st, rm, owner)
}

/// A state without pools shared between threads, its resource manager, and a flag that
/// tells those threads to stop.
pub(super) fn shared_state() -> (Arc<ServerState>, Arc<FakeRm>, Arc<AtomicBool>) {
    let (st, rm) = state(&[]);
    (Arc::new(st), rm, Arc::new(AtomicBool::new(false)))
}

/// A registration of `key` at `offset`/`len` of `region`.
pub(super) fn reg<'a>(
    key: &'a [u8],
    region: &TableRegion,
    offset: u64,
    len: u64,
) -> RegisterEntry<'a> {
    RegisterEntry {
        key,
        region_id: region.info.handle.region_id,
        offset,
        len,
    }
}

/// `key` in namespace `ns`, as the registry and the index hold it.
pub(super) fn key_in(ns: &[u8], key: &[u8]) -> Vec<u8> {
    let mut s = Vec::new();
    super::index::scoped(ns, key, &mut s);
    s
}

/// The configuration of a key index in `dir` with room for `capacity` keys and
/// `key_area_bytes` of long keys.
pub(super) fn index_config(
    dir: &tempfile::TempDir,
    capacity: u64,
    key_area_bytes: u64,
) -> IndexConfig {
    IndexConfig {
        capacity,
        key_area_bytes,
        ..IndexConfig::at(dir.path().join("keys.index"))
    }
}

/// A state without pools writing through to the index `cfg` (see [`state`]).
pub(super) fn indexed_state(cfg: &IndexConfig) -> (ServerState, Arc<FakeRm>) {
    let (st, rm) = state(&[]);
    (st.with_index(KeyIndex::open(cfg).unwrap()), rm)
}

/// The state a restarted server starts with: the same resource manager and index, nothing
/// rebuilt yet.
pub(super) fn restarted_state(rm: &Arc<FakeRm>, cfg: &IndexConfig) -> ServerState {
    ServerState::new(Box::new(rm.clone()), vec![], "h".into(), super::PIN_TTL)
        .with_index(KeyIndex::open(cfg).unwrap())
}
