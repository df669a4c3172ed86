"""Fixtures shared by the test modules that run training in this process."""

import pytest
from accelerate.state import AcceleratorState, GradientState


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps process-wide singletons; each run in this process starts from a clean slate."""
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
