//! The index against a HashMap model: random inserts, removes, updates and lookups, checked
//! through the writer, a reader, iteration, and a re-attach after each run.

mod common;

use std::collections::HashMap;

use maru_index::{CreateOptions, IndexReader, IndexWriter, Inserted, Location};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Insert(u32, Vec<u8>, u32),
    Remove(u32, Vec<u8>),
    Update(u32, Vec<u8>, u32),
    Lookup(u32, Vec<u8>),
    Reopen,
}

/// Key ids of the space, and key lengths: short, inline at most, and in the key-bytes area.
const KEY_IDS: u8 = 24;
const KEY_LENS: [usize; 3] = [3, 16, 40];

fn key_bytes(id: u8, len: usize) -> Vec<u8> {
    let mut k = vec![b'k'; len];
    k[0] = id;
    k
}

/// Keys from a small space (so operations meet), short and long, in two namespaces.
fn key() -> impl Strategy<Value = (u32, Vec<u8>)> {
    (0u32..2, 0u8..KEY_IDS, 0usize..KEY_LENS.len())
        .prop_map(|(ns, id, shape)| (ns, key_bytes(id, KEY_LENS[shape])))
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (key(), 1u32..1000).prop_map(|((ns, k), l)| Op::Insert(ns, k, l)),
        2 => key().prop_map(|(ns, k)| Op::Remove(ns, k)),
        1 => (key(), 1u32..1000).prop_map(|((ns, k), l)| Op::Update(ns, k, l)),
        2 => key().prop_map(|(ns, k)| Op::Lookup(ns, k)),
        1 => Just(Op::Reopen),
    ]
}

fn loc(l: u32) -> Location {
    Location {
        region: l % 7,
        offset: l as u64 * 4096,
        len: l,
    }
}

fn check_all(w: &IndexWriter, r: &IndexReader, model: &HashMap<(u32, Vec<u8>), (Location, u64)>) {
    assert_eq!(w.len(), model.len() as u64);
    assert_eq!(r.len(), model.len() as u64);
    let mut seen = HashMap::new();
    w.for_each(|ns, k, f| {
        seen.insert((ns, k.to_vec()), (f.location, f.generation));
    });
    assert_eq!(&seen, model);
    for ((ns, k), (l, g)) in model {
        let f = r.lookup(*ns, k).expect("present");
        assert_eq!((f.location, f.generation), (*l, *g));
    }
    check_batches(r, model);
}

/// Batches of every key of the space (present or not) and a key over the length limit, more
/// than two runs of a batch's pipelined lookups long, answer as single lookups do.
fn check_batches(r: &IndexReader, model: &HashMap<(u32, Vec<u8>), (Location, u64)>) {
    let mut keys: Vec<Vec<u8>> = Vec::new();
    while keys.len() < 300 {
        for id in 0..KEY_IDS {
            keys.extend(KEY_LENS.iter().map(|&len| key_bytes(id, len)));
        }
        keys.push(vec![b'x'; maru_index::layout::MAX_KEY_LEN + 1]);
    }
    let mut answers = Vec::new();
    let mut present = Vec::new();
    for ns in 0..2 {
        r.batch_lookup(ns, &keys, &mut answers);
        r.batch_exists(ns, &keys, &mut present);
        assert_eq!(answers.len(), keys.len());
        for ((k, a), &p) in keys.iter().zip(&answers).zip(&present) {
            let want = model.get(&(ns, k.clone())).copied();
            assert_eq!(
                a.map(|f| (f.location, f.generation)),
                want,
                "key {k:?} in {ns}"
            );
            assert_eq!(p, want.is_some());
        }
        let leading = present.iter().take_while(|&&p| p).count();
        assert_eq!(r.prefix_len(ns, &keys), leading);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    #[test]
    fn matches_a_hashmap(ops in proptest::collection::vec(op(), 1..200)) {
        // Room for the whole key space (144 keys, 96 long ones) at 80 % load: probes cross buckets.
        let (_dir, path, mut w) = common::new_index(153, 96 * 40);
        let mut r = IndexReader::open(&path).unwrap();
        let mut model: HashMap<(u32, Vec<u8>), (Location, u64)> = HashMap::new();
        let mut last_gen = 0;
        for op in ops {
            match op {
                Op::Insert(ns, k, l) => match w.insert_if_absent(ns, &k, loc(l)).unwrap() {
                    Inserted::New(f) => {
                        prop_assert!(!model.contains_key(&(ns, k.clone())));
                        prop_assert!(f.generation > last_gen);
                        last_gen = f.generation;
                        model.insert((ns, k), (loc(l), f.generation));
                    }
                    Inserted::Existed(f) => {
                        prop_assert_eq!(model.get(&(ns, k)), Some(&(f.location, f.generation)));
                    }
                },
                Op::Remove(ns, k) => {
                    let got = w.remove(ns, &k).map(|f| (f.location, f.generation));
                    prop_assert_eq!(got, model.remove(&(ns, k)));
                }
                Op::Update(ns, k, l) => {
                    let got = w.update(ns, &k, loc(l)).unwrap();
                    match model.get_mut(&(ns, k)) {
                        Some(v) => {
                            let f = got.expect("updated");
                            prop_assert!(f.generation > last_gen);
                            last_gen = f.generation;
                            *v = (loc(l), f.generation);
                        }
                        None => prop_assert!(got.is_none()),
                    }
                }
                Op::Lookup(ns, k) => {
                    let want = model.get(&(ns, k.clone())).copied();
                    let got = r.lookup(ns, &k).map(|f| (f.location, f.generation));
                    prop_assert_eq!(got, want);
                    prop_assert_eq!(w.lookup(ns, &k).map(|f| (f.location, f.generation)), want);
                }
                Op::Reopen => {
                    drop(w);
                    let (w2, report) = IndexWriter::open(&path).unwrap();
                    prop_assert!(report.was_clean);
                    prop_assert!(!report.repaired(), "{:?}", report);
                    w = w2;
                    r = IndexReader::open(&path).unwrap();
                    check_all(&w, &r, &model);
                }
            }
        }
        check_all(&w, &r, &model);
        drop(w);
        let (w, report) = IndexWriter::open(&path).unwrap();
        prop_assert_eq!(report.keys, model.len() as u64);
        check_all(&w, &r, &model);
    }
}

#[test]
fn a_full_table_and_a_full_key_area_are_typed_errors() {
    let (_dir, _, mut w) = common::new_index(10, 64);
    let max = w.geometry().max_keys();
    for i in 0..max {
        w.insert_if_absent(0, &i.to_le_bytes(), loc(1)).unwrap();
    }
    let e = w.insert_if_absent(0, b"one more", loc(1)).unwrap_err();
    assert!(
        matches!(e.kind, maru_index::ErrorKind::TableFull { .. }),
        "{e}"
    );
    w.remove(0, &0u64.to_le_bytes()).unwrap();
    let long = [7u8; 40];
    w.insert_if_absent(0, &long, loc(1)).unwrap();
    w.remove(0, &1u64.to_le_bytes()).unwrap();
    let e = w.insert_if_absent(0, &[8u8; 40], loc(1)).unwrap_err();
    assert!(e.to_string().contains("key-bytes area is full"), "{e}");
    let e = w.insert_if_absent(0, &[0u8; 1025], loc(1)).unwrap_err();
    assert!(e.to_string().contains("at most 1024 bytes"), "{e}");
    let e = w
        .insert_if_absent(
            0,
            b"k",
            Location {
                region: 0,
                offset: 0,
                len: 0,
            },
        )
        .unwrap_err();
    assert!(e.to_string().contains("length must be positive"), "{e}");
}

#[test]
fn a_second_writer_is_refused_and_the_budget_holds() {
    let (_dir, path, w) = common::new_index(100_000, 0);
    let e = IndexWriter::open(&path).err().expect("locked");
    assert!(matches!(e.kind, maru_index::ErrorKind::Locked), "{e}");
    let e = IndexWriter::create(
        &path,
        CreateOptions {
            capacity: 1,
            key_area_bytes: 0,
        },
    )
    .err()
    .expect("exists");
    assert!(matches!(e.kind, maru_index::ErrorKind::Exists), "{e}");
    // Bytes per key at capacity, beyond the keys' own bytes (which go to the key area).
    let per_key = w.file_bytes() as f64 / 100_000.0;
    assert!(per_key <= 88.0, "{per_key} bytes per key");
    drop(w);
    let (_w, report) = IndexWriter::open(&path).unwrap();
    assert!(report.was_clean && report.keys == 0);
}
