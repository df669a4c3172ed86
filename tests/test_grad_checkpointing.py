"""Grad checkpointing (`set_grad_checkpointing`, `run.grad_checkpointing`): the blocks keep no activations for the
backward pass, and the loss and gradients stay exactly those of the plain forward, drop path and SReT's random
slices included."""

import json
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from torch.autograd.graph import saved_tensors_hooks

from mae_tnt.config import PretrainConfig, load_config
from mae_tnt.finetune_config import FinetuneConfig
from mae_tnt.models import create_model
from mae_tnt.models.layers import Block as VitBlock
from mae_tnt.models.sret import NonLinearProjection, RecursiveBlock
from mae_tnt.models.tnt import Block as TntBlock
from mae_tnt.train.engine import Trainer
from mae_tnt.train.finetune import FinetuneRun

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = (VitBlock, TntBlock, RecursiveBlock, NonLinearProjection)
"""Every module that grad checkpointing recomputes (MAE decoder blocks are ViT blocks)."""
MODELS = ["mae_vit_test", "mae_tnt_test", "mae_sret_test", "vit_test_patch8_32", "tnt_test_patch8_32", "sret_test"]


def loss_of(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    out = model(images)
    return out[0] if isinstance(out, tuple) else out.square().mean()  # MAE: its loss; a classifier: any scalar


def saved_inside_blocks(model: torch.nn.Module, images: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Bytes of the tensors that the blocks' operations keep for the backward pass, and the loss."""
    depth, saved = [0], {}

    def enter(*_):
        depth[0] += 1

    def leave(*_):
        depth[0] -= 1

    def pack(tensor):
        if depth[0]:
            saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    handles = [hook(fn) for m in model.modules() if isinstance(m, BLOCKS)
               for hook, fn in ((m.register_forward_pre_hook, enter), (m.register_forward_hook, leave))]
    with saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = loss_of(model, images)
    for handle in handles:
        handle.remove()
    return sum(saved.values()), loss


@pytest.mark.parametrize("name", MODELS)
def test_checkpointed_blocks_keep_no_activations_and_give_the_same_gradients(name):
    kwargs = {} if name.startswith("mae_") else {"num_classes": 3}
    torch.manual_seed(0)
    model = create_model(name, drop_path_rate=0.3, **kwargs).train()
    images = torch.randn(4, 3, model.grid * model.unit, model.grid * model.unit)
    results = {}
    for enabled in (False, True):
        model.set_grad_checkpointing(enabled)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same masks, drop-path draws and random slices in both runs
        kept, loss = saved_inside_blocks(model, images)
        loss.backward()
        results[enabled] = kept, loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    (kept_plain, loss_plain, grads_plain), (kept, loss, grads) = results[False], results[True]
    assert kept_plain > 0 and kept == 0
    assert torch.equal(loss, loss_plain)
    assert grads.keys() == grads_plain.keys() and grads
    assert all(torch.equal(grads[key], grads_plain[key]) for key in grads)


def test_no_grad_forward_ignores_checkpointing():
    model = create_model("mae_vit_test")
    model.set_grad_checkpointing()
    images = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 16)
    with torch.no_grad():
        checkpointed_loss = model(images, noise=noise)[0]
    model.set_grad_checkpointing(False)
    with torch.no_grad():
        assert torch.equal(checkpointed_loss, model(images, noise=noise)[0])


def losses(out: Path) -> list[float]:
    return [row["loss"] for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in row]


def count_checkpoints(monkeypatch) -> list[int]:
    """Counts the checkpointed calls, which still run as before."""
    calls = [0]
    original = torch.utils.checkpoint.checkpoint

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    return calls


RUNS = {"pretrain": ("demo_mae_vit.yaml", PretrainConfig, Trainer, ["eval.knn_every=0"]),
        "finetune": ("demo_finetune_vit.yaml", FinetuneConfig, FinetuneRun, [])}


@pytest.mark.parametrize("kind", RUNS)
def test_run_grad_checkpointing_checkpoints_every_block_and_trains_the_same(tmp_path, monkeypatch, kind,
                                                                           fresh_accelerate_state):
    recipe, config_class, run_class, extra = RUNS[kind]
    calls = count_checkpoints(monkeypatch)
    trained = {}
    for enabled in (False, True):
        out = tmp_path / str(enabled)
        overrides = [f"run.output_dir={out}", f"run.grad_checkpointing={enabled}", "run.max_steps=2",
                     "run.log_every=1", "data.num_workers=0", "data.val=null", *extra]
        cfg = load_config(config_class, ROOT / "recipes" / recipe, overrides)
        AcceleratorState._reset_state(True)
        calls[0] = 0
        run_class(cfg).train()
        trained[enabled] = losses(out), calls[0]
    blocks = sum(isinstance(m, VitBlock) for m in create_model(cfg.model.name).modules())  # encoder (+ decoder)
    assert trained[False][1] == 0
    assert trained[True][1] == 2 * blocks  # every block of both steps (a step is one micro-step here)
    assert trained[True][0] == trained[False][0] and len(trained[True][0]) == 2
