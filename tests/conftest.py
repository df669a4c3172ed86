"""Fixtures shared by the test modules, most of them for those that run training in this process."""

import signal
import threading

import pytest
import torch
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


@pytest.fixture
def forbid_real_builds(monkeypatch):
    """A call that lets registered models be built on the meta device only from then on: a build that would allocate
    fails the test instead, such as one that a forged checkpoint description sizes at many GB."""
    from mae_tnt.models import registry

    def on_meta_only(name, builder):
        def build(**kwargs):
            if torch.get_default_device().type != "meta":
                pytest.fail(f"{name} was built on {torch.get_default_device()} with {kwargs}")
            return builder(**kwargs)
        return build

    def forbid():
        monkeypatch.setattr(registry, "_BUILDERS", {name: on_meta_only(name, builder)
                                                    for name, builder in registry._BUILDERS.items()})
    return forbid
