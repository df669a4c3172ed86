"""The benchmarks' own arithmetic (their timings are not tests)."""

import argparse
import sys
from pathlib import Path

import pytest

from mae_tnt.data.stream import StreamPlan

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools" / "bench"))
gpu = pytest.importorskip("gpu")


@pytest.mark.parametrize("workers", [1, 7, 16, 32])
@pytest.mark.parametrize("steps", [1, 30, 100])
def test_gpu_benchs_pipeline_shards_hold_one_epoch_of_the_timed_steps_for_every_default_model(workers, steps):
    """A second epoch would restart the loader workers inside the timed window; too few images gave workers no
    batch at all (16 cores at batch 512)."""
    args = argparse.Namespace(models=gpu.DEFAULT_MODELS, steps=steps, workers=workers)
    images = gpu.images_for_one_epoch(args)
    for spec in gpu.DEFAULT_MODELS:
        plan = StreamPlan(images, workers, int(spec.split(":")[1]))
        assert plan.batches_per_worker * workers > steps
