"""Strict config loading: every shipped recipe loads, unknown keys fail naming the key, overrides are typed."""

import argparse
import errno
import io
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from shard_utils import write_shards
from torch.cuda import OutOfMemoryError

import mae_tnt
from mae_tnt.cli import ABOUT, PREEMPTED_EXIT, load_recipe, run_recipe
from mae_tnt.config import ConfigError, PretrainConfig, all_keys, load_config
from mae_tnt.data.shards import ShardError, StreamError
from mae_tnt.finetune_config import FinetuneConfig
from mae_tnt.train.checkpoint import CheckpointWriteError

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TOOLS = sorted(path for folder in ("tools", "tools/bench") for path in (RECIPES.parent / folder).glob("*.py")
               if path.name != "common.py")
PRETRAIN_RECIPES = sorted(p for p in RECIPES.glob("*.yaml") if not p.name.startswith(("finetune", "linprobe"))
                          and "finetune" not in p.name and "linprobe" not in p.name and "knn" not in p.name)


@pytest.mark.parametrize("recipe", PRETRAIN_RECIPES, ids=lambda p: p.name)
def test_every_pretrain_recipe_loads_and_names_a_registered_model(recipe):
    import mae_tnt

    cfg = load_config(PretrainConfig, recipe)
    assert cfg.model.name in mae_tnt.list_models()


def write(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_unknown_key_names_the_key_and_suggests(tmp_path):
    path = write(tmp_path, "model: {name: mae_vit_test}\ndata: {train: x}\noptim: {lr: 1.0}\n")
    with pytest.raises(ConfigError, match=r"unknown config key `optim.lr`; did you mean `optim.min_lr` or "
                                          r"`optim.base_lr`\?$") as err:  # the spelling alone named min_lr only
        load_config(PretrainConfig, path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("cls, override, meant", [
    (PretrainConfig, "optim.clip_grad=1", "`optim.grad_clip`"),  # the words of a key, in another order
    (PretrainConfig, "lr=1e-4", "`optim.min_lr` or `optim.base_lr`"),  # in the wrong section
    (PretrainConfig, "data.trian=x", "`data.train`"),  # a typo
    (FinetuneConfig, "dta.batch_size=8", "`data.batch_size` or `data.eval_batch_size`"),  # a typo of the section
])
def test_an_unknown_key_suggests_the_keys_named_with_its_words(tmp_path, cls, override, meant):
    recipe = write(tmp_path, "model: {name: vit_test_patch8_32}\ndata: {train: x}\n")
    key = override.partition("=")[0]
    with pytest.raises(ConfigError, match=rf"^command line: unknown config key `{key}`; did you mean {meant}\?$"):
        load_config(cls, recipe, [override])


@pytest.mark.parametrize("recipe, typo, section", [
    ("model: {name: mae_vit_test}\ndta: {train: x}\n", "dta", "data"),
    ("modle: {name: mae_vit_test}\ndata: {train: x}\n", "modle", "model"),
])
def test_a_misspelled_section_is_named_rather_than_reported_as_its_missing_keys(tmp_path, recipe, typo, section):
    with pytest.raises(ConfigError, match=rf"unknown config key `{typo}`; did you mean `{section}`\?"):
        load_config(PretrainConfig, write(tmp_path, recipe))


def test_invalid_yaml_is_a_config_error_naming_the_file_line_or_override(tmp_path):
    path = write(tmp_path, "model:\n  name: mae_vit_test\ndata: {train: [x\n")
    with pytest.raises(ConfigError, match=rf"^{path}:4: not valid YAML \(expected ',' or '\]'"):
        load_config(PretrainConfig, path)
    good = write(tmp_path, "model: {name: mae_vit_test}\ndata: {train: x}\n")
    with pytest.raises(ConfigError, match=r"^override 'optim.base_lr=\[1': not valid YAML"):
        load_config(PretrainConfig, good, ["optim.base_lr=[1"])


@pytest.mark.parametrize("cls", [PretrainConfig, FinetuneConfig])
def test_help_lists_every_settable_key_and_a_missing_recipe_is_a_usage_error(cls, capsys):
    prog = "pretrain.py" if cls is PretrainConfig else "finetune.py"
    with pytest.raises(SystemExit) as done:
        load_recipe(cls, ["recipes/any.yaml", "--help"], prog)  # after the recipe too
    out = capsys.readouterr().out
    assert done.value.code == 0 and out.startswith(f"usage: {prog} RECIPE.yaml")
    assert ABOUT[cls] in " ".join(out.split())  # what the script does, wrapped
    listed = {f"{line.split(': ')[0].strip()}.{name}" for line in out.replace(",\n    ", ", ").splitlines()
              if line.startswith("  ") for name in line.split(": ")[1].split(", ")}
    assert {key.removeprefix("top level.") for key in listed} == {
        key for key in all_keys(cls) if not any(other.startswith(f"{key}.") for other in all_keys(cls))}
    example = "recipes/demo_mae_vit.yaml" if cls is PretrainConfig else "recipes/demo_finetune_vit.yaml"
    for argv, error in ((["optim.base_lr=1"], f"the recipe comes first, e.g. {prog} {example} optim.base_lr=1"),
                        ([], f"give a recipe, e.g. {prog} {example}")):
        with pytest.raises(SystemExit) as done:
            load_recipe(cls, argv, prog)
        usage, line = capsys.readouterr().err.splitlines()
        assert done.value.code == 2 and usage.startswith(f"usage: {prog}") and line == f"error: {error}"


@pytest.mark.parametrize("cls, prog, recipe, message", [
    (PretrainConfig, "pretrain.py", "demo_finetune_vit.yaml",
     "`mode` is a fine-tuning key; is this a fine-tuning recipe? Run it with finetune.py"),
    (FinetuneConfig, "finetune.py", "demo_mae_vit.yaml",
     "`eval` is a pretraining key; is this a pretraining recipe? Run it with pretrain.py"),
])
def test_a_recipe_given_to_the_other_script_names_the_script(capsys, cls, prog, recipe, message):
    with pytest.raises(SystemExit) as done:
        load_recipe(cls, [str(RECIPES / recipe)], prog)
    assert done.value.code == 2 and capsys.readouterr().err == f"error: {RECIPES / recipe}: {message}\n"


@pytest.mark.parametrize("cls, prog, recipe, override, message", [
    (PretrainConfig, "pretrain.py", "demo_mae_vit.yaml", "init=/x", "unknown config key `init`"),
    (FinetuneConfig, "finetune.py", "demo_finetune_vit.yaml", "eval.knn_k=5",
     "unknown config key `eval.knn_k`; did you mean `knn.k`?"),
])
def test_an_override_of_the_other_scripts_key_gets_the_plain_unknown_key_error(capsys, cls, prog, recipe, override,
                                                                               message):
    """The recipe is the right one: the other script's advice would send a good recipe to the wrong script."""
    with pytest.raises(SystemExit):
        load_recipe(cls, [str(RECIPES / recipe), override], prog)
    assert capsys.readouterr().err == f"error: command line: {message}\n"


def test_a_recipe_whose_path_holds_an_equals_sign_is_read_as_the_recipe(tmp_path):
    """A run directory named after a setting (`lr=1e-4/`) holds a config.yaml that reproduces the run."""
    (tmp_path / "lr=1e-4").mkdir()
    recipe = tmp_path / "lr=1e-4" / "config.yaml"
    recipe.write_text("model: {name: mae_vit_test}\ndata: {train: x}\n")
    assert load_recipe(PretrainConfig, [str(recipe), "seed=3"], "pretrain.py").seed == 3


@pytest.mark.parametrize("path, why", [("recipes", "Is a directory"), ("recipes/none.yaml", "No such file"),
                                       ("data/fashion_mnist/train-000000.tar.gz", "not a text file")])
def test_a_recipe_path_that_is_no_file_is_one_error_line(capsys, path, why):
    with pytest.raises(SystemExit):
        load_recipe(PretrainConfig, [path], "pretrain.py")
    assert capsys.readouterr().err.startswith(f"error: cannot read the recipe {path} ({why}")


def test_an_output_dir_that_is_or_lies_under_a_file_is_refused(tmp_path):
    path = write(tmp_path, "model: {name: mae_vit_test}\ndata: {train: x}\n")
    for output_dir in (path, path / "run"):
        with pytest.raises(ConfigError, match=rf"run.output_dir={output_dir} cannot be a directory: {path} is a file"):
            load_config(PretrainConfig, path, [f"run.output_dir={output_dir}"])


def test_unknown_override_key_fails(tmp_path):
    path = write(tmp_path, "model: {name: mae_vit_test}\ndata: {train: x}\n")
    with pytest.raises(ConfigError, match="unknown config key `data.batchsize`.*`data.batch_size`"):
        load_config(PretrainConfig, path, ["data.batchsize=4"])


def test_a_pretraining_only_key_is_unknown_to_fine_tuning(tmp_path):
    path = write(tmp_path, "model: {name: vit_test_patch8_32}\ndata: {train: x}\n")
    with pytest.raises(ConfigError, match="unknown config key `run.recon_every`"):
        load_config(FinetuneConfig, path, ["run.recon_every=5"])
    path = write(tmp_path, "model: {name: mae_vit_test}\ndata: {train: x}\n")
    assert load_config(PretrainConfig, path, ["run.recon_every=5"]).run.recon_every == 5


def test_overrides_are_typed_and_applied(tmp_path):
    path = write(tmp_path, "model: {name: mae_vit_test}\ndata: {train: x}\n")
    cfg = load_config(PretrainConfig, path, ["optim.base_lr=1e-4", "data.batch_size=8", "run.max_steps=3",
                                             "optim.betas=[0.8, 0.9]"])
    assert cfg.optim.base_lr == 1e-4 and cfg.data.batch_size == 8 and cfg.run.max_steps == 3
    assert cfg.optim.betas == [0.8, 0.9]
    cfg = load_config(PretrainConfig, path, ["run.output_dir=no", "data.val=2024", "run.resume=none", "data.info=null"])
    assert (cfg.run.output_dir, cfg.data.val, cfg.run.resume, cfg.data.info) == ("no", "2024", "none", None)
    cfg = load_config(PretrainConfig, path, ["data.val=None", "data.info=none", "data.batch_size=1_024"])
    assert (cfg.data.val, cfg.data.info, cfg.data.batch_size) == (None, None, 1024)  # Python's null spelling
    for spelling, keyword in (("None", "none"), ("null", "none"), ("NONE", "none"), ("Auto", "auto")):
        assert load_config(PretrainConfig, path, [f"run.resume={spelling}"]).run.resume == keyword, spelling
    assert load_config(PretrainConfig, write(tmp_path, "model: {name: mae_vit_test}\ndata: {train: x}\n"
                                                       "run: {resume: null}\n")).run.resume == "none"
    cfg = load_config(PretrainConfig, path, ["run.max_steps=None", "optim.grad_clip=none"])  # optional numbers too
    assert (cfg.run.max_steps, cfg.optim.grad_clip) == (None, None)


@pytest.mark.parametrize("override", ["run.resume=", "data.val=", "run.max_steps= "])
def test_an_override_without_a_value_is_refused_not_taken_for_null(tmp_path, override):
    """`run.resume=$CKPT` with CKPT unset: null would set the run aside and start afresh, or fine-tune from random
    weights (`init=`)."""
    key = override.partition("=")[0]
    with pytest.raises(ConfigError, match=rf"^command line: {key}= has no value \(an unset shell variable\?\); give "
                                          rf"one, or {key}=null for none$"):
        load_config(PretrainConfig, write(tmp_path, BASE_RECIPE), [override])


def test_paths_starting_with_a_tilde_are_in_the_home_directory(tmp_path, monkeypatch):
    """Recipes and quoted words leave `~` to us: a literal `~` folder in the working directory looked like home."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    recipe = write(tmp_path, "model: {name: mae_vit_test}\ndata: {train: ~/shards, val: ~/val}\n"
                             "run: {output_dir: ~/runs/a, resume: ~/runs/b/checkpoints}\n")
    cfg = load_config(PretrainConfig, recipe, ["data.info=~/info"])
    home = tmp_path / "home"
    assert (cfg.data.train, cfg.data.val, cfg.data.info) == (f"{home}/shards", f"{home}/val", f"{home}/info")
    assert (cfg.run.output_dir, cfg.run.resume) == (f"{home}/runs/a", f"{home}/runs/b/checkpoints")
    finetune = write(tmp_path, "model: {name: vit_test_patch8_32}\ndata: {train: x}\ninit: ~/runs/a\n")
    assert load_config(FinetuneConfig, finetune).init == f"{home}/runs/a"


def test_a_section_override_merges_into_the_recipes_section(tmp_path):
    path = write(tmp_path, "model: {name: mae_vit_test}\ndata: {train: x, num_workers: 1, mean: [0.5, 0.5, 0.5]}\n")
    cfg = load_config(PretrainConfig, path, ["data={batch_size: 32, train: y}", "model={mask_ratio: 0.5}"])
    assert (cfg.data.train, cfg.data.batch_size, cfg.data.num_workers, cfg.data.mean) == ("y", 32, 1, [0.5] * 3)
    assert (cfg.model.name, cfg.model.mask_ratio) == ("mae_vit_test", 0.5)
    with pytest.raises(ConfigError, match="^command line: unknown config key `data.batchsize`"):  # not the recipe's
        load_config(PretrainConfig, path, ["data={batchsize: 32}"])
    with pytest.raises(ConfigError, match=r"^command line: `optim.accum_steps` must be int, got 2.5"):
        load_config(PretrainConfig, path, ["optim={accum_steps: 2.5}"])
    with pytest.raises(ConfigError, match=r"^.*r.yaml with command line model=\{mask_ratio: 1.5\}: .*mask_ratio"):
        load_config(PretrainConfig, path, ["model={mask_ratio: 1.5}"])  # a section's own check names it too


@pytest.mark.parametrize("name, overrides, built", [
    ("mae_vit_test", ["model.decoder_dim=16", "model.decoder_depth=3", "model.decoder_heads=4", "model.img_size=48",
                      "model.norm_pix_loss=false", "model.mask_ratio=0.5", "model.drop_path=0.2"],
     lambda m: (m.decoder_embed.out_features, len(m.decoder_blocks), m.decoder_blocks[0].attn.num_heads,
                m.grid * m.unit, m.norm_pix_loss, m.mask_ratio,
                round(m.encoder.blocks[-1].drop_path1.drop_prob, 6)) == (16, 3, 4, 48, False, 0.5, 0.2)),
    ("mae_tnt_test", ["model.word_mask_ratio=0.5"], lambda m: m.word_mask_ratio == 0.5),
    ("mae_sret_test", ["model.dense_stem=true", "model.img_size=64"], lambda m: m.encoder.dense_stem),
])
def test_every_model_key_reaches_the_model_it_builds(tmp_path, name, overrides, built):
    path = write(tmp_path, f"model: {{name: {name}}}\ndata: {{train: x}}\n")
    cfg = load_config(PretrainConfig, path, overrides)
    assert built(mae_tnt.create_model(cfg.model.name, **cfg.model.build_kwargs()))


@pytest.mark.parametrize("override, message", [
    ("data.batch_size=abc", "data.batch_size` must be int"),
    ("optim.betas=0.9,0.95", r"`optim.betas` must be a list, got '0.9,0.95'; write it in brackets, e.g. "
                             r"optim.betas=\[0.9,0.95\]"),
    ("data.batch_size=true", "data.batch_size` must be int"),
    ("data.batch_size=010", r"^command line: write data.batch_size as a decimal number, not '010' \(which YAML "
                            r"reads as 8\)$"),
    ("seed=0x10", r"write seed as a decimal number, not '0x10' \(which YAML reads as 16\)"),
    ("optim=null", r"^command line: optim is a section, not a value: set its keys one by one \(e.g. "
                   r"optim.base_lr=...\), or give a mapping \(optim=\{...\}\)$"),
    ("model.mask_ratio=1.5", "mask_ratio must be in"),
    ("run.precision=fp8", "run.precision"),
    ("data.mean=[0.5]", "one value per RGB channel"),
    ("data.std=[0.5, 0.5, 0]", "one value per RGB channel"),
    ("schedule.epochs=0", r"schedule.epochs must be finite and > 0, got 0.0 \(use run.max_steps"),
    ("schedule.epochs=inf", r"`schedule.epochs` must be a finite number, got .inf."),
    ("data.shuffle_chunk=0", r"data.shuffle_chunk must be in \[1, inf\], got 0$"),
    ("data.num_workers=-1", r"data.num_workers must be in \[0, inf\], got -1$"),
    ("eval.knn_k=0", r"eval.knn_k must be in \[1, inf\], got 0$"),
    ("eval.knn_temperature=0", r"eval.knn_temperature must be in \(0, inf\], got 0.0$"),
    ("schedule.warmup_epochs=900", r"warmup_epochs must be in \[0, schedule.epochs = 800"),
    ("run.max_steps=0", r"run.max_steps must be in \[1, inf\], got 0$"),
    ("optim.betas=[0.9]", r"optim.betas must be two values in \[0, 1\), got \[0.9\]"),
    ("optim.base_lr=-1", r"optim.base_lr must be in \(0, inf\], got -1.0$"),
    ("optim.weight_decay=nan", "`optim.weight_decay` must be a finite number, got 'nan'"),
    ("optim.grad_clip=-1", r"optim.grad_clip must be in \(0, inf\), got -1.0"),
    ("optim.grad_clip=0", r"optim.grad_clip must be in \(0, inf\), got 0.0"),
    ("model.drop_path=1.5", r"model.drop_path must be in \[0, 1\), got 1.5"),
    ("eval.knn_every=-1", r"eval.knn_every must be in \[0, inf\], got -1.0"),
    ("eval.knn_max_train=0", r"eval.knn_max_train must be at least 1, or null for every train image, got 0"),
    ("data.max_image_pixels=0", r"data.max_image_pixels must be in \[1, inf\], got 0"),
    ("model.decoder_dim=0", r"model.decoder_dim must be in \[1, inf\], got 0"),
    ("seed=99999999999999999999", r"seed must be a whole number from 0 to 2\*\*63 - 1, got 99999999999999999999"),
    ("run.recon_every=-5", r"run.recon_every must be in \[0, inf\], got -5"),
    ("data.crop_scale=[0.5,1.2]", r"data.crop_scale must be \[low, high\] within \(0, 1\], got \[0.5, 1.2\]"),
    ("data.crop_scale=[0.8,0.2]", r"data.crop_scale must be \[low, high\] within \(0, 1\], got \[0.8, 0.2\]"),
    ("data.decode_device=gpu", r"data.decode_device must be one of cpu, cuda, got 'gpu'"),
    ("run.precision=BF16", r"run.precision must be one of auto, fp32, bf16, fp16, got 'BF16'; did you mean bf16 or "
                           r"fp16\?$"),
    ("optim.accum_steps=0", r"optim.accum_steps must be in \[1, inf\], got 0$"),
    ("optim.min_lr=-1e-6", r"optim.min_lr must be in \[0, inf\], got -1e-06$"),
    ("run.log_every=0", r"run.log_every must be in \[1, inf\], got 0$"),
    ("run.preempt_check_every=0", r"run.preempt_check_every must be in \[1, inf\], got 0$"),
    ("run.keep_checkpoints=-1", r"run.keep_checkpoints must be in \[0, inf\], got -1$"),
    ("model.name=vit_test_patch8_32", r"model.name='vit_test_patch8_32' is not a registered masked autoencoder \(it is "
                                      r"a classifier; the masked autoencoder of its encoder is mae_vit_test\)"),
    ("model.name=mae_vit_tset", r"model.name='mae_vit_tset' is not a registered masked autoencoder \(did you mean "
                                r"mae_vit_test, .*\); list them with python -c \"import mae_tnt; print\(mae_tnt."
                                r"list_models\('mae_\*'\)\)\"$"),
])
def test_bad_values_fail(tmp_path, override, message):
    path = write(tmp_path, "model: {name: mae_vit_test}\ndata: {train: x}\n")
    with pytest.raises(ConfigError, match=message):
        load_config(PretrainConfig, path, [override])


BASE_RECIPE = "model: {name: mae_vit_test}\ndata: {train: x}\n"


@pytest.mark.parametrize("recipe, overrides, message", [
    (BASE_RECIPE, ["optim.base_lr"], r"^override 'optim.base_lr' is not of the form key=value \(e.g. optim.base_lr="),
    (BASE_RECIPE, ["=1"], r"^override '=1' is not of the form key=value"),
    (BASE_RECIPE + "optim: 3\n", [], r"r.yaml: `optim` must be a mapping, got 3$"),
    (BASE_RECIPE + "optim: 3\n", ["optim.base_lr=1"], r"^command line: cannot set 'optim.base_lr': 'optim' is not a "
                                                         r"section$"),
    ("- a\n", [], r"r.yaml: a recipe must be a YAML mapping at the top level$"),
])
def test_a_recipe_or_override_of_the_wrong_shape_is_refused_saying_which(tmp_path, recipe, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(PretrainConfig, write(tmp_path, recipe), overrides)


def test_a_wrong_type_on_the_command_line_is_blamed_on_it_not_on_the_recipe(tmp_path):
    path = write(tmp_path, "model: {name: mae_vit_test}\ndata: {train: x}\n")
    with pytest.raises(ConfigError, match=r"^command line: `optim.base_lr` must be float, got 'abc'$"):
        load_config(PretrainConfig, path, ["optim.base_lr=abc"])
    path = write(tmp_path, "model: {name: mae_vit_test}\ndata: {train: x}\noptim: {base_lr: abc}\n")
    with pytest.raises(ConfigError, match=rf"^{path}: `optim.base_lr` must be float"):
        load_config(PretrainConfig, path)


def test_a_bad_value_names_the_overrides_that_reached_its_section(tmp_path):
    path = write(tmp_path, "model: {name: mae_vit_test}\ndata: {train: x}\nrun: {precision: fp23}\n")
    with pytest.raises(ConfigError, match=rf"^{path}: run.precision must be"):
        load_config(PretrainConfig, path, ["optim.base_lr=1e-4"])
    with pytest.raises(ConfigError, match=rf"^{path} with command line run.precision=fp8 run.log_every=5: run.precis"):
        load_config(PretrainConfig, path, ["optim.base_lr=1e-4", "run.precision=fp8", "run.log_every=5"])
    with pytest.raises(ConfigError, match=r"^command line model.name=mae_vit_test model.mask_ratio=0: model.mask"):
        load_config(PretrainConfig, None, ["model.name=mae_vit_test", "data.train=x", "model.mask_ratio=0"])


def test_a_top_level_check_names_only_the_overrides_of_the_keys_it_concerns(tmp_path):
    """Every override reaches the top level: its checks list those their message names, not the whole command line."""
    path = write(tmp_path, "model: {name: mae_vit_test}\ndata: {train: x}\n")
    with pytest.raises(ConfigError, match=rf"^{path} with command line seed=-1: seed must be"):
        load_config(PretrainConfig, path, ["optim.base_lr=1e-4", "seed=-1", "run.log_every=5"])
    with pytest.raises(ConfigError, match=r"^recipes/demo_finetune_vit.yaml with command line mode=linprobe "
                                          r"augment.reprob=0.25: mode=linprobe trains on random-resized crops"):
        load_config(FinetuneConfig, "recipes/demo_finetune_vit.yaml",
                    ["seed=3", "mode=linprobe", "augment.reprob=0.25", "data.batch_size=4"])


def test_a_key_given_twice_is_refused_rather_than_silently_taking_the_last(tmp_path):
    path = write(tmp_path, "model: {name: mae_vit_test}\ndata:\n  train: x\n  batch_size: 4\n  batch_size: 8\n")
    with pytest.raises(ConfigError, match=rf"^{path}:5: key `batch_size` is written twice in the same mapping"):
        load_config(PretrainConfig, path)
    path = write(tmp_path, "model: {name: mae_vit_test}\ndata: {train: x}\n")
    with pytest.raises(ConfigError, match=r"^command line: `data.batch_size` is given twice \(data.batch_size=4 "
                                          r"and data.batch_size=8\); keep one$"):
        load_config(PretrainConfig, path, ["data.batch_size=4", "data.batch_size=8"])
    with pytest.raises(ConfigError, match=r"^override 'data=\{train: y, train: z\}': key `train` is written twice"):
        load_config(PretrainConfig, path, ["data={train: y, train: z}"])
    for overrides in (["data.batch_size=4", "data={batch_size: 8}"], ["data={batch_size: 8}", "data.batch_size=4"]):
        with pytest.raises(ConfigError, match=r"^command line: `data.batch_size` is given twice"):  # spelled apart
            load_config(PretrainConfig, path, overrides)
    with pytest.raises(ConfigError, match="unknown config key `loop`"):  # a cyclic alias is walked once
        load_config(PretrainConfig, write(tmp_path, "loop: &loop [*loop]\nmodel: {name: mae_vit_test}\n"))


def test_missing_required_key_fails(tmp_path):
    path = write(tmp_path, "model: {name: mae_vit_test}\n")
    with pytest.raises(ConfigError, match="required key `data.train`"):
        load_config(PretrainConfig, path)


def test_yaml_is_parsed_safely(tmp_path):
    path = write(tmp_path, "model: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(Exception, match="could not determine a constructor|ConstructorError"):
        load_config(PretrainConfig, path)


@pytest.mark.parametrize("path", sorted((RECIPES / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_launcher_configs_load_in_accelerate(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    assert config.num_processes >= 1
    if config.distributed_type.name == "DEEPSPEED":
        assert (RECIPES.parent / config.deepspeed_config["deepspeed_config_file"]).exists()


@pytest.mark.parametrize("path", sorted((RECIPES / "deepspeed").glob("*.json")), ids=lambda p: p.name)
def test_deepspeed_bucket_sizes_are_integers(path):
    """timm models have no `hidden_size`, so DeepSpeed cannot resolve "auto" for these."""
    import json

    zero = json.loads(path.read_text())["zero_optimization"]
    buckets = {k: v for k, v in zero.items() if k.endswith(("bucket_size", "persistence_threshold"))}
    assert buckets and all(isinstance(v, int) for v in buckets.values())


@pytest.mark.parametrize("error, local_rank, printed", [
    (ConfigError("bad key"), "0", "error: bad key\n"),
    (ConfigError("bad key"), "1", ""),  # the same in every process: the node's first one says it
    (ShardError("/data/x does not exist"), "1", ""),  # the node's files are the same for each process
    (StreamError("no readable image in 9 samples"), "0", "error (rank 2 of 4): no readable image in 9 samples\n"),
    (StreamError("no readable image in 9 samples"), "1", "error (rank 2 of 4): no readable image in 9 samples\n"),
    (CheckpointWriteError("could not write x"), "1", "error (rank 2 of 4): could not write x\n"),  # its own write
    (OSError(errno.ENOSPC, "No space left on device"), "1", "error (rank 2 of 4): [Errno 28] No space left on "
     "device; free some disk space and run the same command again: a training run resumes from its newest "
     "checkpoint\n"),
    (OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 2 has a total capacity of 79.11 GiB of "
                      "which 1.20 GiB is free. Including non-PyTorch memory, this process has 77.91 GiB in use."),
     "1", "error (rank 2 of 4): CUDA out of memory. Tried to allocate 2.00 GiB. GPU 2 has a total capacity of 79.11 "
     "GiB of which 1.20 GiB is free. Lower data.batch_size and raise optim.accum_steps by the same factor (the "
     "effective batch, and so the LR, stay the same), or set run.grad_checkpointing=true; then run the same command "
     "again\n"),
])
def test_a_multi_process_run_prints_a_shared_error_once_per_node_and_a_process_own_with_its_rank(
        capsys, monkeypatch, error, local_rank, printed):
    from mae_tnt.cli import report_user_errors

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", local_rank)

    def fail():
        raise error

    assert report_user_errors(fail) is None
    assert capsys.readouterr().err == printed


def test_os_errors_other_than_a_full_disk_keep_their_traceback():
    from mae_tnt.cli import report_user_errors

    def denied():
        raise PermissionError(errno.EACCES, "Permission denied")

    with pytest.raises(PermissionError):
        report_user_errors(denied)


@pytest.mark.parametrize("sample_warning, rank, printed", [
    (False, "0", "warning: model.num_classes differs\n"),
    (False, "1", ""),  # the same in every process: rank 0 says it
    (True, "0", "warning (rank 0 of 2): skipped sample s000003 (unknown image format)\n"),
    (True, "1", "warning (rank 1 of 2): skipped sample s000003 (unknown image format)\n"),  # its own samples
])
def test_our_warnings_are_lines_from_rank_0_except_sample_warnings_which_each_rank_gives_with_its_rank(
        capsys, monkeypatch, sample_warning, rank, printed):
    import warnings

    from mae_tnt.cli import PACKAGE_DIR, report_user_errors
    from mae_tnt.data.shards import SampleWarning

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", rank)
    category, message = ((SampleWarning, "skipped sample s000003 (unknown image format)") if sample_warning
                         else (UserWarning, "model.num_classes differs"))

    def warn_twice():  # as package code does: a message is shown once per run
        for _ in range(2):
            warnings.warn_explicit(message, category, str(PACKAGE_DIR / "data" / "stream.py"), 1)
        return {}

    assert report_user_errors(warn_twice) == {}
    assert capsys.readouterr().err == printed


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("rank, stream, start", [
    ("1", Terminal, "\r\x1b[K"),  # rank 0's bar may fill the shared terminal's line: clear it first
    ("1", io.StringIO, ""),  # a log file gets the bar's lines with their newlines, and no terminal codes
    ("0", Terminal, ""),  # rank 0's own bar: tqdm clears and redraws it
])
def test_a_process_without_the_progress_bar_clears_the_terminal_line_it_writes_on(monkeypatch, rank, stream, start):
    from mae_tnt.progress import write_line

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", rank)
    out = stream()
    write_line("warning (rank 1 of 2): skipped sample s000003 (unknown image format)", out)
    assert out.getvalue() == start + "warning (rank 1 of 2): skipped sample s000003 (unknown image format)\n"


def test_a_recipe_error_is_printed_by_the_first_process_of_each_node(capsys, monkeypatch):
    printed = {}
    for local_rank in ("0", "1"):
        monkeypatch.setenv("LOCAL_RANK", local_rank)
        with pytest.raises(SystemExit) as done:
            load_recipe(PretrainConfig, [str(RECIPES / "demo_mae_vit.yaml"), "data.trian=x"], "pretrain.py")
        assert done.value.code == 2
        printed[local_rank] = capsys.readouterr().err
    assert printed == {"0": "error: command line: unknown config key `data.trian`; did you mean `data.train`?\n",
                       "1": ""}


@pytest.mark.parametrize("local_rank, printed", [
    ("0", "interrupted; run the same command again to resume from the last checkpoint (or to start over if none was "
          "written yet)\n"), ("1", "")])
@pytest.mark.parametrize("script, recipe", [("pretrain", "demo_mae_vit.yaml"), ("finetune", "demo_finetune_vit.yaml")])
def test_ctrl_c_is_explained_once_per_node_even_while_the_recipe_is_read(capsys, monkeypatch, script, recipe,
                                                                         local_rank, printed):
    """A Ctrl-C before training starts (torch's import takes seconds) gave a traceback through the import."""
    import mae_tnt.cli
    from mae_tnt.cli import INTERRUPTED_EXIT, run_pretrain
    from mae_tnt.finetune_cli import run_finetune

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setenv("LOCAL_RANK", local_rank)
    monkeypatch.setattr(mae_tnt.cli, "load_config", interrupted)
    with pytest.raises(SystemExit) as done:
        {"pretrain": run_pretrain, "finetune": run_finetune}[script]([f"recipes/{recipe}"])
    assert done.value.code == INTERRUPTED_EXIT and capsys.readouterr().err == printed


@pytest.mark.parametrize("cls, recipe", [(PretrainConfig, "recipes/demo_mae_vit.yaml"),
                                         (FinetuneConfig, "recipes/demo_finetune_vit.yaml")])
def test_a_run_ends_with_its_closing_line_or_as_preempted_with_the_status_a_shell_reports(capsys, cls, recipe):
    """One flow serves both scripts: a finished run prints its closing line and exits 0; one that SIGTERM stopped
    says how to resume and exits 143, so that `a && b` chains do not take it for finished."""
    def run(summary):
        return run_recipe(cls, [recipe], "x.py", lambda cfg: summary, lambda summary, cfg: f"done: {cfg.seed}")

    assert run({"preempted": False, "steps": 3, "output_dir": "runs/x"}) == 0
    assert capsys.readouterr().out == "done: 0\n"
    assert run({"preempted": True, "steps": 3, "output_dir": "runs/x"}) == PREEMPTED_EXIT == 143
    assert capsys.readouterr().err == ("stopped early by SIGTERM after step 3, with a checkpoint in runs/x; run the "
                                       "same command again to resume\n")


def test_a_ctrl_c_that_python_drops_in_a_finalizer_still_ends_as_an_interrupt(capsys, monkeypatch):
    """Python only prints a KeyboardInterrupt raised inside a finalizer or weakref callback; the loader workers have
    stopped on the same Ctrl-C, so the run fails on them a moment later: that error is the interrupt, and Python's
    "Exception ignored" report with its traceback is left out."""
    import os
    import signal

    from mae_tnt.cli import INTERRUPTED_EXIT, quiet_on_ctrl_c

    class Finalized:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)  # handled here, where Python drops the KeyboardInterrupt

    @quiet_on_ctrl_c("run it again")
    def main(argv, ctrl_c: bool = True):
        if ctrl_c:
            Finalized()  # collected at once
        raise RuntimeError("DataLoader worker (pid(s) 4242) exited unexpectedly")

    reported = []
    monkeypatch.setattr(sys, "unraisablehook", reported.append)  # Python's own hook would print the traceback
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit) as done:
        main([])
    assert done.value.code == INTERRUPTED_EXIT
    assert capsys.readouterr().err.endswith("interrupted; run it again\n") and reported == []
    assert signal.getsignal(signal.SIGINT) is before and sys.unraisablehook == reported.append
    with pytest.raises(RuntimeError, match="exited unexpectedly"):  # without a Ctrl-C, the error is the error
        quiet_on_ctrl_c("run it again")(lambda argv: main.__wrapped__(argv, ctrl_c=False))([])


@pytest.mark.parametrize("then", ["trains on", "returns", "held back"])
def test_a_ctrl_c_that_python_drops_with_no_error_after_it_still_stops_the_run(capsys, monkeypatch, then):
    """Dropped while the loader of the last epoch was collected, say: the loop raises it at its next batch, and a
    command that ends first ends as interrupted. So does one held back while a loader started its workers."""
    import os
    import signal

    from mae_tnt.cli import INTERRUPTED_EXIT, quiet_on_ctrl_c
    from mae_tnt.ctrl_c import PENDING, deferred
    from mae_tnt.train.loop import Window, timed

    class Finalized:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)

    trained, set_up = [], []

    @quiet_on_ctrl_c("run it again")
    def main(argv):
        if then == "held back":
            with deferred():
                os.kill(os.getpid(), signal.SIGINT)
                set_up.append("whole")
        else:
            Finalized()
        if then != "returns":
            with timed(range(3), Window(torch.device("cpu"))) as batches:
                trained.extend(batches)
        return 0

    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: None)
    with pytest.raises(SystemExit) as done:
        main([])
    assert done.value.code == INTERRUPTED_EXIT and trained == [] and not PENDING.is_set()
    assert set_up == (["whole"] if then == "held back" else [])
    assert capsys.readouterr().err.endswith("interrupted; run it again\n")


def test_an_interrupted_command_kills_its_children_which_may_ignore_the_sigterm_of_exit(monkeypatch):
    """Loader workers that a Ctrl-C caught starting are left to exit, where multiprocessing would wait for them."""
    import multiprocessing
    import signal
    import time

    from mae_tnt.cli import INTERRUPTED_EXIT, quiet_on_ctrl_c

    children = []

    @quiet_on_ctrl_c("run it again")
    def main(argv):
        child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,), daemon=True)
        child.start()
        children.append(child)
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as done:
        main([])
    children[0].join(timeout=10)
    assert done.value.code == INTERRUPTED_EXIT and children[0].exitcode == -signal.SIGKILL


@pytest.mark.parametrize("module, work, argv, advice", [
    ("mae_tnt.export", "export", ["some/checkpoint", "some/out"], "export"),
    ("mae_tnt.visualize", "visualize", ["some/checkpoint", "some/shards"], "draw the grid"),
    ("mae_tnt.data.inspect", "inspect_shards", ["some/shards"], "check the shards"),
    ("mae_tnt.convert_checkpoint", "convert", ["src.pth", "out.safetensors", "--model", "mae_vit_test"], "convert"),
])
def test_ctrl_c_in_the_tools_is_one_line_too(capsys, monkeypatch, module, work, argv, advice):
    import importlib

    from mae_tnt.cli import INTERRUPTED_EXIT

    tool = importlib.import_module(module)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tool, work, interrupted)
    with pytest.raises(SystemExit) as done:
        tool.main(argv)
    assert done.value.code == INTERRUPTED_EXIT
    assert capsys.readouterr().err == f"interrupted; run the same command again to {advice}\n"


@pytest.mark.parametrize("script", TOOLS, ids=lambda p: p.name)
def test_every_tool_option_has_help_that_shows_its_default(script, monkeypatch):
    parsers = []

    def capture(parser, *args, **kwargs):
        parsers.append(parser)
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    monkeypatch.setattr(sys, "argv", [str(script)])
    with pytest.raises(SystemExit):
        runpy.run_path(str(script), run_name="__main__")
    shown = " ".join(parsers[0].format_help().split())  # unwrapped
    for action in parsers[0]._actions:
        if not action.option_strings or action.dest == "help":
            continue
        assert action.help, f"{action.option_strings[0]} has no help text"
        if not (action.default is None or action.default is False or action.default == []):
            assert f"(default: {action.default})" in shown or f"{action.default} here)" in shown, \
                f"{action.option_strings[0]} does not show its default {action.default!r}"


# runpy warns because the test imported the module just before running it as __main__; `python -m` in a fresh
# process, as users run it, does not.
@pytest.mark.filterwarnings("ignore:.*found in sys.modules after import of package:RuntimeWarning")
def test_every_console_script_is_the_main_of_a_tool_in_tools(capsys):
    """`pip install` puts each [project.scripts] entry on PATH; each must be a tool's `main`, as tools/ runs it."""
    import importlib
    import re

    pyproject = (RECIPES.parent / "pyproject.toml").read_text()
    section = pyproject.split("[project.scripts]")[1].split("\n[")[0]  # tomllib would need Python 3.11
    scripts = re.findall(r'^([\w-]+) = "([\w.]+):(\w+)"$', section, flags=re.MULTILINE)
    wrappers = " ".join(path.read_text() for path in TOOLS)
    assert scripts and len(scripts) == len(section.strip().splitlines())  # every entry parsed
    for command, module, function in scripts:
        assert callable(getattr(importlib.import_module(module), function)), command
        assert f"from {module} import {function}" in wrappers, f"{command}: no tools/ script runs {module}:{function}"
        run_as_module(module, capsys)


def run_as_module(module: str, capsys) -> None:
    """`python -m MODULE --help` shows the tool's usage, as the console script does."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", [module, "--help"])
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("usage: "), module


def test_a_tool_whose_reader_has_gone_stops_quietly(tmp_path):
    """`tool | head -1`: the reader closes the pipe before the tool writes (here before it has even started)."""
    write_shards(tmp_path, [4])
    argv = [sys.executable, "tools/inspect_shards.py", str(tmp_path)]
    tool = subprocess.Popen(argv, cwd=RECIPES.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    tool.stdout.close()
    stderr = tool.communicate(timeout=120)[1].decode()
    assert tool.returncode == 1 and "Error" not in stderr and "Exception" not in stderr, stderr


def test_a_recipe_whose_yaml_aliases_nest_a_million_values_is_refused_in_a_short_message(tmp_path):
    """safe_load shares aliased nodes, so the recipe loads in no time; the error must not spell them out."""
    anchors = ["&a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    # 10**6 strings: enough to show, few enough that a regression fails rather than exhausts the CI machine
    anchors += [f"&a{level} [{', '.join([f'*a{level - 1}'] * 10)}]" for level in range(1, 6)]
    recipe = tmp_path / "laughs.yaml"
    recipe.write_text(f"model:\n  name: mae_vit_test\ndata:\n  mean: [[{', '.join(anchors)}]]\n")  # one value
    with pytest.raises(ConfigError) as err:
        load_config(PretrainConfig, recipe)
    assert "`data.mean[0]` must be float, got [" in str(err.value) and len(str(err.value)) < 1000
