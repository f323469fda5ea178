//! What the state's unit tests share: a state on an in-memory resource manager, and clients.

use std::sync::Arc;

use maru_proto::{Hello, RegisterEntry, Role};

use super::regions::TableRegion;
use super::sessions::{Peer, Session};
use super::ServerState;
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
