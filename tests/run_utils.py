"""Helpers for tests that launch real runs: a free port, overrides on top of a base set, and the logged losses."""

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


def overridden(base: list, overrides: tuple[str, ...] | list[str]) -> list:
    """`base` key=value overrides with a test's own `overrides` replacing those of the same key (the config refuses
    a key given twice); arguments without `=` (a worker's mode and paths) keep their place."""
    given = {str(item).partition("=")[0]: item for item in [*base, *overrides]}
    return list(given.values())
