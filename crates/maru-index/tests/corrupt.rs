//! Broken index files: each is refused with what is wrong and left untouched, and what a writer
//! killed mid-call leaves behind is repaired and reported.

mod common;

use std::path::{Path, PathBuf};

use maru_index::layout::BUCKET_SLOTS;
use maru_index::{ErrorKind, IndexReader, IndexWriter, Location};

const LONG: &[u8] = b"a key that is longer than sixteen bytes";

fn at(i: u32) -> Location {
    Location {
        region: 1,
        offset: i as u64 * 4096,
        len: 4096,
    }
}

/// An index with 100 keys (short and long), closed cleanly.
fn made() -> (tempfile::TempDir, PathBuf) {
    let (dir, path, mut w) = common::new_index(200, 8192);
    for i in 0..100u32 {
        w.insert_if_absent(0, &key(i), at(i)).unwrap();
    }
    (dir, path)
}

fn key(i: u32) -> Vec<u8> {
    if i.is_multiple_of(2) {
        format!("k{i}").into_bytes()
    } else {
        [LONG, &i.to_le_bytes()].concat()
    }
}

fn patch(path: &Path, offset: u64, f: impl FnOnce(&mut [u8])) {
    let mut bytes = std::fs::read(path).unwrap();
    f(&mut bytes[offset as usize..]);
    std::fs::write(path, bytes).unwrap();
}

fn refused(path: &Path, expect: impl Fn(&ErrorKind) -> bool, words: &str) {
    let before = std::fs::read(path).unwrap();
    let e = IndexWriter::open(path).err().expect("refused");
    assert!(expect(&e.kind), "{e:?}");
    let text = e.to_string();
    assert!(text.contains(words), "{text}");
    assert!(text.contains(&path.display().to_string()), "{text}");
    assert_eq!(
        std::fs::read(path).unwrap(),
        before,
        "a refused file is left as it was"
    );
}

#[test]
fn a_wrong_magic_is_refused_by_writers_and_readers() {
    let (_d, path) = made();
    patch(&path, 0, |b| b[0] ^= 0xff);
    refused(
        &path,
        |k| matches!(k, ErrorKind::BadMagic { .. }),
        "not a Maru key index",
    );
    let e = IndexReader::open(&path).err().expect("refused");
    assert!(matches!(e.kind, ErrorKind::BadMagic { .. }), "{e}");
}

#[test]
fn another_layout_version_is_refused() {
    let (_d, path) = made();
    patch(&path, 8, |b| b[..4].copy_from_slice(&2u32.to_le_bytes()));
    refused(
        &path,
        |k| {
            matches!(
                k,
                ErrorKind::VersionMismatch {
                    found: 2,
                    expected: 1
                }
            )
        },
        "layout version 2, this build reads version 1",
    );
}

#[test]
fn a_flipped_geometry_byte_fails_the_checksum() {
    for offset in [16u64, 40, 48, 64] {
        let (_d, path) = made();
        patch(&path, offset, |b| b[0] ^= 0x04);
        refused(
            &path,
            |k| matches!(k, ErrorKind::HeaderChecksum { .. }),
            "checksum mismatch",
        );
    }
}

#[test]
fn a_geometry_this_layout_does_not_have_is_refused_even_with_a_good_checksum() {
    let (_d, path) = made();
    patch(&path, 0, |b| {
        b[24..28].copy_from_slice(&16u32.to_le_bytes());
        let crc = crc32fast::hash(&b[..72]);
        b[72..76].copy_from_slice(&crc.to_le_bytes());
    });
    refused(
        &path,
        |k| matches!(k, ErrorKind::Geometry(_)),
        "slots per bucket is 16",
    );
}

#[test]
fn a_truncated_file_is_refused() {
    let (_d, path) = made();
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len - 4096)
        .unwrap();
    refused(
        &path,
        |k| matches!(k, ErrorKind::Truncated { .. }),
        "truncated",
    );
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(10)
        .unwrap();
    refused(
        &path,
        |k| matches!(k, ErrorKind::Truncated { found: 10, .. }),
        "truncated",
    );
    let e = IndexReader::open(&path).err().expect("refused");
    assert!(matches!(e.kind, ErrorKind::Truncated { .. }), "{e}");
}

/// Offsets of a key's entry and of its bucket line.
fn entry_and_bucket(path: &Path, i: u32) -> (u64, u64, usize) {
    let r = IndexReader::open(path).unwrap();
    let g = r.geometry();
    let f = r.lookup(0, &key(i)).unwrap();
    let bucket = f.slot / BUCKET_SLOTS as u64;
    (
        g.entries_offset() + f.slot * 64,
        g.buckets_offset() + bucket * 64,
        (f.slot % BUCKET_SLOTS as u64) as usize,
    )
}

#[test]
fn an_entry_whose_hash_is_not_its_keys_is_refused() {
    let (_d, path) = made();
    let (entry, _, _) = entry_and_bucket(&path, 7);
    patch(&path, entry + 16, |b| b[3] ^= 1);
    refused(
        &path,
        |k| matches!(k, ErrorKind::CorruptEntry { .. }),
        "stored hash is not its key's",
    );
}

#[test]
fn key_bytes_outside_the_area_are_refused() {
    let (_d, path) = made();
    let (entry, _, _) = entry_and_bucket(&path, 9);
    patch(&path, entry + 48, |b| {
        b[..8].copy_from_slice(&u64::MAX.to_le_bytes())
    });
    refused(
        &path,
        |k| matches!(k, ErrorKind::CorruptEntry { .. }),
        "out of range",
    );
}

#[test]
fn what_a_killed_writer_leaves_is_repaired_and_reported() {
    let (_d, path) = made();
    // Key 3: cut off mid-change (odd version). Key 4: complete but never published (no tag).
    // Key 5's bucket: an overflow count too high. A tag on an empty slot.
    let (e3, _, _) = entry_and_bucket(&path, 3);
    let (_, b4, s4) = entry_and_bucket(&path, 4);
    let (_, b5, _) = entry_and_bucket(&path, 5);
    patch(&path, e3, |b| b[0] |= 1);
    patch(&path, b4, |b| b[s4 * 4..s4 * 4 + 4].fill(0));
    patch(&path, b5 + 60, |b| b[0] = b[0].wrapping_add(3));
    let r = IndexReader::open(&path).unwrap();
    let g = r.geometry();
    let empty = (0..g.slots()).find(|&s| {
        let bytes = std::fs::read(&path).unwrap();
        let o = (g.entries_offset() + s * 64 + 8) as usize;
        bytes[o..o + 8] == [0; 8]
    });
    let empty = empty.unwrap();
    patch(
        &path,
        g.buckets_offset() + (empty / 15) * 64 + (empty % 15) * 4,
        |b| b[0] = 0x55,
    );
    // Readers treat the odd entry as absent once it stays odd, the untagged one as absent.
    assert!(r.lookup(0, &key(3)).is_none());
    assert!(r.lookup(0, &key(4)).is_none());
    assert!(r.lookup(0, &key(5)).is_some());

    let (w, report) = IndexWriter::open(&path).unwrap();
    assert!(report.repaired());
    assert!(
        report.was_clean,
        "the file was closed cleanly before it was patched"
    );
    assert_eq!(report.keys, 98);
    let mut torn: Vec<_> = report
        .torn
        .iter()
        .map(|t| (t.key.clone(), t.unpublished))
        .collect();
    torn.sort();
    assert_eq!(
        torn,
        vec![(Some((0, key(3))), false), (Some((0, key(4))), true)]
    );
    assert_eq!(
        report.torn.iter().find(|t| t.unpublished).unwrap().location,
        at(4)
    );
    assert_eq!(report.tags_cleared, 1);
    assert!(report.overflow_fixed >= 1);
    for i in (0..100).filter(|i| *i != 3 && *i != 4) {
        assert_eq!(w.lookup(0, &key(i)).unwrap().location, at(i), "key {i}");
        assert_eq!(r.lookup(0, &key(i)).unwrap().location, at(i), "key {i}");
    }
    assert!(w.lookup(0, &key(3)).is_none() && w.lookup(0, &key(4)).is_none());
    drop(w);
    let (_w, again) = IndexWriter::open(&path).unwrap();
    assert!(!again.repaired(), "{again:?}");
    assert_eq!(again.keys, 98);
}

#[test]
fn the_epoch_tells_readers_about_attaches_and_clean_shutdowns() {
    let (_d, path) = made();
    let r = IndexReader::open(&path).unwrap();
    assert_eq!(r.epoch(), 2, "created attached (1), closed cleanly (2)");
    let (w, report) = IndexWriter::open(&path).unwrap();
    assert!(report.was_clean);
    assert_eq!((report.epoch, r.epoch()), (3, 3));
    drop(w);
    assert_eq!(r.epoch(), 4);
}

/// A hugetlbfs refuses `write`: creating an index there is a typed error that says where to
/// put it, and leaves no file behind.
#[test]
fn an_index_on_a_hugetlbfs_is_refused_in_words() {
    let dir = tempfile::tempdir().unwrap();
    let mount = match maru_shm::HugePageMount::reserve(dir.path(), 2 << 20) {
        Ok(m) => m,
        Err(why) => {
            eprintln!("skipped: {why}");
            return;
        }
    };
    let path = mount.path().join("keys.index");
    let opts = maru_index::CreateOptions {
        capacity: 100,
        key_area_bytes: 4096,
    };
    let e = IndexWriter::create(&path, opts).err().expect("refused");
    assert!(matches!(e.kind, ErrorKind::InvalidOptions(_)), "{e:?}");
    assert!(e.to_string().contains("hugetlbfs"), "{e}");
    assert_eq!(std::fs::read_dir(mount.path()).unwrap().count(), 0);
}
