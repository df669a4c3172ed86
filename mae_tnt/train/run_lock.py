"""One run per run directory: an advisory lock held while a run uses it.

Two runs writing the same `run.output_dir` interleave their metrics, set each other's checkpoints aside and mix
their weights; it happens easily, since killing `accelerate launch` does not stop its ranks. The global main process
holds an exclusive `flock` on `OUT/.run.lock` from just before the run's first write (its checks passed, so a
refused run leaves no folder behind; one whose later set-up fails gives the lock up and removes the folder if it
created it and wrote nothing else) to its end (the kernel also releases it however the process ends, so a killed
run leaves nothing stale), and every rank learns whether it got it. A process may claim a directory it holds again
(a notebook running one run after another). On network file systems `flock` may not reach other machines; there the
lock guards against runs on the same node only.
"""

from __future__ import annotations

import atexit
import fcntl
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object

from ..config import ConfigError

LOCK_NAME = ".run.lock"
"""The lock file in a run directory; setting a run aside (`superseded/`) leaves it in place."""

_HELD: dict[Path, IO] = {}
"""This process's locks, by resolved run directory."""
_CREATED: set[Path] = set()
"""Run directories that this process's claims created (resolved), which a run that fails to start removes."""


def claim_run_directory(out: Path, accelerator: Accelerator) -> None:
    """Lock `out` for this run (see `released_at_end`).

    Raises:
        ConfigError: on every rank, when another live process holds `out`, or when some process does not see the
            directory that the main process claimed (nodes without shared storage).
    """
    refusal = _try_lock(Path(out)) if accelerator.is_main_process else None
    stamp = _stamp(Path(out))
    if accelerator.num_processes > 1:
        refusal, stamp = broadcast_object_list([refusal, stamp])  # every rank stops, not only the main one
    if refusal is not None:
        raise ConfigError(refusal)
    if accelerator.num_processes > 1:
        with given_back_on_failure(out):
            _require_shared(Path(out), stamp, accelerator)


def _stamp(out: Path) -> str | None:
    """What the lock file that this process holds on `out` says (its pid and host)."""
    lock = _HELD.get(out.resolve())
    return None if lock is None else (out / LOCK_NAME).read_text()


def _require_shared(out: Path, stamp: str, accelerator: Accelerator) -> None:
    """Refuse, on every rank, a run directory that some process does not see as the main process wrote it: each
    writes its part of every checkpoint there and reads it back to resume, so on nodes that do not share the storage
    (or start in other working directories, for a relative path) the checkpoints would be incomplete."""
    try:
        seen = (out / LOCK_NAME).read_text() == stamp
    except OSError:
        seen = False
    blind = gather_object([] if seen else [f"rank {accelerator.process_index} on {socket.gethostname()}"])
    if blind:
        raise ConfigError(f"run.output_dir={out} is not the same directory for every process: {', '.join(blind)} "
                          f"cannot see the run that rank 0 claimed there ({stamp}); every process writes its part of "
                          "each checkpoint into it, so put it on storage that every node mounts, at an absolute path")


@contextmanager
def released_at_end(out: Path) -> Iterator[None]:
    """Give up this process's lock on `out` when the block ends, however it ends."""
    try:
        yield
    finally:
        _release(Path(out).resolve())


@contextmanager
def given_back_on_failure(out: Path) -> Iterator[None]:
    """A run's set-up after its claim: if it fails, the lock is given up, and a directory that the claim created and
    that holds nothing but the lock is removed, so a run that never started leaves no folder."""
    try:
        yield
    except BaseException:
        key = Path(out).resolve()
        if key in _CREATED and [path.name for path in key.iterdir()] == [LOCK_NAME]:
            (key / LOCK_NAME).unlink()  # still locked: no other run can have taken the folder meanwhile
            key.rmdir()
        _release(key)
        raise


def _forget_locks_in_child() -> None:
    """A forked child (a DataLoader worker) shares its parent's locks; closing its copies lets a lock go with the
    parent, where an orphaned worker kept it held for seconds after a `kill -9`, refusing the rerun."""
    for lock in _HELD.values():
        lock.close()
    _HELD.clear()
    _CREATED.clear()


os.register_at_fork(after_in_child=_forget_locks_in_child)


@atexit.register
def _release_all() -> None:
    """Close the locks still held at exit (a run built but never trained): the kernel would release them anyway, but
    an open file left to the interpreter's teardown makes it print a ResourceWarning."""
    for key in list(_HELD):
        _release(key)


def _release(key: Path) -> None:
    lock = _HELD.pop(key, None)
    if lock is not None:
        lock.close()
    _CREATED.discard(key)


def _try_lock(out: Path) -> str | None:
    """Take the lock on `out`; None on success, else the refusal naming the holder."""
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    key = out.resolve()
    if key in _HELD:
        return None
    lock = open(out / LOCK_NAME, "a+")  # noqa: SIM115 - held open while the run lasts
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        return (f"run.output_dir={out} is in use by another run ({holder}); wait for it to finish or stop it "
                "(killing `accelerate launch` leaves its ranks running: stop those too), or pick another "
                "run.output_dir")
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()} on {socket.gethostname()}")
    lock.flush()
    os.fsync(lock.fileno())  # on a network file system, other nodes read it (`_require_shared`)
    _HELD[key] = lock
    if created:
        _CREATED.add(key)
    return None
