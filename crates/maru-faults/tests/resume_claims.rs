//! Pins and view holds that ride through a metadata-server restart: the server `SIGKILL`ed
//! while client processes hold pins and views, restarted within its reconnect grace; each
//! handler's resume claims its pins and its live views' holds from its own books, and the
//! server gives back those that still stand — a pinned key's delete reports it pinned, a
//! viewed page is not reused after its key's delete until the view is released — and refuses
//! the rest, forged ones included, changing nothing for them (docs/ARCHITECTURE.md §8,
//! *Restart*).

use maru_faults::child::{num, pages_of, ChildProc};
use maru_faults::restart::{
    cluster, connect, first_frame, first_frame_kept, holds, released_pages_are_reused,
    resume_hello, viewed_keys, T,
};
use maru_proto::{
    encode_request, ErrorCode, Location, PageRef, Request, Response, ResumeHold, ResumePin, Role,
    ServerUrl,
};
use maru_testkit::wire;
use maru_transport::BlockingConn;

#[test]
fn child_role() {
    maru_faults::child::run_if_child();
}

fn delete(p: &mut ChildProc, prefix: &str, n: u64) -> (u64, u64) {
    let a = p.ok(&format!("delete {prefix} 0 {n}"), T);
    (num(&a, "deleted"), num(&a, "pinned"))
}

#[test]
fn a_pin_taken_before_a_restart_still_pins_its_key_after_the_resume() {
    let mut c = cluster(20.0);
    let mut writer = connect("writer", &c.unix_url());
    assert_eq!(num(&writer.ok("store k 0 4", T), "stored"), 4);
    let mut pinner = connect("pinner", &c.unix_url());
    // Twice: the count comes back, not only the pin.
    for _ in 0..2 {
        assert_eq!(num(&pinner.ok("pin k 0 4", T), "pinned"), 4);
    }
    assert_eq!(c.server_stats().pinned_keys, 4);

    c.restart_server();
    assert_eq!(
        c.server_stats().pinned_keys,
        0,
        "pins live in the server's memory"
    );
    pinner.ok("touch", T);
    assert_eq!(
        c.server_stats().pinned_keys,
        4,
        "the resume brought no pins back"
    );

    let mut other = connect("other", &c.unix_url());
    assert_eq!(delete(&mut other, "k", 4), (0, 4));
    assert_eq!(num(&pinner.ok("unpin k 0 4", T), "unpinned"), 4);
    assert_eq!(delete(&mut other, "k", 4), (0, 4), "one pin of two is left");
    assert_eq!(num(&pinner.ok("unpin k 0 4", T), "unpinned"), 4);
    assert_eq!(num(&pinner.ok("unpin k 0 4", T), "unpinned"), 0);
    assert_eq!(delete(&mut other, "k", 4), (4, 0));
    for p in [&mut writer, &mut pinner, &mut other] {
        p.ok("close", T);
    }
}

#[test]
fn a_view_taken_before_a_restart_keeps_its_page_until_it_is_released() {
    let mut c = cluster(20.0);
    let (mut writer, mut holder, viewed) = viewed_keys(&c);

    c.restart_server();
    assert_eq!(holds(&c), 0, "holds live in the server's memory");
    assert_eq!(num(&holder.ok("touch", T), "live"), 16);
    assert_eq!(holds(&c), 16, "the resume brought no holds back");

    // The writer deletes the viewed keys and fills the rest of its region: had their pages
    // gone back, its allocator would have handed them out again by now.
    assert_eq!(delete(&mut writer, "k", 16), (16, 0));
    assert_eq!(num(&writer.ok("store n 0 112", T), "stored"), 112);
    let regions = writer.ok("regions", T);
    let placed = pages_of(&writer.ok("where n 0 112", T));
    assert_eq!(placed.len(), 112, "{regions}");
    assert!(
        placed.is_disjoint(&viewed),
        "a viewed page was reused: {:?}",
        placed.intersection(&viewed).collect::<Vec<_>>()
    );
    let a = holder.ok("check_held", T);
    assert_eq!(num(&a, "intact"), 16, "a view lied after the restart: {a}");

    // Negative control: released, the pages go back to the writer, whose next stores (its
    // region full) take exactly them.
    released_pages_are_reused(&c, writer, holder, &viewed);
}

/// A raw client session of the test's own: its connection (kept open so the session lives
/// until the kill) and the location of `key`, looked up with a hold.
fn lookup(conn: &mut BlockingConn, key: &[u8]) -> Location {
    match conn.call(&Request::Lookup { key }).unwrap() {
        Response::Lookup(Some(loc)) => loc,
        other => panic!("{other:?}"),
    }
}

#[test]
fn forged_or_malformed_resume_claims_change_nothing_and_are_reported() {
    let mut c = cluster(20.0);
    let mut writer = connect("writer", &c.unix_url());
    assert_eq!(num(&writer.ok("store k 0 2", T), "stored"), 2);
    let url = ServerUrl::parse(&c.unix_url()).unwrap();
    let mut probe = wire::connect_as(&url, Role::Client, "probe", None).unwrap();
    let token = probe.peer().session_token;
    let (k0, k1) = (b"k-0".as_slice(), b"k-1".as_slice());
    let at0 = lookup(&mut probe, k0);
    let at1 = lookup(&mut probe, k1);
    let page = |l: &Location| PageRef {
        region_id: l.region.handle.region_id,
        offset: l.offset,
    };
    c.restart_server();
    drop(probe);

    // A claim that does not decode is refused as a whole and takes nothing.
    let mut bad = Vec::new();
    let zero = Request::Resume {
        hello: resume_hello(token),
        regions: vec![],
        pins: vec![ResumePin { key: k0, count: 1 }],
        holds: vec![],
    };
    encode_request(&mut bad, 1, &zero).unwrap();
    // The pin's count is the four bytes before the (empty) hold list.
    let n = bad.len();
    bad[n - 8..n - 4].copy_from_slice(&0u32.to_le_bytes());
    match first_frame(&c.unix_url(), &bad) {
        Response::Error(e) => assert_eq!(e.code, ErrorCode::BadFrame, "{e:?}"),
        other => panic!("a zero pin count was taken: {other:?}"),
    }

    let hold = |key, page, generation| ResumeHold {
        key,
        page,
        generation,
        count: 1,
    };
    let foreign = PageRef {
        region_id: 999_999,
        offset: 0,
    };
    let req = Request::Resume {
        hello: resume_hello(token),
        regions: vec![],
        pins: vec![
            ResumePin {
                key: b"never-stored",
                count: 1,
            },
            ResumePin { key: k0, count: 2 },
        ],
        holds: vec![
            // Another key's page, a registration that was never there, a region the server
            // has not got, a key that does not exist; then k-1's own hold.
            hold(k0, page(&at1), at0.generation),
            hold(k1, page(&at1), at1.generation + 1000),
            hold(k1, foreign, at1.generation),
            hold(b"never-stored", page(&at0), at0.generation),
            hold(k1, page(&at1), at1.generation),
        ],
    };
    let (_resumed, answer) = first_frame_kept(&c.unix_url(), &wire::request(1, &req));
    match answer {
        Response::Resumed {
            refused,
            refused_pins,
            refused_holds,
            hello,
        } => {
            assert!(refused.is_empty());
            assert_eq!(refused_pins, [0], "only the unknown key's pin is refused");
            assert_eq!(refused_holds, [0, 1, 2, 3], "the forged holds are refused");
            assert_eq!(hello.session_token, token);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(c.server_stats().pinned_keys, 1);
    assert_eq!(holds(&c), 1, "only the true hold was taken");
    // k-0 is pinned (its pin was true), k-1 only held: it goes, and its page stays held.
    assert_eq!(delete(&mut writer, "k", 2), (1, 1));
    assert_eq!(holds(&c), 1, "the deleted key's page is still held");
    writer.ok("close", T);
}
