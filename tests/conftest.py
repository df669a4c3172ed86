"""Fixtures shared by the test modules that run training in this process."""

import signal
import threading

import pytest
from accelerate.state import AcceleratorState, GradientState


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps process-wide singletons; each run in this process starts from a clean slate."""
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def tensorboard_writer_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if type(thread).__module__.endswith("event_file_writer")]


@pytest.fixture(autouse=True)
def runs_leave_no_process_state_behind():
    """A run inside someone's process (a notebook, this test session) must give back what it borrowed.

    A SIGTERM handler left installed made this whole session ignore SIGTERM, and was forked into every later
    worker pool, which then waited forever for its SIGTERM-ignoring workers; an unclosed TensorBoard writer is a
    thread per run, live in every later fork.
    """
    handler = signal.getsignal(signal.SIGTERM)
    yield
    assert signal.getsignal(signal.SIGTERM) is handler, "the test left a SIGTERM handler installed"
    assert not tensorboard_writer_threads(), "the test left a TensorBoard writer open"
