//! The resource manager in-process: allocate, map, free, list, stats, restart.

mod common;

use common::*;
use maru_proto::ErrorCode;
use maru_shm::{MapMode, Mapping};

#[test]
fn alloc_access_map_free_and_stats() {
    let (d, rm, mut c) = default_rm();
    let h = c.alloc(3 * MIB, None).unwrap();
    assert_eq!(h.len, 4 * MIB, "rounded up to the 2 MiB alignment");
    assert_eq!(h.offset % (2 * MIB), 0);
    assert_eq!(h.pool, pool_path(d.path(), "p0"));
    let a = c.get_access(&h).unwrap();
    assert_eq!((a.offset, a.len), (h.offset, h.len));
    let m = Mapping::map(a.path.as_ref(), a.offset, a.len, MapMode::ReadWrite, false).unwrap();
    m.write_at(0, b"kv").unwrap();

    let list = c.list().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].handle, h);
    assert!(list[0].connected);
    assert_eq!(list[0].owner_pid, std::process::id());

    let s = c.stats().unwrap();
    assert_eq!(s.allocations, 1);
    assert_eq!(s.allocated_bytes, 4 * MIB);
    assert_eq!(s.pools.len(), 1);
    assert_eq!(s.pools[0].free_bytes, 60 * MIB);
    assert_eq!(s.pools[0].regions, 1);
    assert_eq!(s.pools[0].kind, "shm");
    assert_eq!(rm.stats().allocations, 1);

    c.free(&h).unwrap();
    assert_eq!(c.free(&h).unwrap_err().code(), Some(ErrorCode::DoubleFree));
    let s = c.stats().unwrap();
    assert_eq!((s.allocations, s.pools[0].free_bytes), (0, 64 * MIB));
    assert!(s.ops["rm_alloc"].count >= 1);
    c.heartbeat().unwrap();
    rm.shutdown();
}

#[test]
fn allocations_and_handles_survive_a_restart() {
    let (d, rm, mut c) = default_rm();
    let hs: Vec<_> = (0..4).map(|_| c.alloc(MIB, None).unwrap()).collect();
    c.free(&hs[1]).unwrap();
    let before = c.list().unwrap();
    drop(c);
    rm.shutdown();

    let rm = start_default(d.path());
    let mut c = client(&rm);
    let after = c.list().unwrap();
    assert_eq!(
        after.iter().map(|a| &a.handle).collect::<Vec<_>>(),
        before.iter().map(|a| &a.handle).collect::<Vec<_>>()
    );
    c.get_access(&hs[0]).unwrap();
    c.free(&hs[2]).unwrap();
    let h = c.alloc(MIB, None).unwrap();
    assert!(h.region_id > hs[3].region_id, "region ids are never reused");
    rm.shutdown();
}

#[test]
fn pool_preference_and_no_such_pool() {
    let d = temp_dir();
    let pools = vec![
        shm_pool(d.path(), "a", 8 * MIB),
        shm_pool(d.path(), "b", 8 * MIB),
    ];
    let rm = maru_resource_manager::start(rm_config(d.path(), pools)).unwrap();
    let mut c = client(&rm);
    let b = pool_path(d.path(), "b");
    assert_eq!(c.alloc(MIB, Some(&b)).unwrap().pool, b);
    assert_eq!(c.alloc(MIB, None).unwrap().pool, pool_path(d.path(), "a"));
    let e = c.alloc(MIB, Some("/dev/shm/nope")).unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::NoSuchPool));
    rm.shutdown();
}

#[test]
fn abandoned_daemon_recovers_from_its_log_alone() {
    let (d, rm, mut c) = default_rm();
    let hs: Vec<_> = (0..6)
        .map(|i| c.alloc((i + 1) * MIB, None).unwrap())
        .collect();
    c.free(&hs[2]).unwrap();
    let before = c.list().unwrap();
    drop(c);
    // No final checkpoint: the state is only in the write-ahead log.
    rm.abandon();
    assert!(!state_dir(d.path()).join("checkpoint").exists());
    let rm = start_default(d.path());
    let after = rm.list();
    assert_eq!(
        after.iter().map(|a| &a.handle).collect::<Vec<_>>(),
        before.iter().map(|a| &a.handle).collect::<Vec<_>>()
    );
    // Recovery folded the log into a checkpoint.
    assert!(state_dir(d.path()).join("checkpoint").exists());
    assert_eq!(
        std::fs::metadata(state_dir(d.path()).join("wal"))
            .unwrap()
            .len(),
        0
    );
    rm.shutdown();
}

/// The FS_DAX pool kind on a plain tmpfs directory: one file per region, removed on free,
/// and stale files (a crash between prepare and log) removed at start-up.
#[test]
fn fs_dax_logic_on_a_plain_directory() {
    let d = temp_dir();
    let pool_dir = d.path().join("fsdax");
    std::fs::create_dir(&pool_dir).unwrap();
    let spec = maru_shm::PoolSpec::FsDax {
        dir: pool_dir.clone(),
    };
    let rm = maru_resource_manager::start(rm_config(d.path(), vec![spec.clone()])).unwrap();
    let mut c = client(&rm);
    let h = c.alloc(3 * MIB, None).unwrap();
    let a = c.get_access(&h).unwrap();
    assert_eq!(a.offset, 0);
    assert!(a.path.starts_with(pool_dir.to_str().unwrap()));
    assert_eq!(std::fs::metadata(&a.path).unwrap().len(), 4 * MIB);
    let m = Mapping::map(a.path.as_ref(), 0, a.len, MapMode::ReadWrite, false).unwrap();
    m.write_at(4 * MIB as usize - 1, b"z").unwrap();
    drop(m);
    let keep = c.alloc(MIB, None).unwrap();
    c.free(&h).unwrap();
    assert!(
        !std::path::Path::new(&a.path).exists(),
        "region file left after free"
    );
    drop(c);
    rm.shutdown();

    let stale = maru_shm::naming::Naming::default().region_file(&pool_dir, 999);
    std::fs::write(&stale, b"left by a crash").unwrap();
    let rm = maru_resource_manager::start(rm_config(d.path(), vec![spec])).unwrap();
    assert!(!stale.exists(), "stale region file not removed at start-up");
    let mut c = client(&rm);
    let kept = c.get_access(&keep).unwrap();
    assert!(std::path::Path::new(&kept.path).exists());
    rm.shutdown();
}
