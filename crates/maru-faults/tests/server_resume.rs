//! Sessions that ride through a metadata-server restart: the server `SIGKILL`ed while a
//! client process owns a region, restarted within its reconnect grace; the same handler
//! resumes its session with its regions and writes into shared memory again. A handler that
//! stays away past the grace loses its regions, and a resume with a token the previous
//! process never gave out is refused and changes nothing (docs/ARCHITECTURE.md §8,
//! *Restart*).

use maru_faults::child::{field, num};
use maru_faults::restart::{cluster, connect, resume, T};
use maru_faults::{wait_until, MIB};
use maru_proto::{ErrorCode, Request, Response, Role, ServerUrl};
use maru_testkit::{wire, BinaryCluster};

#[test]
fn child_role() {
    maru_faults::child::run_if_child();
}

fn ids(line: &str) -> Vec<u64> {
    let mut v: Vec<u64> = field(line, "ids")
        .unwrap_or_default()
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap())
        .collect();
    v.sort();
    v
}

/// The server's region table as (region id, connected owner).
fn owners(c: &BinaryCluster) -> Vec<(u64, bool)> {
    let mut v: Vec<(u64, bool)> = c
        .server_regions()
        .iter()
        .map(|r| (r.handle.region_id, r.owner_connected))
        .collect();
    v.sort();
    v
}

#[test]
fn a_handler_resumes_its_session_and_owned_region_across_a_server_restart() {
    let mut c = cluster(20.0);
    let mut writer = connect("writer", &c.unix_url());
    assert_eq!(num(&writer.ok("store a 0 8", T), "stored"), 8);
    let before = ids(&writer.ok("regions", T));
    assert_eq!(before.len(), 1, "{before:?}");
    // A second handler whose region holds one written page and no key.
    let mut pending = connect("pending", &c.unix_url());
    pending.ok("alloc_write pending-0", T);
    let pending_region = ids(&pending.ok("regions", T));

    c.restart_server();

    // The same handler: its next store resumes the session, then lands in the region it
    // owned before, in shared memory.
    assert_eq!(num(&writer.ok("store b 0 8", T), "stored"), 8);
    assert_eq!(
        ids(&writer.ok("regions", T)),
        before,
        "the owned region changed"
    );
    let table = owners(&c);
    assert!(
        table.contains(&(before[0], true)),
        "the writer's region is not owned by a live session again: {table:?}"
    );
    let mut reader = connect("reader", &c.unix_url());
    let got = reader.ok("verify b 0 8", T);
    assert_eq!((num(&got, "found"), num(&got, "corrupt")), (8, 0), "{got}");
    let got = reader.ok("verify a 0 8", T);
    assert_eq!((num(&got, "found"), num(&got, "corrupt")), (8, 0), "{got}");

    // The region no key names was kept for its owner, which takes it back too; a page
    // handed out before the loss wrote into the detached copy and is not stored.
    assert_eq!(ids(&pending.ok("regions", T)), pending_region);
    let a = pending.call("store_pending", T);
    assert!(
        a.starts_with("err"),
        "a page written while detached was stored: {a}"
    );
    assert_eq!(num(&pending.ok("store p 0 2", T), "stored"), 2);
    assert_eq!(ids(&pending.ok("regions", T)), pending_region);
    let got = reader.ok("verify p 0 2", T);
    assert_eq!((num(&got, "found"), num(&got, "corrupt")), (2, 0), "{got}");
    for p in [&mut writer, &mut pending, &mut reader] {
        p.ok("close", T);
    }
}

#[test]
fn a_handler_away_past_the_reconnect_grace_loses_its_session() {
    let mut c = cluster(1.0);
    let mut writer = connect("writer", &c.unix_url());
    assert_eq!(num(&writer.ok("store a 0 4", T), "stored"), 4);
    let mut idle = connect("idle", &c.unix_url());
    idle.ok("alloc_write idle-0", T);
    let idle_region = ids(&idle.ok("regions", T));
    c.restart_server();
    // Nobody comes back within the grace: the region no key names goes back, the
    // writer's region stays only for its keys.
    let ok = wait_until(T, || {
        let listed = c.rm_region_ids();
        !listed.contains(&idle_region[0])
    });
    assert!(
        ok,
        "an unclaimed region outlived the grace: {:?}",
        c.rm_list()
    );
    let a = writer.call("store b 0 1", T);
    assert!(a.starts_with("err"), "{a}");
    assert!(a.contains("lost"), "not a server-lost error: {a}");
    assert!(
        owners(&c).iter().all(|(_, live)| !live),
        "a region is still owned: {:?}",
        owners(&c)
    );
    let mut reader = connect("reader", &c.unix_url());
    let got = reader.ok("verify a 0 4", T);
    assert_eq!((num(&got, "found"), num(&got, "corrupt")), (4, 0), "{got}");
    for p in [&mut writer, &mut idle, &mut reader] {
        p.ok("close", T);
    }
}

#[test]
fn a_resume_with_an_unknown_token_is_refused_and_changes_nothing() {
    let mut c = cluster(20.0);
    let url = ServerUrl::parse(&c.unix_url()).unwrap();
    let mut owner = wire::connect_as(&url, Role::Client, "owner", None).unwrap();
    let token = owner.peer().session_token;
    let region = match owner
        .call(&Request::RequestRegion { size: 2 * MIB })
        .unwrap()
    {
        Response::Region(info) => info.handle.region_id,
        other => panic!("{other:?}"),
    };
    c.restart_server();
    drop(owner);
    let forged = resume(&c.unix_url(), [7; 16], vec![region]);
    match forged {
        Response::Error(e) => assert_eq!(e.code, ErrorCode::SessionConflict, "{e:?}"),
        other => panic!("a forged token resumed: {other:?}"),
    }
    assert!(c.rm_region_ids().contains(&region));
    assert!(
        c.server_regions().is_empty(),
        "the refused resume claimed a region"
    );
    // The real token still resumes, with its region: the refusal changed nothing.
    match resume(&c.unix_url(), token, vec![region, 999_999]) {
        Response::Resumed { refused, hello, .. } => {
            assert_eq!(refused, vec![999_999], "only the unknown region is refused");
            assert_eq!(hello.session_token, token);
        }
        other => panic!("{other:?}"),
    }
    // A token resumes once.
    match resume(&c.unix_url(), token, vec![region]) {
        Response::Error(e) => assert_eq!(e.code, ErrorCode::SessionConflict, "{e:?}"),
        other => panic!("a token resumed twice: {other:?}"),
    }
}
