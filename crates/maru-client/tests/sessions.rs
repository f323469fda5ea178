//! Sessions, namespaces and pins as leases, against real daemons: handlers that share an
//! instance id are separate sessions; namespaces never see each other's keys; a pin belongs
//! to the session that took it, and ends with its unpin, its session or its lease.

mod common;

use std::time::{Duration, Instant};

use common::*;
use maru_client::{DeleteStatus, MaruConfig};

/// A cluster whose pins live `ttl` unless renewed.
fn cluster_with_pin_ttl(ttl: Duration) -> InProcessCluster {
    InProcessCluster::with(
        |dir, rm| rm.pools = vec![maru_testkit::shm_pool(dir, "p0", 64 << 20)],
        move |_, s| s.pin_ttl = ttl,
    )
}

#[test]
fn handlers_sharing_an_instance_id_are_separate_sessions() {
    let c = cluster();
    let cfg = MaruConfig {
        instance_id: "tp-worker".into(),
        ..c.config()
    };
    let a = c.handler(cfg.clone());
    let b = c.handler(cfg);
    a.store_bytes(b"from-a", b"", b"A").unwrap();
    b.store_bytes(b"from-b", b"", b"B").unwrap();
    assert!(a.pin(b"from-b").unwrap());
    assert!(!b.unpin(b"from-b").unwrap(), "a's pin is not b's to take");
    // One leaving ends only its own session: the other keeps its pins and its pages.
    b.close();
    assert_eq!(a.delete(b"from-b").unwrap(), DeleteStatus::Pinned);
    assert_eq!(a.retrieve(b"from-a").unwrap().unwrap().to_vec(), b"A");
    assert!(a.unpin(b"from-b").unwrap());
    assert_eq!(a.delete(b"from-b").unwrap(), DeleteStatus::Deleted);
}

#[test]
fn namespaces_keep_their_keys_apart() {
    let c = cluster();
    let in_ns = |ns: &str| {
        c.handler(MaruConfig {
            namespace: ns.into(),
            ..c.config()
        })
    };
    let (red, blue, shared) = (in_ns("red"), in_ns("blue"), in_ns(""));
    red.store_bytes(b"k", b"", b"red value").unwrap();
    for other in [&blue, &shared] {
        assert!(!other.exists(b"k").unwrap());
        assert!(other.retrieve(b"k").unwrap().is_none());
        assert_eq!(other.batch_exists(&[b"k"]).unwrap(), [false]);
        assert!(
            !other.pin(b"k").unwrap(),
            "cannot pin another namespace's key"
        );
        assert_eq!(other.delete(b"k").unwrap(), DeleteStatus::NotFound);
    }
    // The same key bytes in another namespace are another key.
    blue.store_bytes(b"k", b"", b"blue value").unwrap();
    assert_eq!(red.retrieve(b"k").unwrap().unwrap().to_vec(), b"red value");
    assert_eq!(
        blue.retrieve(b"k").unwrap().unwrap().to_vec(),
        b"blue value"
    );
    // A namespace whose name looks like a prefix of another's key is still apart.
    shared.store_bytes(b"\x03redk", b"", b"shared").unwrap();
    assert_eq!(red.retrieve(b"k").unwrap().unwrap().to_vec(), b"red value");
    let red2 = in_ns("red");
    assert!(red2.exists(b"k").unwrap(), "one namespace, two sessions");
    let e = MaruConfig {
        namespace: "x".repeat(256),
        ..c.config()
    }
    .validate()
    .unwrap_err();
    assert!(e.to_string().contains("namespace"), "{e}");
}

#[test]
fn unpinning_another_sessions_pin_is_refused() {
    let c = cluster();
    let (a, b) = (c.handler(c.config()), c.handler(c.config()));
    a.store_bytes(b"k", b"", b"v").unwrap();
    assert!(a.pin(b"k").unwrap());
    assert!(!b.unpin(b"k").unwrap());
    assert_eq!(b.batch_unpin(&[b"k"]).unwrap(), [false]);
    assert_eq!(b.delete(b"k").unwrap(), DeleteStatus::Pinned);
    assert!(b.pin(b"k").unwrap());
    assert!(a.unpin(b"k").unwrap());
    assert_eq!(
        a.delete(b"k").unwrap(),
        DeleteStatus::Pinned,
        "b's pin holds"
    );
    assert!(b.unpin(b"k").unwrap());
    assert_eq!(a.delete(b"k").unwrap(), DeleteStatus::Deleted);
}

#[test]
fn an_abandoned_pin_expires_at_its_ttl_and_lookups_do_not_extend_it() {
    let ttl = Duration::from_millis(400);
    let c = cluster_with_pin_ttl(ttl);
    let (owner, pinner) = (c.handler(c.config()), c.handler(c.config()));
    owner.store_bytes(b"k", b"", b"v").unwrap();
    let pinned_at = Instant::now();
    assert!(pinner.pin(b"k").unwrap());
    // The pinner keeps looking the key up (an exists storm) but never renews: the lease ends
    // at its deadline all the same.
    let mut lookups = 0u64;
    let mut deleted_at = None;
    while pinned_at.elapsed() < Duration::from_secs(10) {
        assert!(pinner.exists(b"k").unwrap() || deleted_at.is_some());
        let _ = pinner.batch_exists(&[b"k", b"k"]).unwrap();
        lookups += 1;
        if owner.delete(b"k").unwrap() == DeleteStatus::Deleted {
            deleted_at = Some(pinned_at.elapsed());
            break;
        }
    }
    let deleted_at = deleted_at.expect("the abandoned pin never expired");
    assert!(
        deleted_at >= ttl,
        "the pin went before its TTL ({deleted_at:?})"
    );
    assert!(
        lookups > 10,
        "the storm was too small to mean anything: {lookups}"
    );
    assert!(owner.stats().unwrap().server.pins_expired >= 1);
    assert!(!pinner.unpin(b"k").unwrap(), "an expired pin is gone");
}

#[test]
fn renewed_pins_outlive_their_ttl() {
    let ttl = Duration::from_millis(300);
    let c = cluster_with_pin_ttl(ttl);
    let (owner, pinner) = (c.handler(c.config()), c.handler(c.config()));
    owner.store_bytes(b"k", b"", b"v").unwrap();
    assert!(pinner.pin(b"k").unwrap());
    let started = Instant::now();
    while started.elapsed() < 3 * ttl {
        pinner.renew_pins().unwrap();
        assert_eq!(owner.delete(b"k").unwrap(), DeleteStatus::Pinned);
        std::thread::sleep(ttl / 6);
    }
    // Without renewals it runs out.
    wait_until("the lease to run out", Duration::from_secs(10), || {
        owner.delete(b"k").unwrap() == DeleteStatus::Deleted
    });
}

#[test]
fn a_closed_pinners_pins_end_with_its_session() {
    let c = cluster();
    let (owner, pinner) = (c.handler(c.config()), c.handler(c.config()));
    owner.store_bytes(b"k", b"", b"v").unwrap();
    assert!(pinner.batch_pin(&[b"k", b"k"]).unwrap().iter().all(|p| *p));
    pinner.close();
    assert_eq!(owner.delete(b"k").unwrap(), DeleteStatus::Deleted);
    assert_eq!(
        owner.stats().unwrap().server.pins_expired,
        0,
        "ended, not expired"
    );
}
