//! A client process SIGKILLed between alloc and store, in the middle of a batch_store, and
//! while another process holds views into its region. Real `maru-resource-manager` and
//! `maru-server` processes, real client processes (this binary in its child role).
//!
//! What must hold: other instances' data stays intact and readable; the dead instance's
//! regions that no key references go back to the resource manager; regions that keys still
//! reference stay until those keys are deleted, then go back too.

use std::collections::BTreeSet;
use std::time::Duration;

use maru_faults::child::{ids, num, ChildProc};
use maru_faults::{wait_until, KIB, MIB};
use maru_testkit::binary_cluster::server_stats;
use maru_testkit::{BinaryCluster, ClusterOpts};

const T: Duration = Duration::from_secs(30);

#[test]
fn child_role() {
    maru_faults::child::run_if_child();
}

fn connect(c: &BinaryCluster, name: &str, pool: u64, chunk: u64) -> ChildProc {
    ChildProc::spawn_connected(name, &c.unix_url(), pool, chunk, 5000, T)
}

/// The daemons and a client process "writer" on them (2 MiB regions, 64 KiB chunks).
fn cluster_and_writer() -> (BinaryCluster, ChildProc) {
    let c = BinaryCluster::start(ClusterOpts::default());
    let writer = connect(&c, "writer", 2 * MIB, 64 * KIB);
    (c, writer)
}

fn rm_ids(c: &BinaryCluster) -> BTreeSet<u64> {
    c.rm_region_ids().into_iter().collect()
}

/// Waits (bounded) until the resource manager's regions are exactly `want`.
fn expect_rm_regions(c: &BinaryCluster, want: &BTreeSet<u64>, what: &str) {
    let mut last = BTreeSet::new();
    let ok = wait_until(Duration::from_secs(10), || {
        last = rm_ids(c);
        last == *want
    });
    assert!(
        ok,
        "{what}: resource manager has {last:?}, expected {want:?}"
    );
}

#[test]
fn client_killed_between_alloc_and_store() {
    // 2 MiB regions of 32 pages of 64 KiB: 32 keys fill the first region, so the page of
    // the next alloc comes from a second region that no key will ever reference.
    let (c, mut a) = cluster_and_writer();
    assert_eq!(num(&a.ok("store a 0 32", T), "stored"), 32);
    let first = ids(&a.ok("regions", T));
    let pending = a.ok("alloc_write pending-0", T);
    let a_regions = ids(&a.ok("regions", T));
    let spare = num(&pending, "region");
    assert!(
        !first.contains(&spare),
        "the unstored page is in a region of its own"
    );

    let mut b = connect(&c, "reader", 2 * MIB, 64 * KIB);
    assert_eq!(num(&b.ok("store b 0 8", T), "stored"), 8);
    let b_regions = ids(&b.ok("regions", T));
    let all: BTreeSet<u64> = a_regions.union(&b_regions).copied().collect();
    assert_eq!(rm_ids(&c), all);

    a.kill();

    // The referenced region stays, the spare one goes back.
    let want: BTreeSet<u64> = first.union(&b_regions).copied().collect();
    expect_rm_regions(&c, &want, "after the writer died");
    let records = c.server_regions();
    for r in records
        .iter()
        .filter(|r| first.contains(&r.handle.region_id))
    {
        assert!(!r.owner_connected, "dead owner still counted: {r:?}");
        assert_eq!(r.ref_count, 32);
    }
    let stats = c.server_stats();
    assert_eq!(stats.keys, 40);
    assert_eq!(stats.clients.iter().filter(|c| c.connected).count(), 1);

    // Everything acknowledged is intact; the page that was never stored is not a key.
    let got = b.ok("verify a 0 32", T);
    assert_eq!((num(&got, "found"), num(&got, "corrupt")), (32, 0), "{got}");
    let got = b.ok("verify b 0 8", T);
    assert_eq!((num(&got, "found"), num(&got, "corrupt")), (8, 0), "{got}");
    assert_eq!(num(&b.ok("verify pending 0 1", T), "missing"), 1);

    // Deleting the dead writer's keys frees its last region.
    assert_eq!(num(&b.ok("delete a 0 32", T), "deleted"), 32);
    expect_rm_regions(&c, &b_regions, "after its keys were deleted");
    // The reader's own keys keep its region after it leaves (deferred freeing)...
    b.ok("close", T);
    expect_rm_regions(&c, &b_regions, "after the reader left with live keys");
    // ...until someone deletes them.
    let mut sweeper = connect(&c, "sweeper", 2 * MIB, 64 * KIB);
    assert_eq!(num(&sweeper.ok("delete b 0 8", T), "deleted"), 8);
    sweeper.ok("close", T);
    expect_rm_regions(&c, &BTreeSet::new(), "after everyone left");
    assert_eq!(c.server_stats().regions, 0);
}

#[test]
fn client_killed_in_the_middle_of_a_batch_store() {
    let c = BinaryCluster::start(ClusterOpts::default());
    // 4 KiB pages in 4 MiB regions: a batch of 9000 entries takes 9 regions and three
    // register round trips (4096 + 4096 + 808), so a kill lands inside one call.
    const BATCH: u64 = 9000;
    let mut a = connect(&c, "batcher", 4 * MIB, 4 * KIB);
    a.send(&format!("batch_loop bl {BATCH}"));
    // "batch 1": the first call returned, the second one has begun.
    loop {
        match a.line(T) {
            Some(l) if l == "batch 1" => break,
            Some(l) if l.starts_with("err") => panic!("batch_loop failed: {l}"),
            Some(_) => {}
            None => panic!("no progress from the batch writer"),
        }
    }
    // Kill once the second call has registered something but (most likely) not all.
    let mut admin = c.server_admin();
    let ok = wait_until(T, || server_stats(&mut admin).keys > BATCH);
    assert!(ok, "second batch never registered anything");
    a.kill();
    // Once the server has seen the connection close it has applied whatever arrived before.
    let ok = wait_until(Duration::from_secs(10), || {
        c.server_regions().iter().all(|r| !r.owner_connected)
    });
    assert!(ok, "the server did not notice the writer's death");
    let keys_at_kill = server_stats(&mut admin).keys;

    // Whatever got registered is whole and intact; the rest is absent.
    let mut b = connect(&c, "reader", 2 * MIB, 4 * KIB);
    let total = 3 * BATCH;
    let got = b.ok(&format!("verify bl 0 {total}"), T);
    let found = num(&got, "found");
    assert_eq!((num(&got, "zeros"), num(&got, "corrupt")), (0, 0), "{got}");
    assert_eq!(found + num(&got, "missing"), total);
    assert!(found > BATCH, "{got}");
    assert_eq!(found, keys_at_kill, "keys registered = keys readable");
    println!(
        "batch_store killed mid-call: {} of the interrupted call's {BATCH} keys registered",
        found - BATCH
    );

    // The dead writer's regions that no key references are back at the resource manager;
    // the server and the resource manager agree on the rest.
    let b_regions = ids(&b.ok("regions", T));
    let ok = wait_until(Duration::from_secs(10), || {
        let server: BTreeSet<u64> = c
            .server_regions()
            .iter()
            .filter(|r| r.ref_count > 0 || b_regions.contains(&r.handle.region_id))
            .map(|r| r.handle.region_id)
            .collect();
        server == rm_ids(&c) && c.server_regions().len() == server.len()
    });
    assert!(
        ok,
        "unreferenced regions of the dead writer were not freed: server {:?}, rm {:?}",
        c.server_regions(),
        rm_ids(&c)
    );
    assert_eq!(
        num(&b.ok(&format!("delete bl 0 {total}"), T), "deleted"),
        found
    );
    expect_rm_regions(&c, &b_regions, "after the dead writer's keys were deleted");
    b.ok("close", T);
    expect_rm_regions(&c, &BTreeSet::new(), "after everyone left");
}

#[test]
fn client_killed_while_another_process_holds_views_into_its_region() {
    let (c, mut a) = cluster_and_writer();
    assert_eq!(num(&a.ok("store v 0 16", T), "stored"), 16);
    let a_regions = ids(&a.ok("regions", T));
    let mut b = connect(&c, "holder", 2 * MIB, 64 * KIB);
    let held = b.ok("hold v 0 16", T);
    assert_eq!((num(&held, "held"), num(&held, "corrupt")), (16, 0));

    a.kill();
    let ok = wait_until(Duration::from_secs(10), || {
        c.server_regions()
            .iter()
            .filter(|r| a_regions.contains(&r.handle.region_id))
            .all(|r| !r.owner_connected)
    });
    assert!(ok, "the server did not notice the writer's death");

    // The holder's views and a newcomer's reads see the data, intact.
    let now = b.ok("check_held", T);
    assert_eq!(num(&now, "intact"), 16, "{now}");
    let mut newcomer = connect(&c, "newcomer", 2 * MIB, 64 * KIB);
    let got = newcomer.ok("verify v 0 16", T);
    assert_eq!((num(&got, "found"), num(&got, "corrupt")), (16, 0), "{got}");
    assert!(
        rm_ids(&c).is_superset(&a_regions),
        "a referenced region was freed"
    );

    // The keys go at once, but the views hold their pages: they still show the values, and
    // the region stays until the holder lets go of them.
    assert_eq!(num(&b.ok("delete v 0 16", T), "deleted"), 16);
    let after = b.ok("check_held", T);
    assert_eq!(num(&after, "intact"), 16, "{after}");
    println!("views held past their keys' deletion: {after}");
    assert!(
        rm_ids(&c).is_superset(&a_regions),
        "a region was freed under live views"
    );
    b.ok("close", T);
    let ok = wait_until(Duration::from_secs(10), || {
        rm_ids(&c).is_disjoint(&a_regions)
    });
    assert!(
        ok,
        "the dead writer's region was not freed after its keys and views were gone"
    );
    newcomer.ok("close", T);
    expect_rm_regions(&c, &BTreeSet::new(), "after everyone left");
}
