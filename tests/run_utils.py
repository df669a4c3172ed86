"""Helpers for tests that launch real runs in subprocesses: a free port and the logged losses of a run."""

from __future__ import annotations

import json
import socket
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def logged_losses(out: Path) -> list[tuple]:
    """(step, loss, lr) of every line of a run's metrics.jsonl."""
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"], r["lr"]) for r in map(json.loads, lines)]
