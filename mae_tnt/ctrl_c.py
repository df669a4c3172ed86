"""A Ctrl-C held back, until the training loop or the end of the command raises it.

Python cannot raise a KeyboardInterrupt out of a finalizer or weakref callback (a DataLoader iterator collected at
an epoch's end, say): it prints it and drops it, and the run would go on as if no Ctrl-C had come. And one raised
while a DataLoader iterator starts its workers leaves a half-built iterator whose workers nothing shuts down.
`cli.quiet_on_ctrl_c` sets `PENDING` when it sees one dropped, or when one comes inside a `deferred()` block; the
training loop raises it at its next batch (`raise_if_pending`), and the command at its end.
"""

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
