"""A Ctrl-C held back, until the training loop or the end of the command raises it.

Python cannot raise a KeyboardInterrupt out of a finalizer or weakref callback (a DataLoader iterator collected at
an epoch's end, say): it prints it and drops it, and the run would go on as if no Ctrl-C had come. And one raised
while a DataLoader iterator starts its workers leaves a half-built iterator whose workers nothing shuts down.
Within `recorded()`, which `cli.quiet_on_ctrl_c` wraps every command in, `PENDING` is set when a Ctrl-C is seen
dropped, or when one comes inside a `deferred()` block; the training loop raises it at its next batch
(`raise_if_pending`), and the command at its end.
"""

import multiprocessing
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

PENDING = threading.Event()
DEFERRING = threading.Event()


@contextmanager
def deferred() -> Iterator[None]:
    """A block that a Ctrl-C does not interrupt: it is held in `PENDING` instead."""
    DEFERRING.set()
    try:
        yield
    finally:
        DEFERRING.clear()


def raise_if_pending() -> None:
    """Raise the KeyboardInterrupt of a Ctrl-C held back, once."""
    if PENDING.is_set():
        PENDING.clear()
        raise KeyboardInterrupt


@contextmanager
def recorded() -> Iterator[list[int]]:
    """Within: a Ctrl-C raises KeyboardInterrupt (or sets `PENDING` inside `deferred()`), is recorded in the
    list yielded, and one that Python drops (inside a finalizer) sets `PENDING` without a report."""
    received: list[int] = []

    def on_ctrl_c(signum, frame) -> None:
        received.append(signum)
        if DEFERRING.is_set():
            PENDING.set()
        else:
            raise KeyboardInterrupt

    def report_unraisable(unraisable) -> None:
        if received and issubclass(unraisable.exc_type, KeyboardInterrupt):  # our dropped Ctrl-C
            PENDING.set()
        else:
            previous_hook(unraisable)

    # Signal handlers belong to the main thread; a main run in another (a notebook's) keeps Python's own.
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, on_ctrl_c) if in_main_thread else None
    previous_hook, sys.unraisablehook = sys.unraisablehook, report_unraisable
    try:
        yield received
    finally:
        sys.unraisablehook = previous_hook
        PENDING.clear()  # a notebook's next run starts without it
        if in_main_thread:
            signal.signal(signal.SIGINT, previous)


def kill_children() -> None:
    """Kill this process's multiprocessing children, without torch's SIGCHLD handler reporting each as a loader
    worker that failed."""
    if children := multiprocessing.active_children():
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for child in children:
            child.kill()
