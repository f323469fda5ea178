//! The Rust example runs as a user would run it, against a real `maru up`.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn example_binary(name: &str) -> PathBuf {
    // target/<profile>/deps/<this test> → target/<profile>/examples/<name>
    let exe = std::env::current_exe().unwrap();
    exe.parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples")
        .join(name)
}

#[test]
fn rust_quickstart_runs_against_maru_up() {
    let dir = tempfile::Builder::new()
        .prefix("maru-test-example-")
        .tempdir_in("/dev/shm")
        .unwrap();
    let ready = dir.path().join("ready.json");
    let mut up = Command::new(env!("CARGO_BIN_EXE_maru"))
        .args(["up", "--port", "0", "--rm-port", "0", "--pool-size", "64M"])
        .arg("--pool-dir")
        .arg(dir.path().join("pool"))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--ready-file")
        .arg(&ready)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let info: serde_json::Value = loop {
        if let Some(v) = std::fs::read_to_string(&ready)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
        {
            break v;
        }
        assert!(Instant::now() < deadline, "maru up not ready");
        std::thread::sleep(Duration::from_millis(10));
    };
    let url = info["unix"].as_str().unwrap();
    let out = Command::new(example_binary("rust-quickstart"))
        .arg(url)
        .output()
        .expect("example built by cargo test");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(up.id() as i32, libc::SIGTERM) };
    assert!(up.wait().unwrap().success());
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
