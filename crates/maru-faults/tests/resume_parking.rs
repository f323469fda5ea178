//! Views of a session that has not resumed yet: the metadata server `SIGKILL`ed while a
//! client process holds views, restarted within its reconnect grace, and another handler
//! deletes the viewed keys and fills its region before the holder makes any call. The
//! freed pages are parked — not reused — until the holder resumes and holds them again, or
//! the grace ends without it; a pool they fill refuses stores with its usual error
//! (docs/ARCHITECTURE.md §8, *Restart*).

use maru_faults::child::{num, pages_of, ChildProc};
use maru_faults::restart::{
    cluster, cluster_with, connect, holds, released_pages_are_reused, reused_by_the_writer,
    viewed_keys, Pages, T,
};
use maru_faults::{wait_until, MIB};
use maru_testkit::{BinaryCluster, ClusterOpts};

#[test]
fn child_role() {
    maru_faults::child::run_if_child();
}

fn parked(c: &BinaryCluster) -> u64 {
    c.server_stats().pages_parked
}

/// The writer stores 16 keys and the holder views them; the server is killed and started
/// again; before the holder makes any call, the writer (resumed by its first call) deletes
/// the keys and fills the rest of its 128-page region. Checks that no new key landed on a
/// viewed page and that the views still show their keys; returns both processes and the
/// viewed pages.
fn delete_while_the_holder_is_away(c: &mut BinaryCluster) -> (ChildProc, ChildProc, Pages) {
    let (mut writer, mut holder, viewed) = viewed_keys(c);
    c.restart_server();
    let a = writer.ok("delete k 0 16", T);
    assert_eq!((num(&a, "deleted"), num(&a, "pinned")), (16, 0), "{a}");
    assert_eq!(parked(c), 16, "the deleted keys' pages were not parked");
    assert_eq!(
        holds(c),
        0,
        "the holder has not resumed: nothing holds its views"
    );
    // Had the pages gone back, the writer's allocator would have handed them out by now.
    assert_eq!(num(&writer.ok("store n 0 112", T), "stored"), 112);
    let placed = pages_of(&writer.ok("where n 0 112", T));
    assert_eq!(placed.len(), 112);
    assert!(
        placed.is_disjoint(&viewed),
        "a page viewed by a session not back yet was reused: {:?}",
        placed.intersection(&viewed).collect::<Vec<_>>()
    );
    // Read from the shared mapping without a call to the server (no resume yet).
    let a = holder.ok("check_held", T);
    assert_eq!(num(&a, "intact"), 16, "a view lied before its resume: {a}");
    (writer, holder, viewed)
}

#[test]
fn a_view_keeps_its_page_when_its_key_goes_before_the_holder_resumes() {
    let mut c = cluster(20.0);
    let (writer, mut holder, viewed) = delete_while_the_holder_is_away(&mut c);

    // The holder's first call resumes it: its claims on the parked pages name the
    // registrations freed there, so they are granted.
    assert_eq!(num(&holder.ok("touch", T), "live"), 16);
    assert_eq!(holds(&c), 16, "the holds on the parked pages were refused");
    assert_eq!(parked(&c), 0, "every session is back: nothing stays parked");
    let a = holder.ok("check_held", T);
    assert_eq!(num(&a, "intact"), 16, "a view lied after its resume: {a}");

    // Negative control: released, the pages go back to the writer.
    released_pages_are_reused(&c, writer, holder, &viewed);
}

#[test]
fn parked_pages_are_freed_when_the_grace_ends_without_their_holder() {
    // Long enough for the writer's work above to happen within it on a loaded machine.
    let mut c = cluster(10.0);
    let (mut writer, mut holder, viewed) = delete_while_the_holder_is_away(&mut c);

    assert!(
        wait_until(T, || parked(&c) == 0),
        "the grace ended and pages stayed parked"
    );
    assert_eq!(holds(&c), 0);
    reused_by_the_writer(&c, &mut writer, &viewed);
    // The holder comes back too late: its session was forgotten with its views' claims.
    let a = holder.call("touch", T);
    assert!(a.starts_with("err") && a.contains("lost"), "{a}");
    writer.ok("close", T);
    holder.kill();
}

#[test]
fn a_full_pool_during_the_grace_refuses_a_store_rather_than_evict_for_nothing() {
    // One region's worth of pool, and no background eviction below a full pool: the
    // writer's region is all there is.
    let mut c = cluster_with(
        20.0,
        ClusterOpts {
            pool_bytes: 2 * MIB,
            server_extra: ["--evict-high", "1.0", "--evict-low", "0.95"]
                .map(String::from)
                .to_vec(),
            ..ClusterOpts::default()
        },
    );
    let mut writer = connect("writer", &c.unix_url());
    assert_eq!(num(&writer.ok("store k 0 128", T), "stored"), 128);
    let mut holder = connect("holder", &c.unix_url());
    let viewed = pages_of(&holder.ok("hold k 0 16", T));
    assert_eq!(viewed.len(), 16);

    c.restart_server();
    assert_eq!(num(&writer.ok("delete k 0 16", T), "deleted"), 16);
    assert_eq!(parked(&c), 16);
    // Parked pages are no free space, and every key left is from before the restart:
    // evicting one would only park its page too. The store fails, typed and at once.
    let a = writer.call("store x 0 1", T);
    assert!(
        a.starts_with("err kind=Exhausted"),
        "not a pool-exhausted error: {a}"
    );
    let a = writer.ok("verify k 16 112", T);
    assert_eq!(num(&a, "found"), 112, "keys were evicted for nothing: {a}");
    assert_eq!(c.server_stats().eviction.evictions, 0);

    // The holder is back: its views hold their pages, nothing is parked, and making room
    // evicts the writer's unviewed keys as usual.
    assert_eq!(num(&holder.ok("touch", T), "live"), 16);
    assert_eq!(parked(&c), 0);
    assert_eq!(num(&writer.ok("store x 0 1", T), "stored"), 1);
    let placed = pages_of(&writer.ok("where x 0 1", T));
    assert!(placed.is_disjoint(&viewed), "a held page was reused");
    assert!(c.server_stats().eviction.evictions > 0);
    let a = holder.ok("check_held", T);
    assert_eq!(num(&a, "intact"), 16, "{a}");
    for p in [&mut writer, &mut holder] {
        p.ok("close", T);
    }
}
