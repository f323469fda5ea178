//! The Rust example runs as a user would run it, against a real `maru up`.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::Up;

/// The example's executable, as `cargo test` (hashed name) or `cargo build --examples` (plain
/// name) left it in target/<profile>/examples/.
fn example_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap().join("examples");
    let plain = dir.join(name);
    if plain.exists() {
        return plain;
    }
    let hashed = format!("{}-", name.replace('-', "_"));
    std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.starts_with(&hashed) && p.extension().is_none()
        })
        .max_by_key(|p| p.metadata().and_then(|m| m.modified()).ok())
        .unwrap_or_else(|| panic!("example {name} is not built in {} (run `cargo test` without --test, or `cargo build --examples`)", dir.display()))
}

#[test]
fn rust_quickstart_runs_against_maru_up() {
    let dir = maru_testkit::temp_dir();
    let up = Up::start(dir.path(), &[]);
    let out = Command::new(example_binary("rust-quickstart"))
        .arg(up.url("unix"))
        .output()
        .unwrap();
    up.stop();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "example failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("retrieved 65536 bytes starting with \"chunk-2\""),
        "{stdout}"
    );
    assert!(stdout.contains("exists: true"), "{stdout}");
    assert!(stdout.contains("deleted 4 chunks + 1"), "{stdout}");
}
