"""The pretraining loop: run directory, exact resume, early config errors, non-finite loss, checkpoint safety."""

import dataclasses
import errno
import importlib.util
import itertools
import json
import math
import os
import re
import shutil
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.state import AcceleratorState
from run_utils import overridden
from safetensors import SafetensorError
from safetensors.torch import save_file
from shard_utils import drop_classes, write_shards
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.cuda import OutOfMemoryError

import mae_tnt
from mae_tnt.cli import report_user_errors
from mae_tnt.config import ConfigError, ModelConfig, PretrainConfig, load_config
from mae_tnt.data.shards import ShardError, read_samples
from mae_tnt.data.transforms import normalize
from mae_tnt.finetune_config import FinetuneConfig
from mae_tnt.train.checkpoint import ResumeError, find_checkpoints
from mae_tnt.train.engine import Trainer
from mae_tnt.train.finetune import FinetuneRun, finetune
from mae_tnt.train.launch import auto_precision
from mae_tnt.train.loop import NonFiniteLossError, TrainingRun, Window, raise_if_nonfinite, seed_step
from mae_tnt.train.resume import _skipped_carried_over
from mae_tnt.train.schedule import derive_plan, lr_at
from mae_tnt.visualize import main as visualize_main

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "data" / "fashion_mnist"


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    write_shards(root, [32, 32, 32, 32], size=20)
    write_shards(root, [16], split="val", size=20)
    return root


def config(shards, out, *overrides):
    base = [f"data.train={shards}", f"data.val={shards}", f"run.output_dir={out}", "data.batch_size=8",
            "data.num_workers=0", "model.img_size=32", "schedule.epochs=2", "schedule.warmup_epochs=0.5",
            "run.log_every=1", "run.checkpoint_every=4", "optim.base_lr=1e-3", "data.shuffle_chunk=16"]
    return load_config(PretrainConfig, ROOT / "recipes" / "demo_mae_vit.yaml", overridden(base, overrides))


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_run_writes_the_run_directory_and_lowers_the_loss(shards, tmp_path):
    summary = Trainer(config(shards, tmp_path, "schedule.epochs=4", "run.checkpoint_every=100",
                             "eval.knn_every=2")).train()
    assert summary["steps"] == 64
    knn = [r for r in metrics(tmp_path) if "knn_top1" in r]
    assert [r["step"] for r in knn] == [32, 64] and all(0 <= r["knn_top1"] <= 100 for r in knn)
    rows = [r for r in metrics(tmp_path) if "loss" in r]
    assert {"step", "epoch", "loss", "lr", "img_per_s", "data_wait"} <= set(rows[0])
    assert sum(r["loss"] for r in rows[-8:]) < sum(r["loss"] for r in rows[:8])
    # 16 steps per epoch, warmup 8 steps to 1e-3 x 8 / 256, then half-cosine to 0; a row logs its step's LR.
    peak = 1e-3 * 8 / 256
    expected = [peak * s / 8 if s < 8 else peak * 0.5 * (1 + math.cos(math.pi * (s - 8) / 56)) for s in range(64)]
    assert [r["lr"] for r in rows] == pytest.approx(expected, abs=1e-12)
    for name in ("config.yaml", "recon/step_00000064.png", "checkpoints/step_00000064/model.safetensors",
                 "checkpoints/step_00000064/state.json"):
        assert (tmp_path / name).exists(), name
    assert list((tmp_path / "tensorboard").iterdir())
    weights = tmp_path / "checkpoints/step_00000064/model.safetensors"
    assert stat.S_IMODE(weights.stat().st_mode) == stat.S_IMODE((tmp_path / "config.yaml").stat().st_mode)


@pytest.mark.parametrize("keep, kept", [(2, [3, 4]), (0, [1, 2, 3, 4])])
def test_the_rotation_keeps_the_newest_checkpoints_or_every_one_at_zero(shards, tmp_path, keep, kept):
    overrides = ["run.max_steps=4", "run.checkpoint_every=1", f"run.keep_checkpoints={keep}"]
    Trainer(config(shards, tmp_path, *overrides)).train()
    assert sorted(int(path.name.removeprefix("step_")) for path in find_checkpoints(tmp_path)) == kept


@pytest.mark.skipif(not BUNDLED.exists(), reason="bundled Fashion-MNIST sample missing")
@pytest.mark.parametrize("backbone", sorted(path.stem.removeprefix("demo_mae_")
                                             for path in (ROOT / "recipes").glob("demo_mae_*.yaml")))
def test_every_demo_recipe_runs_on_the_bundled_sample_as_written(backbone, tmp_path):
    """The demo recipes themselves, cut short: the backbone's MAE pretraining (model, augmentation, grids, a
    checkpoint), then each demo fine-tuning recipe of that backbone (demo_*_{backbone}.yaml) from its checkpoint."""
    pretrained = tmp_path / "mae"
    cfg = load_config(PretrainConfig, ROOT / f"recipes/demo_mae_{backbone}.yaml",
                      [f"run.output_dir={pretrained}", "run.max_steps=3", "run.log_every=1", "run.recon_every=3"])
    assert Trainer(cfg).train()["steps"] == 3
    rows = [r for r in metrics(pretrained) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(0 < r["loss"] < 10 for r in rows)
    for name in ("config.yaml", "recon/step_00000003.png", "checkpoints/step_00000003/model.safetensors"):
        assert (pretrained / name).exists(), name

    follow_ups = sorted(ROOT.glob(f"recipes/demo_*_{backbone}.yaml"))
    assert len(follow_ups) > 1, follow_ups
    for recipe in follow_ups:
        if recipe.name.startswith("demo_mae_"):
            continue
        cfg = load_config(FinetuneConfig, recipe, [f"init={pretrained}", f"run.output_dir={tmp_path / recipe.stem}",
                                                   "run.max_steps=2", "knn.max_train=200"])
        summary = finetune(cfg)
        if cfg.mode == "knn":
            assert 0 <= summary["knn_top1"] <= 100, summary
        else:
            assert summary["steps"] == 2 and 0 <= summary["best"]["val_acc1"] <= 100, (recipe.name, summary)


def test_the_knn_monitor_runs_at_each_periods_end_and_at_the_last_step_of_a_schedule_that_ends_inside_one():
    def due_steps(steps_per_epoch, total_steps, every=1):
        run = SimpleNamespace(cfg=SimpleNamespace(eval=SimpleNamespace(knn_every=every), data=SimpleNamespace(val="v")),
                              plan=SimpleNamespace(steps_per_epoch=steps_per_epoch, total_steps=total_steps))
        return [step for step in range(1, total_steps + 1) if Trainer._knn_due(SimpleNamespace(**vars(run), step=step))]

    assert due_steps(7.75, 23) == [8, 16, 23]  # 3 epochs of 31 batches, accumulated 4 at a time: 23.25 cut to 23
    assert due_steps(8, 24) == [8, 16, 24]  # whole epochs: no extra evaluation
    assert due_steps(51, 60, every=0.2) == [11, 21, 31, 41, 51, 60]  # 51 / (51 x 0.2) = 4.999999999999999 in floats


def test_the_schedule_counts_the_steps_its_epochs_stand_for():
    cfg = load_config(PretrainConfig, ROOT / "recipes" / "demo_mae_vit.yaml", ["schedule.epochs=0.29",
                                                                              "schedule.warmup_epochs=0.07"])
    plan = derive_plan(cfg, num_processes=1, batches_per_epoch=100)  # 0.29 x 100 = 28.999999999999996 in floats
    assert (plan.total_steps, plan.warmup_steps) == (29, 7)


def test_the_lr_scales_with_the_effective_batch_and_warmup_counts_optimizer_steps():
    """lr = base_lr x batch x accumulation x processes / 256; an epoch of 100 batches accumulated 2 at a time is 50
    optimizer steps, which the schedule's epochs count."""
    cfg = load_config(PretrainConfig, ROOT / "recipes" / "demo_mae_vit.yaml", [
        "data.batch_size=8", "optim.accum_steps=2", "optim.base_lr=1e-3", "schedule.epochs=3",
        "schedule.warmup_epochs=1", "optim.min_lr=0"])
    plan = derive_plan(cfg, num_processes=4, batches_per_epoch=100)
    assert (plan.effective_batch, plan.peak_lr) == (64, pytest.approx(1e-3 * 64 / 256))
    assert (plan.steps_per_epoch, plan.total_steps, plan.warmup_steps) == (50, 150, 50)


def test_a_min_lr_above_the_peak_lr_is_refused_though_below_base_lr():
    """With an effective batch of 64 the peak is base_lr / 4: a min_lr of base_lr / 2 would make the cosine rise."""
    cfg = load_config(PretrainConfig, ROOT / "recipes" / "demo_mae_vit.yaml", [
        "data.batch_size=32", "optim.accum_steps=1", "optim.base_lr=1e-3", "optim.min_lr=5e-4"])
    with pytest.raises(ConfigError, match=r"optim.min_lr=0.0005 is above the peak LR 0.00025 \(optim.base_lr x "
                                          r"effective batch 64 / 256\)"):
        derive_plan(cfg, num_processes=2, batches_per_epoch=10)


def test_step_seeds_are_reproducible_and_no_two_coordinates_share_one():
    def torch_seed(*coordinates):
        seed_step(*coordinates)
        return torch.initial_seed()

    # Shifts that a linear mix of (seed, rank, step) would map onto each other, next to plain neighbours.
    steps = (*range(4), 7_919, 7_920, 1_000_003)
    coordinates = [(seed, rank, step) for seed in (0, 1) for rank in range(4) for step in steps]
    seeds = [torch_seed(*c) for c in coordinates]
    assert len(set(seeds)) == len(coordinates)
    assert seeds == [torch_seed(*c) for c in coordinates]
    assert torch_seed(2**63 - 1, 4095, 10**9) < 2**63


def test_img_per_s_leaves_out_the_time_spent_saving_checkpoints(shards, tmp_path, monkeypatch):
    """A clock that advances 1 ms per reading, and an hour at every checkpoint: the rates must not see the hours."""
    import mae_tnt.train.loop as loop

    ticks, offset = itertools.count(step=1e-3), [0.0]
    monkeypatch.setattr(loop, "time", SimpleNamespace(perf_counter=lambda: next(ticks) + offset[0]))
    trainer = Trainer(config(shards, tmp_path, "run.max_steps=6", "run.checkpoint_every=2"))
    save = trainer.save

    def slow_save():
        offset[0] += 3600
        return save()

    monkeypatch.setattr(trainer, "save", slow_save)
    trainer.train()
    rows = [r for r in metrics(tmp_path) if "loss" in r]
    assert len(rows) == 6 and all(r["img_per_s"] > 100 for r in rows), [r["img_per_s"] for r in rows]


def test_a_run_directory_in_use_by_another_run_is_refused_and_a_finished_run_frees_it(shards, tmp_path):
    import fcntl

    tmp_path.mkdir(exist_ok=True)
    with open(tmp_path / ".run.lock", "a+") as other:  # another live run, as its lock file shows it
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        other.write("pid 4242 on node7")
        other.flush()
        with pytest.raises(ConfigError, match=rf"run.output_dir={tmp_path} is in use by another run \(pid 4242 on "
                                              r"node7\); wait for it to finish or stop it"):
            Trainer(config(shards, tmp_path, "run.max_steps=1"))
    Trainer(config(shards, tmp_path, "run.max_steps=1")).train()
    with open(tmp_path / ".run.lock") as after:
        fcntl.flock(after, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when the run ended
    Trainer(config(shards, tmp_path, "run.max_steps=2", "run.resume=none")).train()  # a set-aside keeps the lock
    assert (tmp_path / ".run.lock").exists() and not list((tmp_path / "superseded").glob("*/.run.lock"))


def test_a_run_whose_set_up_fails_after_its_claim_leaves_no_folder_and_frees_the_lock(shards, tmp_path):
    import fcntl

    out = tmp_path / "new"
    with pytest.raises(ResumeError, match="run.resume=/nonexistent does not exist"):
        Trainer(config(shards, out, "run.resume=/nonexistent"))
    assert not out.exists()
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ResumeError):
        Trainer(config(shards, out, "run.resume=/nonexistent"))
    assert sorted(path.name for path in out.iterdir()) == [".run.lock", "notes.txt"]  # not created by the run: kept
    with open(out / ".run.lock") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # given up


def test_a_forked_child_of_a_run_does_not_keep_its_lock(tmp_path):
    """DataLoader workers are forked after the claim: one orphaned by a `kill -9` of its run must not hold the lock
    that the rerun takes."""
    import fcntl
    import multiprocessing

    from accelerate import Accelerator

    from mae_tnt.train.run_lock import claim_run_directory, released_at_end

    def worker(started) -> None:
        started.set()
        time.sleep(60)

    out, fork = tmp_path / "run", multiprocessing.get_context("fork")
    started = fork.Event()
    with released_at_end(out):
        claim_run_directory(out, Accelerator(cpu=True))
        child = fork.Process(target=worker, args=(started,))
        child.start()
    assert started.wait(30)  # the child runs: the fork's after-child hooks are done
    try:
        with open(out / ".run.lock") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the child is alive, and the lock free
    finally:
        child.terminate()
        child.join()


def test_a_run_built_but_never_trained_closes_its_lock_at_exit(tmp_path):
    """A notebook or test that builds a run and exits holds the lock to the end; exit closes it quietly."""
    script = ("from pathlib import Path; from accelerate import Accelerator; "
              "from mae_tnt.train.run_lock import claim_run_directory; "
              f"claim_run_directory(Path({str(tmp_path / 'run')!r}), Accelerator(cpu=True))")
    done = subprocess.run([sys.executable, "-W", "error::ResourceWarning", "-c", script], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "ResourceWarning" not in done.stderr, done.stderr
    assert (tmp_path / "run" / ".run.lock").exists()


def test_visualize_writes_a_checkpoints_reconstructions(shards, tmp_path, capsys):
    Trainer(config(shards, tmp_path, "run.max_steps=4")).train()
    out = tmp_path / "grid.png"
    assert visualize_main([str(tmp_path / "checkpoints" / "step_00000004"), str(shards), "--split", "val",
                           "--count", "4", "--out", str(out)]) == 0
    assert out.stat().st_size > 0 and f"wrote {out}" in capsys.readouterr().out
    assert visualize_main([str(tmp_path), str(shards), "--count", "4"]) == 0  # a run directory: its newest checkpoint
    assert (tmp_path / "recon" / "step_00000004_val.png").stat().st_size > 0
    (tmp_path / "recon" / "step_00000004_val.png").unlink()
    weights = tmp_path / "checkpoints" / "step_00000004" / "model.safetensors"  # stands for its checkpoint
    assert visualize_main([str(weights), str(shards), "--count", "4"]) == 0
    assert (tmp_path / "recon" / "step_00000004_val.png").stat().st_size > 0
    pipe = f"pipe:cat {shards}/val-000000.tar"  # counted by --info, as data.info counts it in training
    assert visualize_main([str(tmp_path), pipe, "--count", "2"]) == 1
    assert "set data.allow_pipe=true (tools/visualize.py: --allow-pipe) if you trust it" in capsys.readouterr().err
    assert visualize_main([str(tmp_path), pipe, "--count", "2", "--allow-pipe", "--info", str(shards)]) == 0
    assert visualize_main([str(tmp_path), str(shards), "--count", "20", "--mask-ratio", "0"]) == 0
    printed = capsys.readouterr().out
    assert "note: the val split has only 16 readable images to show of the 20 asked" in printed
    assert "(masked-patch loss n/a, nothing is hidden at mask ratio 0.0)" in printed
    assert visualize_main([str(tmp_path), str(shards), "--count", "2", "--out", str(tmp_path)]) == 0  # a directory
    assert f"wrote {tmp_path / 'step_00000004_val.png'} " in capsys.readouterr().out
    assert visualize_main([str(tmp_path), str(shards), "--count", "2", "--out", f"{tmp_path / 'new'}/"]) == 0
    assert f"wrote {tmp_path / 'new' / 'step_00000004_val.png'} " in capsys.readouterr().out  # created for it
    assert visualize_main([str(tmp_path), str(tmp_path / "no_shards"), "--out", str(tmp_path / "later" / "g.png")]) == 1
    assert not (tmp_path / "later").exists()  # a failure leaves no folder behind
    (tmp_path / "a_file").write_text("")
    for bad, message in ((["--count", "0"], "--count must be >= 1, got 0"),
                         (["--mask-ratio", "1"], "--mask-ratio must be in [0, 1), got 1.0"),
                         (["--out", "grid.txt"], "--out must be a .png or .jpg file or a directory, got grid.txt"),
                         (["--out", str(tmp_path / "a_file" / "g.png")], f"{tmp_path / 'a_file'} is a file")):
        with pytest.raises(SystemExit):  # argparse's usage error (status 2), before any work
            visualize_main([str(tmp_path), str(shards), *bad])
        assert message in capsys.readouterr().err
    state = tmp_path / "checkpoints" / "step_00000004" / "state.json"
    weights = shutil.copy(state.parent / "model.safetensors", tmp_path / "bare.safetensors")
    assert visualize_main([str(weights), str(shards)]) == 1
    assert capsys.readouterr().err == (f"error: {weights} comes without a run's state.json: name the MAE model of "
                                       "these weights with --model (and --img-size, --no-norm-pix where they differ "
                                       "from its defaults)\n")
    from mae_tnt.export import export

    export(tmp_path / "checkpoints" / "step_00000004", tmp_path / "exported", model_name="vit_test_patch8_32")
    pretraining = "pass the pretraining run's directory (or one of its checkpoints/step_* directories)"
    for given in ([], ["--model", "mae_vit_test"]):  # --model does not make an export an MAE
        assert visualize_main([str(tmp_path / "exported"), str(shards), *given]) == 1
        assert capsys.readouterr().err == (f"error: {tmp_path / 'exported'} is an export, which keeps no decoder to "
                                           f"reconstruct with; {pretraining}\n")
    # A fine-tuning checkpoint, which records the pretraining it started from.
    state.write_text(json.dumps({**json.loads(state.read_text()), "model": "vit_test_patch8_32",
                                 "config": {"init": "runs/pretrain"}}))
    for given in ([], ["--model", "mae_vit_test"]):
        for checkpoint in (tmp_path, state.parent / "model.safetensors"):  # a run; weights beside their state.json
            assert visualize_main([str(checkpoint), str(shards), *given]) == 1
            assert capsys.readouterr().err.endswith(f"holds the classifier vit_test_patch8_32, which has no decoder to "
                                                    f"reconstruct with; {pretraining}: it started from runs/pretrain\n")


def test_visualize_shows_weights_without_a_run_given_their_model(shards, tmp_path, capsys):
    Trainer(config(shards, tmp_path / "run", "run.max_steps=1")).train()
    weights = tmp_path / "mae_weights.safetensors"  # as tools/convert_checkpoint.py writes an official MAE's
    shutil.copy(tmp_path / "run" / "checkpoints" / "step_00000001" / "model.safetensors", weights)
    assert visualize_main([str(weights), str(shards), "--model", "mae_vit_test", "--img-size", "32", "--count", "2",
                           "--no-norm-pix"]) == 0
    grid = tmp_path / "mae_weights_val.png"
    assert grid.stat().st_size > 0 and f"wrote {grid} (masked-patch loss" in capsys.readouterr().out
    assert visualize_main([str(weights), str(shards), "--model", "mae_vit_test", "--count", "2"]) == 0  # its 32 px
    capsys.readouterr()
    larger = tmp_path / "tnt_64px.safetensors"  # a learned position table of another size: never resampled unasked
    save_file(mae_tnt.create_model("mae_tnt_test", img_size=64).state_dict(), larger)
    tnt = [str(larger), str(shards), "--model", "mae_tnt_test", "--count", "2"]
    assert visualize_main(tnt) == 1
    assert capsys.readouterr().err == ("error: the position table of the weights is for another image size than "
                                       "mae_tnt_test at 32 px (patch_pos [1, 65, 32] -> [1, 17, 32]): pass "
                                       "--img-size the size it was trained at\n")
    assert visualize_main([*tnt, "--img-size", "64"]) == 0
    assert visualize_main([str(weights), str(shards), "--model", "vit_test_patch8_32"]) == 1
    assert ("--model='vit_test_patch8_32' is not a registered masked autoencoder (it is a classifier; the masked "
            "autoencoder of its encoder is mae_vit_test)") in capsys.readouterr().err
    assert visualize_main([str(tmp_path / "run"), str(shards), "--model", "mae_vit_test"]) == 1
    assert "whose state.json names its model (mae_vit_test) and data settings; drop --model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        visualize_main([str(tmp_path / "run"), str(shards), "--img-size", "32"])
    assert "--img-size and --[no-]norm-pix describe weights named with --model" in capsys.readouterr().err


@pytest.mark.parametrize("name, settings, at_0_9", [
    ("mae_tnt_test", {"decoder_dim": 16, "decoder_depth": 1, "decoder_heads": 2, "word_mask_ratio": 0.5}, ""),
    ("mae_sret_test", {"dense_stem": True, "mask_ratio": 0.5}, ": 3 of 4 units hidden (0.75)"),  # 32-px units
])
def test_a_run_checkpoint_rebuilds_its_mae_with_every_model_setting_for_visualize_and_create_model(
        shards, tmp_path, capsys, name, settings, at_0_9):
    model_config = ModelConfig(name=name, img_size=64, **settings)
    written = mae_tnt.create_model(name, **model_config.build_kwargs())
    folder = tmp_path / "checkpoints" / "step_00000001"
    folder.mkdir(parents=True)
    save_file(written.state_dict(), folder / "model.safetensors")
    data = {"mean": list(IMAGENET_DEFAULT_MEAN), "std": list(IMAGENET_DEFAULT_STD)}
    (folder / "state.json").write_text(json.dumps({"step": 1, "model": name, "config": {
        "model": dataclasses.asdict(model_config), "data": data}}))
    rebuilt = mae_tnt.create_model(name, checkpoint_path=tmp_path)
    assert type(rebuilt) is type(written)  # word masking has a model of its own
    shapes = [{key: value.shape for key, value in model.state_dict().items()} for model in (rebuilt, written)]
    assert shapes[0] == shapes[1]
    assert rebuilt.mask_ratio == settings.get("mask_ratio", 0.75)
    assert getattr(rebuilt.encoder, "dense_stem", False) == settings.get("dense_stem", False)
    assert visualize_main([str(tmp_path), str(shards), "--count", "2"]) == 0, capsys.readouterr().err
    words = " (hidden sentences + hidden words)" if "word_mask_ratio" in settings else ""
    assert f"{words} at mask ratio {rebuilt.mask_ratio})" in capsys.readouterr().out
    assert visualize_main([str(tmp_path), str(shards), "--count", "2", "--mask-ratio", "0.9"]) == 0
    assert f"at mask ratio 0.9{at_0_9})" in capsys.readouterr().out  # the units a grid hides, where they round


def test_a_mask_ratio_that_whole_units_round_is_noted_with_the_units_hidden(shards, tmp_path, capsys):
    Trainer(config(shards, tmp_path / "sret", "model.name=mae_sret_test", "model.img_size=64", "model.mask_ratio=0.9"))
    assert ("note: model.mask_ratio=0.9 hides whole 32-px units: 3 of 4 units hidden (0.75) at 64 px; a larger "
            "model.img_size gives finer steps") in capsys.readouterr().out
    Trainer(config(shards, tmp_path / "vit", "model.mask_ratio=0.9"))  # 16 units of 8 px: one stays visible
    assert "note: model.mask_ratio=0.9 hides whole 8-px units: 15 of 16 units hidden (0.938) at 32 px" in \
        capsys.readouterr().out
    Trainer(config(shards, tmp_path / "fine", "model.mask_ratio=0.75"))
    assert "hides whole" not in capsys.readouterr().out


@pytest.mark.parametrize("name", ["mae_vit_test", "mae_tnt_test", "mae_sret_test", "tnt_test_patch8_32", "sret_test"])
def test_run_fused_attn_false_keeps_every_attention_of_every_backbone_off_sdpa(monkeypatch, name):
    from timm.layers import set_fused_attn, use_fused_attn

    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *args, **kwargs: calls.append(1) or sdpa(*args, **kwargs))
    images = torch.randn(2, 3, 64, 64)
    outputs = {}
    was_fused = use_fused_attn()
    try:
        for fused in (True, False):
            set_fused_attn(fused)  # what the trainers do with run.fused_attn before building the model
            torch.manual_seed(0)
            model = mae_tnt.create_model(name, img_size=64).eval()
            calls.clear()
            torch.manual_seed(1)  # the same mask
            outputs[fused] = model(images)[0] if name.startswith("mae_") else model(images)
            assert bool(calls) == fused, f"{len(calls)} SDPA calls with fused_attn={fused}"
    finally:
        set_fused_attn(was_fused)
    torch.testing.assert_close(outputs[False], outputs[True], rtol=1e-5, atol=1e-5)


def test_a_truncated_val_shard_is_warned_about_by_pretraining_and_by_visualize(shards, tmp_path, capsys):
    broken = tmp_path / "shards"
    shutil.copytree(shards, broken)
    victim = broken / "val-000000.tar"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    with pytest.warns(UserWarning, match=f"{victim}: .* Until then, its samples after the break are skipped"):
        trainer = Trainer(config(broken, tmp_path / "run", "run.max_steps=2"))  # before any step
    trainer.train()
    assert visualize_main([str(tmp_path / "run"), str(broken), "--count", "4"]) == 0
    assert f"warning: {victim}: " in capsys.readouterr().err


def test_every_log_row_has_the_gradient_norm_that_clipping_measures_and_measuring_it_changes_nothing(shards,
                                                                                                      tmp_path):
    from safetensors.torch import load_file

    runs = {"every": ["run.log_every=1"], "every 3": ["run.log_every=3"],
            "clipped": ["run.log_every=1", "optim.grad_clip=1e9"]}  # a clip that never bites
    for name, overrides in runs.items():
        Trainer(config(shards, tmp_path / name, "run.max_steps=4", "run.checkpoint_every=100", *overrides)).train()
    norms = {name: {row["step"]: row["grad_norm"] for row in metrics(tmp_path / name) if "loss" in row}
             for name in runs}
    assert list(norms["every"]) == [1, 2, 3, 4] and all(norm > 0 for norm in norms["every"].values())
    assert norms["every"] == pytest.approx(norms["clipped"], rel=1e-6)
    assert norms["every 3"] == {step: norms["every"][step] for step in (3, 4)}
    weights = [load_file(tmp_path / name / "checkpoints/step_00000004/model.safetensors") for name in runs]
    assert all(torch.equal(weights[0][key], other[key]) for other in weights[1:] for key in weights[0])


def test_grad_clip_scales_the_gradients_the_optimizer_applies_down_to_the_limit(shards, tmp_path, monkeypatch):
    applied = []  # the global gradient norm at every AdamW step
    adamw_step = torch.optim.AdamW.step

    def recording_step(optimizer, *args, **kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        applied.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
        return adamw_step(optimizer, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    Trainer(config(shards, tmp_path, "run.max_steps=3", "run.checkpoint_every=100", "optim.grad_clip=0.01")).train()
    logged = [row["grad_norm"] for row in metrics(tmp_path) if "loss" in row]
    assert len(applied) == 3 and min(logged) > 0.1  # the limit bites: the norms before clipping are far above it
    assert applied == pytest.approx([0.01] * 3, rel=1e-4)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_with_identical_losses_and_lrs(shards, tmp_path, workers):
    """Killed mid-epoch after its step-12 checkpoint (epoch = 16 steps, log rows every 5), the resumed run logs the
    uninterrupted one's rows exactly, the row of steps 11-15 included. So does a run stopped by run.max_steps=14 and
    continued from its last checkpoint, which adds a row at its stop."""
    extra = (f"data.num_workers={workers}", "run.log_every=5")
    Trainer(config(shards, tmp_path / "full", *extra, "run.max_steps=20")).train()
    for run in ("cut", "continued"):
        Trainer(config(shards, tmp_path / run, *extra, "run.max_steps=14")).train()
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step_00000014")  # as if killed before saving it
    for run in ("cut", "continued"):
        Trainer(config(shards, tmp_path / run, *extra, "run.max_steps=20")).train()
    full, cut, continued = (metrics(tmp_path / run) for run in ("full", "cut", "continued"))
    assert [r["step"] for r in cut] == [5, 10, 15, 20] and [r["step"] for r in continued] == [5, 10, 14, 15, 20]
    assert [(r["loss"], r["lr"]) for r in cut] == [(r["loss"], r["lr"]) for r in full]
    assert [(r["loss"], r["lr"]) for r in continued if r["step"] != 14] == [(r["loss"], r["lr"]) for r in full]


def test_each_step_applies_the_lr_its_metrics_row_logs_and_the_schedule_gives(shards, tmp_path):
    """The LR the optimizer steps with, not only the one logged: step s (0-based) runs at lr_at(s)."""
    trainer = Trainer(config(shards, tmp_path, "run.max_steps=6", "optim.accum_steps=2", "optim.min_lr=1e-5"))
    inner, applied = trainer.optimizer.optimizer, []  # accelerate's wrapper calls the torch optimizer on boundaries
    step = inner.step
    inner.step = lambda *args, **kwargs: (applied.append(inner.param_groups[0]["lr"]), step(*args, **kwargs))[1]
    trainer.train()
    plan = trainer.plan
    expected = [lr_at(s, peak_lr=plan.peak_lr, total_steps=plan.total_steps, warmup_steps=plan.warmup_steps,
                      min_lr=1e-5) for s in range(6)]
    assert plan.warmup_steps > 1 and len(set(expected)) == 6  # every step's LR differs from its neighbours'
    assert applied == pytest.approx(expected) and [row["lr"] for row in metrics(tmp_path)] == pytest.approx(expected)


def test_unknown_key_fails_before_any_work(tmp_path):
    out = tmp_path / "never"
    result = subprocess.run([sys.executable, str(ROOT / "pretrain.py"), str(ROOT / "recipes/demo_mae_vit.yaml"),
                             f"run.output_dir={out}", "optim.lr=1"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2
    assert "unknown config key `optim.lr`" in result.stderr and "did you mean" in result.stderr
    assert not out.exists()


def test_a_cpu_run_with_deepspeed_installed_prints_no_gpu_detection_warning(shards, tmp_path):
    pytest.importorskip("deepspeed")  # accelerate imports it when saving, and it used to warn it found no GPU
    result = subprocess.run([sys.executable, str(ROOT / "pretrain.py"), str(ROOT / "recipes/demo_mae_vit.yaml"),
                             f"data.train={shards}", "data.val=null", "model.img_size=32", "data.batch_size=8",
                             "data.num_workers=0", "run.max_steps=1", f"run.output_dir={tmp_path}"],
                            capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "checkpoints" / "step_00000001").is_dir()
    assert "setting accelerator" not in (result.stdout + result.stderr).lower()


def test_a_truncated_shard_is_one_warning_line_and_its_lost_samples_are_counted(shards, tmp_path):
    broken = tmp_path / "shards"
    shutil.copytree(shards, broken)
    victim = broken / "train-000002.tar"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    readable = sum(1 for _ in read_samples(str(victim)))
    result = subprocess.run([sys.executable, str(ROOT / "pretrain.py"), str(ROOT / "recipes/demo_mae_vit.yaml"),
                             f"data.train={broken}", "data.val=null", "model.img_size=32", "data.batch_size=8",
                             "data.num_workers=0", "run.max_steps=16", "run.log_every=4",
                             f"run.output_dir={tmp_path / 'run'}"],
                            capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    warnings = [line for line in result.stderr.splitlines() if "warning" in line.lower()]
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: {victim}: "), warnings
    assert "training counts them in skipped_samples" in warnings[0] and "Traceback" not in result.stderr
    # A running total over 16 steps, one epoch; the samples that fill in for the lost ones come from the next
    # epoch's order, which may cross the break again.
    assert metrics(tmp_path / "run")[-1]["skipped_samples"] >= 32 - readable > 0


def test_a_truncated_shard_in_a_pattern_is_warned_about_once_though_evaluations_resolve_it_again(shards, tmp_path):
    broken = tmp_path / "shards"
    shutil.copytree(shards, broken, ignore=shutil.ignore_patterns("_info.json"))
    victim = broken / "train-000002.tar"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    pattern = f"{broken}/train-{{000000..000003}}.tar"  # no _info.json: each resolution counts the tars again
    result = subprocess.run([sys.executable, str(ROOT / "pretrain.py"), str(ROOT / "recipes/demo_mae_vit.yaml"),
                             f"data.train={pattern}", f"data.val={pattern}", "eval.knn_every=0.25", "eval.knn_k=2",
                             "model.img_size=32", "data.batch_size=8", "data.num_workers=0", "run.max_steps=12",
                             "run.checkpoint_every=4", f"run.output_dir={tmp_path / 'run'}"],
                            capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert len([row for row in metrics(tmp_path / "run") if "knn_top1" in row]) >= 3  # resolved again each time
    warnings = [line for line in result.stderr.splitlines() if "warning" in line.lower()]
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: {victim}: "), warnings
    assert "samples before the break are used" in warnings[0]


def test_a_failing_pipe_shard_read_by_two_workers_is_one_warning_line(shards, tmp_path):
    (tmp_path / "some").mkdir()
    for name in ("train-000000.tar", "train-000001.tar", "train-000003.tar"):  # train-000002.tar is missing
        shutil.copy(shards / name, tmp_path / "some" / name)
    url = f"pipe:cat {tmp_path / 'some'}/train-{{000000..000003}}.tar"
    result = subprocess.run([sys.executable, str(ROOT / "pretrain.py"), str(ROOT / "recipes/demo_mae_vit.yaml"),
                             f"data.train={url}", "data.allow_pipe=true", f"data.info={shards}", "data.val=null",
                             "model.img_size=32", "data.batch_size=8", "data.num_workers=2", "run.max_steps=36",
                             f"run.output_dir={tmp_path / 'run'}"],
                            capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: pipe:cat {tmp_path / 'some'}/train-000002.tar broke (its command exited with "
                        "status 1); its samples after the break are skipped and counted (skipped_samples in the "
                        "metrics)"]
    assert metrics(tmp_path / "run")[-1]["skipped_samples"] >= 32  # over 2 epochs, with workers started for each


def test_pretraining_streams_allowed_pipe_urls(shards, tmp_path):
    url = f"pipe:cat {shards}/train-{{000000..000003}}.tar"
    trainer = Trainer(config(shards, tmp_path, f"data.train={url}", "data.allow_pipe=true", f"data.info={shards}",
                             "data.val=null", "run.max_steps=2"))
    assert trainer.train()["steps"] == 2 and (tmp_path / "recon" / "step_00000002.png").exists()


@pytest.mark.parametrize("zero3", [False, True])
def test_under_zero3_every_rank_runs_the_reconstruction_forward_and_only_the_main_one_writes(shards, tmp_path,
                                                                                             monkeypatch, zero3):
    """ZeRO-3 gathers the split weights inside each forward: a forward the main process ran alone would wait for the
    other ranks forever. Here the trainer plays rank 1 of such a run."""
    import mae_tnt.train.engine as engine

    trainer = Trainer(config(shards, tmp_path, "run.max_steps=1"))
    monkeypatch.setattr(engine, "splits_weights", lambda accelerator: zero3)
    forwards = []
    trainer.model.register_forward_hook(lambda *_: forwards.append(trainer.step))
    for trainer.is_main in (False, True):
        trainer.reconstructed_step = -1  # each rank has a trainer of its own
        trainer.reconstructions()
    assert forwards == [0, 0] if zero3 else [0]
    assert [p.name for p in (tmp_path / "recon").iterdir()] == ["step_00000000.png"]


def test_unreadable_val_shards_fail_before_any_work_with_one_error_line(shards, tmp_path):
    out = tmp_path / "never"
    result = subprocess.run([sys.executable, str(ROOT / "pretrain.py"), str(ROOT / "recipes/demo_mae_vit.yaml"),
                             f"data.train={shards}", f"data.val={tmp_path / 'missing'}", f"run.output_dir={out}"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 1
    assert result.stderr.startswith("error: data.val: ") and "missing does not exist" in result.stderr
    assert "Traceback" not in result.stderr and not out.exists()


def test_the_knn_monitor_on_unlabeled_shards_fails_before_any_work(shards, tmp_path):
    unlabeled = tmp_path / "unlabeled"
    shutil.copytree(shards, unlabeled)
    drop_classes(unlabeled)
    refused = r"^the kNN monitor \(eval.knn_every\) needs labeled shards, .* no classes; make labeled shards .*"
    with pytest.raises(ShardError, match=refused + r"; or set eval.knn_every=0 to pretrain without the monitor$"):
        Trainer(config(shards, tmp_path / "run", f"data.val={unlabeled}", "eval.knn_every=1"))
    assert not (tmp_path / "run").exists()
    AcceleratorState._reset_state(True)
    assert Trainer(config(shards, tmp_path / "run", f"data.val={unlabeled}", "eval.knn_every=0")).step == 0


def test_the_knn_monitor_without_val_shards_is_warned_about(shards, tmp_path, capsys):
    Trainer(config(shards, tmp_path, "data.val=null", "eval.knn_every=1"))
    assert "eval.knn_every is set but data.val is null" in capsys.readouterr().out


def test_val_shards_of_another_directory_than_the_train_shards_get_a_note(shards, tmp_path):
    """A demo recipe run on one's own data.train would otherwise show the bundled data in every grid, unremarked."""
    from mae_tnt.train.engine import check_eval_data

    other = tmp_path / "other"
    write_shards(other, [16], split="val", size=20)
    for val, knn, noted in ((other, 1, " and the kNN monitor"), (other, 0, ""), (shards, 1, None)):
        logged = []
        check_eval_data(config(shards, tmp_path / "run", f"data.val={val}", f"eval.knn_every={knn}"), logged.append)
        expected = [] if noted is None else [
            f"note: data.val={other} is another shard directory than data.train's ({shards}): the reconstruction "
            f"grids{noted} use its images; if it is a recipe's default, set data.val to held-out shards of your "
            "data (and data.mean and data.std to their statistics), or data.val=null to draw the grids from "
            "data.train"]
        assert logged == expected


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(shards, tmp_path, monkeypatch):
    trainer = Trainer(config(shards, tmp_path, "run.checkpoint_every=4", "run.log_every=100"))
    forward = trainer.model.forward
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += trainer.model.training  # reconstruction grids run in eval mode and do not count
        loss, pred, mask = forward(*args, **kwargs)
        return (loss * float("nan") if calls["n"] == 6 else loss), pred, mask

    monkeypatch.setattr(trainer.model, "forward", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"micro-step 5 \(optimizer step 6\); stopping without saving. Try "
                                                 r"a lower optim.base_lr, optim.grad_clip=1.0. The last good "
                                                 r"checkpoint, .*step_00000004, is intact: the same command resumes"):
        trainer.train()  # in fp32: no advice to train in fp32
    assert [p.name for p in find_checkpoints(tmp_path)] == ["step_00000004"]

    calls["n"] = 0
    trainer = Trainer(config(shards, tmp_path / "early", "run.checkpoint_every=100", "run.log_every=100"))
    forward = trainer.model.forward
    monkeypatch.setattr(trainer.model, "forward", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"No checkpoint was written yet: the same command starts afresh"):
        trainer.train()


class ThreadRanks:
    """An accelerator for `raise_if_nonfinite` run by one thread per rank: `reduce` all-reduces across the threads."""

    mixed_precision = "no"
    distributed_type = SimpleNamespace(name="MULTI_CPU")

    def __init__(self, world_size: int):
        self.barrier = threading.Barrier(world_size)
        self.tensors: list[torch.Tensor] = []

    def reduce(self, tensor: torch.Tensor, reduction: str) -> torch.Tensor:
        assert reduction == "max"
        self.tensors.append(tensor)
        self.barrier.wait()  # every rank's tensor is in
        reduced = torch.stack(self.tensors).amax(0)
        self.barrier.wait()  # every rank has read them
        return reduced


def test_the_non_finite_loss_error_names_the_earliest_bad_micro_step_of_any_rank(tmp_path):
    first_bad = [9, -1, 3]  # per rank; -1: all its losses were finite
    ranks, errors = ThreadRanks(len(first_bad)), {}

    def rank(index: int) -> None:
        window = Window(torch.device("cpu"))
        window.first_bad.fill_(first_bad[index])
        try:
            raise_if_nonfinite(ranks, window, tmp_path, accum_steps=2)
        except NonFiniteLossError as err:
            errors[index] = str(err)

    threads = [threading.Thread(target=rank, args=(index,)) for index in range(len(first_bad))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(errors) == [0, 1, 2]  # every rank stops, the one whose losses were finite too
    assert {message.split(";")[0] for message in errors.values()} == {
        "non-finite loss at micro-step 3 (optimizer step 2)"}


def add_losses(window: Window, losses: list[float], device: torch.device | str = "cpu") -> None:
    """Add `losses` as micro-steps 0, 1, ... of `window`, their tensors made first (a GPU test times only the adds)."""
    tensors = [torch.tensor(loss, device=device) for loss in losses]
    for micro, loss in enumerate(tensors):
        window.add(loss, images=4, micro=micro)


def test_the_window_sums_the_finite_losses_and_keeps_the_first_bad_micro_step():
    window = Window(torch.device("cpu"))
    add_losses(window, [1.0, 2.0, math.nan, 4.0, math.inf])
    assert (window.loss_sum.item(), window.count.item(), window.images) == (7.0, 5, 20)
    assert window.first_bad.item() == 2  # 0-based: the nan, not the later inf


def test_each_rank_reopens_its_own_log_window_so_a_resumed_row_sums_as_the_uninterrupted_one():
    """Float32 sums depend on their order: rank 0 holding every rank's total put the 2-process row 2e-7 apart."""
    windows = [Window(torch.device("cpu")) for _ in range(2)]
    add_losses(windows[0], [0.1, 16777216.0])
    add_losses(windows[1], [0.3])

    class TwoRanks:  # what accelerate's gather returns: every rank's tensor, concatenated along dim 0
        @staticmethod
        def gather(_):
            return torch.cat([torch.stack([window.loss_sum, window.count])[None] for window in windows])

    saved = json.loads(json.dumps(windows[0].loss_totals(TwoRanks())))  # through state.json
    for rank, window in enumerate(windows):
        reopened = Window(torch.device("cpu"))
        reopened.restore_loss_totals(saved, rank, world_size=2)
        assert torch.equal(reopened.loss_sum, window.loss_sum) and torch.equal(reopened.count, window.count)
    for totals in (saved, {"loss_sum": 3.5, "count": 3}):  # another process count, or an earlier version's total
        reopened = [Window(torch.device("cpu")) for _ in range(3)]
        for rank, window in enumerate(reopened):
            window.restore_loss_totals(totals, rank, world_size=3)
        assert [window.count.item() for window in reopened] == [3, 0, 0]
        assert [window.loss_sum.item() for window in reopened[1:]] == [0, 0]
        assert reopened[0].loss_sum.item() == pytest.approx(sum(totals.get("loss_sums", [3.5])))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_micro_steps_normalisation_and_loss_bookkeeping_never_wait_for_the_gpu():
    """The CPU queues the next batch while the GPU still runs this one: a host sync (a tensor built from Python
    numbers on the GPU is one) would stall it at every micro-step."""
    device = torch.device("cuda")
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8, device=device)
    expected = normalize(images, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)  # makes the device constants, once
    window = Window(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        normalized = normalize(images, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
        add_losses(window, [1.0, math.nan], device)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(normalized, expected)
    assert (window.loss_sum.item(), window.first_bad.item()) == (1.0, 1)


def test_running_out_of_gpu_memory_is_one_line_naming_the_settings_that_need_less(shards, tmp_path, monkeypatch,
                                                                                  capsys):
    trainer = Trainer(config(shards, tmp_path, "run.checkpoint_every=4", "run.log_every=100"))
    forward = trainer.model.forward

    def out_of_memory_at_step_6(*args, **kwargs):
        if trainer.step == 5:
            raise OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. Including non-PyTorch memory, ...")
        return forward(*args, **kwargs)

    monkeypatch.setattr(trainer.model, "forward", out_of_memory_at_step_6)
    assert report_user_errors(trainer.train) is None
    assert capsys.readouterr().err.splitlines()[-1] == (
        "error: CUDA out of memory. Tried to allocate 2.00 GiB. Lower data.batch_size and raise optim.accum_steps by "
        "the same factor (the effective batch, and so the LR, stay the same), or set run.grad_checkpointing=true; "
        "then run the same command again")
    assert [p.name for p in find_checkpoints(tmp_path)] == ["step_00000004"]


def fails_mid_write(error: Exception):
    """A torch.save or save_weights that writes part of its file, then fails with `error`, as on a full disk."""
    def write(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"PK\x03\x04 the start of a file")
        raise error

    return write


@pytest.mark.parametrize("writer, error", [
    ("torch.save", RuntimeError("[enforce fail at inline_container.cc:671] . unexpected pos 576 vs 534")),
    ("save_weights", SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")),
    ("save_weights", OSError(errno.ENOSPC, "No space left on device")),
])
def test_a_checkpoint_that_cannot_be_written_is_one_error_line_and_the_previous_one_resumes(
        shards, tmp_path, monkeypatch, capsys, writer, error):
    """torch.save's own message on a full disk names no cause: the line adds the free space and what to do. The
    partial checkpoint is removed, since the space it holds is what the next attempt needs."""
    Trainer(config(shards, tmp_path, "run.max_steps=4")).train()
    import mae_tnt.train.checkpoint as ckpt

    with monkeypatch.context() as patch:
        patch.setattr(*((ckpt.torch, "save") if writer == "torch.save" else (ckpt, "save_weights")),
                      fails_mid_write(error))
        assert report_user_errors(lambda: Trainer(config(shards, tmp_path, "run.max_steps=8")).train()) is None
    line = capsys.readouterr().err.splitlines()[-1]  # after the progress bar
    assert line.startswith(f"error: could not write {tmp_path / 'checkpoints/step_00000008'} ({error}), with ")
    assert line.endswith(" free on its disk. The checkpoints written before it are intact: free some space (or "
                         "lower run.keep_checkpoints) and run the same command again to resume")
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000004"]  # no .tmp-step_00000008
    AcceleratorState._reset_state(True)
    assert Trainer(config(shards, tmp_path, "run.max_steps=8")).step == 4


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


@pytest.mark.parametrize("corrupt, damage", [("model.safetensors", truncated), ("optimizer.pt", truncated),
                                             ("data_rank0.json", truncated), ("state.json", lambda data: b"{}")])
def test_corrupted_checkpoint_falls_back_to_the_previous_one(shards, tmp_path, capsys, corrupt, damage):
    Trainer(config(shards, tmp_path, "run.max_steps=8")).train()
    newest = find_checkpoints(tmp_path)[0]
    (newest / corrupt).write_bytes(damage((newest / corrupt).read_bytes()))
    AcceleratorState._reset_state(True)
    trainer = Trainer(config(shards, tmp_path, "run.max_steps=8"))
    assert trainer.step == 4
    assert "skipping unusable checkpoint" in capsys.readouterr().out
    # Out of the rotation, so the next saves cannot rotate away step 4 while the corrupt step 8 stays.
    assert [p.name for p in find_checkpoints(tmp_path)] == ["step_00000004"]
    assert [p.name for p in tmp_path.glob("superseded/*/step_*")] == ["step_00000008"]


def test_when_no_checkpoint_can_be_read_the_old_run_is_set_aside_and_the_new_one_keeps_its_checkpoints(
        shards, tmp_path, capsys):
    Trainer(config(shards, tmp_path, "run.max_steps=8", "run.keep_checkpoints=1")).train()  # only step 8 is kept
    old_metrics = (tmp_path / "metrics.jsonl").read_text()
    (tmp_path / "checkpoints/step_00000008/state.json").write_text("{}")
    AcceleratorState._reset_state(True)
    Trainer(config(shards, tmp_path, "run.max_steps=6", "run.keep_checkpoints=1")).train()
    assert "no checkpoint of it could be read, so this run starts afresh: moved the previous run" in (
        capsys.readouterr().out)
    # The rotation keeps the highest steps: left in place, the unreadable step 8 would have deleted step 6.
    assert [p.name for p in find_checkpoints(tmp_path)] == ["step_00000006"]
    (old,) = tmp_path.glob("superseded/*")
    assert [p.name for p in old.glob("checkpoints/step_*")] == ["step_00000008"]
    assert (old / "metrics.jsonl").read_text() == old_metrics
    assert [row["step"] for row in metrics(tmp_path) if "loss" in row] == list(range(1, 7))


def wait_for_the_next_second() -> None:
    """Before a second TensorBoard writer in this process. TensorBoard reads event files in name order: the second
    they were created, the host, the process, then a per-process count compared as text ("10" before "9"), so a
    second writer of one process in the same second could be read first (in a full suite it was). A resumed run, a
    process started seconds later, is read in order."""
    start = int(time.time())
    while int(time.time()) == start:
        time.sleep(0.01)


def test_resuming_from_an_earlier_checkpoint_sets_the_later_ones_aside(shards, tmp_path, capsys):
    Trainer(config(shards, tmp_path, "run.max_steps=12")).train()  # checkpoints at steps 4, 8 and 12
    AcceleratorState._reset_state(True)
    wait_for_the_next_second()
    earlier = tmp_path / "checkpoints" / "step_00000004"
    Trainer(config(shards, tmp_path, f"run.resume={earlier}", "run.checkpoint_every=2", "run.max_steps=6")).train()
    assert [p.name for p in find_checkpoints(tmp_path)] == ["step_00000006", "step_00000004"]
    assert sorted(p.name for p in tmp_path.glob("superseded/*/step_*")) == ["step_00000008", "step_00000012"]
    assert sorted(p.name for p in (tmp_path / "recon").iterdir()) == ["step_00000004.png", "step_00000006.png"]
    assert sorted(p.name for p in tmp_path.glob("superseded/*/recon/*")) == ["step_00000008.png", "step_00000012.png"]
    assert ("moved what later steps wrote (step_00000012, step_00000008), with their reconstruction grids and metrics "
            "rows, to") in capsys.readouterr().out
    (old_rows,) = tmp_path.glob("superseded/*/metrics.jsonl")
    assert [json.loads(line)["step"] for line in old_rows.read_text().splitlines()] == list(range(5, 13))
    if importlib.util.find_spec("tensorboard"):  # the later continuation's events are hidden, as in metrics.jsonl
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
        assert [event.step for event in events.Scalars("loss")] == [row["step"] for row in metrics(tmp_path)]
    AcceleratorState._reset_state(True)
    assert Trainer(config(shards, tmp_path, "run.max_steps=6")).step == 6  # auto: this continuation, not step 12
    AcceleratorState._reset_state(True)
    with pytest.raises(ResumeError, match=r"run.resume=.*step_00000012 does not exist; this run's are step_00000006, "
                                          r"step_00000004 in .*checkpoints: give one's path, run.resume=auto for "
                                          r"the newest, or run.resume=none to start afresh$"):
        Trainer(config(shards, tmp_path, f"run.resume={tmp_path / 'checkpoints' / 'step_00000012'}"))
    with pytest.raises(ResumeError, match=r"model.safetensors is a file; give the checkpoint directory that holds it "
                                          r"\(.*step_00000006\) or its run directory"):
        Trainer(config(shards, tmp_path, f"run.resume={tmp_path / 'checkpoints/step_00000006/model.safetensors'}"))
    AcceleratorState._reset_state(True)
    newest = Trainer(config(shards, tmp_path, f"run.resume={tmp_path / 'checkpoints'}", "run.max_steps=6"))
    assert newest.step == 6  # the run's checkpoints folder stands for its newest, as the run directory does
    AcceleratorState._reset_state(True)
    set_aside = sorted(tmp_path.glob("superseded/*"))[-1]  # a continuation set aside: not this run's checkpoints
    with pytest.raises(ResumeError, match=rf"superseded/.* is a folder of checkpoints; give one of them \(the newest "
                                          rf"is .*{set_aside.name}/step_00000012\)"):
        Trainer(config(shards, tmp_path, f"run.resume={set_aside}"))


def test_a_fresh_start_in_a_used_run_directory_sets_the_old_run_aside(shards, tmp_path, capsys):
    Trainer(config(shards, tmp_path, "run.max_steps=8")).train()  # checkpoints at steps 4 and 8
    old_metrics = (tmp_path / "metrics.jsonl").read_text()
    AcceleratorState._reset_state(True)
    Trainer(config(shards, tmp_path, "run.resume=none", "run.max_steps=3")).train()
    assert "run.resume=none: moved the previous run" in capsys.readouterr().out
    (old,) = tmp_path.glob("superseded/*")
    assert sorted(p.name for p in old.glob("checkpoints/step_*")) == ["step_00000004", "step_00000008"]
    assert (old / "metrics.jsonl").read_text() == old_metrics and (old / "config.yaml").exists()
    assert [p.name for p in find_checkpoints(tmp_path)] == ["step_00000003"]  # not rotated away by the old steps
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2, 3]
    AcceleratorState._reset_state(True)
    assert Trainer(config(shards, tmp_path, f"run.resume={tmp_path}")).step == 3  # a run directory: its newest


@pytest.mark.parametrize("change, why", [
    (None, "2 processes -> 1"), ("data.num_workers=1", "data.num_workers 0 -> 1"), ("seed=1", "seed 0 -> 1"),
    ("data.shuffle_chunk=8", "data.shuffle_chunk 16 -> 8"), ("data.split=copy", "data.split train -> copy"),
])
def test_resume_with_another_data_layout_restarts_the_epoch_in_progress(shards, tmp_path, capsys, change, why):
    Trainer(config(shards, tmp_path, "run.max_steps=20")).train()  # 16 steps per epoch: stopped in epoch 1
    if change is None:  # as if written by two processes
        state_file = find_checkpoints(tmp_path)[0] / "state.json"
        state_file.write_text(json.dumps({**json.loads(state_file.read_text()), "world_size": 2}))
    if change == "data.split=copy":  # another split of as many samples: the same step counts, other data
        write_shards(shards, [32, 32, 32, 32], split="copy", size=20)
    AcceleratorState._reset_state(True)
    trainer = Trainer(config(shards, tmp_path, "run.max_steps=24", *filter(None, [change])))
    assert trainer.step == 20 and (trainer.stream.state.epoch, trainer.stream.state.batches) == (1, 0)
    assert (trainer.stream.state.positions, trainer.stream.state.skipped) == ({}, 0)  # nothing of the old layout
    assert f"warning: {why}: the data position does not carry over to other data or another layout (continuing " \
           "would skip some samples of epoch 1), so epoch 1 restarts from its start and the samples it had seen are " \
           "seen again" in capsys.readouterr().out


def test_a_resume_with_another_mask_ratio_or_normalisation_says_the_loss_may_jump(shards, tmp_path, capsys):
    Trainer(config(shards, tmp_path, "run.max_steps=2")).train()
    AcceleratorState._reset_state(True)
    assert Trainer(config(shards, tmp_path, "run.max_steps=4", "model.mask_ratio=0.5", "data.mean=[0.5,0.5,0.5]",
                          "data.crop_scale=[0.2,1]")).step == 2
    assert ("note: model.mask_ratio 0.75 -> 0.5; data.mean [0.286, 0.286, 0.286] -> [0.5, 0.5, 0.5]; data.crop_scale "
            "[0.5, 1.0] -> [0.2, 1.0] since step_00000002: training goes on under the new setting from this step on, "
            "so the loss may jump") in capsys.readouterr().out


def test_a_resume_whose_layout_changes_the_step_counts_says_the_lr_follows_them(shards, tmp_path, capsys):
    Trainer(config(shards, tmp_path, "run.max_steps=20")).train()  # 128 samples, 1 worker: 16 batches of 8
    AcceleratorState._reset_state(True)
    Trainer(config(shards, tmp_path, "run.max_steps=24", "data.num_workers=3"))  # 42 samples each: 5 batches
    assert ("note: steps_per_epoch 16.0 -> 15.0; total_steps 32 -> 30; warmup_steps 8 -> 7 since step_00000020: the "
            "LR follows the schedule of the new settings from this step on, so it may jump") in capsys.readouterr().out


def test_resume_at_an_epoch_start_in_another_layout_loses_nothing_and_says_nothing(shards, tmp_path, capsys):
    Trainer(config(shards, tmp_path, "run.max_steps=16")).train()  # 16 steps per epoch
    AcceleratorState._reset_state(True)
    trainer = Trainer(config(shards, tmp_path, "run.max_steps=20", "data.num_workers=1"))
    assert trainer.step == 16 and trainer.stream.state.epoch == 1
    assert "restarts from its start" not in capsys.readouterr().out


def test_resume_after_a_finished_epoch_in_another_layout_starts_the_next_one_and_says_nothing(shards, tmp_path,
                                                                                               capsys):
    """The step count falls mid-epoch under the new layout (16 batches = 1 epoch of 15 and 1), but the checkpoint's
    position says epoch 0 was read to its end."""
    Trainer(config(shards, tmp_path, "run.max_steps=16")).train()
    position = json.loads((find_checkpoints(tmp_path)[0] / "data_rank0.json").read_text())
    assert (position["epoch"], position["batches"]) == (1, 0)
    AcceleratorState._reset_state(True)
    trainer = Trainer(config(shards, tmp_path, "run.max_steps=20", "data.num_workers=3"))  # 15 batches an epoch
    assert trainer.step == 16 and (trainer.stream.state.epoch, trainer.stream.state.batches) == (1, 0)
    assert "restarts from its start" not in capsys.readouterr().out


def test_the_skipped_sample_counts_carry_over_to_another_number_of_processes(tmp_path):
    for rank, skipped in enumerate([5, 7, 11]):  # a checkpoint of 3 processes
        (tmp_path / f"data_rank{rank}.json").write_text(json.dumps({"epoch": 0, "batches": 3, "skipped": skipped}))
    assert [_skipped_carried_over(tmp_path, rank, 2) for rank in range(2)] == [5 + 11, 7]
    assert _skipped_carried_over(tmp_path, 0, 1) == 23
    assert [_skipped_carried_over(tmp_path, rank, 4) for rank in range(4)] == [5, 7, 11, 0]


def test_each_step_gets_one_reconstruction_grid_even_where_the_recon_period_and_a_checkpoint_meet(shards, tmp_path,
                                                                                                  monkeypatch):
    import mae_tnt.train.engine as engine

    labels = []
    monkeypatch.setattr(engine, "write_reconstructions", lambda *args: labels.append(args[5]))
    Trainer(config(shards, tmp_path, "run.max_steps=4", "run.recon_every=2", "run.checkpoint_every=2",
                   "eval.knn_every=0")).train()
    assert labels == ["step 2", "step 4"]  # step 4: the last step, a recon step, and the final checkpoint


def test_a_run_stopped_while_drawing_a_checkpoints_grid_draws_it_when_resumed(shards, tmp_path, monkeypatch):
    import mae_tnt.train.recon as recon

    draw = recon.save_grid

    def stopped_at_step_4(rows, mean, std, path, title):
        if title.startswith("step 4,"):
            raise RuntimeError("killed")  # as a SIGKILL would stop it, with nothing saved on the way out
        draw(rows, mean, std, path, title)

    monkeypatch.setattr(recon, "save_grid", stopped_at_step_4)
    with pytest.raises(RuntimeError, match="killed"):
        Trainer(config(shards, tmp_path, "run.max_steps=4", "run.checkpoint_every=2")).train()
    assert [path.name for path in find_checkpoints(tmp_path)] == ["step_00000002"]  # the grid comes first
    monkeypatch.setattr(recon, "save_grid", draw)
    AcceleratorState._reset_state(True)
    assert Trainer(config(shards, tmp_path, "run.max_steps=4", "run.checkpoint_every=2")).train()["steps"] == 4
    assert sorted(path.name for path in (tmp_path / "recon").iterdir()) == ["step_00000002.png", "step_00000004.png"]


def test_a_resume_with_nothing_left_to_train_says_only_that_and_keeps_the_runs_config(shards, tmp_path, capsys):
    Trainer(config(shards, tmp_path, "run.max_steps=6")).train()
    trained_with = (tmp_path / "config.yaml").read_text()
    capsys.readouterr()
    AcceleratorState._reset_state(True)
    summary = Trainer(config(shards, tmp_path, "run.max_steps=4", "data.num_workers=1", "optim.base_lr=1")).train()
    out, err = capsys.readouterr()
    assert summary["steps"] == 6 and "nothing is left to train" in out
    assert "restarts from its start" not in out and "step [" not in err  # no epoch restart, no progress bar
    assert (tmp_path / "config.yaml").read_text() == trained_with  # no step was trained with base_lr=1


def test_resume_with_another_effective_batch_is_refused_with_the_settings_that_fix_it(shards, tmp_path):
    Trainer(config(shards, tmp_path, "run.max_steps=20")).train()
    state_file = find_checkpoints(tmp_path)[0] / "state.json"
    state = json.loads(state_file.read_text())
    # as written by 2 processes: each read 8 batches an epoch, so step 20 is 4 batches into epoch 2
    state_file.write_text(json.dumps({**state, "world_size": 2,
                                      "plan": {**state["plan"], "effective_batch": 16, "batches_per_epoch": 8}}))
    position = find_checkpoints(tmp_path)[0] / "data_rank0.json"
    position.write_text(json.dumps({**json.loads(position.read_text()), "epoch": 2, "batches": 4}))
    AcceleratorState._reset_state(True)
    with pytest.raises(ResumeError, match=r"effective batch of 16 \(2 processes\), this launch gives 8.*"
                                          r"set optim.accum_steps=2 to continue it"):
        Trainer(config(shards, tmp_path, "run.max_steps=24"))
    AcceleratorState._reset_state(True)
    trainer = Trainer(config(shards, tmp_path, "run.max_steps=24", "optim.accum_steps=2"))
    assert trainer.step == 20 and trainer.stream.state.epoch == 2  # 8 steps of 16 images per epoch of 128
    state_file.write_text(json.dumps(state))  # as written: 8 images a step on one process
    AcceleratorState._reset_state(True)
    with pytest.raises(ResumeError, match=r"effective batch of 8 \(1 process\), this launch gives 16.*"
                                          r"set data.batch_size=8 optim.accum_steps=1 to continue it"):
        Trainer(config(shards, tmp_path, "run.max_steps=24", "data.batch_size=16"))
    state_file.write_text(json.dumps({**state, "world_size": 2, "plan": {**state["plan"], "effective_batch": 20}}))
    AcceleratorState._reset_state(True)
    with pytest.raises(ResumeError, match=r"effective batch of 20 \(2 processes\), this launch gives 8.*"
                                          r"set data.batch_size=5 optim.accum_steps=4 to continue it"):
        Trainer(config(shards, tmp_path, "run.max_steps=24"))  # 20 images per process: 4 x 5 fit where 8 did


@pytest.mark.parametrize("gpu, use_cpu, expected", [(True, None, "bf16"), (True, "1", "fp32"), (False, None, "fp32")])
def test_auto_precision_follows_the_device_training_runs_on(monkeypatch, gpu, use_cpu, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    if use_cpu is None:
        monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    else:
        monkeypatch.setenv("ACCELERATE_USE_CPU", use_cpu)  # accelerate launch --cpu
    assert auto_precision() == expected


def deepspeed_file(monkeypatch, tmp_path, **modes) -> None:
    """Launch as `accelerate launch` does with a DeepSpeed config file whose sections set `enabled` to `modes`."""
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}} | {m: {"enabled": v} for m, v in modes.items()}))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)


@pytest.mark.parametrize("modes, requested, expected", [
    ({"bf16": "auto", "fp16": "auto"}, "bf16", "bf16"),  # the bundled files: the recipe decides
    ({"bf16": "auto", "fp16": "auto"}, "auto", "fp32"),
    ({}, "fp16", "fp16"),
    ({"bf16": True, "fp16": False}, "auto", "bf16"),  # the file's explicit choice stands for auto
    ({"bf16": True}, "bf16", "bf16"),
    ({"bf16": False, "fp16": "false"}, "fp32", "fp32"),
])
def test_a_deepspeed_file_that_agrees_with_run_precision_is_followed(monkeypatch, tmp_path, modes, requested,
                                                                     expected):
    from mae_tnt.train.launch import resolve_precision
    deepspeed_file(monkeypatch, tmp_path, **modes)
    assert resolve_precision(requested) == expected


@pytest.mark.parametrize("modes, requested, setting", [
    ({"bf16": True}, "fp32", "bf16.enabled=true"),  # accelerate trained in bf16
    ({"bf16": False}, "bf16", "bf16.enabled=false"),  # accelerate trained in fp32
    ({"fp16": "true"}, "bf16", "fp16.enabled=true"),  # accelerate's error named `--mixed_precision`
    ({"bf16": True, "fp16": True}, "auto", "bf16.enabled=true, fp16.enabled=true"),
])
def test_a_deepspeed_file_that_contradicts_run_precision_is_refused(monkeypatch, tmp_path, modes, requested,
                                                                    setting):
    from mae_tnt.train.launch import resolve_precision
    deepspeed_file(monkeypatch, tmp_path, **modes)
    with pytest.raises(ConfigError, match=rf"run.precision={requested}( \(\w+ here\))?, but the DeepSpeed config "
                                          rf".*ds.json sets {setting}: write \"enabled\": \"auto\""):
        resolve_precision(requested)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")  # the same file unused: the recipe decides alone
    assert resolve_precision(requested) in ("fp32", requested)


def test_a_deepspeed_file_that_is_not_json_is_named(monkeypatch, tmp_path):
    from mae_tnt.train.launch import resolve_precision
    deepspeed_file(monkeypatch, tmp_path)
    (tmp_path / "ds.json").write_text('{"bf16": {"enabled": true},}')
    with pytest.raises(ConfigError, match=r"the DeepSpeed config .*ds.json is not valid JSON: .*line 1"):
        resolve_precision("bf16")


@pytest.mark.parametrize("device, deepspeed, expected", [("cuda", False, torch.channels_last),
                                                         ("cuda", True, torch.contiguous_format),
                                                         ("cpu", False, torch.contiguous_format)])
def test_channels_last_weights_only_on_a_gpu_without_deepspeed(device, deepspeed, expected):
    """DeepSpeed views every parameter as bytes, which a channels-last 3-channel convolution weight refuses."""
    run = TrainingRun()
    run.cfg = SimpleNamespace(run=SimpleNamespace(channels_last=True))
    run.acc = SimpleNamespace(device=torch.device(device),
                              distributed_type=SimpleNamespace(name="DEEPSPEED" if deepspeed else "NO"))
    assert run.memory_format == expected


def test_the_start_line_names_the_precision_and_a_launcher_precision_the_recipe_overrides_is_warned_about(
        shards, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")  # accelerate launch --mixed_precision fp16
    AcceleratorState._reset_state(True)
    Trainer(config(shards, tmp_path, "run.precision=bf16"))
    out = capsys.readouterr().out
    assert ("warning: the launcher asks for mixed precision fp16, but the recipe's run.precision=bf16 decides: "
            "training in bf16 (set run.precision=fp16 to use it)") in out
    assert "x 1 process in bf16; lr = " in out
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # accelerate's default: nothing asked
    AcceleratorState._reset_state(True)
    Trainer(config(shards, tmp_path / "auto", "run.precision=auto"))
    out = capsys.readouterr().out
    auto = "bf16" if torch.cuda.is_available() else "fp32"
    assert f"x 1 process in {auto}; lr = " in out and "launcher" not in out


def test_resume_with_another_model_is_refused(shards, tmp_path):
    Trainer(config(shards, tmp_path, "run.max_steps=4")).train()
    AcceleratorState._reset_state(True)
    written = (tmp_path / "config.yaml").read_text()
    with pytest.raises(ResumeError, match="written by model 'mae_vit_test'"):
        Trainer(config(shards, tmp_path, "model.name=mae_vit_tiny_patch16"))
    assert (tmp_path / "config.yaml").read_text() == written  # still describes the checkpoints beside it
    AcceleratorState._reset_state(True)
    with pytest.raises(ResumeError, match=r"step_00000004 holds weights of another shape than this recipe's model "
                                          r"\(model.img_size 32 -> 64\); use another run.output_dir"):
        Trainer(config(shards, tmp_path, "model.img_size=64"))
    AcceleratorState._reset_state(True)
    with pytest.raises(ResumeError, match=r"\(model.decoder_dim None -> 16\); use another run.output_dir"):
        Trainer(config(shards, tmp_path, "model.decoder_dim=16"))  # null: the registry's decoder was built
    (find_checkpoints(tmp_path)[0] / "engine").mkdir()  # as DeepSpeed writes it
    AcceleratorState._reset_state(True)
    with pytest.raises(ResumeError, match=r"step_00000004 was written with DeepSpeed: launch with the same "
                                          r"DeepSpeed accelerate config to continue it"):
        Trainer(config(shards, tmp_path))


def test_a_min_lr_above_the_peak_lr_is_refused_before_any_step(shards, tmp_path):
    with pytest.raises(ConfigError, match=r"optim.min_lr=0.01 is above the peak LR 3.13e-05 \(optim.base_lr x "
                                          r"effective batch 8 / 256\)"):
        Trainer(config(shards, tmp_path, "optim.min_lr=0.01"))


def test_a_log_line_clears_the_progress_bar_and_redraws_it_below(capsys, monkeypatch):
    from mae_tnt.progress import write_line
    from mae_tnt.train.metrics import step_progress

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # in a log file, each redraw is a line: nothing to clear

    with step_progress(total=3, initial=0, enabled=True) as bar:
        bar.update(1)
        write_line("saved checkpoint")
    out, err = capsys.readouterr()
    assert out == "saved checkpoint\n" and err.count("1/3") >= 2  # drawn, cleared, then drawn again


@pytest.mark.parametrize("deepspeed, cause", [
    ("true", "on CPU, DeepSpeed runs one process only: add --num_processes 1 to the launch, or train several CPU "
             "processes without DeepSpeed"),
    ("false", "there is no GPU for each; to run CPU processes, launch"),  # a multi-GPU config without GPUs
])
def test_processes_launched_together_but_set_up_alone_are_refused_naming_the_cause(monkeypatch, deepspeed, cause):
    from mae_tnt.train.launch import check_launch

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", deepspeed)
    with pytest.raises(ConfigError, match=rf"the launcher started 2 processes, but accelerate set this one up as 1 "
                                          rf"of 1, so each would train alone: {cause} with ACCELERATE_USE_CPU=1 "
                                          "accelerate launch --config_file recipes/accelerate/cpu_2proc.yaml"):
        check_launch("2", 1)
    check_launch("2", 2)
    check_launch(None, 1)  # a plain `python pretrain.py`


def test_two_optimizer_steps_lower_the_loss_on_a_fixed_batch():
    import mae_tnt

    torch.manual_seed(0)
    model = mae_tnt.create_model("mae_vit_test")
    images, noise = torch.randn(4, 3, 32, 32), torch.rand(4, 16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(3):
        loss, _, _ = model(images, noise=noise)
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert losses[2] < losses[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 autocast works on CUDA")
def test_fp16_on_cpu_is_warned_about_instead_of_silently_training_in_fp32(capsys):
    from mae_tnt.train.launch import build_accelerator

    cfg = load_config(PretrainConfig, ROOT / "recipes" / "demo_mae_vit.yaml", ["run.precision=fp16"])
    build_accelerator(cfg)
    assert "warning: run.precision=fp16 has no effect on CPU" in capsys.readouterr().out


class WorkerLoaderIterator:
    """Iterates like torch's multi-process loader iterator; a Ctrl-C lands while its workers are being stopped."""

    def __init__(self):
        self.batches = iter([1, 2, 3])

    def __iter__(self):
        return self

    def __next__(self):
        return next(self.batches)

    def _shutdown_workers(self):
        raise KeyboardInterrupt


def test_a_ctrl_c_while_the_loader_workers_stop_reaches_the_training_loop():
    """Stopping the workers in a generator's `finally` ran when the generator left by `break` was collected, where
    the interrupt was printed as "Exception ignored" and lost."""
    from mae_tnt.train.loop import Window, timed

    taken = []
    with pytest.raises(KeyboardInterrupt):
        with timed(WorkerLoaderIterator(), Window(torch.device("cpu"))) as batches:
            for batch in batches:
                taken.append(batch)
                break
    assert taken == [1]


@pytest.mark.parametrize("in_file, warned", [("auto", False), (0.5, False), (1.0, True)])
def test_the_recipe_sets_deepspeeds_batch_and_clipping_fields_and_a_clipping_it_overrides_is_warned_about(
        in_file, warned, recwarn):
    from mae_tnt.train.launch import configure_deepspeed

    ds_config = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 7,
                 "gradient_clipping": in_file}
    accelerator = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=ds_config)),
                                  mixed_precision="bf16")
    cfg = load_config(PretrainConfig, ROOT / "recipes" / "demo_mae_vit.yaml", ["optim.grad_clip=0.5",
                                                                              "optim.accum_steps=2"])
    assert configure_deepspeed(accelerator, cfg, torch.nn.Linear(2, 2)) == torch.bfloat16
    assert ds_config == {"train_micro_batch_size_per_gpu": cfg.data.batch_size, "gradient_accumulation_steps": 2,
                         "gradient_clipping": 0.5}
    messages = [str(w.message) for w in recwarn]
    expected = ("the DeepSpeed config sets gradient_clipping 1.0; the recipe's optim.grad_clip=0.5 applies, as its "
                "batch settings do (set it there)")
    assert messages == ([expected] if warned else [])


def test_the_compile_time_of_the_first_step_is_logged_once(shards, tmp_path, monkeypatch, capsys):
    """A clock that advances 1 ms per reading, and a compiler whose first forward takes an hour."""
    import mae_tnt.train.engine as engine

    ticks, offset = itertools.count(step=1e-3), [0.0]
    monkeypatch.setattr(engine, "time", SimpleNamespace(perf_counter=lambda: next(ticks) + offset[0]))

    def compile_for_an_hour(model):
        forward = model.forward

        def first_forward(*args, **kwargs):
            offset[0] += 3600
            model.forward = forward
            return forward(*args, **kwargs)

        model.forward = first_forward
        return model

    monkeypatch.setattr(torch, "compile", compile_for_an_hour)
    Trainer(config(shards, tmp_path, "run.max_steps=4", "run.compile=true")).train()
    logged = [line for line in capsys.readouterr().out.splitlines() if line.startswith("torch.compile")]
    assert len(logged) == 1 and logged[0].startswith("torch.compile: first step (compilation included) took 3600.")


def test_reconstruction_grids_hide_the_recipes_mask_ratio(shards, tmp_path, monkeypatch):
    import mae_tnt.train.recon as recon

    hidden, reconstruct = [], recon.reconstruct

    def recorded(model, images, noise):
        hidden.append(model(images, noise=noise)[2].float().mean().item())
        return reconstruct(model, images, noise)

    monkeypatch.setattr(recon, "reconstruct", recorded)
    Trainer(config(shards, tmp_path, "model.mask_ratio=0.25", "run.max_steps=1")).train()
    assert hidden == [0.25]  # 4 of the 16 units of a 32-px image
    assert (tmp_path / "recon" / "step_00000001.png").exists()


def test_a_run_started_again_before_its_first_checkpoint_hides_the_earlier_curves_in_tensorboard(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    from mae_tnt.train.metrics import MetricsLogger

    with MetricsLogger(tmp_path, True) as logger:  # killed before its first checkpoint
        for step in (1, 2, 3):
            logger.log({"step": step, "loss": 1.0})
    wait_for_the_next_second()
    with MetricsLogger(tmp_path, True) as logger:  # the same command again: nothing to resume
        logger.log({"step": 1, "loss": 0.5})
    events = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 0.5)]
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "loss": 0.5}\n'


@pytest.mark.parametrize("rows", [2, None])  # None: a checkpoint that did not record the row count
def test_a_resume_drops_the_half_written_line_a_killed_run_left_in_metrics_jsonl(tmp_path, rows):
    from mae_tnt.train.metrics import MetricsLogger

    with MetricsLogger(tmp_path, True) as logger:
        for step in (1, 2):
            logger.log({"step": step, "loss": 1.0})
    with open(tmp_path / "metrics.jsonl", "a") as file:  # killed while writing step 3's row
        file.write('{"step": 3, "lo')
    with MetricsLogger(tmp_path, True, resume_step=2, resume_rows=rows) as logger:
        logger.log({"step": 3, "loss": 0.5})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 1.0},
                                                    {"step": 3, "loss": 0.5}]


def test_tensorboard_plots_each_curve_once_per_step_and_records_the_config_a_run_resumed_with(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    from mae_tnt.train.metrics import MetricsLogger

    with MetricsLogger(tmp_path, True, {"seed": 0}) as logger:
        logger.log({"step": 4, "epoch": 1.0, "loss": 0.5})
        logger.log({"step": 4, "epoch": 1.0, "knn_top1": 50.0, "knn_train": 10, "knn_val": 5, "knn_k": 3})
    wait_for_the_next_second()
    with MetricsLogger(tmp_path, True, {"seed": 1}, resume_step=4) as logger:
        logger.log({"step": 5, "epoch": 1.25, "loss": 0.4})
    events = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["epoch", "knn_top1", "loss"]
    assert [(e.step, e.value) for e in events.Scalars("epoch")] == [(4, 1.0), (5, 1.25)]
    assert [e.step for e in events.Tensors("config/text_summary")] == [0, 4]


@pytest.mark.skipif(not BUNDLED.exists(), reason="bundled Fashion-MNIST sample missing")
def test_both_runs_open_with_how_the_batch_the_lr_and_the_schedule_follow_from_the_recipe(shards, tmp_path, capsys):
    Trainer(config(shards, tmp_path / "pretrain", "run.max_steps=1", "optim.accum_steps=2"))
    assert ("effective batch 16 = 8 per device x 2 accumulation x 1 process in fp32; lr = 0.001 x 16 / 256 = "
            "6.25e-05; 8 steps/epoch, 16 steps in the schedule, stopping at 1") in capsys.readouterr().out
    AcceleratorState._reset_state(True)
    FinetuneRun(load_config(FinetuneConfig, ROOT / "recipes" / "demo_finetune_vit.yaml", [
        f"run.output_dir={tmp_path / 'finetune'}", "data.num_workers=0", "run.max_steps=1", "optim.layer_decay=0.5"]))
    assert re.search(r"effective batch \d+ = \d+ per device x 1 accumulation x 1 process in fp32; lr = .* \(adamw, "
                     r"layer decay 0.5\); [\d.]+ steps/epoch, \d+ steps in the schedule, stopping at 1",
                     capsys.readouterr().out)
