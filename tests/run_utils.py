"""Helpers for tests that launch real runs: launching with a time limit, a free port, overrides on top of a base set,
the logged losses, and directories that one launch fills for several tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from filelock import FileLock

from mae_tnt.train.checkpoint import fresh_directory

STACKS_SHOWN = 12000
"""Characters of a hung launch's stderr that its failure shows: the stacks of two ranks and their loader workers."""


def run_launch(command: list[str], *, env: dict, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """`subprocess.run(command, capture_output=True, text=True)` for a launcher that starts processes of its own
    (accelerate's ranks). One that outlives `timeout` fails the test with the Python stack of every process it
    started, since a hang between ranks is rare and leaves nothing else to go on; no process outlives the call,
    where `subprocess.run` would kill the launcher alone and leave its ranks waiting on each other."""
    process = subprocess.Popen(command, env={**env, "PYTHONFAULTHANDLER": "1"}, cwd=cwd, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _signal_session(process, signal.SIGABRT)  # faulthandler prints each process's stack as it dies
        try:
            stdout, stderr = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            _signal_session(process, signal.SIGKILL)
            stdout, stderr = process.communicate()
        pytest.fail(f"{' '.join(command[:4])} ... still ran after {timeout:.0f} s, so it was aborted; where each of "
                    f"its processes was:\n{stderr[-STACKS_SHOWN:]}", pytrace=False)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def _signal_session(process: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(process.pid, signum)  # the launcher's session: its ranks and their DataLoader workers
    except ProcessLookupError:  # every one of them has already exited
        pass


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
