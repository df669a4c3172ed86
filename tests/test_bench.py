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


def test_visible_only_bench_reports_what_the_step_would_take_at_the_full_encoders_rate(capsys):
    """The visible-only encoder does 4 GMAC in 2 s, half the full one's rate (16 GMAC in 4 s): at that rate it would
    take 1 s, so the visible-only step would take 2 s instead of 3 s, against the full step's 6 s."""
    visible_only = pytest.importorskip("visible_only")
    seconds = {"visible-only": 3.0, "mask tokens in encoder": 6.0, "encoder alone, visible-only": 2.0,
               "encoder alone, mask tokens": 4.0}
    macs = {"encoder alone, visible-only": 4.0, "encoder alone, mask tokens": 16.0}
    visible_only.print_encoder_efficiency(seconds, macs)
    assert capsys.readouterr().out.splitlines() == [
        "encoder MACs per second, visible-only / mask tokens: 0.50x",
        "speedup if the visible-only encoder ran at the full one's rate: 3.00x"]


def test_the_visible_only_bench_gives_both_models_the_same_weights_and_prints_the_ratio_last(monkeypatch, capsys):
    visible_only = pytest.importorskip("visible_only")
    monkeypatch.setattr(sys, "argv", ["visible_only.py", "--model", "mae_vit_test", "--batch", "2", "--repeats", "1"])
    visible_only.main()  # asserts that the weights load across with only the mask tokens left out
    assert capsys.readouterr().out.splitlines()[-1].startswith("speedup visible-only vs mask tokens: ")


def test_interleaved_times_reverses_the_order_of_the_cases_every_other_repetition():
    """Running first, or after a given case, must not favour the same case in every repetition."""
    common = pytest.importorskip("common")
    calls = []
    times = common.interleaved_times({name: (lambda name=name: calls.append(name)) for name in "abc"}, repeats=3,
                                     warmup=1)
    assert calls == [*"abc", *"abc", *"cba", *"abc"]  # the warm-up, then the three repetitions
    assert {name: len(values) for name, values in times.items()} == {"a": 3, "b": 3, "c": 3}
