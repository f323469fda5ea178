//! Seed corpora of the resource manager's fuzz targets (`fuzz/fuzz_targets/wal_record.rs`,
//! `checkpoint.rs`): every committed seed replays without a panic and every seed that
//! decodes is canonical — the same checks the targets make, on stable, in every test run.
//! Regression inputs under `fuzz/regressions/<target>/` (crashes found by fuzzing) replay
//! here too. `write_seed_corpus` (ignored) regenerates those seed inputs after a format change.
//!
//! An input's first byte picks the target's mode: even = the bytes as they are, odd = the
//! bytes with valid checksums added (see the targets).

use std::path::PathBuf;

use maru_resource_manager::checkpoint::CHECKPOINT_VERSION;
use maru_resource_manager::{
    decode_checkpoint, decode_wal, encode_checkpoint, encode_record, Allocation, Checkpoint, Owner,
    WalOp,
};

fn fuzz_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

fn owner(pid: u32) -> Owner {
    Owner {
        host: "node-1".into(),
        pid,
        start_time: 123_456,
    }
}

fn alloc(id: u64) -> WalOp {
    WalOp::Alloc(Allocation {
        region_id: id,
        pool: "/dev/shm/maru/pool0".into(),
        offset: (id - 1) << 21,
        len: 2 << 20,
        owner: Owner {
            host: "node-1".into(),
            pid: 4242,
            start_time: 123_456,
        },
    })
}

fn log(ops: &[WalOp], first: u64) -> Vec<u8> {
    ops.iter()
        .enumerate()
        .flat_map(|(i, op)| encode_record(first + i as u64, op).unwrap())
        .collect()
}

fn with_mode(mode: u8, bytes: &[u8]) -> Vec<u8> {
    let mut v = vec![mode];
    v.extend_from_slice(bytes);
    v
}

/// Body-only input for the checksum-fixing mode of `wal_record`: length byte + body each.
fn bodies(ops: &[WalOp]) -> Vec<u8> {
    let mut v = vec![1u8];
    for op in ops {
        let rec = encode_record(1, op).unwrap();
        let body = &rec[maru_resource_manager::wal::RECORD_HEADER_LEN..];
        v.push(body.len() as u8);
        v.extend_from_slice(body);
    }
    v
}

fn wal_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let ops = vec![
        alloc(1),
        alloc(2),
        WalOp::Free { region_id: 1 },
        WalOp::Reclaim { region_id: 2 },
        alloc(3),
        WalOp::Bind {
            owner: owner(3),
            server_id: [7; 16],
        },
        WalOp::Adopt {
            from: owner(3),
            to: owner(4),
        },
    ];
    let full = log(&ops, 41);
    let mut torn = full.clone();
    torn.truncate(full.len() - 7);
    let mut middle = full.clone();
    middle[30] ^= 0xff;
    vec![
        ("empty", with_mode(0, &[])),
        ("seven-records", with_mode(0, &full)),
        ("torn-tail", with_mode(0, &torn)),
        ("corrupt-middle", with_mode(0, &middle)),
        (
            "one-free",
            with_mode(0, &log(&[WalOp::Free { region_id: 9 }], 1)),
        ),
        ("bodies", bodies(&ops)),
    ]
}

fn checkpoint_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let allocations: Vec<Allocation> = (1..=3)
        .map(|i| match alloc(i) {
            WalOp::Alloc(a) => a,
            _ => unreachable!(),
        })
        .collect();
    let empty = encode_checkpoint(&Checkpoint {
        seq: 0,
        next_region_id: 1,
        ..Checkpoint::default()
    })
    .unwrap();
    let three = encode_checkpoint(&Checkpoint {
        seq: 77,
        next_region_id: 4,
        allocations,
        bindings: Vec::new(),
    })
    .unwrap();
    vec![
        ("empty", with_mode(0, &empty)),
        ("three-allocations", with_mode(0, &three)),
        ("body", with_mode(1, &three[20..])),
        ("truncated", with_mode(0, &three[..three.len() - 5])),
    ]
}

/// The `wal_record` target's checks.
fn check_wal(input: &[u8]) {
    let Some((mode, rest)) = input.split_first() else {
        return;
    };
    assert_eq!(mode & 1, 0, "seeds of the raw mode only are replayed here");
    let Ok(scan) = decode_wal(rest) else {
        return;
    };
    let again: Vec<u8> = scan
        .records
        .iter()
        .flat_map(|r| encode_record(r.seq, &r.op).unwrap())
        .collect();
    assert_eq!(&again[..], &rest[..scan.valid_len]);
}

fn check_checkpoint(input: &[u8]) {
    let Some((mode, rest)) = input.split_first() else {
        return;
    };
    if mode & 1 == 1 {
        return; // needs the target's wrapping; decoded by the target itself
    }
    if let Ok(c) = decode_checkpoint(rest) {
        let again = encode_checkpoint(&c).unwrap();
        // The current version is canonical; an older one re-encodes to the same table.
        if rest[4..8] == CHECKPOINT_VERSION.to_le_bytes() {
            assert_eq!(again, rest);
        } else {
            assert_eq!(decode_checkpoint(&again).unwrap(), c);
        }
    }
}

fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for dir in ["corpus", "regressions"] {
        let d = fuzz_dir().join(dir).join(target);
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            out.push((e.path(), std::fs::read(e.path()).unwrap()));
        }
    }
    out
}

#[test]
fn committed_wal_and_checkpoint_inputs_replay_cleanly() {
    let wal = inputs("wal_record");
    let ckpt = inputs("checkpoint");
    assert!(
        wal.len() >= wal_seeds().len(),
        "fuzz/corpus/wal_record is missing seeds"
    );
    assert!(
        ckpt.len() >= checkpoint_seeds().len(),
        "fuzz/corpus/checkpoint is missing seeds"
    );
    for (path, bytes) in &wal {
        if bytes.first().is_some_and(|m| m & 1 == 0) {
            check_wal(bytes);
        }
        let _ = path;
    }
    for (_, bytes) in &ckpt {
        check_checkpoint(bytes);
    }
    // The valid seeds decode to what they were made from.
    let scan = decode_wal(&wal_seeds()[1].1[1..]).unwrap();
    assert_eq!(scan.records.len(), 7);
    assert!(
        decode_wal(&wal_seeds()[3].1[1..]).is_err(),
        "damage in the middle is refused"
    );
    assert_eq!(decode_wal(&wal_seeds()[2].1[1..]).unwrap().records.len(), 6);
}

#[test]
#[ignore = "writes fuzz/corpus/{wal_record,checkpoint}; run by hand after a format change"]
fn write_seed_corpus() {
    for (target, seeds) in [
        ("wal_record", wal_seeds()),
        ("checkpoint", checkpoint_seeds()),
    ] {
        let dir = fuzz_dir().join("corpus").join(target);
        std::fs::create_dir_all(&dir).unwrap();
        for (name, bytes) in seeds {
            std::fs::write(dir.join(format!("seed-{name}.bin")), bytes).unwrap();
        }
    }
}
