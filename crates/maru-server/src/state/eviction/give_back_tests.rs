//! Giving regions back: which live owner's region a full pool takes, that its keys go but
//! pinned keys and held pages are never touched, that the owner is asked before the pages of
//! its evicted keys reach it, and that the requester waits a bounded time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use maru_proto::ErrorCode;

use super::room::{give_back_order, Candidate, ROOM_DEADLINE};
use crate::registry::KeyRegistry;
use crate::state::fixtures::*;
use crate::state::lock;
use crate::state::regions::TableRegion;
use crate::state::sessions::{scope_of, Session};
use crate::state::ServerState;
use crate::testing::FakeRm;

const PAGE: u64 = 4096;
const POOL: &str = "/p";

fn key(name: &str) -> Vec<u8> {
    let mut k = scope_of("").into_vec();
    k.extend_from_slice(name.as_bytes());
    k
}

fn candidate(slot: u32, last_used: u64) -> Candidate {
    Candidate {
        slot,
        len: MIB,
        last_used,
        keys: 1,
        pinned: 0,
        held: 0,
        asked: false,
    }
}

fn slots(order: &[Candidate]) -> Vec<u32> {
    order.iter().map(|c| c.slot).collect()
}

#[test]
fn the_least_recently_used_region_goes_first_and_pinned_held_or_small_ones_never() {
    let pinned = Candidate {
        pinned: 1,
        ..candidate(1, 0)
    };
    let held = Candidate {
        held: 2,
        ..candidate(2, 0)
    };
    let small = Candidate {
        len: MIB / 2,
        ..candidate(3, 0)
    };
    let order = give_back_order(
        vec![
            candidate(4, 30),
            pinned,
            candidate(5, 10),
            held,
            small,
            candidate(6, 20),
        ],
        MIB,
    );
    assert_eq!(slots(&order), [5, 6, 4], "oldest use first; the rest never");

    // Equal recency: fewer keys first, then the older slot.
    let many = Candidate {
        keys: 9,
        ..candidate(7, 5)
    };
    let order = give_back_order(vec![many, candidate(9, 5), candidate(8, 5)], MIB);
    assert_eq!(slots(&order), [8, 9, 7]);

    // A region asked back before and still not given back goes after every other one.
    let asked = Candidate {
        asked: true,
        ..candidate(10, 0)
    };
    let order = give_back_order(vec![asked, candidate(11, 50)], MIB);
    assert_eq!(slots(&order), [11, 10]);
    assert!(give_back_order(vec![pinned, held, small], MIB).is_empty());
}

/// A state whose pool holds `regions` regions of a MiB.
fn full_pool(regions: u64) -> (ServerState, Arc<FakeRm>) {
    let (st, rm) = state(&[POOL]);
    rm.room.lock().unwrap().insert(POOL.into(), regions * MIB);
    (st, rm)
}

/// Registers `names[i]` on page `i` of `region`, in order.
fn put_pages(st: &ServerState, s: &Session, region: &TableRegion, names: &[&str]) {
    for (page, name) in (0..).zip(names) {
        assert!(st
            .register(s, &reg(&key(name), region, page * PAGE, PAGE))
            .unwrap());
    }
}

fn read(st: &ServerState, name: &str) {
    st.write_lookup(&mut Vec::new(), 1, None, &key(name));
}

fn id(r: &TableRegion) -> u64 {
    r.info.handle.region_id
}

/// Plays the owner's client: once the server asks for a region back (a `Reclaim` queued in
/// the owner's outbox), gives it back, as its watcher does. (These owners have no watch
/// connection, so their notices stay queued: a request already there is an earlier one.)
fn give_back_when_asked(
    st: &Arc<ServerState>,
    owner: &Arc<Session>,
) -> std::thread::JoinHandle<u64> {
    let (st, owner) = (st.clone(), owner.clone());
    let earlier = lock(&owner.notices).queued_reclaims().len();
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let asked = lock(&owner.notices).queued_reclaims();
            if let Some(region) = asked.get(earlier) {
                st.give_back(&owner, *region);
                return *region;
            }
            assert!(Instant::now() < deadline, "no region was asked back");
            std::thread::yield_now();
        }
    })
}

#[test]
fn a_full_pool_takes_back_the_least_recently_used_unpinned_region_of_a_live_owner() {
    let (st, rm) = full_pool(3);
    let st = Arc::new(st);
    let (_pa, a, pinned) = client_with_region(&st, "a");
    let cold = st.request_region(&a, MIB).unwrap();
    let (_pb, b, warm) = client_with_region(&st, "b");
    put_pages(&st, &a, &pinned, &["pinned", "beside-pinned"]);
    put_pages(&st, &a, &cold, &["cold-0", "cold-1"]);
    put_pages(&st, &b, &warm, &["warm"]);
    assert!(st.pin(&a, &key("pinned")).unwrap());
    // The pinned region is the oldest, and "warm" is read after "cold" was registered.
    read(&st, "warm");

    let (_pn, n, _) = client(&st, "n");
    let owner = give_back_when_asked(&st, &a);
    let t = Instant::now();
    let got = st.request_region(&n, MIB).unwrap();
    assert!(t.elapsed() < ROOM_DEADLINE, "took {:?}", t.elapsed());
    assert_eq!(
        owner.join().unwrap(),
        id(&cold),
        "the coldest unpinned region"
    );

    for gone in ["cold-0", "cold-1"] {
        assert!(st.registry.lookup(&key(gone)).is_none(), "{gone} stayed");
    }
    for kept in ["pinned", "beside-pinned", "warm"] {
        assert!(st.registry.lookup(&key(kept)).is_some(), "{kept} went");
    }
    let live = rm.live();
    assert!(!live.contains(&id(&cold)), "the region went back: {live:?}");
    assert_eq!(live.len(), 3, "{live:?}");
    assert!(live.contains(&id(&got)));
    assert_eq!(st.stats().eviction.evictions, 2);
    st.check_ref_counts();
}

#[test]
fn when_every_live_region_holds_pinned_keys_or_views_the_answer_is_quick_and_says_so() {
    let (st, rm) = full_pool(2);
    let (_pa, a, ra) = client_with_region(&st, "a");
    let (_pb, b, rb) = client_with_region(&st, "b");
    put_pages(&st, &a, &ra, &["a-pinned", "a-free"]);
    put_pages(&st, &b, &rb, &["b-viewed", "b-free"]);
    assert!(st.pin(&b, &key("a-pinned")).unwrap());
    // A view of b's key holds its page (a session's lookup takes a hold).
    assert!(st.find_and_hold(Some(&a), &key("b-viewed")).is_some());

    let (_pn, n, _) = client(&st, "n");
    let t = Instant::now();
    let e = st.request_region(&n, MIB).unwrap_err();
    assert!(t.elapsed() < ROOM_DEADLINE, "took {:?}", t.elapsed());
    assert_eq!(e.code, ErrorCode::PoolExhausted);
    assert!(
        e.message.contains("pinned keys or pages a view holds"),
        "{e:?}"
    );
    for kept in ["a-pinned", "a-free", "b-viewed", "b-free"] {
        assert!(
            st.registry.lookup(&key(kept)).is_some(),
            "{kept} went for nothing"
        );
    }
    assert_eq!(rm.live().len(), 2);
    assert!(lock(&a.notices).queued_reclaims().is_empty());
}

#[test]
fn an_owner_that_does_not_give_back_costs_the_requester_the_deadline_and_nothing_else() {
    let (st, rm) = full_pool(2);
    let (_pa, a, ra) = client_with_region(&st, "a");
    let (_pb, b, rb) = client_with_region(&st, "b");
    put_pages(&st, &a, &ra, &["a-0"]);
    put_pages(&st, &b, &rb, &["b-pinned"]);
    assert!(st.pin(&b, &key("b-pinned")).unwrap());

    let (_pn, n, _) = client(&st, "n");
    let t = Instant::now();
    let e = st.request_region(&n, MIB).unwrap_err();
    let took = t.elapsed();
    assert!(
        took >= ROOM_DEADLINE - Duration::from_millis(20) && took < 2 * ROOM_DEADLINE,
        "took {took:?}"
    );
    assert_eq!(e.code, ErrorCode::PoolExhausted);
    assert!(
        e.message.contains(&format!("[{}]", id(&ra))) && e.message.contains("did not"),
        "{e:?}"
    );
    // a's key went and a was asked; its region is still a's (only a gives it back).
    assert!(st.registry.lookup(&key("a-0")).is_none());
    assert_eq!(lock(&a.notices).queued_reclaims(), [id(&ra)]);
    assert!(st.allocations().iter().all(|r| r.owner_connected));
    assert_eq!(rm.live().len(), 2);

    // Once it gives the region back, the next request has it at once.
    st.give_back(&a, id(&ra));
    assert_eq!(rm.live().len(), 1);
    st.request_region(&n, MIB).unwrap();
}

#[test]
fn a_caller_with_evictable_keys_of_its_own_takes_only_a_region_used_less_recently() {
    let (st, rm) = full_pool(3);
    let st = Arc::new(st);
    let (_pa, a, ra) = client_with_region(&st, "a");
    let (_pn, n, rn) = client_with_region(&st, "n");
    let ra2 = st.request_region(&a, MIB).unwrap();
    put_pages(&st, &a, &ra, &["a-old"]);
    put_pages(&st, &n, &rn, &["n-0"]);
    put_pages(&st, &a, &ra2, &["a-new"]);
    // a's first region was used before any of n's, its second after: only the first may go.
    let owner = give_back_when_asked(&st, &a);
    st.request_region(&n, MIB).unwrap();
    assert_eq!(owner.join().unwrap(), id(&ra));
    assert!(st.registry.lookup(&key("a-old")).is_none());

    // Now every region of a's is newer than n's oldest: n's own victims come first.
    read(&st, "a-new");
    let e = st.request_region(&n, MIB).unwrap_err();
    assert_eq!(e.code, ErrorCode::PoolExhausted);
    assert!(st.registry.lookup(&key("a-new")).is_some());
    assert!(st.registry.lookup(&key("n-0")).is_some());
    // Its own keys pinned, nothing of its own may go: then it may take a's.
    assert!(st.pin(&n, &key("n-0")).unwrap());
    let owner = give_back_when_asked(&st, &a);
    st.request_region(&n, MIB).unwrap();
    assert_eq!(owner.join().unwrap(), id(&ra2));
    assert!(st.registry.lookup(&key("n-0")).is_some());
    assert_eq!(rm.live().len(), 3);
}

/// What the owner's watcher reads, in order: `Reclaim` notices as `Err(region)`, returned
/// pages as `Ok(page)`.
fn read_until_pages(
    end: &mut std::os::unix::net::UnixStream,
    pages: usize,
) -> Vec<Result<maru_proto::PageRef, u64>> {
    use maru_proto::{decode_response, Response};
    end.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let mut rx = maru_transport::FrameBuf::new();
    let mut seen: Vec<Result<maru_proto::PageRef, u64>> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen.iter().filter(|s| s.is_ok()).count() < pages {
        assert!(Instant::now() < deadline, "only {seen:?}");
        let _ = rx.read_some(end);
        while let Ok(Some((h, payload))) = rx.take_frame() {
            match decode_response(&h, payload).unwrap() {
                Response::Reclaim { region_id } => seen.push(Err(region_id)),
                Response::ReturnPages(p) => seen.extend(p.into_iter().map(Ok)),
                Response::Ok => {}
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    seen
}

#[test]
fn the_owner_hears_of_the_request_before_it_sees_the_regions_pages_free() {
    let (st, _rm) = full_pool(1);
    let st = Arc::new(st);
    let (_pa, a, _) = client(&st, "a");
    let (near, mut far) = std::os::unix::net::UnixStream::pair().unwrap();
    st.watch(&a, Some(maru_transport::Stream::Unix(near)), 1);
    let ra = st.request_region(&a, MIB).unwrap();
    put_pages(&st, &a, &ra, &["k0", "k1", "k2"]);
    let owner = {
        let (st, a) = (st.clone(), a.clone());
        let region = id(&ra);
        std::thread::spawn(move || {
            let seen = read_until_pages(&mut far, 3);
            st.give_back(&a, region);
            seen
        })
    };
    let (_pn, n, _) = client(&st, "n");
    st.request_region(&n, MIB).unwrap();
    let seen = owner.join().unwrap();
    assert_eq!(seen.first(), Some(&Err(id(&ra))), "{seen:?}");
    assert!(seen[1..]
        .iter()
        .all(|p| p.is_ok_and(|p| p.region_id == id(&ra))));
}
