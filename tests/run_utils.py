"""Helpers for tests that launch real runs: a free port, overrides on top of a base set, the logged losses, and
directories that one launch fills for several tests."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
from filelock import FileLock

from mae_tnt.train.checkpoint import fresh_directory


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


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """A directory that `build` fills once per test session, however many pytest-xdist workers ask for it: a launch
    costs more than the tests reading its results, and xdist's own grouping (`--dist loadgroup`) is lost on pytest 9.
    A failed build leaves no mark, so the next worker to ask builds it again and fails the same way."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        directory = tmp_path_factory.mktemp(name)
        build(directory)
        return directory
    directory = tmp_path_factory.getbasetemp().parent / name  # the session's folder, above every worker's own
    with FileLock(f"{directory}.lock"):
        if not (directory / ".built").exists():
            fresh_directory(directory)
            build(directory)
            (directory / ".built").touch()
    return directory
