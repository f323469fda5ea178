//! The pool header at the resource manager: a new pool is formatted (a UUID, its geometry,
//! its first extent set aside and out of the capacity), a restart keeps the UUID and every
//! grant carries it; a damaged header, and a pool with regions but no header, refuse the
//! start and are left as they were.

mod common;

use common::*;
use maru_resource_manager::RmError;
use maru_shm::pool::header::{HeaderPlace, PoolHeader, HEADER_LEN};

fn header_of(pool: &std::path::Path) -> PoolHeader {
    let place = HeaderPlace::InPool {
        path: pool.to_owned(),
        map_len: 4096,
    };
    place.read().unwrap().unwrap()
}

#[test]
fn a_new_pool_is_formatted_and_its_header_extent_is_never_handed_out() {
    let dir = temp_dir();
    let rm = start_default(dir.path());
    let pool = std::path::PathBuf::from(pool_path(dir.path(), "p0"));
    let h = header_of(&pool);
    assert_eq!(
        (h.total_size, h.align, h.reserved),
        (66 * MIB, 2 * MIB, 2 * MIB),
        "a 64 MiB shm pool is a file of 66 MiB: the header's extent comes on top"
    );
    let stats = rm.stats().pools.remove(0);
    assert_eq!(stats.uuid, h.uuid_text());
    assert_eq!(
        (stats.total_bytes, stats.free_bytes, stats.reserved_bytes),
        (64 * MIB, 64 * MIB, 2 * MIB),
        "the header's extent is neither capacity nor free"
    );
    let mut c = client(&rm);
    let mut offsets = Vec::new();
    while let Ok(handle) = c.alloc(2 * MIB, None) {
        let access = c.get_access(&handle).unwrap();
        assert_eq!(access.pool_uuid, h.uuid, "every grant names the pool");
        offsets.push(handle.offset);
    }
    assert_eq!(offsets.len(), 32);
    assert!(offsets.iter().all(|&o| o >= 2 * MIB), "{offsets:?}");
    drop(c);
    rm.shutdown();

    // A restart finds the header and keeps the identity.
    let rm = start_default(dir.path());
    assert_eq!(rm.stats().pools[0].uuid, h.uuid_text());
    assert_eq!(header_of(&pool), h);
    rm.shutdown();
}

#[test]
fn a_damaged_header_refuses_the_start_and_is_left_as_it_was() {
    let dir = temp_dir();
    start_default(dir.path()).shutdown();
    let pool = std::path::PathBuf::from(pool_path(dir.path(), "p0"));
    let mut bytes = std::fs::read(&pool).unwrap();
    bytes[20] ^= 0x55; // inside the UUID: the checksum no longer matches
    std::fs::write(&pool, &bytes).unwrap();
    let cfg = rm_config(dir.path(), vec![shm_pool(dir.path(), "p0", 64 * MIB)]);
    let e = maru_resource_manager::start(cfg).err().expect("refused");
    assert!(matches!(e, RmError::PoolHeader { .. }), "{e}");
    assert!(e.to_string().contains("checksum"), "{e}");
    assert!(e.to_string().contains("first 4096 bytes"), "{e}");
    assert_eq!(
        std::fs::read(&pool).unwrap()[..HEADER_LEN],
        bytes[..HEADER_LEN]
    );
}

#[test]
fn a_pool_with_regions_and_foreign_bytes_for_a_header_is_refused_a_blank_one_is_formatted() {
    let dir = temp_dir();
    let rm = start_default(dir.path());
    let mut c = client(&rm);
    c.alloc(2 * MIB, None).unwrap();
    drop(c);
    rm.shutdown();
    // Something else where the header goes (another device, or a pool of a build before
    // headers, whose regions may sit there): refused, and left as it was.
    let pool = std::path::PathBuf::from(pool_path(dir.path(), "p0"));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&pool)
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0x5Au8; HEADER_LEN], 0).unwrap();
    let cfg = rm_config(dir.path(), vec![shm_pool(dir.path(), "p0", 64 * MIB)]);
    let e = maru_resource_manager::start(cfg).err().expect("refused");
    assert!(e.to_string().contains("1 regions"), "{e}");
    let mut first = vec![0u8; HEADER_LEN];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut first, 0).unwrap();
    assert_eq!(first, vec![0x5Au8; HEADER_LEN], "nothing was written");

    // Zeroes there (the file was truncated: its memory is gone): formatted anew, with a new
    // identity, and the region stays allocated.
    std::os::unix::fs::FileExt::write_all_at(&f, &[0u8; HEADER_LEN], 0).unwrap();
    let rm = start_default(dir.path());
    let s = rm.stats();
    assert_eq!((s.allocations, s.pools[0].regions), (1, 1));
    assert_eq!(s.pools[0].uuid, header_of(&pool).uuid_text());
    rm.shutdown();

    // A file of something else, in a state directory without regions: formatted.
    let other = temp_dir();
    let file = other.path().join("pools/p0");
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    std::fs::write(&file, vec![0xAB; 66 * MIB as usize]).unwrap();
    let rm = start_default(other.path());
    assert_eq!(rm.stats().pools[0].uuid, header_of(&file).uuid_text());
    rm.shutdown();
}
