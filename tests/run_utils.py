"""Helpers for tests that launch real runs: launching with a time limit, a free port, overrides on top of a base set,
the logged losses, and directories that one launch fills for several tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from filelock import FileLock

from mae_tnt.train.checkpoint import fresh_directory

STACKS_SHOWN = 20000
"""Characters of a hung launch's stderr that its failure shows: the stacks of two ranks and their loader workers."""


def run_launch(command: list[str], *, env: dict, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """`subprocess.run(command, capture_output=True, text=True)` for a launcher that starts processes of its own
    (accelerate's ranks). One that outlives `timeout` fails the test with the Python stack of every process it
    started, since a hang between ranks is rare and leaves nothing else to go on; no process outlives the call,
    where `subprocess.run` would kill the launcher alone and leave its ranks running. Its temporary files (torch's
    launcher leaves a `torchelastic_*` log directory behind every launch) go into a directory removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="launch-") as scratch:
        process = subprocess.Popen(command, env={**env, "PYTHONFAULTHANDLER": "1", "TMPDIR": scratch}, cwd=cwd,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _abort_tree(process.pid)
            stdout, stderr = process.communicate()
            stacks = "\n".join(line for line in stderr.splitlines() if not line.startswith("Extension modules:"))
            pytest.fail(f"{' '.join(command[:4])} ... still ran after {timeout:.0f} s, so it was aborted; where each "
                        f"of its processes was:\n{stacks[-STACKS_SHOWN:]}", pytrace=False)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def _abort_tree(launcher: int) -> None:
    """Abort the processes `launcher` started one at a time, each printing its stack (faulthandler) alone, since
    their writes to the shared stderr would interleave; then kill whatever is left of their sessions. The launcher is
    stopped first, so that it does not stop the other ranks when one dies; the ranks are found by parentage, since
    torch's launcher starts each in a session of its own."""
    _send(launcher, signal.SIGSTOP)
    tree = _descendants(launcher)
    for pid, _ in tree:  # ranks before their DataLoader workers, which exit on their own once their rank is gone
        _send(pid, signal.SIGABRT)
        stops_running(pid, within=10)
    sessions = {launcher, *(session for _, session in tree)}  # start_new_session=True: the launcher leads its own
    for pid, _, session in _live_processes():
        if session in sessions:
            _send(pid, signal.SIGKILL)


def _send(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:  # it has exited meanwhile
        pass


def _live_processes() -> list[tuple[int, int, int]]:
    """(pid, parent pid, session) of every process that has not exited (Linux: read from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        fields = _stat_fields(stat)
        if fields is not None and fields[0] != "Z":
            found.append((int(stat.parent.name), int(fields[1]), int(fields[3])))
    return found


def _stat_fields(stat: Path) -> list[str] | None:
    """A /proc/PID/stat's fields after the command name (state, parent pid, group, session, ...); None once the
    process is gone."""
    try:
        return stat.read_text().rpartition(")")[2].split()
    except OSError:
        return None


def _descendants(root: int) -> list[tuple[int, int]]:
    """(pid, session) of the live processes that `root` started and of theirs, parents first."""
    children: dict[int, list[tuple[int, int]]] = {}
    for pid, parent, session in _live_processes():
        children.setdefault(parent, []).append((pid, session))
    found: list[tuple[int, int]] = []
    queue = [root]
    while queue:
        started = children.get(queue.pop(0), [])
        found += started
        queue += [pid for pid, _ in started]
    return found


def descendants(root: int) -> list[int]:
    """The live processes that `root` started, and theirs."""
    return [pid for pid, _ in _descendants(root)]


def _running(pid: int) -> bool:
    """Whether `pid` runs (a zombie, which only waits for its parent to collect it, does not)."""
    fields = _stat_fields(Path(f"/proc/{pid}/stat"))
    return fields is not None and fields[0] != "Z"


def stops_running(pid: int, within: float) -> bool:
    """Whether `pid` stops running within `within` seconds: a killed process closes its files, which ends a
    launch's output, a moment before it has exited."""
    deadline = time.monotonic() + within
    while _running(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


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
