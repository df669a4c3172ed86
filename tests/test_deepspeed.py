"""DeepSpeed ZeRO through accelerate, one CPU process: save, resume and accumulation match the plain loop exactly,
and a ZeRO-3 checkpoint exports."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from run_utils import built_once, free_port, logged_losses, overridden, run_launch
from safetensors.torch import load_file
from shard_utils import write_shards

import mae_tnt
from mae_tnt.export import export
from mae_tnt.models.loading import save_weights

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")  # accelerate needs it whenever DeepSpeed is on

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def accelerate_config(tmp_path: Path, stage: int) -> Path:
    """The shipped recipes/deepspeed/zeroN.json; ZeRO-3 partitions every parameter, as it does ViT-B's pos_embed
    (151k elements, over the shipped persistence threshold), where the tiny test model's would all stay whole."""
    deepspeed = ROOT / f"recipes/deepspeed/zero{stage}.json"
    if stage == 3:
        settings = json.loads(deepspeed.read_text())
        settings["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        deepspeed = tmp_path / "zero3.json"
        deepspeed.write_text(json.dumps(settings))
    path = tmp_path / f"zero{stage}.yaml"
    path.write_text(f"compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\nnum_processes: 1\n"
                    f"num_machines: 1\nmachine_rank: 0\ndeepspeed_config:\n  deepspeed_config_file: "
                    f"{deepspeed}\n  zero3_init_flag: false\n")
    return path


def run(shards, out, max_steps, config: Path | None, precision: str = "fp32", *extra: str,
        recipe: str = "demo_mae_vit.yaml", check: bool = True) -> subprocess.CompletedProcess:
    """pretrain.py on `recipe` (under DeepSpeed when `config` is given), asserted to succeed when `check`."""
    args = [str(ROOT / "pretrain.py"), str(ROOT / "recipes" / recipe), *overridden([
        f"data.train={shards}", "data.val=null", f"run.output_dir={out}", "data.batch_size=8", "data.num_workers=0",
        "optim.accum_steps=2", "schedule.epochs=2", "schedule.warmup_epochs=0.5", "run.log_every=1",
        "run.checkpoint_every=2", f"run.max_steps={max_steps}", f"run.precision={precision}"], extra)]
    return launch(config, args, check)


def launch(config: Path | None, args: list[str], check: bool = True) -> subprocess.CompletedProcess:
    """A script and its arguments, under `accelerate launch --config_file config` (plain Python without one)."""
    launcher = [sys.executable]
    if config is not None:
        launcher += ["-m", "accelerate.commands.launch", "--config_file", str(config), "--main_process_port",
                     str(free_port())]
    result = run_launch(launcher + args, env=ENV, cwd=ROOT, timeout=400)
    assert result.returncode == 0 or not check, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds_shards")
    write_shards(root, [32] * 4, size=20)
    return root


@pytest.mark.timeout(600)  # three runs, two of them DeepSpeed launches: 241 s on a throttled 2-core machine
def test_zero2_save_resume_and_accumulation_match_the_plain_loop(shards, tmp_path):
    config = accelerate_config(tmp_path, 2)
    run(shards, tmp_path / "plain", 4, None)
    run(shards, tmp_path / "zero2", 3, config)  # checkpoints at steps 2 and 3
    assert (tmp_path / "zero2/checkpoints/step_00000003/engine").is_dir()
    run(shards, tmp_path / "zero2", 4, config)
    zero2, plain = logged_losses(tmp_path / "zero2"), logged_losses(tmp_path / "plain")
    assert [r[0] for r in zero2] == [r[0] for r in plain] == [1, 2, 3, 4]
    for column in (1, 2):  # loss, lr
        assert [r[column] for r in zero2] == pytest.approx([r[column] for r in plain], rel=1e-6)


def train_then_resume(shards, out: Path, config: Path, precision: str, *extra: str, last_step: int = 3) -> None:
    """Two steps (a checkpoint, a reconstruction image), then a resume up to `last_step`."""
    run(shards, out, 2, config, precision, *extra)
    assert (out / "checkpoints/step_00000002/engine").is_dir() and (out / "recon/step_00000002.png").exists()
    run(shards, out, last_step, config, precision, *extra)
    losses = [row["loss"] for row in metric_rows(out)["loss"]]
    assert len(losses) == last_step and all(0 < loss < 10 for loss in losses)


@pytest.mark.timeout(900)  # four DeepSpeed launches and an export; over 300 s for three on a loaded 2-core machine
@pytest.mark.parametrize("stage", [1, 2])  # ZeRO-2's shipped file accumulates gradients in fp32, ZeRO-1's in bf16
def test_bf16_trains_saves_resumes_with_another_accumulation_and_exports(shards, tmp_path, stage):
    """bf16 under DeepSpeed stores the weights in bf16: inputs, reconstructions and resume must all cope. The resumed
    step 3 is the uninterrupted run's. Resumed again at step 3 with 4 half-size micro-batches a step (6 micro-steps so
    far, not a multiple of 4), step 4 still takes 4: DeepSpeed's load_state brings back accelerate's micro-step count,
    which decides where a step ends."""
    config, out = accelerate_config(tmp_path, stage), tmp_path / f"zero{stage}"
    train_then_resume(shards, out, config, "bf16")
    run(shards, tmp_path / "straight", 3, config, "bf16")
    resumed, straight = (logged_losses(path) for path in (out, tmp_path / "straight"))
    assert [row[0] for row in resumed] == [row[0] for row in straight] == [1, 2, 3]
    for column in (1, 2):  # loss, lr
        assert [row[column] for row in resumed] == pytest.approx([row[column] for row in straight], rel=1e-6)
    run(shards, out, 4, config, "bf16", "data.batch_size=4", "optim.accum_steps=4")
    position = json.loads((out / "checkpoints/step_00000004/data_rank0.json").read_text())
    assert position["batches"] == 4  # the new batch size restarted the epoch at step 3
    assert export(out, tmp_path / "export")["step"] == 4  # the fp32 masters gathered from the engine checkpoint


def zero3_extras(shards) -> tuple[str, ...]:
    """Blocks recomputed in the backward, and an online kNN every 2 steps (a quarter epoch)."""
    return "run.grad_checkpointing=true", f"data.val={shards}", "data.val_split=train", "eval.knn_every=0.25"


@pytest.fixture(scope="module")
def zero3_run(shards, tmp_path_factory) -> Path:
    """A ZeRO-3 run trained, saved and resumed: ZeRO-3 gathers the partitioned weights as each block runs,
    recomputation and the kNN's forwards included."""
    def build(root: Path) -> None:
        train_then_resume(shards, root / "run", accelerate_config(root, 3), "fp32", *zero3_extras(shards), last_step=4)

    return built_once(tmp_path_factory, "zero3_run", build) / "run"


def test_zero3_trains_evaluates_saves_and_resumes_as_the_plain_loop_would(zero3_run, shards, tmp_path):
    run(shards, tmp_path / "plain", 4, None, "fp32", *zero3_extras(shards))
    zero3, plain = (metric_rows(out) for out in (zero3_run, tmp_path / "plain"))
    assert [r["step"] for r in zero3["loss"]] == [r["step"] for r in plain["loss"]] == [1, 2, 3, 4]
    # loss, lr: resumed at step 2, step 3's loss shows the restored weights and step 4's the restored optimizer state
    for column in ("loss", "lr"):
        assert [r[column] for r in zero3["loss"]] == pytest.approx([r[column] for r in plain["loss"]], rel=1e-5)
    assert [r["step"] for r in zero3["knn_top1"]] == [r["step"] for r in plain["knn_top1"]] == [2, 4]
    assert [r["knn_top1"] for r in zero3["knn_top1"]] == pytest.approx([r["knn_top1"] for r in plain["knn_top1"]])
    # The export gathers the partitioned weights: the encoder the plain loop trained, to fp32 rounding.
    export(zero3_run, tmp_path / "export")
    exported = load_file(tmp_path / "export" / "model.safetensors")
    trained = load_file(tmp_path / "plain" / "checkpoints" / "step_00000004" / "model.safetensors")
    assert exported.keys() == {key.removeprefix("encoder.") for key in trained if key.startswith("encoder.")}
    for key, value in exported.items():
        torch.testing.assert_close(value, trained[f"encoder.{key}"], rtol=1e-4, atol=1e-6)


def metric_rows(out: Path) -> dict[str, list[dict]]:
    """A run's metrics.jsonl rows by kind: training rows under "loss", kNN rows under "knn_top1"."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {kind: [r for r in rows if kind in r] for kind in ("loss", "knn_top1")}


def test_a_zero3_checkpoint_exports_its_gathered_weights(zero3_run, tmp_path):
    checkpoint = zero3_run / "checkpoints" / "step_00000004"
    assert (checkpoint / "engine").is_dir() and not (checkpoint / "model.safetensors").exists()
    config = export(zero3_run, tmp_path / "out")  # the export loads its result back with no key left over
    assert (config["kind"], config["model"], config["source"]) == ("encoder", "vit_test_patch8_32", str(checkpoint))
    assert all(torch.isfinite(v).all() for v in load_file(tmp_path / "out" / "model.safetensors").values())


@pytest.mark.parametrize("recipe, precision, message", [
    ("demo_mae_sret.yaml", "bf16", "mae_sret_test has BatchNorm layers, whose weights DeepSpeed's bf16 mode casts but "
                                   "not their running statistics"),  # torch's batch_norm stopped the first step
    ("demo_mae_vit.yaml", "fp16", "run.precision=fp16: DeepSpeed has no fp16 on CPU; set run.precision=bf16 or "
                                  "fp32"),  # its engine stopped the first step, after our warning that it trains fp32
])
def test_precisions_deepspeed_cannot_run_here_are_one_error_line_before_training(shards, tmp_path, recipe, precision,
                                                                                 message):
    result = run(shards, tmp_path / "run", 2, accelerate_config(tmp_path, 2), precision, recipe=recipe, check=False)
    assert result.returncode != 0 and f"error: {message}" in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr.split("error: ")[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("mode", ["finetune", "linprobe"])
def test_a_bf16_fine_tune_or_probe_keeps_its_best_weights_as_the_fp32_masters(shards, tmp_path, mode):
    """DeepSpeed's half modes hold 16-bit copies in the module; best/ and the exports hold the weights the optimizer
    updates, and a probe's frozen encoder exactly as it was loaded (the engine has no fp32 master of it)."""
    init = tmp_path / "encoder.safetensors"
    encoder = mae_tnt.create_model("vit_test_patch8_32", num_classes=0).state_dict()
    save_weights(encoder, init)
    args = [str(ROOT / "finetune.py"), str(ROOT / f"recipes/demo_{mode}_vit.yaml"), f"data.train={shards}",
            f"data.val={shards}", "data.val_split=train", f"run.output_dir={tmp_path / 'ft'}", "data.batch_size=8",
            "data.num_workers=0", "run.max_steps=2", "run.precision=bf16", f"init={init}"]
    launch(accelerate_config(tmp_path, 1), args)
    best = load_file(tmp_path / "ft" / "best" / "model.safetensors")
    gathered = export(tmp_path / "ft" / "checkpoints" / "step_00000002", tmp_path / "export")
    exported = load_file(tmp_path / "export" / "model.safetensors")
    assert gathered["step"] == 2 and {v.dtype for v in best.values() if v.is_floating_point()} == {torch.float32}
    compared = exported.keys() & best.keys() if mode == "linprobe" else exported  # a probe's export folds its BN
    assert compared and all(torch.equal(best[key], exported[key]) for key in compared)
    if mode == "linprobe":
        assert all(torch.equal(best[key], encoder[key]) for key in encoder)
