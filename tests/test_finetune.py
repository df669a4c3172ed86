"""Downstream runs: recipes, layer-decay groups, init sources with exact key checks, position-embedding resampling,
reproducible augmentation, a demo fine-tune above chance with exact resume, and a frozen linear probe."""

import copy
import errno
import importlib.util
import itertools
import json
import os
import pickle
import random
import re
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from run_utils import overridden
from safetensors.torch import load_file, save_file
from shard_utils import drop_classes, encode_png, write_shards
from test_tnt import official_layout as tnt_official_layout

from mae_tnt.atomic import aside_name
from mae_tnt.config import ConfigError, PretrainConfig, UnknownKeyError, load_config
from mae_tnt.data.shards import ShardError, StreamError, read_samples, resolve_shards
from mae_tnt.data.transforms import train_crop
from mae_tnt.finetune_config import AugmentConfig, FinetuneConfig
from mae_tnt.models import CheckpointError, ModelError, create_model
from mae_tnt.models.loading import resolve_checkpoint
from mae_tnt.models.sret import to_official_state_dict
from mae_tnt.train import augment as augment_module
from mae_tnt.train.augment import BatchAugment, FinetuneTransform, build_criterion, seeded_global_rngs
from mae_tnt.train.checkpoint import CheckpointWriteError, ResumeError, find_checkpoints
from mae_tnt.train.engine import Trainer
from mae_tnt.train.finetune import FinetuneRun, build_classifier, build_optimizer, finetune, resolve_num_classes
from mae_tnt.train.init import load_init, recorded_init
from mae_tnt.train.loop import NonFiniteLossError, seed_step
from mae_tnt.train.superseded import best_weights_step

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "data" / "fashion_mnist"
DOWNSTREAM_RECIPES = sorted(p for p in (ROOT / "recipes").glob("*.yaml")
                            if any(word in p.name for word in ("finetune", "linprobe", "knn")))


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture
def one_thread():
    """Tiny models run faster on one thread, and much faster when other processes share the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load_tool(name: str):
    """tools/NAME.py as a module (tools/ is a script folder, not a package)."""
    spec = importlib.util.spec_from_file_location(f"{name}_tool", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def export_tool():
    from mae_tnt import export

    return export


FASHION_MEAN, FASHION_STD = [0.286] * 3, [0.353] * 3  # the demo recipes' normalisation


def write_mae_checkpoint(path: Path, name: str = "mae_vit_test") -> dict:
    """A pretraining checkpoint directory as the engine writes it: model.safetensors + state.json."""
    mae = create_model(name)
    path.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in mae.state_dict().items()}, path / "model.safetensors")
    size = mae.grid * mae.unit
    config = {"model": {"img_size": size}, "data": {"mean": FASHION_MEAN, "std": FASHION_STD}}
    (path / "state.json").write_text(json.dumps({"step": 1, "model": name, "config": config}))
    return mae.state_dict()


def classifier(name="vit_test_patch8_32", **kwargs):
    return create_model(name, **{"num_classes": 10, **kwargs})


@pytest.mark.parametrize("recipe", DOWNSTREAM_RECIPES, ids=lambda p: p.name)
def test_every_downstream_recipe_loads_and_names_a_registered_classifier(recipe):
    import mae_tnt

    cfg = load_config(FinetuneConfig, recipe)
    assert cfg.model.name in mae_tnt.list_models() and not cfg.model.name.startswith("mae_")


def test_linear_probe_refuses_fine_tuning_augmentation():
    with pytest.raises(ConfigError, match="augment.rand_augment=null"):
        load_config(FinetuneConfig, None, ["mode=linprobe", "model.name=vit_test_patch8_32", "data.train=x"])


@pytest.mark.parametrize("override, message", [
    ("augment.rand_augment=bogus", "augment.rand_augment='bogus' is not a timm RandAugment spec such as 'rand-m9-"),
    ("knn.k=0", r"knn.k must be in \[1, inf\], got 0"),
    ("knn.temperature=-1", r"knn.temperature must be in \(0, inf\], got -1.0"),
    ("model.drop_path=1.5", r"model.drop_path must be in \[0, 1\), got 1.5"),
    ("model.head_init_std=-1", r"model.head_init_std must be in \(0, inf\), got -1.0"),
    ("augment.label_smoothing=1.5", r"augment.label_smoothing must be in \[0, 1\), got 1.5"),
    ("augment.reprob=1.5", r"augment.reprob must be in \[0, 1\], got 1.5"),
    ("augment.mixup=-1", r"augment.mixup must be in \[0, inf\], got -1.0"),
    ("optim.ema_decay=1.5", r"optim.ema_decay must be in \[0, 1\), got 1.5"),
    ("optim.min_lr=inf", r"`optim.min_lr` must be a finite number, got 'inf'"),
    ("knn.max_train=-1", r"knn.max_train must be at least 1, or null for every train image, got -1"),
    ("seed=-1", r"seed must be a whole number from 0 to 2\*\*63 - 1, got -1"),
    ("optim.name=lars", r"LARS applies no layer-wise LR decay: set optim.layer_decay=null with optim.name=lars"),
    ("optim.name=sgd", r"optim.name must be one of adamw, lars, got 'sgd'$"),
    ("model.num_classes=0", r"model.num_classes must be >= 1, got 0"),
    ("model.global_pool=max", r"model.global_pool must be one of avg, token, null, got 'max'$"),
    ("mode=lin", r"mode must be one of finetune, linprobe, knn, got 'lin'; did you mean linprobe\?$"),
    ("data.decode_device=cuda", r"data.decode_device must be cpu for downstream runs: RandAugment works on PIL"),
    ("data.batch_size=7", r"mixup/cutmix pair images in a batch: data.batch_size must be even, got 7"),
])
def test_bad_downstream_values_fail_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(FinetuneConfig, None, ["model.name=vit_test_patch8_32", "data.train=x", override])


@pytest.mark.parametrize("override, message", [
    ("model.name=mae_vit_test", r"model.name='mae_vit_test' is not a registered classifier \(it is a masked "
                                r"autoencoder; the classifier of its encoder is vit_test_patch8_32\)"),
    ("model.name=vit_tset", r"model.name='vit_tset' is not a registered classifier \(did you mean .*vit_test_patch8_32"
                            r".*\); list them with python -c \"import mae_tnt; print\(mae_tnt.list_models\(\)\)\"$"),
])
def test_a_model_name_that_is_no_classifier_fails_before_any_work_naming_the_one_meant(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(FinetuneConfig, None, ["data.train=x", override])


@pytest.mark.parametrize("recipe, verb", [("demo_finetune_vit.yaml", "training"), ("demo_knn_vit.yaml", "evaluating")])
def test_a_run_without_init_says_it_uses_a_random_encoder(tmp_path, recipe, verb):
    logged = []
    cfg = load_config(FinetuneConfig, ROOT / "recipes" / recipe, ["init=null", f"run.output_dir={tmp_path}"])
    build_classifier(cfg, 10, log=logged.append)
    assert f"init: none, {verb} a randomly initialised encoder" in logged


@pytest.mark.parametrize("pool", ["avg", "token"])
def test_layer_decay_scales_follow_the_depth(pool):
    # MAE's rule, ViT test model of depth 2: n = 3 groups above the stem; stem 0.65^3, block i 0.65^(2 - i), and the
    # head with every norm after the blocks 1 (timm's own ViT would merge `norm` into the last block, at 0.65).
    cfg = load_config(FinetuneConfig, None, ["model.name=vit_test_patch8_32", "data.train=x",
                                             "optim.layer_decay=0.65", f"model.global_pool={pool}"])
    model = build_classifier(cfg, num_classes=10)
    scale = lr_scales(build_optimizer(model, cfg, lr=1.0), model)
    final_norm = "fc_norm.weight" if pool == "avg" else "norm.weight"
    expected = {"cls_token": 0.65**3, "pos_embed": 0.65**3, "patch_embed.proj.weight": 0.65**3,
                "blocks.0.attn.qkv.weight": 0.65**2, "blocks.1.mlp.fc2.bias": 0.65, final_norm: 1.0,
                "head.weight": 1.0}
    assert {k: pytest.approx(scale[k]) for k in expected} == expected
    assert set(scale) == {n for n, _ in model.named_parameters()}  # the sin-cos table is trained when fine-tuning


@pytest.mark.parametrize("name, last_block, groups_below_head", [
    ("tnt_test_patch8_32", "blocks.1.mlp_in.fc1.weight", 3),  # stem, 2 blocks
    ("sret_test", "stages.2.blocks.0.attn.qkv.weight", 4),  # stem, 3 stages of one shared block
])
def test_layer_decay_gives_the_final_norm_the_head_scale_and_the_last_block_one_decay(name, last_block,
                                                                                      groups_below_head):
    cfg = load_config(FinetuneConfig, None, [f"model.name={name}", "data.train=x", "optim.layer_decay=0.5"])
    model = build_classifier(cfg, num_classes=10)
    scale = lr_scales(build_optimizer(model, cfg, lr=1.0), model)
    assert scale["norm.weight"] == scale["norm.bias"] == scale["head.weight"] == 1.0
    assert scale[last_block] == 0.5
    assert min(scale.values()) == 0.5**groups_below_head


def lr_scales(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> dict[str, float]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: g["lr_scale"] for g in optimizer.param_groups for p in g["params"]}


def assert_encoder_loaded(model, encoder_state: dict):
    for key in ("patch_embed.proj.weight", "blocks.1.attn.qkv.weight", "pos_embed"):
        assert torch.equal(model.state_dict()[key], encoder_state[key]), key


def test_init_from_our_pretraining_checkpoint_run_directory_and_export(tmp_path, export_tool):
    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000001"
    mae_state = write_mae_checkpoint(checkpoint)
    encoder_state = {k.removeprefix("encoder."): v for k, v in mae_state.items() if k.startswith("encoder.")}
    export_tool.export(checkpoint, tmp_path / "export")
    for source in (checkpoint, tmp_path / "run", tmp_path / "export"):
        model, logged = classifier(global_pool="avg"), []
        report = load_init(model, source, logged.append)
        assert report.missing == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
        assert report.unexpected == ["norm.bias", "norm.weight"]  # global pooling replaces the final norm
        assert_encoder_loaded(model, encoder_state)
        assert logged[0].startswith(f"init from {checkpoint if source != tmp_path / 'export' else source} ")
        dropped = "dropped 0" if source == tmp_path / "export" else " (decoder_"  # an export has no decoder
        assert (dropped in logged[0]) and not logged[0].endswith("()")


@pytest.mark.parametrize("with_decoder", [False, True])
def test_init_from_official_mae_files(tmp_path, with_decoder):
    mae = create_model("mae_vit_test")
    flat = {k.removeprefix("encoder."): v for k, v in mae.state_dict().items()
            if with_decoder or k.startswith("encoder.")}  # `*_full.pth` keeps decoder_* and mask_token flat
    torch.save({"model": flat}, tmp_path / "mae_pretrain.pth")
    model = classifier(global_pool="token")
    report = load_init(model, tmp_path / "mae_pretrain.pth")
    assert (report.missing, report.unexpected) == (["head.bias", "head.weight"], [])
    assert ("mask_token" in report.dropped) == with_decoder
    assert_encoder_loaded(model, flat)


def test_a_wrong_key_fails_with_a_message_naming_it(tmp_path):
    state = classifier(num_classes=0).state_dict()
    state["blocks.0.attn.qkvv.weight"] = state.pop("blocks.0.attn.qkv.weight")
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"qkvv\.weight") as err:
        load_init(classifier(), tmp_path / "bad.pth")
    assert "blocks.0.attn.qkv.weight" in str(err.value)  # and the key the model misses


@pytest.mark.parametrize("described", [False, True])
def test_init_from_a_globally_pooled_classifier_into_a_token_pooled_model_names_the_setting(tmp_path, described):
    """Only the pooling differs: the advice names it first, and the model that wrote a described checkpoint only as
    the next thing to try (it is the model already built here)."""
    save_file(classifier(global_pool="avg").state_dict(), tmp_path / "model.safetensors")  # fc_norm, no norm
    if described:
        (tmp_path / "config.json").write_text(json.dumps({"model": "vit_test_patch8_32"}))
    writer = "; if keys still misfit, also set model.name=vit_test_patch8_32 .*" if described else ""
    with pytest.raises(CheckpointError, match=r"missing: norm.bias, norm.weight\. .*, or set model.global_pool=avg: "
                                              rf"the checkpoint was trained with global average pooling{writer}$"):
        load_init(classifier(global_pool="token", num_classes=0), tmp_path / "model.safetensors")
    load_init(classifier(global_pool="avg", num_classes=0), tmp_path / "model.safetensors")  # as the message says


@pytest.mark.parametrize("writer, reader", [
    ("mae_tnt_test", "vit_test_patch8_32"), ("mae_vit_test", "tnt_test_patch8_32"),
    ("mae_sret_test", "vit_test_patch8_32"), ("mae_vit_test", "sret_test"),
])
def test_init_from_another_models_checkpoint_names_the_model_that_wrote_it(tmp_path, writer, reader):
    write_mae_checkpoint(tmp_path / "ckpt", name=writer)  # position tables of other layouts are not resampled
    fitting = writer.removeprefix("mae_").replace("test", "test_patch8_32" if "sret" not in writer else "test")
    with pytest.raises(CheckpointError, match=rf"do not fit .*, or set model.name={fitting} \(the checkpoint was "
                                              rf"written by `{writer}`; model.name and its arguments must build"):
        load_init(classifier(reader), tmp_path / "ckpt")
    load_init(create_model(fitting, num_classes=10), tmp_path / "ckpt")  # as the message says


def test_init_from_an_official_sret_file(tmp_path):
    encoder = create_model("sret_test", num_classes=0)
    torch.save({"model": to_official_state_dict(encoder)}, tmp_path / "sret.pth")
    model = classifier("sret_test")
    report = load_init(model, tmp_path / "sret.pth")
    assert (report.missing, report.unexpected) == (["head.bias", "head.weight"], [])
    assert torch.equal(model.stages[1].blocks[0].attn.qkv.weight, encoder.stages[1].blocks[0].attn.qkv.weight)


@pytest.mark.parametrize("name, size, official_layout", [
    ("tnt_test_patch8_32", 48, lambda model: tnt_official_layout(model.state_dict())),
    ("sret_test", 96, to_official_state_dict),
])
def test_the_init_log_of_an_official_file_counts_the_tensors_loaded_and_names_the_resampled_table(
        tmp_path, name, size, official_layout):
    """Official files hold tensors the model does not load (TNT's unused outer_tokens, SReT's shared blocks saved
    once per application) and other names for the position table (TNT's outer_pos)."""
    torch.save({"model": official_layout(create_model(name, num_classes=0))}, tmp_path / "official.pth")
    model, logged = classifier(name, img_size=size), []
    report = load_init(model, tmp_path / "official.pth", logged.append)
    assert f": {len(model.state_dict()) - len(report.missing)} tensors loaded;" in logged[0]
    table = "patch_pos" if name.startswith("tnt") else "pos_embed"
    assert re.match(rf"init: resampled the position table to this image size \(bicubic\): {table} ", logged[1])


@pytest.mark.parametrize("mae_name, name, size, new_size", [
    ("mae_vit_test", "vit_test_patch8_32", 32, 48),
    ("mae_tnt_test", "tnt_test_patch8_32", 32, 48),
    ("mae_sret_test", "sret_test", 64, 96),
])
def test_a_checkpoint_stays_usable_at_another_resolution(tmp_path, mae_name, name, size, new_size):
    write_mae_checkpoint(tmp_path / "ckpt", mae_name)
    model = classifier(name, img_size=new_size)
    logged = []
    load_init(model, tmp_path / "ckpt", logged.append)
    assert model(torch.randn(2, 3, new_size, new_size)).shape == (2, 10)
    assert logged[-1].startswith("init: resampled the position table to this image size (bicubic): ")


def test_train_transform_is_reproducible_per_sample_and_picklable():
    data = next(read_samples(resolve_shards(str(BUNDLED), "train")[0].url))["png"] if BUNDLED.exists() else None
    if data is None:
        pytest.skip("bundled data missing")
    transform = pickle.loads(pickle.dumps(FinetuneTransform(32, [0.08, 1.0], "rand-m9-mstd0.5-inc1", [0.5] * 3)))
    first, again = transform(data, random.Random(3)), transform(data, random.Random(3))
    assert first.shape == (3, 32, 32) and first.dtype == torch.uint8
    assert torch.equal(first, again)
    assert any(not torch.equal(first, transform(data, random.Random(seed))) for seed in range(4, 8))


def test_rand_augment_at_full_magnitude_posterizes_to_black_instead_of_failing():
    if not BUNDLED.exists():
        pytest.skip("bundled data missing")
    data = next(read_samples(resolve_shards(str(BUNDLED), "train")[0].url))["png"]
    transform = FinetuneTransform(32, [0.08, 1.0], "rand-m10-n4-mstd0-inc1", [0.5] * 3)  # magnitude 10 every time
    for seed in range(40):  # Pillow 13 raised on the 0 bits timm's PosterizeIncreasing keeps at magnitude 10
        assert transform(data, random.Random(seed)).shape == (3, 32, 32)
    (posterize,) = [op for op in transform.rand_augment.ops if op.name == "PosterizeIncreasing"]
    assert posterize.aug_fn(Image.new("RGB", (4, 4), (200, 100, 50)), 0).getextrema() == ((0, 0),) * 3


def test_batch_augment_is_a_function_of_the_step_seed():
    augment = BatchAugment(AugmentConfig(), num_classes=10, device=torch.device("cpu"))
    images, labels = torch.randn(8, 3, 32, 32), torch.arange(8)

    def run(micro):
        seed_step(0, 0, micro)
        with seeded_global_rngs(torch.initial_seed()):
            return augment(images.clone(), labels)

    (a, ta), (b, tb), (c, _) = run(5), run(5), run(6)
    assert torch.equal(a, b) and torch.equal(ta, tb) and not torch.equal(a, c)
    assert ta.shape == (8, 10) and torch.allclose(ta.sum(1), torch.ones(8))  # mixed, smoothed soft targets


@pytest.mark.parametrize("settings, soft", [
    (dict(mixup=0.8, cutmix=1.0, label_smoothing=0.1), True),
    (dict(mixup=0.0, cutmix=0.0, label_smoothing=0.1), False),
    (dict(mixup=0.0, cutmix=0.0, label_smoothing=0.0), False),
])
def test_the_loss_is_cross_entropy_on_the_targets_the_batch_augmentation_gives(settings, soft):
    cfg = AugmentConfig(rand_augment=None, reprob=0.0, **settings)
    torch.manual_seed(0)
    images, labels, logits = torch.randn(8, 3, 16, 16), torch.arange(8) % 10, torch.randn(8, 10)
    mixed, targets = BatchAugment(cfg, num_classes=10, device=torch.device("cpu"))(images.clone(), labels)
    loss = build_criterion(cfg)(logits, targets)
    if soft:  # mixup: soft targets [B, C] with the smoothing inside, and mixed images
        assert targets.shape == (8, 10) and not torch.equal(mixed, images)
        assert targets.sum(-1) == pytest.approx([1.0] * 8) and targets.min() >= 0.1 / 10 - 1e-7  # smoothed
        expected = -(targets * logits.log_softmax(-1)).sum(-1).mean()
    else:  # the labels and images as they came, smoothing in the loss
        assert torch.equal(targets, labels) and torch.equal(mixed, images)
        expected = F.cross_entropy(logits, labels, label_smoothing=settings["label_smoothing"])
    torch.testing.assert_close(loss, expected)


def test_mixup_and_cutmix_take_their_own_settings():
    cfg = AugmentConfig(mixup=0.3, cutmix=0.7, mixup_prob=0.6, mixup_switch_prob=0.2, label_smoothing=0.05)
    mixup = BatchAugment(cfg, num_classes=7, device=torch.device("cpu")).mixup
    assert (mixup.mixup_alpha, mixup.cutmix_alpha, mixup.mix_prob, mixup.switch_prob, mixup.label_smoothing,
            mixup.num_classes) == (0.3, 0.7, 0.6, 0.2, 0.05, 7)


def test_the_global_rngs_are_given_back_as_they_were_after_a_seeded_block():
    random.seed(5)
    np.random.seed(5)
    expected = (random.random(), np.random.rand())
    random.seed(5)
    np.random.seed(5)
    with seeded_global_rngs(1):
        random.random(), np.random.rand()
    assert (random.random(), np.random.rand()) == expected


def test_every_sample_draws_its_rand_augment_from_its_own_seed(monkeypatch):
    seeds = []
    seeded = augment_module.seeded_global_rngs
    monkeypatch.setattr(augment_module, "seeded_global_rngs", lambda seed: (seeds.append(seed), seeded(seed))[1])
    transform = FinetuneTransform(16, [0.5, 1.0], "rand-m9-mstd0.5-inc1", [0.5] * 3)
    data = encode_png(7, size=20)
    for seed in range(6):
        transform(data, random.Random(seed))
    assert len(set(seeds)) == 6


@pytest.mark.skipif(not BUNDLED.exists(), reason="bundled Fashion-MNIST sample missing")
def test_a_fine_tuning_step_trains_on_the_augmented_batch_and_the_stream_applies_rand_augment(tmp_path):
    run = FinetuneRun(demo_config(tmp_path, "run.max_steps=1", "augment.mixup=0.8", "augment.cutmix=1.0",
                                  "augment.rand_augment=rand-m9-mstd0.5-inc1"))
    seen, criterion = [], run.criterion
    run.criterion = lambda logits, targets: (seen.append(targets), criterion(logits, targets))[1]
    run.train()
    assert seen[0].shape == (run.cfg.data.batch_size, 10)  # mixup's soft targets, not the labels
    data = next(read_samples(resolve_shards(str(BUNDLED), "train")[0].url))["png"]
    crops = [train_crop(data, random.Random(seed), size=32, scale=run.cfg.data.crop_scale) for seed in range(4)]
    augmented = [run.stream.transform(data, random.Random(seed)) for seed in range(4)]  # the same crops, then ops
    assert any(not torch.equal(a, c) for a, c in zip(augmented, crops, strict=True))


def test_random_erasing_blanks_one_box_per_image_at_its_probability():
    cfg = AugmentConfig(rand_augment=None, reprob=1.0, mixup=0.0, cutmix=0.0)
    images = torch.zeros(4, 3, 32, 32)
    erased, _ = BatchAugment(cfg, num_classes=10, device=torch.device("cpu"))(images.clone(), torch.arange(4))
    assert all((image != 0).any() for image in erased)  # every image got its box of random pixels
    assert all((image == 0).any() for image in erased)  # and kept pixels outside it


@pytest.mark.parametrize("mode, std", [("finetune", 0.3), ("linprobe", 0.02)])
def test_the_head_is_initialised_with_head_init_std_and_drop_path_reaches_the_blocks(mode, std):
    recipe = "demo_finetune_vit.yaml" if mode == "finetune" else "demo_linprobe_vit.yaml"
    cfg = load_config(FinetuneConfig, ROOT / "recipes" / recipe, [f"model.head_init_std={std}", "model.drop_path=0.2"])
    model = build_classifier(cfg, num_classes=1000)
    linear = model.head if mode == "finetune" else model.head[1]
    assert linear.weight.std().item() == pytest.approx(std, rel=0.05) and not linear.bias.any()
    rates = [getattr(block.drop_path1, "drop_prob", 0.0) for block in model.blocks]
    assert rates == pytest.approx([0.0, 0.2])  # timm's rule: rising linearly with depth to model.drop_path


def demo_config(out: Path, *overrides: str, recipe: str = "demo_finetune_vit.yaml") -> FinetuneConfig:
    base = [f"run.output_dir={out}", "data.num_workers=0", "schedule.epochs=2", "run.log_every=5"]
    return load_config(FinetuneConfig, ROOT / "recipes" / recipe, overridden(base, overrides))


@pytest.mark.skipif(not BUNDLED.exists(), reason="bundled Fashion-MNIST sample missing")
def test_the_head_is_sized_from_the_shards_and_a_different_size_is_warned_about(tmp_path):
    logged = []
    assert resolve_num_classes(demo_config(tmp_path, "model.num_classes=null"), logged.append) == 10
    cfg = demo_config(tmp_path, "model.num_classes=1000")
    assert resolve_num_classes(cfg, logged.append) == 1000
    assert logged == [f"warning: model.num_classes=1000 but {cfg.data.train}/_info.json lists 10 classes; set "
                      "model.num_classes=null to size the head from the shards (the head's last 990 outputs are "
                      "never a target)"]
    with pytest.raises(ShardError, match="model.num_classes=5 but .* lists 10 classes"):  # labels 5-9: no logit
        resolve_num_classes(demo_config(tmp_path, "model.num_classes=5"))

    remote = f"pipe:cat {BUNDLED}/train-{{000000..000001}}.tar.gz"  # sized from data.info, as a directory would be
    cfg = demo_config(tmp_path, f"data.train={remote}", "data.allow_pipe=true", "model.num_classes=null")
    with pytest.raises(ShardError, match="set model.num_classes, or data.info to a local copy"):
        resolve_num_classes(cfg)
    assert resolve_num_classes(demo_config(tmp_path, f"data.train={remote}", "data.allow_pipe=true",
                                           f"data.info={BUNDLED / '_info.json'}", "model.num_classes=null")) == 10


def test_unlabeled_shards_are_refused_before_fine_tuning_even_with_a_class_count(tmp_path):
    write_shards(tmp_path / "shards", [8])
    drop_classes(tmp_path / "shards")
    cfg = demo_config(tmp_path / "run", f"data.train={tmp_path / 'shards'}", "data.val=null", "model.num_classes=3")
    with pytest.raises(ShardError, match=r"finetune needs labeled shards, but .* gives split 'train' \(data.split\) no "
                                         r"classes; make "
                                         "labeled shards"):
        resolve_num_classes(cfg)


@pytest.mark.skipif(not BUNDLED.exists(), reason="bundled Fashion-MNIST sample missing")
def test_an_unlabeled_validation_split_is_refused_before_fine_tuning(tmp_path):
    write_shards(tmp_path / "shards", [8], split="unlabeled")
    write_shards(tmp_path / "shards", [8], split="val")
    info = json.loads((tmp_path / "shards" / "_info.json").read_text())
    info["splits"]["unlabeled"]["labeled"] = False  # as make_shards marks a split of unlabeled images
    (tmp_path / "shards" / "_info.json").write_text(json.dumps(info))
    with pytest.raises(ShardError, match=r"finetune validation needs labeled shards, but .* gives split 'unlabeled' "
                                         r"\(data.val_split\) no classes; set data.val_split to a labeled split "
                                         r"\(val\)"):
        FinetuneRun(demo_config(tmp_path / "run", f"data.val={tmp_path / 'shards'}", "data.val_split=unlabeled"))


@pytest.mark.skipif(not BUNDLED.exists(), reason="bundled Fashion-MNIST sample missing")
def test_stem_norm_refit_on_a_model_without_batchnorm_is_one_error_line(tmp_path, capsys, fresh_accelerate_state):
    from mae_tnt.finetune_cli import run_finetune

    argv = [str(ROOT / "recipes" / "demo_finetune_tnt.yaml"), f"run.output_dir={tmp_path}", "data.num_workers=0",
            "model.bn_reestimate_batches=2"]
    assert run_finetune(argv) == 1
    err = capsys.readouterr().err
    assert err == "error: model.bn_reestimate_batches applies to SReT only, not TNT; set it to 0\n"


@pytest.mark.skipif(not BUNDLED.exists(), reason="bundled Fashion-MNIST sample missing")
def test_validation_shards_labelled_with_other_classes_are_refused_before_fine_tuning(tmp_path):
    write_shards(tmp_path / "shards", [8], split="val")
    info = json.loads((tmp_path / "shards" / "_info.json").read_text())
    (tmp_path / "shards" / "_info.json").write_text(json.dumps({**info, "classes": ["cat", "dog", "emu"]}))
    with pytest.raises(ShardError, match="finetune validation needs train and val shards labelled alike"):
        FinetuneRun(demo_config(tmp_path / "run", f"data.val={tmp_path / 'shards'}"))


@pytest.mark.skipif(not BUNDLED.exists(), reason="bundled Fashion-MNIST sample missing")
def test_validation_that_reads_nothing_is_warned_about_and_refused_not_scored_zero(tmp_path, one_thread):
    failing = "pipe:cat /nonexistent/val-{000000..000001}.tar.gz"  # the command fails for both shards
    run = FinetuneRun(demo_config(tmp_path, "data.allow_pipe=true", f"data.info={BUNDLED}", f"data.val={failing}",
                                  "run.max_steps=1"))
    with pytest.warns(UserWarning, match=r"pipe:cat /nonexistent/val-00000[01].tar.gz broke \(its command exited with "
                                         r"status 1\); its samples after the break are skipped"):
        with pytest.raises(ShardError, match="no labeled sample of pipe:cat .* could be read for validation"):
            run.train()


@pytest.mark.skipif(not BUNDLED.exists(), reason="bundled Fashion-MNIST sample missing")
def test_validation_labels_beyond_the_head_are_refused_naming_the_shards(tmp_path, one_thread):
    write_shards(tmp_path / "two", [64], size=28, num_classes=2)
    write_shards(tmp_path / "ten", [8], split="val", size=28)  # labels 0-7 of 10 classes
    (tmp_path / "loose").mkdir()  # without the _info.json that names its classes, only the labels tell
    (tmp_path / "ten" / "val-000000.tar").rename(tmp_path / "loose" / "val-000000.tar")
    run = FinetuneRun(demo_config(tmp_path / "run", f"data.train={tmp_path / 'two'}", "model.num_classes=null",
                                  f"data.val={tmp_path / 'loose'}/val-000000.tar", "run.max_steps=1"))
    with pytest.raises(ShardError, match=r"val-000000.tar holds label 7, but the head has 2 classes"):
        run.train()


def test_top5_is_left_out_with_five_classes_or_fewer_where_it_is_always_100(tmp_path, capsys, one_thread):
    write_shards(tmp_path / "two", [64], size=28, num_classes=2)
    write_shards(tmp_path / "two", [8], split="val", size=28, num_classes=2)
    FinetuneRun(demo_config(tmp_path / "run", f"data.train={tmp_path / 'two'}", f"data.val={tmp_path / 'two'}",
                            "model.num_classes=null", "run.max_steps=1")).train()
    validated = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert "val_acc1" in validated and "val_acc5" not in validated
    assert re.search(r"epoch [\d.]+: val top-1 [\d.]+; best", capsys.readouterr().out)


@pytest.mark.skipif(not BUNDLED.exists(), reason="bundled Fashion-MNIST sample missing")
@pytest.mark.parametrize("key", ["data.split", "data.val_split"])
def test_a_split_the_shards_lack_is_refused_naming_the_key_and_the_splits(tmp_path, key):
    with pytest.raises(ShardError, match=rf"_info.json has no split 'test'; it has train, val: set {key} to one "
                                         r"of them$"):
        FinetuneRun(demo_config(tmp_path, f"{key}=test"))


@pytest.mark.skipif(not BUNDLED.exists(), reason="bundled Fashion-MNIST sample missing")
def test_a_wrong_init_path_fails_without_leaving_a_run_folder(tmp_path):
    with pytest.raises(CheckpointError, match=f"^init={tmp_path / 'missing'} does not exist: give a pretraining "
                                              "checkpoint, run directory, export or weights file, or init=null"):
        FinetuneRun(demo_config(tmp_path / "run", f"init={tmp_path / 'missing'}"))
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(not BUNDLED.exists(), reason="bundled Fashion-MNIST sample missing")
@pytest.mark.parametrize("resume", ["auto", "none"])
def test_a_fresh_start_moves_nothing_before_its_init_is_known_good(tmp_path, one_thread, resume):
    """A run set aside for an init that then fails, or for an init inside it, would be a run lost to a typo."""
    pretraining = tmp_path / "mae"
    write_mae_checkpoint(pretraining / "checkpoints" / "step_00000001")
    (pretraining / "metrics.jsonl").write_text('{"step": 1}\n')
    def listing() -> list[str]:
        return sorted(str(path) for path in pretraining.rglob("*") if path.name != ".run.lock")

    before = listing()
    init = pretraining / "checkpoints" / "step_00000001"
    with pytest.raises(ConfigError, match=rf"^init={init} lies inside run.output_dir={pretraining}, the run that "
                                          r"this finetune run would resume or, with run.resume=none, set aside; give "
                                          rf"it a directory of its own, e.g. run.output_dir={pretraining}_finetune$"):
        FinetuneRun(demo_config(pretraining, f"init={init}", f"run.resume={resume}"))
    with pytest.raises(CheckpointError, match=r"^init=.*typo does not exist"):
        FinetuneRun(demo_config(pretraining, f"init={tmp_path / 'typo'}", f"run.resume={resume}"))
    assert listing() == before


@pytest.mark.skipif(not BUNDLED.exists(), reason="bundled Fashion-MNIST sample missing")
def test_a_training_checkpoint_builds_its_model_as_trained_unless_told_otherwise(tmp_path, one_thread,
                                                                                  fresh_accelerate_state):
    """TNT's weights do not show its pooling: without the checkpoint's record it would load into token pooling."""
    FinetuneRun(demo_config(tmp_path / "run", "run.max_steps=1", "data.val=null",
                            recipe="demo_finetune_tnt.yaml")).train()
    model = create_model("tnt_test_patch8_32", checkpoint_path=tmp_path / "run")
    assert (model.global_pool, model.num_classes, model.grid * model.unit) == ("avg", 10, 32)
    assert create_model("tnt_test_patch8_32", checkpoint_path=tmp_path / "run", global_pool="token").global_pool \
        == "token"  # the caller's argument wins
    Trainer(load_config(PretrainConfig, ROOT / "recipes" / "demo_mae_tnt.yaml", [
        f"run.output_dir={tmp_path / 'mae'}", "run.max_steps=1", "data.num_workers=0", "model.img_size=48",
        "eval.knn_every=0"])).train()
    assert create_model("mae_tnt_test", checkpoint_path=tmp_path / "mae").grid == 6  # 48 px of 8-px patches
    encoder = create_model("tnt_test_patch8_32", checkpoint_path=tmp_path / "mae")  # TNT's default head: 1000
    assert (encoder.num_classes, encoder.grid) == (0, 6)


@pytest.mark.skipif(not BUNDLED.exists(), reason="bundled Fashion-MNIST sample missing")
def test_compiled_runs_write_the_models_own_keys_which_fine_tuning_and_export_read(tmp_path, one_thread, monkeypatch,
                                                                                  export_tool):
    """torch.compile wraps the model in an OptimizedModule whose keys carry `_orig_mod.`; no file may keep them.
    Dynamo is switched off so the wrapper stays but nothing compiles."""
    monkeypatch.setattr(torch._dynamo.config, "disable", True)
    Trainer(load_config(PretrainConfig, ROOT / "recipes" / "demo_mae_vit.yaml", [
        f"run.output_dir={tmp_path / 'mae'}", "run.max_steps=1", "data.num_workers=0", "eval.knn_every=0",
        "run.compile=true"])).train()
    fine_tune = [f"init={tmp_path / 'mae'}", "run.compile=true", "optim.ema_decay=0.9", "run.checkpoint_every=1"]
    run = FinetuneRun(demo_config(tmp_path / "ft", *fine_tune, "run.max_steps=2"))
    assert type(run.model).__name__ == "OptimizedModule"
    run.train()
    step = tmp_path / "ft" / "checkpoints" / "step_00000002"
    own = set(create_model("vit_test_patch8_32", num_classes=10, global_pool="avg").state_dict())
    for file in (tmp_path / "mae" / "checkpoints" / "step_00000001" / "model.safetensors",
                 step / "model.safetensors", step / "ema.safetensors", tmp_path / "ft" / "best" / "model.safetensors"):
        assert not any(key.startswith("_orig_mod.") for key in load_file(file)), file
    assert set(load_file(step / "model.safetensors")) == own
    assert export_tool.export(tmp_path / "ft", tmp_path / "export")["num_classes"] == 10
    assert FinetuneRun(demo_config(tmp_path / "ft", *fine_tune, "run.max_steps=3")).train()["steps"] == 3  # resumes


def test_resume_refuses_a_pretraining_checkpoint_pointing_to_init_and_a_run_of_another_mode(tmp_path, one_thread):
    write_mae_checkpoint(tmp_path / "mae")
    torch.save({}, tmp_path / "mae" / "optimizer.pt")
    with pytest.raises(ResumeError, match=r"written by model 'mae_vit_test' but this recipe builds "
                                          r"'vit_test_patch8_32'; .*start a new run from it: init=\S+/mae with "
                                          r"a run.output_dir of its own \(and run.resume=auto\)$"):
        FinetuneRun(demo_config(tmp_path / "run", f"run.resume={tmp_path / 'mae'}"))
    FinetuneRun(demo_config(tmp_path / "run", "run.max_steps=1", "data.val=null")).train()
    with pytest.raises(ResumeError, match=r"written with mode=finetune but this recipe runs mode=linprobe"):
        FinetuneRun(demo_config(tmp_path / "run", recipe="demo_linprobe_vit.yaml"))


@pytest.mark.skipif(not BUNDLED.exists(), reason="bundled Fashion-MNIST sample missing")
def test_a_run_without_validation_ends_saying_so_and_where_its_weights_are(tmp_path, capsys, one_thread,
                                                                           fresh_accelerate_state):
    from mae_tnt.finetune_cli import run_finetune

    argv = [str(ROOT / "recipes" / "demo_finetune_vit.yaml"), f"run.output_dir={tmp_path}", "data.num_workers=0",
            "data.val=null", "run.max_steps=2"]
    assert run_finetune(argv) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert last == f"done: 2 steps, not validated yet (data.val is null); outputs in {tmp_path}/checkpoints"
    assert (tmp_path / "checkpoints" / "step_00000002" / "model.safetensors").exists()
    assert run_finetune(argv[:-2] + ["run.max_steps=1", "run.resume=auto"]) == 0  # already past it: nothing to do
    output = capsys.readouterr().out
    assert "note: step_00000002 is at or past this run's last step 1 (run.max_steps, schedule.epochs): nothing is " \
           "left to train" in output
    last = output.splitlines()[-1]
    assert last == (f"done: 2 steps, not validated yet (validation runs at the end of each epoch); outputs in "
                    f"{tmp_path}/checkpoints")


def test_evaluations_at_epoch_ends_are_labelled_with_the_epoch_when_accumulation_splits_a_step(tmp_path, one_thread):
    write_shards(tmp_path / "shards", [40], size=32)
    write_shards(tmp_path / "shards", [8], split="val", size=32)
    # 10 batches an epoch, 4 per optimizer step: the first epoch ends 2 micro-batches into step 3.
    shards = tmp_path / "shards"
    run = FinetuneRun(demo_config(tmp_path / "run", f"data.train={shards}", f"data.val={shards}", "data.batch_size=4",
                                  "optim.accum_steps=4", "schedule.epochs=2", "schedule.warmup_epochs=0"))
    summary = run.train()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["epoch"]) for r in rows if "val_acc1" in r] == [(2, 1), (5, 2)]
    assert summary["best"]["epoch"] in (1, 2)


@pytest.mark.skipif(not BUNDLED.exists(), reason="bundled Fashion-MNIST sample missing")
def test_demo_finetune_beats_chance_and_resumes_exactly(tmp_path, one_thread):
    full = FinetuneRun(demo_config(tmp_path / "full")).train()
    assert full["steps"] == 62 and full["best"]["val_acc1"] > 25.0  # 10 classes: chance is 10 %
    assert (tmp_path / "full" / "best" / "model.safetensors").exists()
    rows = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if "val_acc5" in r] == [1.0, 2.0]
    assert all(r["skipped_samples"] == 0 for r in rows if "loss" in r)

    FinetuneRun(demo_config(tmp_path / "split", "run.max_steps=31")).train()
    resumed = FinetuneRun(demo_config(tmp_path / "split")).train()
    assert resumed["steps"] == 62
    final = [load_file(p / "checkpoints" / "step_00000062" / "model.safetensors") for p in
             (tmp_path / "full", tmp_path / "split")]
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])


@pytest.mark.skipif(not BUNDLED.exists(), reason="bundled Fashion-MNIST sample missing")
def test_resuming_from_before_the_best_weights_sets_them_aside_with_the_later_checkpoints(tmp_path, one_thread,
                                                                                          capsys):
    """best/ of the continuation set aside held weights this one never had, which the best record of the checkpoint
    resumed from (validated at epoch 1) did not describe; export would have taken them as this run's best."""
    overrides = ["run.checkpoint_every=16", "run.keep_checkpoints=8"]
    FinetuneRun(demo_config(tmp_path, *overrides)).train()
    first_best = json.loads((tmp_path / "best" / "state.json").read_text())
    assert first_best["step"] == 62  # the premise: epoch 2 validates better than epoch 1
    epoch_1 = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
               if '"val_acc1"' in line][0]

    cut = FinetuneRun(demo_config(tmp_path, *overrides, "run.max_steps=56",
                                  f"run.resume={tmp_path / 'checkpoints' / 'step_00000048'}"))
    (aside,) = tmp_path.glob("superseded/*")
    assert sorted(p.name for p in aside.iterdir()) == ["best", "metrics.jsonl", "step_00000062"]
    assert cut.best == {}  # not the record of step 31, which a worse validation would have kept without best/
    shown = capsys.readouterr().out
    assert (f"warning: best/ held step 62, past this continuation; the best weights up to step 48 (val top-1 "
            f"{epoch_1['val_acc1']:.2f} at step 31) are gone with it" in shown)
    assert "moved what later steps wrote (step_00000062, best), with their metrics rows, to" in shown  # no grids
    cut.train()  # the stop validates
    assert json.loads((tmp_path / "best" / "state.json").read_text())["step"] == cut.best["step"] == 56

    FinetuneRun(demo_config(tmp_path, *overrides)).train()  # the same weights again at step 62: the resume is exact
    assert json.loads((tmp_path / "best" / "state.json").read_text())["best"] == first_best["best"]
    again, before = (load_file(path / "model.safetensors") for path in (tmp_path / "best", aside / "best"))
    assert all(torch.equal(again[k], before[k]) for k in before)


@pytest.mark.skipif(not BUNDLED.exists(), reason="bundled Fashion-MNIST sample missing")
def test_continuing_another_runs_checkpoint_sets_the_run_in_this_directory_aside_whole(tmp_path, one_thread, capsys):
    """Its metrics rows and best/ are no past of the continuation: keeping as many rows as the other run had dropped
    the rest, and the best record of the other run named weights this directory does not hold."""
    FinetuneRun(demo_config(tmp_path / "a", "run.max_steps=31")).train()  # validates at the end of epoch 1
    FinetuneRun(demo_config(tmp_path / "b", "run.max_steps=20", "run.log_every=1")).train()
    rows_of_b = (tmp_path / "b" / "metrics.jsonl").read_text()
    capsys.readouterr()
    continued = FinetuneRun(demo_config(tmp_path / "b", "run.max_steps=36", f"run.resume={tmp_path / 'a'}"))
    (aside,) = (tmp_path / "b").glob("superseded/*")
    assert (aside / "metrics.jsonl").read_text() == rows_of_b and best_weights_step(aside) == 20
    shown = capsys.readouterr().out
    assert (f"warning: run.resume={tmp_path / 'a'} continues another run: moved the previous run in {tmp_path / 'b'} "
            f"to {aside}") in shown
    assert f"at step 31) are in {tmp_path / 'a' / 'best'}; this run's best/ starts at its next validation" in shown
    continued.train()
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps and min(steps) > 31 and best_weights_step(tmp_path / "b") == 36


@pytest.mark.skipif(not BUNDLED.exists(), reason="bundled Fashion-MNIST sample missing")
def test_an_epoch_that_ends_inside_an_accumulation_is_checkpointed_where_a_resume_is_exact(tmp_path, one_thread):
    """31 batches per epoch at 2 per optimizer step: epoch 1 ends a batch into step 16, so its checkpoint is step 16,
    not step 15 with a half-accumulated gradient that resuming would lose (and then accumulate out of step)."""
    overrides = ["optim.accum_steps=2", "run.max_steps=18", "run.keep_checkpoints=2", "data.val=null"]
    full = FinetuneRun(demo_config(tmp_path / "full", *overrides))
    assert full.plan.steps_per_epoch == 15.5
    full.train()
    assert [p.name for p in find_checkpoints(tmp_path / "full")] == ["step_00000018", "step_00000016"]
    FinetuneRun(demo_config(tmp_path / "split", *overrides)).train()
    shutil.rmtree(tmp_path / "split" / "checkpoints" / "step_00000018")  # as if killed after step 16 was saved
    assert FinetuneRun(demo_config(tmp_path / "split", *overrides)).train()["steps"] == 18
    final = [load_file(p / "checkpoints" / "step_00000018" / "model.safetensors") for p in
             (tmp_path / "full", tmp_path / "split")]
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])


@pytest.mark.skipif(not BUNDLED.exists(), reason="bundled Fashion-MNIST sample missing")
def test_a_validation_logged_after_the_checkpoint_of_its_step_is_logged_once_when_the_run_resumes(tmp_path,
                                                                                                  one_thread):
    """Epoch 1 ends a batch into step 16 and is validated at step 15, after step 15's checkpoint. A run killed
    before step 16 is saved validates that epoch again when it resumes from step 15: the row must not be doubled."""
    overrides = ["optim.accum_steps=2", "run.max_steps=16", "run.checkpoint_every=15", "run.keep_checkpoints=2",
                 "run.log_every=100"]
    FinetuneRun(demo_config(tmp_path / "full", *overrides)).train()
    FinetuneRun(demo_config(tmp_path / "cut", *overrides)).train()
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step_00000016")  # killed before step 16 was saved ...
    metrics = tmp_path / "cut" / "metrics.jsonl"
    written = [line for line in metrics.read_text().splitlines() if json.loads(line)["step"] <= 15]
    metrics.write_text("".join(line + "\n" for line in written))  # ... with the validation at step 15 written
    FinetuneRun(demo_config(tmp_path / "cut", *overrides)).train()

    def validations(run: Path) -> list[tuple]:
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [(row["step"], row["epoch"], row["val_acc1"]) for row in rows if "val_acc1" in row]

    assert [row[:2] for row in validations(tmp_path / "full")] == [(15, 1), (16, round(16 / 15.5, 4))]
    assert validations(tmp_path / "cut") == validations(tmp_path / "full")


@pytest.mark.skipif(not BUNDLED.exists(), reason="bundled Fashion-MNIST sample missing")
@pytest.mark.parametrize("mae_name, overrides", [
    ("mae_vit_test", []),
    # The README's overrides that probe the SReT demo encoder: its stem BatchNorm is refit once, then stays frozen
    ("mae_sret_test", ["model.name=sret_test", "model.img_size=64", "model.global_pool=null",
                       "model.bn_reestimate_batches=2"]),
])
def test_linear_probe_trains_only_the_head_and_keeps_the_encoder_in_eval_mode(tmp_path, one_thread, capsys, mae_name,
                                                                            overrides):
    mae_state = write_mae_checkpoint(tmp_path / "ckpt", mae_name)
    run = FinetuneRun(demo_config(tmp_path / "probe", f"init={tmp_path / 'ckpt'}", "run.max_steps=3", *overrides,
                                  recipe="demo_linprobe_vit.yaml"))
    name = run.cfg.model.name
    out = capsys.readouterr().out
    assert f"linprobe {name} (10 classes, 330 parameters trainable)" in out and "note:" not in out
    if name == "sret_test":
        refit = run.unwrapped.patch_embed.bn1.running_mean
        assert not torch.equal(refit, mae_state["encoder.patch_embed.bn1.running_mean"])
    before = {k: v.clone() for k, v in run.unwrapped.state_dict().items()}
    run.set_train_mode()
    assert not run.unwrapped.patch_embed.training and run.unwrapped.head.training
    run.train()
    after = run.unwrapped.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"head.0.running_mean", "head.0.running_var", "head.0.num_batches_tracked", "head.1.weight",
                       "head.1.bias"}


def test_the_sret_stem_statistics_are_refit_on_real_images_only(tmp_path):
    from mae_tnt.data.loader import eval_batches
    from mae_tnt.data.transforms import normalize
    from mae_tnt.models.sret import reestimate_batchnorm
    from mae_tnt.train.finetune import refit_stem_norms

    write_shards(tmp_path / "shards", [6], size=64, corrupt=frozenset({1, 2}))
    cfg = demo_config(tmp_path / "run", f"data.train={tmp_path / 'shards'}", "data.batch_size=4",
                      "model.bn_reestimate_batches=5", recipe="demo_finetune_sret.yaml")
    refit = create_model("sret_test", num_classes=10)
    reference = copy.deepcopy(refit)
    logged = []
    refit_stem_norms(refit, cfg, torch.device("cpu"), logged.append)
    # Batch 1 holds samples 0 and 3 (1 and 2 do not decode), batch 2 samples 4 and 5 then two rows of padding.
    images = next(eval_batches(resolve_shards(str(tmp_path / "shards")), 64, 6))[0]
    good = [normalize(images[rows], cfg.data.mean, cfg.data.std) for rows in ([0, 1], [2, 3])]
    assert reestimate_batchnorm(reference, good) == 4
    assert logged[0].startswith("init: re-estimated the stem BatchNorm statistics on 4 whole 64-px train images")
    for key, value in reference.patch_embed.state_dict().items():
        torch.testing.assert_close(refit.patch_embed.state_dict()[key], value)


@pytest.mark.skipif(not BUNDLED.exists(), reason="bundled Fashion-MNIST sample missing")
@pytest.mark.parametrize("family, mae_name", [("tnt", "mae_tnt_test"), ("sret", "mae_sret_test")])
def test_tnt_and_sret_demo_recipes_fine_tune_from_an_mae_checkpoint(tmp_path, one_thread, capsys, family, mae_name):
    mae_state = write_mae_checkpoint(tmp_path / "ckpt", mae_name)
    run = FinetuneRun(demo_config(tmp_path / "run", f"init={tmp_path / 'ckpt'}", "run.max_steps=2",
                                  recipe=f"demo_finetune_{family}.yaml"))
    if family == "sret":  # the stem statistics were refit on whole images, everything else came from the checkpoint
        stem_mean = run.unwrapped.patch_embed.bn1.running_mean
        assert not torch.equal(stem_mean.cpu(), mae_state["encoder.patch_embed.bn1.running_mean"])
        assert ("init: re-estimated the stem BatchNorm statistics on 640 whole 64-px train images "
                "(model.bn_reestimate_batches=10)") in capsys.readouterr().out
    summary = run.train()
    assert summary["steps"] == 2 and 0.0 <= summary["best"]["val_acc1"] <= 100.0


@pytest.mark.parametrize("batches, source, noted", [
    (0, "ckpt", True), (10, "ckpt", False), (0, "export", True), (0, "finetuned", False),
])
def test_sret_from_an_mae_checkpoint_or_its_export_without_norm_refit_gets_a_note(tmp_path, capsys, batches, source,
                                                                                    noted):
    from mae_tnt.export import export

    write_mae_checkpoint(tmp_path / "ckpt", "mae_sret_test")
    export(tmp_path / "ckpt", tmp_path / "export", model_name="sret_test")  # the encoder, decoder left out
    finetuned = tmp_path / "finetuned" / "model.safetensors"  # a fine-tune's weights: statistics of whole images
    finetuned.parent.mkdir()
    save_file(classifier("sret_test").state_dict(), finetuned)
    cfg = demo_config(tmp_path / "run", f"init={tmp_path / source}", f"model.bn_reestimate_batches={batches}",
                      recipe="demo_finetune_sret.yaml")
    build_classifier(cfg, num_classes=10)
    note = "note: the stem BatchNorm statistics come from MAE pretraining, which showed the stem 32-px crops"
    assert (note in capsys.readouterr().out) == noted


@pytest.mark.skipif(not BUNDLED.exists(), reason="bundled Fashion-MNIST sample missing")
def test_ema_weights_are_evaluated_and_checkpointed(tmp_path, one_thread, capsys):
    summary = FinetuneRun(demo_config(tmp_path, "optim.ema_decay=0.9", "run.max_steps=2")).train()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert "ema_val_acc1" in rows[-1] and summary["best"]["weights"] in ("model", "ema")
    assert (tmp_path / "checkpoints" / "step_00000002" / "ema.safetensors").exists()
    capsys.readouterr()
    for decay, shown in (("0.5", "0.5"), ("null", "None")):  # a resume says that the EMA changes, or stops
        run = FinetuneRun(demo_config(tmp_path, f"optim.ema_decay={decay}", "run.max_steps=3"))
        assert (run.ema.decay if run.ema else None) == (0.5 if decay == "0.5" else None)
        assert f"note: optim.ema_decay 0.9 -> {shown} since step_00000002" in capsys.readouterr().out


@pytest.mark.skipif(not BUNDLED.exists(), reason="bundled Fashion-MNIST sample missing")
def test_the_ema_averages_the_weights_of_every_step_and_a_resumed_run_continues_it_exactly(tmp_path, one_thread):
    run = FinetuneRun(demo_config(tmp_path / "full", "optim.ema_decay=0.5", "run.max_steps=4", "data.val=null"))
    weights, update = [], run.ema.update

    def recording(model, step):
        weights.append({key: value.clone() for key, value in model.state_dict().items()})
        update(model, step=step)

    run.ema.update = recording
    run.train()
    expected = weights[0]  # the first update copies the weights, each later one moves halfway to them
    for later in weights[1:]:
        expected = {key: 0.5 * expected[key] + 0.5 * later[key] for key in expected}
    ema = load_file(tmp_path / "full" / "checkpoints" / "step_00000004" / "ema.safetensors")
    assert len(weights) == 4 and not torch.equal(ema["head.weight"], weights[-1]["head.weight"])
    for key, value in ema.items():
        torch.testing.assert_close(value, expected[key], rtol=1e-6, atol=1e-7)
    for max_steps in (2, 4):  # interrupted at step 2, then continued
        FinetuneRun(demo_config(tmp_path / "cut", "optim.ema_decay=0.5", f"run.max_steps={max_steps}",
                                "data.val=null")).train()
    resumed = load_file(tmp_path / "cut" / "checkpoints" / "step_00000004" / "ema.safetensors")
    assert all(torch.equal(resumed[key], ema[key]) for key in ema)


@pytest.mark.skipif(not BUNDLED.exists(), reason="bundled Fashion-MNIST sample missing")
def test_a_best_model_that_cannot_be_written_is_named_and_leaves_no_partial_copy(tmp_path, one_thread, monkeypatch):
    import mae_tnt.train.finetune as finetune_module

    def full_disk(state_dict, path, *args, **kwargs):
        Path(path).write_bytes(b"the start of a file")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(finetune_module, "save_weights", full_disk)
    best = re.escape(str(tmp_path / "best"))
    with pytest.raises(CheckpointWriteError, match=rf"^could not write {best} \(\[Errno 28\] No space left on device"):
        FinetuneRun(demo_config(tmp_path, "run.max_steps=2")).train()
    assert not (tmp_path / ".tmp-best").exists() and not (tmp_path / "best").exists()


@pytest.mark.skipif(not BUNDLED.exists(), reason="bundled Fashion-MNIST sample missing")
def test_the_run_that_continues_puts_back_a_best_model_left_aside_by_a_stop_while_it_was_replaced(tmp_path,
                                                                                                  one_thread):
    FinetuneRun(demo_config(tmp_path, "run.max_steps=2")).train()
    os.replace(tmp_path / "best", aside_name(tmp_path / "best"))  # stopped between replace_dir's renames
    FinetuneRun(demo_config(tmp_path, "run.max_steps=2"))
    assert best_weights_step(tmp_path) == 2 and not aside_name(tmp_path / "best").exists()


@pytest.mark.skipif(not BUNDLED.exists(), reason="bundled Fashion-MNIST sample missing")
def test_non_finite_loss_stops_before_the_next_checkpoint(tmp_path, one_thread):
    run = FinetuneRun(demo_config(tmp_path, "run.checkpoint_every=4", "run.log_every=100"))
    criterion, calls = run.criterion, {"n": 0}

    def poisoned(logits, targets):
        calls["n"] += 1
        loss = criterion(logits, targets)
        return loss * float("nan") if calls["n"] == 6 else loss

    run.criterion = poisoned
    with pytest.raises(NonFiniteLossError, match=r"micro-step 5 \(optimizer step 6\)"):
        run.train()
    assert [p.name for p in find_checkpoints(tmp_path)] == ["step_00000004"]


@pytest.mark.skipif(not BUNDLED.exists(), reason="bundled Fashion-MNIST sample missing")
def test_an_epoch_ending_on_a_checkpoint_step_is_saved_once_with_its_evaluation(tmp_path, one_thread, capsys):
    FinetuneRun(demo_config(tmp_path, "run.checkpoint_every=31", "run.max_steps=32",
                             "run.keep_checkpoints=2")).train()  # 31 steps per epoch
    saves = [line for line in capsys.readouterr().out.splitlines() if line.startswith("saved checkpoint")]
    assert [Path(line.split()[-1]).name for line in saves] == ["step_00000031", "step_00000032"]
    state = json.loads((tmp_path / "checkpoints" / "step_00000031" / "state.json").read_text())
    assert state["best"]["epoch"] == 1.0  # saved after the epoch's evaluation


@pytest.mark.skipif(not BUNDLED.exists(), reason="bundled Fashion-MNIST sample missing")
def test_img_per_s_leaves_out_the_time_spent_evaluating_and_saving(tmp_path, one_thread, monkeypatch):
    """A clock that advances 1 ms per reading, and an hour at every evaluation and checkpoint (31 steps per epoch):
    the rates must not see the hours."""
    import mae_tnt.train.loop as loop

    ticks, offset = itertools.count(step=1e-3), [0.0]
    monkeypatch.setattr(loop, "time", SimpleNamespace(perf_counter=lambda: next(ticks) + offset[0]))
    run = FinetuneRun(demo_config(tmp_path, "run.checkpoint_every=10", "run.max_steps=33", "run.log_every=1"))

    def an_hour_then(method):
        def slow(*args):
            offset[0] += 3600
            return method(*args)
        return slow

    monkeypatch.setattr(run, "save", an_hour_then(run.save))
    monkeypatch.setattr(run, "evaluate", an_hour_then(run.evaluate))
    run.train()
    rates = [json.loads(line)["img_per_s"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in line]
    assert len(rates) == 33 and min(rates) > 100, rates


@pytest.mark.skipif(not BUNDLED.exists(), reason="bundled Fashion-MNIST sample missing")
def test_config_yaml_records_the_checkpoint_init_stood_for_and_a_resume_refuses_another_init(tmp_path, one_thread):
    mae_run = tmp_path / "mae"
    write_mae_checkpoint(mae_run / "checkpoints" / "step_00000001")

    def recorded() -> str:
        return yaml.safe_load((tmp_path / "ft" / "config.yaml").read_text())["init"]

    given = demo_config(tmp_path / "ft", f"init={mae_run}", "run.max_steps=1")
    FinetuneRun(given).train()
    assert recorded() == str(mae_run / "checkpoints" / "step_00000001")
    assert given.init == str(mae_run)  # the caller's config is not rewritten (a notebook may run it again)
    write_mae_checkpoint(mae_run / "checkpoints" / "step_00000002")  # the pretraining run went on meanwhile
    FinetuneRun(demo_config(tmp_path / "ft", f"init={mae_run}", "run.max_steps=2")).train()
    assert recorded() == str(mae_run / "checkpoints" / "step_00000001")  # the resumed run started from step 1
    FinetuneRun(demo_config(tmp_path / "ft", f"init={mae_run / 'checkpoints'}", "run.max_steps=3")).train()
    assert recorded() == str(mae_run / "checkpoints" / "step_00000001")  # the run's checkpoints folder names it too
    assert resolve_checkpoint(mae_run / "checkpoints") == mae_run / "checkpoints" / "step_00000002"
    for other in (mae_run / "checkpoints" / "step_00000002", None):  # newer weights, or none: another run
        wanted = re.escape(f"init={other}" if other else "random initialisation (init=null)")
        with pytest.raises(ResumeError, match=rf"run.output_dir holds a run started from init="
                                              rf"{mae_run / 'checkpoints' / 'step_00000001'}, which resuming would "
                                              rf"continue rather than start from {wanted}: to start from "
                                              rf"{wanted}, use another run.output_dir, or run.resume=none"):
            FinetuneRun(demo_config(tmp_path / "ft", f"init={other or 'null'}", "run.max_steps=4"))


def test_only_a_run_or_its_checkpoints_folder_stands_for_its_newest_checkpoint(tmp_path):
    """Other folders of step_* entries (grids, set-aside continuations) are paths like any other."""
    run = tmp_path / "run"
    for step in (2, 4):
        (run / "checkpoints" / f"step_0000000{step}").mkdir(parents=True)
    (run / "checkpoints" / "step_00000009.txt").write_text("a file, not a checkpoint")
    (run / "recon").mkdir()
    (run / "recon" / "step_00000004.png").write_bytes(b"")
    (run / "superseded" / "t" / "step_00000009").mkdir(parents=True)
    newest = run / "checkpoints" / "step_00000004"
    assert resolve_checkpoint(run) == resolve_checkpoint(run / "checkpoints") == newest
    for other in (run / "recon", run / "superseded" / "t", newest):
        assert resolve_checkpoint(other) == other
    (tmp_path / "new" / "checkpoints").mkdir(parents=True)
    for empty in (tmp_path / "new", tmp_path / "new" / "checkpoints"):
        with pytest.raises(CheckpointError, match=f"run directory {tmp_path / 'new'} has no checkpoints yet"):
            resolve_checkpoint(empty)
    for given in (run, run / "checkpoints"):  # both name the checkpoint a resumed run started from
        assert recorded_init(str(given), {"config": {"init": str(newest)}}) == str(newest)
    with pytest.raises(ResumeError, match="started from init=.*best, which resuming would continue"):
        recorded_init(str(run), {"config": {"init": str(run / "best")}})  # the run stands for its newest, not best/


def test_the_knn_bank_caps_former_key_points_to_knn_max_train():
    with pytest.raises(UnknownKeyError, match=r"unknown config key `data.knn_max_train`; did you mean `knn.max_train`"):
        load_config(FinetuneConfig, ROOT / "recipes" / "demo_knn_vit.yaml", ["data.knn_max_train=5"])


def test_sret_takes_the_fine_tuning_default_pooling_and_refuses_a_class_token(tmp_path):
    """Fine-tuning's `model.global_pool` defaults to avg, which is what SReT does: a SReT recipe need not set it."""
    cfg = load_config(FinetuneConfig, ROOT / "recipes" / "demo_finetune_sret.yaml",
                      [f"run.output_dir={tmp_path}", "model.global_pool=avg"])
    assert build_classifier(cfg, num_classes=10, log=lambda line: None).global_pool == "avg"
    with pytest.raises(ModelError, match="SReT averages its tokens and has no class token"):
        create_model("sret_test", global_pool="token")


@pytest.mark.skipif(not BUNDLED.exists(), reason="bundled Fashion-MNIST sample missing")
def test_a_resume_with_a_longer_schedule_says_the_lr_follows_the_new_one(tmp_path, one_thread, capsys):
    FinetuneRun(demo_config(tmp_path, "run.max_steps=1", "data.val=null")).train()
    capsys.readouterr()
    FinetuneRun(demo_config(tmp_path, "run.max_steps=2", "data.val=null", "schedule.epochs=3"))
    assert ("note: schedule.epochs 2.0 -> 3.0; total_steps 62 -> 93 since step_00000001: the LR follows the schedule "
            "of the new settings from this step on, so it may jump") in capsys.readouterr().out


@pytest.mark.skipif(not BUNDLED.exists(), reason="bundled Fashion-MNIST sample missing")
def test_a_resume_with_other_augmentations_says_the_loss_may_jump(tmp_path, one_thread, capsys):
    FinetuneRun(demo_config(tmp_path, "run.max_steps=1", "data.val=null")).train()
    trained_with = (tmp_path / "config.yaml").read_text()
    FinetuneRun(demo_config(tmp_path, "run.max_steps=1", "data.val=null", "augment.reprob=0.5"))
    assert (tmp_path / "config.yaml").read_text() == trained_with  # nothing left to train: no step used 0.5
    capsys.readouterr()
    FinetuneRun(demo_config(tmp_path, "run.max_steps=2", "data.val=null", "augment.reprob=0.5"))
    assert ("note: augment.reprob 0.25 -> 0.5 since step_00000001: training goes on under the new setting from this "
            "step on, so the loss may jump") in capsys.readouterr().out
    assert "reprob: 0.5" in (tmp_path / "config.yaml").read_text()


@pytest.mark.skipif(not BUNDLED.exists(), reason="bundled Fashion-MNIST sample missing")
def test_a_resume_applies_new_optimizer_settings_and_says_so(tmp_path, one_thread, capsys):
    """Loading the optimizer's state would otherwise bring back the checkpoint's weight decay, betas and scales."""
    FinetuneRun(demo_config(tmp_path, "run.max_steps=1", "data.val=null")).train()
    capsys.readouterr()
    run = FinetuneRun(demo_config(tmp_path, "run.max_steps=2", "data.val=null", "optim.layer_decay=0.5",
                                  "optim.weight_decay=0.2", "optim.betas=[0.8,0.9]"))
    assert run.step == 1 and run.optimizer.state  # the moments were restored
    groups = run.optimizer.param_groups
    assert {g["weight_decay"] for g in groups} == {0.0, 0.2} and {tuple(g["betas"]) for g in groups} == {(0.8, 0.9)}
    assert sorted({g["lr_scale"] for g in groups}) == [0.125, 0.25, 0.5, 1.0]  # depth 2 at 0.5, not 0.75
    assert ("note: optim.weight_decay 0.05 -> 0.2; optim.betas [0.9, 0.999] -> [0.8, 0.9]; optim.layer_decay 0.75 -> "
            "0.5 since step_00000001: the new settings apply from this step on") in capsys.readouterr().out


@pytest.mark.skipif(not BUNDLED.exists(), reason="bundled Fashion-MNIST sample missing")
def test_a_resume_refuses_another_optimizer_or_other_parameter_groups(tmp_path, one_thread):
    FinetuneRun(demo_config(tmp_path, "run.max_steps=1", "data.val=null")).train()
    with pytest.raises(ResumeError, match=r"trained with optim.name=adamw, whose state does not carry over to "
                                          r"optim.name=lars; set it back to continue"):
        FinetuneRun(demo_config(tmp_path, "optim.name=lars", "optim.layer_decay=null"))
    with pytest.raises(ResumeError, match=r"holds optimizer state for other parameter groups than this recipe's "
                                          r"\(.*\); set optim.layer_decay and what the model trains back to continue "
                                          r"it \(a pretraining checkpoint from a development build .* cannot "
                                          r"continue\), "
                                          r"or use another run.output_dir"):
        FinetuneRun(demo_config(tmp_path, "optim.layer_decay=null"))


@pytest.mark.skipif(not BUNDLED.exists(), reason="bundled Fashion-MNIST sample missing")
def test_checkpoints_and_exports_name_the_heads_classes(tmp_path, one_thread, export_tool):
    FinetuneRun(demo_config(tmp_path / "run", "run.max_steps=1", "data.val=null")).train()
    classes = json.loads((BUNDLED / "_info.json").read_text())["classes"]
    state = json.loads((tmp_path / "run" / "checkpoints" / "step_00000001" / "state.json").read_text())
    assert state["label_names"] == classes and len(classes) == 10
    assert export_tool.export(tmp_path / "run", tmp_path / "export")["label_names"] == classes
    assert FinetuneRun(demo_config(tmp_path / "wide", "model.num_classes=12")).class_names is None  # not the head's


def test_resuming_from_weights_alone_says_what_continues_the_run_and_what_starts_from_them(tmp_path, one_thread,
                                                                                          export_tool):
    """best/ and an export hold no optimizer state or data position: refused before anything is written, naming
    the run.resume that continues the run and the init= that starts a new one from the weights."""
    run = tmp_path / "run"
    FinetuneRun(demo_config(run, "run.max_steps=1")).train()  # validates at its stop step, which writes best/
    export_tool.export(run, tmp_path / "export")
    expected = {run / "best": rf"is the best weights of the fine-tuning run {run}, weights without the optimizer "
                              rf"state and data position a resume needs: give run.resume={run} to continue that run "
                              rf"from its newest checkpoint, or init={run / 'best'} to fine-tune",
                tmp_path / "export": rf"is an export \(tools/export.py\), weights without .* give the directory of "
                                     rf"the run it came from, or one of its checkpoints \(step_\*\), to continue "
                                     rf"that run, or init={tmp_path / 'export'} to fine-tune from these weights"}
    for weights, message in expected.items():
        with pytest.raises(ResumeError, match=rf"^run.resume={weights} {message}"):
            FinetuneRun(demo_config(tmp_path / "new", f"run.resume={weights}"))
        assert not (tmp_path / "new").exists()
        assert FinetuneRun(demo_config(tmp_path / "from", f"init={weights}", "run.resume=none")).step == 0


@pytest.mark.parametrize("argv, message", [
    (["demo", "runs/x", "--finetune-epochs", "1", "--workers", "2"],
     "demo runs the demo recipes as they are and takes only --out, --data and --threads, not --finetune-epochs, "
     "--workers (for the experiment)"),
    (["demo", "runs/x"], "runs/x does not exist: give a pretraining run or checkpoint directory"),
    (["demo", "RUN"], "RUN has no checkpoint yet: let its pretraining run to its first one"),
    (["demo", "RUN/checkpoints", "--data", "nowhere"], "--data nowhere does not exist: give labeled shards"),
    (["experiment", "runs/x"], "experiment pretrains its own encoders and takes no checkpoint; for the downstream runs "
                               "of runs/x, run: demo runs/x"),
])
def test_the_experiment_tool_refuses_arguments_it_would_ignore_or_could_not_use(tmp_path, capsys, argv, message):
    (tmp_path / "RUN" / "checkpoints").mkdir(parents=True)  # a pretraining stopped before its first checkpoint
    argv = [arg.replace("RUN", str(tmp_path / "RUN")) for arg in argv]
    with pytest.raises(SystemExit) as done:
        load_tool("experiment_fashion").main(argv)
    assert done.value.code == 2 and message.replace("RUN", str(tmp_path / "RUN")) in capsys.readouterr().err


def test_a_failing_stage_of_the_experiment_tool_is_one_error_with_its_last_output(tmp_path, capsys, monkeypatch):
    tool = load_tool("experiment_fashion")
    out = tmp_path / "stage"
    with pytest.raises(tool.StageError, match=r"failed, ending with:\n  .*error: .*\nthe whole output is in "):
        tool.run_stage("finetune.py", "demo_knn_vit.yaml", [f"init={tmp_path / 'none'}"], out, threads=1)
    assert "error: " in (out / "log.txt").read_text()

    def failing_stage(*args, **kwargs):
        raise tool.StageError("the kNN stage failed")

    monkeypatch.setattr(tool, "run_stage", failing_stage)
    assert tool.main(["demo", str(tmp_path)]) == 1  # no traceback
    assert capsys.readouterr().err == "error: the kNN stage failed\n"


@pytest.mark.parametrize("mode, feature", [("knn", "kNN feature"), ("linprobe", "feature the probe reads")])
@pytest.mark.parametrize("pool, noted", [("avg", True), ("token", False)])
def test_frozen_features_with_average_pooling_note_that_their_norm_is_fresh(tmp_path, mode, feature, pool, noted):
    write_mae_checkpoint(tmp_path / "ckpt")
    cfg = load_config(FinetuneConfig, ROOT / "recipes" / f"demo_{mode}_vit.yaml",
                      [f"init={tmp_path / 'ckpt'}", f"model.global_pool={pool}"])
    logged = []
    build_classifier(cfg, num_classes=0 if mode == "knn" else 10, log=logged.append)
    assert any(line.startswith(f"note: with model.global_pool=avg the {feature} is the mean token through a fresh "
                               f"fc_norm, not the checkpoint's final norm; model.global_pool=token gives the "
                               f"pretrained feature (as demo_{mode}_vit.yaml)") for line in logged) == noted


def test_a_knn_evaluation_into_a_training_runs_directory_is_refused_before_evaluating(tmp_path):
    write_mae_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000003")
    cfg = load_config(FinetuneConfig, ROOT / "recipes" / "demo_knn_vit.yaml",
                      [f"init={tmp_path / 'run'}", f"run.output_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match=rf"run.output_dir={tmp_path / 'run'} holds a training run "
                                          r"\(checkpoints/\), which a kNN evaluation would set aside; "
                                          rf".*run.output_dir={tmp_path}/run_knn"):
        finetune(cfg)
    assert sorted(path.name for path in (tmp_path / "run").iterdir()) == ["checkpoints"]  # nothing set aside


@pytest.mark.skipif(not BUNDLED.exists(), reason="bundled Fashion-MNIST sample missing")
def test_a_training_run_into_a_knn_evaluations_directory_sets_the_evaluation_aside(tmp_path, one_thread, capsys):
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "config.yaml").write_text("mode: knn\n")  # what run_knn writes, in short
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "knn_top1": 50.0}\n')
    FinetuneRun(demo_config(tmp_path, "run.max_steps=2", "data.val=null")).train()
    (aside,) = (tmp_path / "superseded").iterdir()
    assert (aside / "config.yaml").read_text() == "mode: knn\n" and "knn_top1" in (aside / "metrics.jsonl").read_text()
    assert "knn" not in (tmp_path / "metrics.jsonl").read_text()
    assert f"warning: {tmp_path} holds a kNN evaluation, not a run to continue: moved" in capsys.readouterr().out


def test_an_init_normalised_otherwise_than_this_run_is_warned_about(tmp_path, export_tool):
    write_mae_checkpoint(tmp_path / "ckpt")
    export_tool.export(tmp_path / "ckpt", tmp_path / "export")
    imagenet = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    for source in (tmp_path / "ckpt", tmp_path / "export"):
        for normalization, warned in ((imagenet, True), ((FASHION_MEAN, FASHION_STD), False), (None, False)):
            logged = []
            load_init(classifier(), source, logged.append, normalization)
            warning = (f"warning: {source.name} was trained on images normalised with mean {FASHION_MEAN} and std "
                       f"{FASHION_STD}, this run uses data.mean {imagenet[0]} and data.std {imagenet[1]}: set them "
                       "to the checkpoint's unless the change is deliberate")
            assert (warning in logged) == warned, (source, normalization)


def test_the_demo_comparison_says_where_its_runs_are_and_keeps_its_table(tmp_path, monkeypatch, capsys):
    tool = load_tool("experiment_fashion")
    stages = []

    def fake_stage(script, recipe, overrides, out, threads):  # writes what a real run logs last
        stages.append((recipe, out.name))
        assert f"data.train={ROOT / 'data' / 'fashion_mnist'}" in overrides  # the bundled sample, from any directory
        out.mkdir(parents=True)
        (out / "metrics.jsonl").write_text(json.dumps({"step": 1, "knn_top1": 50.0, "val_acc1": 60.0}) + "\n")

    monkeypatch.setattr(tool, "run_stage", fake_stage)
    monkeypatch.chdir(tmp_path)
    assert tool.main(["demo", str(tmp_path), "--out", str(tmp_path / "compare")]) == 0
    runs = ["mae_knn", "mae_linprobe", "mae_finetune", "random_knn", "random_linprobe", "random_finetune"]
    assert [out for _, out in stages] == runs
    assert [recipe for recipe, _ in stages[:3]] == [f"demo_{mode}_vit.yaml" for mode in ("knn", "linprobe", "finetune")]
    shown = capsys.readouterr().out
    assert "| init | kNN top-1 | linear probe top-1 | fine-tune top-1 |\n|---|---|---|---|\n" in shown
    assert "| MAE demo checkpoint | 50.00 | 60.00 | 60.00 |" in shown
    assert f"Runs in {tmp_path / 'compare'}: {', '.join(runs)} (" in shown
    assert (tmp_path / "compare" / "results.md").read_text() == shown


@pytest.mark.parametrize("labels, message", [
    ([3, -1, 2], r"sample b in shards/train has no .cls label: fine-tuning needs labeled shards"),
    ([3, 7, 2], r"sample b in shards/train has label 7, but the head has 5 outputs: set model.num_classes to the "
                r"shards' class count"),  # cross-entropy would raise an index error, a GPU a device-side assert
])
def test_a_training_label_the_head_cannot_learn_is_refused_naming_the_sample(labels, message):
    run = SimpleNamespace(cfg=SimpleNamespace(data=SimpleNamespace(train="shards/train")), num_classes=5)
    batch = {"labels": torch.tensor(labels), "keys": ["a", "b", "c"]}
    with pytest.raises(StreamError, match=message):
        FinetuneRun.check_labels(run, batch)
    FinetuneRun.check_labels(run, {**batch, "labels": torch.tensor([0, 4, 2])})
