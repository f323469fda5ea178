//! Forged, altered, stale and other-owner handles are refused, and the allocation table is
//! exactly as it was afterwards.

mod common;

use common::*;
use maru_proto::{ErrorCode, Role};
use maru_resource_manager::RmClient;

#[test]
fn forged_altered_and_foreign_handles_are_rejected_without_state_change() {
    let d = temp_dir();
    let rm = start_default(d.path());
    let mut owner = client(&rm);
    let h = owner.alloc(4 * MIB, None).unwrap();
    let other_region = owner.alloc(2 * MIB, None).unwrap();
    let before = owner.list().unwrap();
    let stats_before = owner.stats().unwrap().pools;

    let mut altered = maru_testkit::wire::altered_handles(&h);
    let mut a = h.clone();
    a.offset = other_region.offset;
    altered.push(("other offset", a));
    let mut a = h.clone();
    a.region_id = other_region.region_id;
    altered.push(("other region id", a));
    let mut a = other_region.clone();
    a.token = h.token;
    altered.push(("token of another handle", a));

    for (what, bad) in &altered {
        let e = owner.free(bad).unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::BadToken), "free with {what}: {e}");
        let e = owner.get_access(bad).unwrap_err();
        assert_eq!(
            e.code(),
            Some(ErrorCode::BadToken),
            "access with {what}: {e}"
        );
    }

    // A genuine handle presented by someone else: readable, not freeable.
    let mut stranger =
        RmClient::connect_as(&rm.url(), Role::Server, "elsewhere", 4242, 7, TIMEOUT).unwrap();
    assert!(stranger.get_access(&h).is_ok());
    let e = stranger.free(&h).unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::NotOwner), "{e}");
    // Same host and pid but another process start time: another process, refused at its
    // Hello (the resource manager reads the start time of the process holding the
    // connection).
    let (host, pid, start) = maru_transport::local_identity();
    let impostor = RmClient::connect_as(&rm.url(), Role::Server, &host, pid, start + 1, TIMEOUT);
    assert_eq!(
        impostor.err().and_then(|e| e.code()),
        Some(ErrorCode::Unauthenticated)
    );

    assert_eq!(
        owner.list().unwrap(),
        before,
        "a refused request changed the table"
    );
    assert_eq!(owner.stats().unwrap().pools, stats_before);
    owner.free(&h).unwrap();
    drop(stranger);
    rm.shutdown();
}

#[test]
fn token_minted_under_another_secret_is_stale() {
    let (d, rm, mut c) = default_rm();
    let h = c.alloc(MIB, None).unwrap();
    let gone = c.alloc(MIB, None).unwrap();
    c.free(&gone).unwrap();
    // A genuine handle of a region freed since: double free, not a bad token.
    assert_eq!(
        c.free(&gone).unwrap_err().code(),
        Some(ErrorCode::DoubleFree)
    );
    assert_eq!(
        c.get_access(&gone).unwrap_err().code(),
        Some(ErrorCode::UnknownRegion)
    );
    drop(c);
    rm.shutdown();

    // The same allocation table under a new secret: every old token is stale.
    std::fs::write(state_dir(d.path()).join("secret"), [0x5a; 32]).unwrap();
    let rm = start_default(d.path());
    let mut c = client(&rm);
    let before = c.list().unwrap();
    assert_eq!(before.len(), 1);
    assert_ne!(
        before[0].handle.token, h.token,
        "listed handles carry tokens of the new secret"
    );
    assert_eq!(c.free(&h).unwrap_err().code(), Some(ErrorCode::BadToken));
    assert_eq!(
        c.get_access(&h).unwrap_err().code(),
        Some(ErrorCode::BadToken)
    );
    assert_eq!(c.list().unwrap(), before);
    c.free(&before[0].handle).unwrap();
    drop(c);
    rm.shutdown();
}
