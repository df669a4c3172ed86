"""mae_tnt.export (tools/export.py): exports load into timm with no key errors, keep fine-tuned heads, fold probe
heads, and fail clearly on DeepSpeed checkpoints without DeepSpeed (tests/test_deepspeed.py exports a ZeRO-3 one)."""

import errno
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import mae_tnt
from mae_tnt.models import CheckpointError, create_model, load_weights
from mae_tnt.models.loading import weights_digest
from mae_tnt.train.init import attach_probe_head, load_init

MEAN_STD = {"mean": [0.3, 0.4, 0.45], "std": [0.2, 0.25, 0.3]}  # unlike any timm default


@pytest.fixture(scope="module")
def tool():
    """The export tool's module (tools/export.py runs its main)."""
    from mae_tnt import export

    return export


def write_checkpoint(path: Path, model: torch.nn.Module, state: dict) -> Path:
    """A checkpoint directory as the engines write it: model.safetensors + state.json."""
    path.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path / "model.safetensors")
    (path / "state.json").write_text(json.dumps(state))
    return path


def pretraining_checkpoint(path: Path, name: str, img_size: int = 32):
    mae = create_model(name, img_size=img_size)
    state = {"step": 7, "model": name, "config": {"model": {"img_size": img_size}, "data": MEAN_STD}}
    return write_checkpoint(path, mae, state), mae


def finetune_checkpoint(path: Path, model, mode: str, pool: str):
    state = {"step": 9, "model": "vit_test_patch8_32", "mode": mode, "num_classes": 10, "img_size": 32,
             "config": {"model": {"img_size": 32, "global_pool": pool}, "data": MEAN_STD}}
    return write_checkpoint(path, model, state)


def local_file(path: Path) -> dict:
    """timm's overlay for weights in a local file, as the export prints it (custom_load: see `timm_call`)."""
    return dict(file=str(path), custom_load=False)


def assert_same_tensors(model: torch.nn.Module, path: Path):
    exported, own = load_file(path), model.state_dict()
    assert set(own) == set(exported)
    assert all(torch.equal(own[k], exported[k]) for k in exported)


def test_pretraining_export_loads_into_timm_vit(tool, tmp_path, caplog):
    ckpt, mae = pretraining_checkpoint(tmp_path / "step_00000007", "mae_vit_test")
    config = tool.export(ckpt, tmp_path / "out")
    assert (config["kind"], config["num_classes"], config["img_size"]) == ("encoder", 0, 32)
    assert config["mean"] == MEAN_STD["mean"]
    file = tmp_path / "out" / "model.safetensors"
    with caplog.at_level(logging.INFO):
        model = timm.create_model("vit_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=local_file(file),
                                  img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0)
    assert "Missing keys" not in caplog.text and "Unexpected keys" not in caplog.text
    assert_same_tensors(model, file)
    assert torch.equal(model.blocks[1].attn.qkv.weight, mae.encoder.blocks[1].attn.qkv.weight)


def test_a_pooling_a_pretrained_encoder_was_not_trained_with_is_refused_saying_where_to_choose_it(tool, tmp_path,
                                                                                                  capsys):
    ckpt, _ = pretraining_checkpoint(tmp_path / "step_00000007", "mae_vit_test")
    assert tool.main([str(ckpt), str(tmp_path / "out"), "--global-pool", "avg"]) == 1
    error = capsys.readouterr().err
    assert error.startswith(f"error: --global-pool avg builds vit_test_patch8_32 with other layers than {ckpt} holds (")
    assert error.rstrip().endswith("leave --global-pool out to keep the pooling it was trained with, and choose the "
                                   "pooling when fine-tuning (model.global_pool=avg)")


def test_exporting_over_an_earlier_export_says_it_replaces_it(tool, tmp_path, capsys):
    ckpt, _ = pretraining_checkpoint(tmp_path / "step_00000007", "mae_vit_test")
    for replacing in (False, True):
        assert tool.main([str(ckpt), str(tmp_path / "out")]) == 0
        assert ("replacing the export that was there" in capsys.readouterr().out.splitlines()[0]) == replacing


def test_tnt_export_loads_into_timm_tnt_with_the_same_output(tool, tmp_path):
    ckpt, mae = pretraining_checkpoint(tmp_path / "ckpt", "mae_tnt_test")
    config = tool.export(ckpt, tmp_path / "out")
    assert config["timm_name"] == "tnt_s_patch16_224"
    file = tmp_path / "out" / "model.safetensors"
    model = timm.create_model(config["timm_name"], pretrained=True, pretrained_cfg_overlay=local_file(file),
                              **config["timm_kwargs"]).eval()
    assert_same_tensors(model, file)
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(images), mae.encoder.eval()(images))


def test_the_printed_timm_call_loads_a_fine_tuned_classifier_with_its_head(tool, tmp_path, capsys):
    ours = create_model("vit_test_patch8_32", num_classes=10, global_pool="avg").eval()
    tool.main([str(finetune_checkpoint(tmp_path / "best", ours, "finetune", "avg")), str(tmp_path / "out")])
    printed = capsys.readouterr().out
    call = printed.split("load it in timm with: ")[1].splitlines()[0]
    assert call == json.loads((tmp_path / "out" / "config.json").read_text())["timm_call"]
    assert "'custom_load': False" in call  # else timm < 1.0.31 reads the file as the default tag's .npz (vit_small)
    model = eval(call, {"timm": timm}).eval()  # noqa: S307 - the tool's own output, as a user would paste it
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(images), ours(images))
    again = eval(printed.split("or with: ")[1].strip(), {"mae_tnt": mae_tnt}).eval()  # noqa: S307 - likewise
    torch.testing.assert_close(again(images), ours(images))
    preprocessing = timm.data.resolve_data_config({}, model=model)  # what timm users feed the model
    assert preprocessing == {"input_size": (3, 32, 32), "interpolation": "bicubic", "mean": tuple(MEAN_STD["mean"]),
                             "std": tuple(MEAN_STD["std"]), "crop_pct": 0.875, "crop_mode": "center"}
    folder = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True).eval()  # as a Hub model's folder
    torch.testing.assert_close(folder(images), ours(images))
    from_json = timm.data.resolve_data_config({}, model=folder)  # JSON gives lists where the overlay has tuples
    assert {key: tuple(v) if isinstance(v, list) else v for key, v in from_json.items()} == preprocessing


@pytest.mark.parametrize("given", ["run", "run/checkpoints"])
def test_exporting_a_run_directory_names_the_checkpoint_taken_and_the_best_weights(tool, tmp_path, capsys, given):
    ours = create_model("vit_test_patch8_32", num_classes=10, global_pool="avg")
    finetune_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000008", ours, "finetune", "avg")
    newest = finetune_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000009", ours, "finetune", "avg")
    finetune_checkpoint(tmp_path / "run" / "best", ours, "finetune", "avg")
    assert tool.main([str(tmp_path / given), str(tmp_path / "out")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (f"exported finetune vit_test_patch8_32 (10 classes, 32 px) from {newest} to "
                        f"{tmp_path / 'out'}")
    best = tmp_path / "run" / "best"
    assert lines[1] == f"note: that is the run's newest checkpoint; its best validated weights are in {best}"
    assert tool.main([str(newest), str(tmp_path / "again")]) == 0  # named itself: no note
    assert "note:" not in capsys.readouterr().out


def test_create_model_builds_an_export_as_it_was_built_and_names_the_head_size_of_a_misfit(tool, tmp_path):
    ours = create_model("vit_test_patch8_32", num_classes=7, global_pool="avg", img_size=48).eval()
    state = {"step": 9, "model": "vit_test_patch8_32", "mode": "finetune", "num_classes": 7, "img_size": 48,
             "config": {"model": {"img_size": 48, "global_pool": "avg"}, "data": MEAN_STD}}
    tool.export(write_checkpoint(tmp_path / "best", ours, state), tmp_path / "out")
    loaded = create_model("vit_test_patch8_32", checkpoint_path=tmp_path / "out" / "model.safetensors").eval()
    assert (loaded.num_classes, loaded.global_pool, loaded.grid * loaded.unit) == (7, "avg", 48)
    images = torch.randn(2, 3, 48, 48)
    torch.testing.assert_close(loaded(images), ours(images))
    with pytest.raises(CheckpointError, match="The checkpoint has a head of 7 outputs: create the model with "
                                              "num_classes=7"):
        create_model("vit_test_patch8_32", checkpoint_path=tmp_path / "out", num_classes=0)  # the caller's wins


def test_an_export_exports_again_and_bare_weights_export_as_trained_or_not_at_all(tool, tmp_path):
    ours = create_model("vit_test_patch8_32", num_classes=7, global_pool="avg", img_size=48).eval()
    names = [f"class {i}" for i in range(7)]
    state = {"step": 9, "model": "vit_test_patch8_32", "mode": "finetune", "num_classes": 7, "label_names": names,
             "img_size": 48, "config": {"model": {"img_size": 48, "global_pool": "avg"}, "data": MEAN_STD}}
    first = tool.export(write_checkpoint(tmp_path / "best", ours, state), tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["label_names"] == names  # timm's Hub key
    folder = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True)
    assert folder.pretrained_cfg["label_names"] == names and folder.num_classes == 7
    again = tool.export(tmp_path / "out", tmp_path / "again")  # its config.json describes it
    built = ("model", "kind", "num_classes", "label_names", "img_size", "global_pool", "mean", "std", "timm_call")
    assert {k: again[k] for k in built} == {k: first[k] for k in built} | {"timm_call": again["timm_call"]}
    assert_same_tensors(ours, tmp_path / "again" / "model.safetensors")

    bare = create_model("vit_test_patch8_32", num_classes=7, global_pool="avg").eval()
    torch.save({"model": bare.state_dict()}, tmp_path / "bare.pth")  # no state.json: only the keys tell
    config = tool.export(tmp_path / "bare.pth", tmp_path / "bare", model_name="vit_test_patch8_32")
    assert (config["kind"], config["num_classes"], config["global_pool"]) == ("classifier", 7, "avg")
    assert_same_tensors(bare, tmp_path / "bare" / "model.safetensors")

    torch.save({"model": ours.state_dict()}, tmp_path / "bare48.pth")  # another size than the default 32
    with pytest.raises(CheckpointError, match=r"another image size than vit_test_patch8_32 at 32 px "
                                              r"\(pos_embed \[1, 37, 32\] -> \[1, 17, 32\]\): pass --img-size"):
        tool.export(tmp_path / "bare48.pth", tmp_path / "bare48", model_name="vit_test_patch8_32")
    config = tool.export(tmp_path / "bare48.pth", tmp_path / "bare48", model_name="vit_test_patch8_32", img_size=48)
    assert config["img_size"] == 48 and config["timm_kwargs"]["img_size"] == 48
    assert_same_tensors(ours, tmp_path / "bare48" / "model.safetensors")


def test_bare_tnt_classifier_weights_need_their_pooling_and_export_with_it(tool, tmp_path, capsys):
    ours = create_model("tnt_test_patch8_32", num_classes=5, global_pool="avg").eval()
    save_file(ours.state_dict(), tmp_path / "tnt.safetensors")  # `norm` is there under either pooling
    assert tool.main([str(tmp_path / "tnt.safetensors"), str(tmp_path / "refused"), "--model",
                      "tnt_test_patch8_32"]) == 1
    assert capsys.readouterr().err.strip() == (
        "error: TNT's weights do not show the pooling its head was trained with: pass --global-pool token (timm's "
        "and the official default) or --global-pool avg (MAE-style fine-tuning)")
    config = tool.export(tmp_path / "tnt.safetensors", tmp_path / "out", "tnt_test_patch8_32", global_pool="avg")
    model = timm.create_model(config["timm_name"], pretrained=True, **config["timm_kwargs"],
                              pretrained_cfg_overlay=local_file(tmp_path / "out" / "model.safetensors") | {
                                  "num_classes": 5}).eval()
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(images), ours(images))


def test_linear_probe_export_folds_the_batchnorm_into_the_head(tool, tmp_path):
    probe = create_model("vit_test_patch8_32", num_classes=10, global_pool="token")
    head = attach_probe_head(probe)
    head[0].running_mean.normal_()
    head[0].running_var.uniform_(0.5, 2.0)
    probe.eval()
    tool.export(finetune_checkpoint(tmp_path / "best", probe, "linprobe", "token"), tmp_path / "out")
    plain = create_model("vit_test_patch8_32", num_classes=10, global_pool="token").eval()
    load_weights(plain, tmp_path / "out")  # exact: no key missing or left over
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(plain(images), probe(images), rtol=1e-4, atol=1e-5)
    loaded = create_model("vit_test_patch8_32", checkpoint_path=tmp_path / "best").eval()  # folded on loading too
    torch.testing.assert_close(loaded(images), probe(images), rtol=1e-4, atol=1e-5)
    resumed = create_model("vit_test_patch8_32", num_classes=10, global_pool="token")
    attach_probe_head(resumed)
    load_weights(resumed, tmp_path / "best" / "model.safetensors")  # a probe's own head stays as it is
    assert torch.equal(resumed.head[0].running_var, head[0].running_var)


def test_an_encoder_from_a_pretraining_checkpoint_is_built_at_the_size_it_was_trained_at(tmp_path):
    checkpoint, mae = pretraining_checkpoint(tmp_path / "ckpt", "mae_vit_test", img_size=48)
    encoder = create_model("vit_test_patch8_32", checkpoint_path=checkpoint, num_classes=0)
    assert encoder.pos_embed.shape == mae.encoder.pos_embed.shape == (1, 37, 32)  # not resampled to 32 px
    assert create_model("vit_test_patch8_32", checkpoint_path=checkpoint, num_classes=0, img_size=32).grid == 4


@pytest.mark.slow  # three ViT-B initialisations: about 5 s alone, 15 s on a shared CPU
def test_vit_base_round_trip_at_real_size(tool, tmp_path):
    encoder = create_model("vit_base_patch16_224", num_classes=0)
    ckpt = write_checkpoint(tmp_path / "ckpt", encoder, {"step": 1, "mode": "finetune", "model":
                                                         "vit_base_patch16_224", "num_classes": 0})
    tool.export(ckpt, tmp_path / "out")
    file = tmp_path / "out" / "model.safetensors"
    model = timm.create_model("vit_base_patch16_224", pretrained=True, pretrained_cfg_overlay=local_file(file),
                              num_classes=0)
    assert_same_tensors(model, file)


def test_deepspeed_checkpoint_without_deepspeed_fails_clearly(tool, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed.utils.zero_to_fp32", None)  # as if DeepSpeed were not installed
    (tmp_path / "ckpt" / "engine").mkdir(parents=True)
    (tmp_path / "ckpt" / "state.json").write_text(json.dumps({"step": 1, "model": "mae_vit_test"}))
    with pytest.raises(CheckpointError, match="install DeepSpeed"):
        tool.export(tmp_path / "ckpt", tmp_path / "out")


def test_a_model_timm_lacks_gets_only_our_call_printed_and_it_loads(tool, tmp_path, capsys):
    checkpoint, mae = pretraining_checkpoint(tmp_path / "ckpt", "mae_sret_test", img_size=64)
    assert tool.main([str(checkpoint), str(tmp_path / "out")]) == 0
    first, *_, last = capsys.readouterr().out.splitlines()
    assert first == f"exported encoder sret_test (no head, 64 px) from {checkpoint} to {tmp_path / 'out'}"
    call, note = last.removeprefix("load it with: ").split(" (")
    assert note == "not a timm architecture)" and "or with" not in last
    encoder = eval(call, {"mae_tnt": mae_tnt})  # noqa: S307 - the tool's own output
    assert all(torch.equal(v, mae.state_dict()[f"encoder.{k}"]) for k, v in encoder.state_dict().items())


def test_weights_without_state_json_need_a_model_name(tool, tmp_path, capsys):
    torch.save({"model": create_model("vit_test_patch8_32", num_classes=0).state_dict()}, tmp_path / "w.pth")
    assert tool.main([str(tmp_path / "w.pth"), str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err == "error: the checkpoint has no state.json naming its model; pass --model NAME\n"
    assert not (tmp_path / "out").exists()
    config = tool.export(tmp_path / "w.pth", tmp_path / "out", model_name="vit_test_patch8_32")
    assert (config["kind"], config["img_size"], config["timm_kwargs"]["img_size"]) == ("encoder", 32, 32)
    assert tool.main([str(tmp_path / "w.pth"), str(tmp_path / "w.pth"), "--model", "vit_test_patch8_32"]) == 1
    assert capsys.readouterr().err == (f"error: the export goes into the directory {tmp_path / 'w.pth'}, but "
                                       f"{tmp_path / 'w.pth'} is a file; choose another OUT\n")
    with pytest.raises(CheckpointError, match="is a file; choose another OUT"):  # the API says the same
        tool.export(tmp_path / "w.pth", tmp_path / "w.pth" / "out", model_name="vit_test_patch8_32")


def test_an_export_never_overwrites_the_run_checkpoint_or_weights_it_exports(tool, tmp_path):
    checkpoint, _ = pretraining_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000005", "mae_vit_test")
    before = (checkpoint / "model.safetensors").read_bytes()
    for source, out in ((checkpoint, checkpoint), (tmp_path / "run", tmp_path / "run"), (tmp_path / "run", checkpoint)):
        with pytest.raises(CheckpointError, match="would overwrite; export into a new directory"):
            tool.export(source, out)
    assert (checkpoint / "model.safetensors").read_bytes() == before and not (checkpoint / "config.json").exists()
    bare = tmp_path / "bare" / "model.safetensors"  # bare weights named like the export's own file
    bare.parent.mkdir()
    save_file(create_model("vit_test_patch8_32", num_classes=0).state_dict(), bare)
    with pytest.raises(CheckpointError, match="would overwrite"):
        tool.export(bare, bare.parent, model_name="vit_test_patch8_32")
    assert tool.export(tmp_path / "run", tmp_path / "exports" / "vit")["kind"] == "encoder"  # a new directory is fine


@pytest.mark.parametrize("files", [{"config.json": '{"architectures": ["BertModel"]}'}, {"model.safetensors": "x"},
                                   {"config.json": "not json", "model.safetensors": "x"}])
def test_an_export_never_overwrites_files_it_did_not_write(tool, tmp_path, files):
    checkpoint, _ = pretraining_checkpoint(tmp_path / "step_00000005", "mae_vit_test")
    out = tmp_path / "hub_model"
    out.mkdir()
    for name, text in files.items():
        (out / name).write_text(text)
    names = " and ".join(name for name in ("model.safetensors", "config.json") if name in files)
    with pytest.raises(CheckpointError, match=rf"^{out} holds {names} that tools/export.py did not write, which the "
                                              r"export would overwrite; export into a new directory"):
        tool.export(checkpoint, out)
    assert {path.name: path.read_text() for path in out.iterdir()} == files


def test_a_re_export_that_cannot_be_written_keeps_the_earlier_export_whole(tool, tmp_path, monkeypatch, capsys):
    """Both files are written aside before either replaces the earlier pair: a full disk halfway leaves no new
    weights beside the old description, and no partial files taking the space."""
    first, _ = pretraining_checkpoint(tmp_path / "first", "mae_vit_test")
    second, _ = pretraining_checkpoint(tmp_path / "second", "mae_vit_test")
    tool.export(first, tmp_path / "out")
    earlier = {path.name: path.read_bytes() for path in (tmp_path / "out").iterdir()}

    def full_disk(path, text, write_text=Path.write_text):
        write_text(path, text[:10])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full_disk)  # the description, written after the weights
    assert tool.main([str(second), str(tmp_path / "out")]) == 1
    monkeypatch.undo()
    assert capsys.readouterr().err.splitlines()[-1].startswith(
        f"error: could not write {tmp_path / 'out'} ([Errno 28] No space left on device), with ")
    assert {path.name: path.read_bytes() for path in (tmp_path / "out").iterdir()} == earlier


def test_the_weights_file_of_a_checkpoint_exports_with_the_description_beside_it(tool, tmp_path):
    ours = create_model("vit_test_patch8_32", num_classes=10, global_pool="avg").eval()
    best = finetune_checkpoint(tmp_path / "best", ours, "finetune", "avg")
    config = tool.export(best / "model.safetensors", tmp_path / "out")  # not only the directory: its file too
    assert (config["kind"], config["mean"], config["step"]) == ("finetune", MEAN_STD["mean"], 9)


def test_a_global_pool_that_contradicts_the_recorded_one_is_refused(tool, tmp_path):
    ours = create_model("tnt_test_patch8_32", num_classes=10, global_pool="avg").eval()
    state = {"step": 9, "model": "tnt_test_patch8_32", "mode": "finetune", "num_classes": 10,
             "config": {"model": {"img_size": 32, "global_pool": "avg"}, "data": MEAN_STD}}
    best = write_checkpoint(tmp_path / "best", ours, state)  # TNT's keys are the same under either pooling
    with pytest.raises(CheckpointError, match="--global-pool token contradicts the pooling avg that .*best's "
                                              "description records; leave --global-pool out"):
        tool.export(best, tmp_path / "out", global_pool="token")
    assert tool.export(best, tmp_path / "out", global_pool="avg")["global_pool"] == "avg"


def forge(description: Path, edit: Callable[[dict], None]) -> None:
    """Apply `edit` to the JSON object in `description` (a state.json or an export's config.json)."""
    recorded = json.loads(description.read_text())
    edit(recorded)
    description.write_text(json.dumps(recorded))


def test_a_description_that_builds_far_more_than_its_weights_is_refused_before_export_builds_it(
        tool, tmp_path, forbid_real_builds):
    """The model that a description sizes is built on the meta device first (every real build fails this test)."""
    pretraining, _ = pretraining_checkpoint(tmp_path / "ckpt", "mae_vit_test")
    forge(pretraining / "state.json", lambda state: state["config"]["model"].update(img_size=65536))
    classifier = create_model("vit_test_patch8_32", num_classes=10)
    best = finetune_checkpoint(tmp_path / "best", classifier, "finetune", "token")
    forge(best / "state.json", lambda state: state.update(num_classes=10**9))
    tool.export(finetune_checkpoint(tmp_path / "fine", classifier, "finetune", "token"), tmp_path / "out")
    forge(tmp_path / "out" / "config.json", lambda config: config.update(img_size=65536))
    forbid_real_builds()
    advice = "restore it, or copy the weights out of it and describe them with --model, --img-size and --global-pool"
    with pytest.raises(CheckpointError, match=rf"^the state.json of {pretraining} builds vit_test_patch8_32 with "
                                              r"num_classes=0, img_size=65536, which holds over 4 times the 32,224 "
                                              rf"elements or 30 tensors of its weights: .*; {advice}$"):
        tool.export(pretraining, tmp_path / "forged")
    for build in (lambda: tool.export(best, tmp_path / "forged"),
                  lambda: create_model("vit_test_patch8_32", checkpoint_path=best)):
        with pytest.raises(CheckpointError, match=r"builds vit_test_patch8_32 with num_classes=1000000000, "):
            build()
    with pytest.raises(CheckpointError, match=rf"^the config.json of {tmp_path / 'out'} builds vit_test_patch8_32 "
                                              r"with num_classes=10, img_size=65536, global_pool='token', which .*; "
                                              r"restore it, or pass global_pool, img_size, num_classes to "
                                              r"create_model yourself$"):
        create_model("vit_test_patch8_32", checkpoint_path=tmp_path / "out")
    with pytest.raises(CheckpointError, match=rf"^the config.json of {tmp_path / 'out'} builds .*; {advice}$"):
        tool.export(tmp_path / "out", tmp_path / "forged")
    assert not (tmp_path / "forged").exists()


def test_an_export_without_normalisation_statistics_says_timm_will_use_its_defaults(tool, tmp_path, capsys):
    torch.save({"model": create_model("vit_test_patch8_32").state_dict()}, tmp_path / "w.pth")
    assert tool.main([str(tmp_path / "w.pth"), str(tmp_path / "out"), "--model", "vit_test_patch8_32"]) == 0
    assert ("note: the weights do not record the normalisation they were trained with, so timm's resolve_data_config "
            "gives vit_base_patch16_224's defaults; add mean=... and std=...") in capsys.readouterr().out
    pretraining_checkpoint(tmp_path / "ckpt", "mae_vit_test")
    assert tool.main([str(tmp_path / "ckpt"), str(tmp_path / "described")]) == 0
    assert "note: the weights do not record" not in capsys.readouterr().out


def tnt_classifier_checkpoint(path: Path, pool: str) -> Path:
    """A fine-tuned TNT's checkpoint: its keys are the same under either pooling, only state.json tells."""
    state = {"step": 9, "model": "tnt_test_patch8_32", "mode": "finetune", "num_classes": 10,
             "config": {"model": {"img_size": 32, "global_pool": pool}, "data": MEAN_STD}}
    return write_checkpoint(path, create_model("tnt_test_patch8_32", num_classes=10, global_pool=pool), state)


def test_an_export_stopped_between_its_two_replaces_is_refused_by_every_reader_until_exported_again(tool, tmp_path,
                                                                                                    monkeypatch):
    """config.json replaces the earlier export's before the weights do: a run killed in between leaves an
    average-pooled classifier's description beside a class-token one's weights, which would load silently."""
    out = tmp_path / "out"
    tool.export(tnt_classifier_checkpoint(tmp_path / "token", "token"), out)
    averaged = tnt_classifier_checkpoint(tmp_path / "avg", "avg")
    replace = os.replace

    def killed_after_the_first(src, dst):
        replace(src, dst)
        raise KeyboardInterrupt  # SIGKILL or a power cut would leave the same two files

    monkeypatch.setattr(tool.os, "replace", killed_after_the_first)
    with pytest.raises(KeyboardInterrupt):
        tool.export(averaged, out)
    monkeypatch.undo()
    refusal = (rf"^{out / 'model.safetensors'} and the config.json beside it come from different exports \(an "
               rf"export was stopped between replacing the one and the other\): export again into {out}$")
    readers = (lambda: create_model("tnt_test_patch8_32", checkpoint_path=out),
               lambda: load_init(create_model("tnt_test_patch8_32", num_classes=10), out),
               lambda: tool.export(out / "model.safetensors", tmp_path / "again"))
    for reader in readers:
        with pytest.raises(CheckpointError, match=refusal):
            reader()
    tool.export(averaged, out)  # the interrupted pair is replaced, as any earlier export
    assert create_model("tnt_test_patch8_32", checkpoint_path=out).global_pool == "avg"


def test_an_export_older_than_its_weights_digest_loads_and_the_same_export_writes_the_same_files(tool, tmp_path):
    ckpt, _ = pretraining_checkpoint(tmp_path / "ckpt", "mae_vit_test", img_size=48)
    tool.export(ckpt, tmp_path / "out")
    first = {name: (tmp_path / "out" / name).read_bytes() for name in ("model.safetensors", "config.json")}
    tool.export(ckpt, tmp_path / "out")
    for name, written in first.items():  # the digest is the weights' own, not a random id
        assert (tmp_path / "out" / name).read_bytes() == written
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    del config["weights_digest"]  # as tools/export.py wrote it before recording the digest
    (tmp_path / "out" / "config.json").write_text(json.dumps(config))
    assert create_model("vit_test_patch8_32", checkpoint_path=tmp_path / "out").grid == 6  # 48 px, as recorded


@pytest.mark.parametrize("header", [(2**62).to_bytes(8, "little"), b"\x05\0\0\0\0\0\0\0[1,2]", b"\x02\0"])
def test_the_weights_digest_of_a_damaged_file_is_none_without_reading_what_its_header_claims(tmp_path, header):
    (tmp_path / "w.safetensors").write_bytes(header)
    assert weights_digest(tmp_path / "w.safetensors") is None
