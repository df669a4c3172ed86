"""Tests of the values training depends on: the LR schedule, per-group LRs and which parameters decay."""

import math
from pathlib import Path

import pytest
import torch

from mae_tnt.config import load_config
from mae_tnt.finetune_config import FinetuneConfig
from mae_tnt.models import create_model
from mae_tnt.train.finetune import build_classifier, build_optimizer
from mae_tnt.train.optim import build_adamw, param_groups
from mae_tnt.train.resume import load_optimizer_state, with_this_runs_kernel
from mae_tnt.train.schedule import lr_at, set_lr

ROOT = Path(__file__).resolve().parents[1]
# What classifiers exempt from weight decay beyond 1-D parameters: class tokens and position tables (MAE fine-tuning).
CLASSIFIER_UNDECAYED = ("cls_token", "pos_embed", "patch_pos", "pixel_pos")
# MAE pretraining decays its class and mask tokens as MAE does, and exempts the learned position tables (TNT's, SReT's).
MAE_UNDECAYED = ("pos_embed", "patch_pos", "pixel_pos")


def test_lr_warms_up_linearly_from_zero_then_falls_on_a_half_cosine_to_min_lr():
    schedule = {"peak_lr": 2.0, "total_steps": 110, "warmup_steps": 10, "min_lr": 0.2}
    expected = {0: 0.0, 5: 1.0, 10: 2.0, 60: 0.2 + 1.8 * 0.5, 85: 0.2 + 1.8 * 0.5 * (1 + math.cos(math.pi * 0.75)),
                110: 0.2, 150: 0.2}
    assert {step: lr_at(step, **schedule) for step in expected} == pytest.approx(expected)
    assert lr_at(0, peak_lr=2.0, total_steps=10, warmup_steps=0) == 2.0  # no warmup: the peak at once


def test_each_group_runs_at_the_lr_times_its_layer_decay_scale():
    cfg = load_config(FinetuneConfig, None, ["model.name=vit_test_patch8_32", "data.train=x", "optim.layer_decay=0.5"])
    optimizer = build_optimizer(build_classifier(cfg, num_classes=10), cfg, lr=1.0)
    set_lr(optimizer, 3.0)
    assert sorted(g["lr"] for g in optimizer.param_groups) == pytest.approx(
        sorted(3.0 * g["lr_scale"] for g in optimizer.param_groups))
    assert {g["lr"] for g in optimizer.param_groups} >= {3.0, 3.0 * 0.5**3}  # head and stem, depth 2


def decay_by_name(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}


@pytest.mark.parametrize("name, exempt, layer_decay", [
    *[(name, MAE_UNDECAYED, None) for name in ("mae_vit_test", "mae_tnt_test", "mae_sret_test")],
    *[(name, CLASSIFIER_UNDECAYED, layer_decay) for name in ("vit_test_patch8_32", "tnt_test_patch8_32", "sret_test")
      for layer_decay in (None, 0.75)],  # fine-tuning's layer-decay groups keep the exemptions
])
def test_weight_matrices_decay_and_norms_and_biases_never_tokens_and_tables_as_mae_decides(name, exempt, layer_decay):
    model = create_model(name)
    optimizer = build_adamw(model, lr=1.0, weight_decay=0.05, betas=(0.9, 0.95), fused=False, layer_decay=layer_decay)
    decay = decay_by_name(model, optimizer)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(decay) == set(trainable)
    undecayed = {n for n, p in trainable.items() if p.ndim <= 1 or n.split(".")[-1] in exempt}
    assert {n for n, wd in decay.items() if wd == 0.0} == undecayed
    assert {wd for n, wd in decay.items() if n not in undecayed} == {0.05}
    tokens = {n for n, p in trainable.items() if p.ndim > 1 and n.endswith("token")}
    assert (tokens <= undecayed if "cls_token" in exempt else not tokens & undecayed)
    tables = {n for n, p in trainable.items() if n.split(".")[-1] in MAE_UNDECAYED}
    assert tables <= undecayed and (tables or name.startswith("mae_vit"))  # ViT's MAE table is fixed, not trained


def test_the_linear_probe_neither_decays_nor_adapts_the_batchnorm_and_bias():
    cfg = load_config(FinetuneConfig, ROOT / "recipes" / "demo_linprobe_vit.yaml", ["optim.weight_decay=0.1"])
    model = build_classifier(cfg, num_classes=10)
    optimizer = build_optimizer(model, cfg, lr=1.0)
    names = {id(p): n for n, p in model.named_parameters()}
    settings = {names[id(p)]: (g["weight_decay"], g["always_adapt"]) for g in optimizer.param_groups
                for p in g["params"]}
    assert settings == {"head.1.weight": (0.1, True), "head.1.bias": (0.0, False)}  # BatchNorm1d(affine=False)


def trained_adamw(model: torch.nn.Module, fused: bool) -> torch.optim.AdamW:
    optimizer = build_adamw(model, lr=1e-3, weight_decay=0.05, betas=(0.9, 0.95), fused=fused)
    model(torch.randn(2, 3, 32, 32)).square().mean().backward()
    optimizer.step()
    return optimizer


def test_a_resume_loads_the_step_counts_as_this_runs_adamw_kernel_wants_them(tmp_path):
    """torch places each step count by the saved groups' flags; a checkpoint of the unfused kernel (a CPU run) resumed
    with the fused one must still get the fused kernel's placement."""
    model = create_model("vit_test_patch8_32")
    saved = trained_adamw(model, fused=False).state_dict()
    resumed = torch.optim.AdamW(param_groups(model, 0.05, None), lr=1e-3, fused=True)  # build_adamw's on a GPU
    handed = with_this_runs_kernel(saved, resumed)
    assert [group["fused"] for group in handed["param_groups"]] == [True, True]
    assert [group["fused"] for group in saved["param_groups"]] == [False, False]  # the checkpoint's copy is untouched
    load_optimizer_state(resumed, saved, tmp_path)
    assert all(group["fused"] for group in resumed.param_groups)
    assert len(resumed.state) == len(list(model.parameters()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_checkpoint_of_the_unfused_adamw_resumes_with_the_fused_kernel_on_a_gpu(tmp_path):
    model = create_model("vit_test_patch8_32")
    torch.save(trained_adamw(model, fused=False).state_dict(), tmp_path / "optimizer.pt")  # a CPU run's checkpoint
    model.cuda()
    resumed = build_adamw(model, lr=1e-3, weight_decay=0.05, betas=(0.9, 0.95), fused=True)
    load_optimizer_state(resumed, torch.load(tmp_path / "optimizer.pt", map_location="cpu", weights_only=True),
                         tmp_path)
    model(torch.randn(2, 3, 32, 32, device="cuda")).square().mean().backward()
    resumed.step()  # the fused kernel refused step counts left on the CPU
    assert all(state["step"].device.type == "cuda" and state["step"].item() == 2 for state in resumed.state.values())
