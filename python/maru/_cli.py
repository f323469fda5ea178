"""Console scripts: the same command-line code as the Rust binaries, run in this process."""

from __future__ import annotations

import sys

from ._maru import run_cli


def _run(program: str) -> None:
    sys.exit(run_cli([program, *sys.argv[1:]]))


def main() -> None:
    """``maru``: up, stats, top (``maru bench`` ships with the Rust binary)."""
    _run("maru")


def server_main() -> None:
    """``maru-server``: the metadata server."""
    _run("maru-server")


def rm_main() -> None:
    """``maru-resource-manager``: the resource manager."""
    _run("maru-resource-manager")
