"""The console scripts `pip install` brings: `maru`, `maru-server`, `maru-resource-manager`.
They run the same command-line code as the Rust binaries, inside the Python process."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from maru import _maru
from conftest import new_dir, wait_for_file

SCRIPTS = ["maru", "maru-server", "maru-resource-manager"]


def script(name: str) -> Path:
    p = Path(sys.executable).parent / name
    if not p.exists():
        found = shutil.which(name)
        if found is None:
            pytest.fail(f"console script {name} is not installed next to {sys.executable}")
        p = Path(found)
    return p


@pytest.mark.parametrize("name", SCRIPTS)
def test_help(name: str) -> None:
    r = subprocess.run([str(script(name)), "--help"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert "Usage" in r.stdout or "usage" in r.stdout


def test_bad_arguments_exit_nonzero() -> None:
    r = subprocess.run(
        [str(script("maru-server")), "--no-such-flag"], capture_output=True, text=True, timeout=30
    )
    assert r.returncode != 0


def test_resource_manager_runs_from_the_console_script() -> None:
    d = new_dir("script")
    log = d / "rm.log"
    proc = subprocess.Popen(
        [
            str(script("maru-resource-manager")),
            "--port", "0",
            "--state-dir", str(d / "state"),
            "--pool", f"shm:{d / 'pool'}:64M",
            "--ready-file", str(d / "ready"),
        ],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        ready = wait_for_file(d / "ready", proc, log)
        stats = json.loads(_maru.rm_stats(f"tcp://{ready['tcp']}"))
        assert stats["pools"] and stats["pools"][0]["total_bytes"] == 64 << 20
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(d, ignore_errors=True)


def test_bench_says_it_ships_with_the_rust_binary() -> None:
    r = subprocess.run(
        [str(script("maru")), "bench", "--quick"], capture_output=True, text=True, timeout=30
    )
    assert r.returncode != 0
    assert "ships with the Rust `maru` binary" in r.stderr, r.stderr
    assert "target/release/maru bench" in r.stderr, r.stderr
