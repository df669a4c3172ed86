"""Checkpoint import and loading: official MAE layouts convert with exact keys; pickles never execute."""

import json
import os
import pickle
import re
import shutil
import stat
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

import mae_tnt
import mae_tnt.atomic
import mae_tnt.export
from mae_tnt.atomic import aside_name, atomic_file, replace_dir, restore_aside
from mae_tnt.convert_checkpoint import main as convert_main
from mae_tnt.models import ModelError
from mae_tnt.models.loading import (
    CheckpointError,
    _builds_over,
    load_weights,
    read_state_dict,
    save_weights,
    untrained_keys,
    without_wrapper_prefixes,
)
from mae_tnt.train.checkpoint import Checkpoint, ResumeError, check_engine_pickles, read_checkpoint
from mae_tnt.train.init import load_init, read_source
from mae_tnt.train.resume import check_compatible, resolve_resume
from mae_tnt.visualize import main as visualize_main


def official_mae_state_dict(with_decoder: bool = True) -> dict:
    """The released layout: flat keys, encoder and decoder side by side, under {'model': ...}."""
    model = mae_tnt.create_model("mae_vit_test")
    flat = {k.removeprefix("encoder."): v for k, v in model.state_dict().items()}
    if not with_decoder:
        flat = {k: v for k, v in flat.items() if not k.startswith(("decoder_", "mask_token"))}
    return flat


def test_an_atomic_write_replaces_the_file_whole_or_leaves_it_as_it_was(tmp_path):
    final = tmp_path / "sub" / "grid.png"
    with atomic_file(final) as tmp:
        assert tmp.parent == final.parent and tmp.suffix == ".png" and tmp != final
        tmp.write_bytes(b"old")
        assert not final.exists()  # nothing shows before the block ends
    with pytest.raises(OSError, match="disk full"), atomic_file(final) as tmp:
        tmp.write_bytes(b"half of the n")
        raise OSError("disk full")
    assert final.read_bytes() == b"old" and sorted(final.parent.iterdir()) == [final]


def directory_with(path: Path, text: str) -> Path:
    path.mkdir()
    (path / "model.safetensors").write_text(text)
    return path


def test_a_directory_replace_stopped_between_its_renames_keeps_the_old_one_whole_to_put_back(tmp_path, monkeypatch):
    final = directory_with(tmp_path / "best", "old")
    renames, replace = [], os.replace

    def stopped_at_the_second(src, dst):
        renames.append(Path(dst).name)
        if len(renames) == 2:
            raise KeyboardInterrupt
        replace(src, dst)

    monkeypatch.setattr(mae_tnt.atomic.os, "replace", stopped_at_the_second)
    with pytest.raises(KeyboardInterrupt):
        replace_dir(directory_with(tmp_path / ".tmp-best", "new"), final)
    monkeypatch.setattr(mae_tnt.atomic.os, "replace", replace)
    assert renames == [aside_name(final).name, "best"] and not final.exists()
    restore_aside(final)
    assert (final / "model.safetensors").read_text() == "old" and not aside_name(final).exists()
    shutil.rmtree(tmp_path / ".tmp-best")  # the next write starts afresh (checkpoint.fresh_directory)
    replace_dir(directory_with(tmp_path / ".tmp-best", "new"), final)
    assert (final / "model.safetensors").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def test_official_full_mae_converts_and_loads_exactly(tmp_path):
    flat = official_mae_state_dict()
    torch.save({"model": flat}, tmp_path / "mae_full.pth")
    assert convert_main([str(tmp_path / "mae_full.pth"), str(tmp_path / "ours.safetensors"),
                         "--model", "mae_vit_test"]) == 0
    model = mae_tnt.create_model("mae_vit_test", checkpoint_path=tmp_path / "ours.safetensors")
    torch.testing.assert_close(model.encoder.blocks[0].attn.qkv.weight, flat["blocks.0.attn.qkv.weight"])
    torch.testing.assert_close(model.decoder_pred.weight, flat["decoder_pred.weight"])


@pytest.mark.parametrize("pool", ["token", "avg"])  # avg: official MAE fine-tuned checkpoints (fc_norm, no norm)
def test_a_classifier_converts_with_the_head_and_pooling_of_its_source_and_the_printed_call_loads_it(tmp_path,
                                                                                                      capsys, pool):
    source = mae_tnt.create_model("vit_test_patch8_32", num_classes=7, global_pool=pool).eval()
    torch.save({"state_dict": source.state_dict()}, tmp_path / "seven.pth")
    out = tmp_path / "seven.safetensors"
    assert convert_main([str(tmp_path / "seven.pth"), str(out), "--model", "vit_test_patch8_32"]) == 0
    printed = capsys.readouterr().out.splitlines()[-1]
    pooling = ", global_pool='avg'" if pool == "avg" else ""
    assert printed == (f"load it with: mae_tnt.create_model('vit_test_patch8_32', checkpoint_path='{out}', "
                       f"num_classes=7{pooling})")
    loaded = eval(printed.removeprefix("load it with: "), {"mae_tnt": mae_tnt}).eval()  # noqa: S307 - our own output
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(images), source(images))


def test_a_conversion_refuses_to_write_over_its_source_and_says_when_it_replaces_a_file(tmp_path, capsys):
    source = tmp_path / "seven.safetensors"
    save_weights(mae_tnt.create_model("vit_test_patch8_32", num_classes=7).state_dict(), source)
    data = source.read_bytes()
    assert convert_main([str(source), str(tmp_path / "." / source.name), "--model", "vit_test_patch8_32"]) == 1
    assert "is SRC, which the conversion would replace; write it to another file" in capsys.readouterr().err
    assert source.read_bytes() == data
    for replacing in (False, True):
        assert convert_main([str(source), str(tmp_path / "out.safetensors"), "--model", "vit_test_patch8_32"]) == 0
        assert ("(replacing the file that was there)" in capsys.readouterr().out.splitlines()[0]) == replacing


def test_weights_of_another_image_size_convert_only_at_a_size_given_and_load_at_it(tmp_path, capsys):
    source = mae_tnt.create_model("vit_test_patch8_32", num_classes=7, img_size=48).eval()
    torch.save(source.state_dict(), tmp_path / "big.pth")
    args = [str(tmp_path / "big.pth"), str(tmp_path / "big.safetensors"), "--model", "vit_test_patch8_32"]
    assert convert_main(args) == 1  # rather than resampled silently to the default 32 px
    assert (f"the position table of {tmp_path / 'big.pth'} is for another image size than vit_test_patch8_32's "
            "default (pos_embed [1, 37, 32] -> [1, 17, 32]): pass --img-size the size it was trained at (or the size "
            "to resample it to)") in capsys.readouterr().err
    assert convert_main(args + ["--img-size", "48"]) == 0
    printed = capsys.readouterr().out.splitlines()[-1]
    assert printed.endswith("num_classes=7, img_size=48)")
    loaded = eval(printed.removeprefix("load it with: "), {"mae_tnt": mae_tnt}).eval()  # noqa: S307 - our own output
    images = torch.randn(2, 3, 48, 48)
    torch.testing.assert_close(loaded(images), source(images))
    assert convert_main(args + ["--img-size", "64"]) == 0  # resampling, when asked for, is said
    printed = capsys.readouterr().out
    assert "resampled the position table to 64 px (bicubic): pos_embed [1, 37, 32] -> [1, 65, 32]" in printed


def test_a_tnt_classifier_converts_with_a_note_that_its_pooling_is_not_in_its_weights(tmp_path, capsys):
    source = mae_tnt.create_model("tnt_test_patch8_32", num_classes=7, global_pool="avg")
    torch.save(source.state_dict(), tmp_path / "tnt.pth")
    out = tmp_path / "tnt.safetensors"
    assert convert_main([str(tmp_path / "tnt.pth"), str(out), "--model", "tnt_test_patch8_32"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[-2].endswith("num_classes=7)")
    assert printed[-1] == ("note: TNT's weights do not show its pooling: the call uses the class token (timm's and "
                           "the official default); add global_pool='avg' if SRC was trained with average pooling")


@pytest.mark.parametrize("source", ["checkpoint", "export"])
def test_a_tnt_classifier_of_ours_converts_with_the_pooling_its_description_records(tmp_path, capsys, source):
    trained = mae_tnt.create_model("tnt_test_patch8_32", num_classes=7, global_pool="avg").eval()
    checkpoint = tmp_path / "best"
    checkpoint.mkdir()
    save_weights(trained.state_dict(), checkpoint / "model.safetensors")
    (checkpoint / "state.json").write_text(json.dumps({"model": "tnt_test_patch8_32", "mode": "finetune",
                                                       "num_classes": 7, "config": {"model": {"global_pool": "avg"}}}))
    if source == "export":
        mae_tnt.export.export(checkpoint, tmp_path / "export")
    out = tmp_path / "tnt.safetensors"
    assert convert_main([str(tmp_path / ("best" if source == "checkpoint" else "export")), str(out), "--model",
                         "tnt_test_patch8_32"]) == 0
    printed = capsys.readouterr().out.splitlines()[-1]  # no note: the pooling is known
    assert printed.endswith("num_classes=7, global_pool='avg')")
    loaded = eval(printed.removeprefix("load it with: "), {"mae_tnt": mae_tnt}).eval()  # noqa: S307 - our own output
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(images), trained(images))


def test_official_encoder_only_mae_needs_the_decoder_allowed(tmp_path, capsys):
    torch.save({"model": official_mae_state_dict(with_decoder=False)}, tmp_path / "enc.pth")
    args = [str(tmp_path / "enc.pth"), str(tmp_path / "o.safetensors"), "--model", "mae_vit_test"]
    assert convert_main(args) == 1
    err = capsys.readouterr().err
    assert "20 missing: decoder_blocks.* (12), decoder_embed.bias, decoder_embed.weight, " in err
    assert "decoder_pred.weight" in err
    assert "pass the groups of keys the source was saved without to --allow-missing" in err
    assert convert_main(args + ["--allow-missing", "decoder_*", "mask_token"]) == 0
    assert ("note: the 20 keys SRC lacks hold a fresh initialisation, the same in every conversion: they were never "
            "trained, as OUT's metadata records (tools/visualize.py refuses to draw a reconstruction through an "
            "untrained decoder, which shows noise)") in capsys.readouterr().out
    first = (tmp_path / "o.safetensors").read_bytes()
    torch.rand(3)  # another random state: the file does not depend on it
    assert convert_main(args + ["--allow-missing", "decoder_*", "mask_token"]) == 0
    assert (tmp_path / "o.safetensors").read_bytes() == first


def test_a_classifier_converts_to_an_mae_once_its_head_is_left_out_and_the_decoder_allowed(tmp_path, capsys):
    classifier = mae_tnt.create_model("vit_test_patch8_32", num_classes=7)
    torch.save(classifier.state_dict(), tmp_path / "vit.pth")
    args = [str(tmp_path / "vit.pth"), str(tmp_path / "mae.safetensors"), "--model", "mae_vit_test",
            "--allow-missing", "decoder_*", "mask_token"]
    assert convert_main(args) == 1
    err = capsys.readouterr().err
    assert "2 unexpected: encoder.head.bias, encoder.head.weight" in err
    assert "of keys to leave out to --allow-unexpected (e.g. a classifier's head: --allow-unexpected " \
           "'encoder.head.*')" in err
    assert convert_main(args + ["--allow-unexpected", "encoder.head.*"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(
        f"wrote {tmp_path / 'mae.safetensors'} for mae_vit_test: missing [decoder_blocks.* (12), decoder_embed.bias, "
        "decoder_embed.weight, decoder_norm.bias, decoder_norm.weight, decoder_pos_embed, decoder_pred.bias, "
        "decoder_pred.weight, mask_token], unexpected [encoder.head.bias, encoder.head.weight], dropped 0 keys")
    loaded = {"mae_tnt": mae_tnt}
    exec(f"model = {printed.splitlines()[-1].removeprefix('load it with: ')}", loaded)  # noqa: S102 - our own output
    assert torch.equal(loaded["model"].encoder.blocks[1].mlp.fc2.weight, classifier.blocks[1].mlp.fc2.weight)


def test_keys_a_conversion_initialised_fresh_are_recorded_and_visualize_refuses_an_untrained_decoder(tmp_path, capsys):
    torch.save({"model": official_mae_state_dict(with_decoder=False)}, tmp_path / "enc.pth")
    out = tmp_path / "mae.safetensors"
    assert convert_main([str(tmp_path / "enc.pth"), str(out), "--model", "mae_vit_test", "--allow-missing",
                         "decoder_*", "mask_token"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"load it with: mae_tnt.create_model('mae_vit_test', checkpoint_path='{out}')")
    assert len(untrained_keys(out)) == 20 and "decoder_pred.weight" in untrained_keys(out) and "mask_token" in \
        untrained_keys(out)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # loading it, and fine-tuning from it, say nothing of the decoder
        mae_tnt.create_model("mae_vit_test", checkpoint_path=out)
        load_init(mae_tnt.create_model("vit_test_patch8_32", num_classes=10), out, log=lambda line: None)
    assert visualize_main([str(out), str(tmp_path / "shards"), "--model", "mae_vit_test"]) == 1
    assert re.fullmatch(rf"error: {re.escape(str(out))} holds 20 keys that never trained \(decoder_blocks\.\* \(12\), "
                        r"decoder_embed\.bias, .*mask_token\): tools/convert_checkpoint.py initialised them fresh, as "
                        r"its source lacked them, so the reconstruction would show noise; draw the grid from weights "
                        r"with a trained decoder \(an official MAE \*_full.pth converts with its own\)\n",
                        capsys.readouterr().err)


@pytest.mark.parametrize("mark", ["not json", '{"untrained_keys": "decoder_pred.weight"}', '{"model": "x"}', "[1]"])
def test_a_converted_file_whose_untrained_mark_is_corrupt_is_refused_rather_than_read_as_all_trained(tmp_path, mark):
    save_file(mae_tnt.create_model("mae_vit_test").state_dict(), tmp_path / "w.safetensors",
              metadata={"mae_tnt_conversion": mark})
    with pytest.raises(CheckpointError, match=r"w.safetensors: its mae_tnt_conversion metadata is corrupt; convert "):
        untrained_keys(tmp_path / "w.safetensors")


@pytest.mark.parametrize("layout", ["ours", "official flat"])
def test_encoder_checkpoint_loads_into_classifier_with_only_the_head_missing(tmp_path, layout):
    mae = mae_tnt.create_model("mae_vit_test")
    weights = mae.state_dict()
    if layout == "official flat":  # MAE's *_full.pth files: the decoder's keys beside the encoder's, no prefix
        weights = {key.removeprefix("encoder."): value for key, value in weights.items()}
    torch.save({"model": weights}, tmp_path / "ckpt.pth")
    classifier = mae_tnt.create_model("vit_test_patch8_32", num_classes=10)
    report = load_weights(classifier, tmp_path / "ckpt.pth", allow_missing=("head.*",))
    assert report.missing == ["head.bias", "head.weight"] and report.unexpected == []
    assert any(k.startswith("decoder_") for k in report.dropped) and "mask_token" in report.dropped
    assert torch.equal(classifier.blocks[1].mlp.fc2.weight, mae.encoder.blocks[1].mlp.fc2.weight)
    with pytest.raises(CheckpointError, match="head.weight"):
        load_weights(mae_tnt.create_model("vit_test_patch8_32", num_classes=10), tmp_path / "ckpt.pth")


def test_unexpected_key_is_named(tmp_path):
    sd = mae_tnt.create_model("mae_vit_test").state_dict()
    sd["encoder.blocks.9.extra"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"1 unexpected: encoder.blocks.9.extra\. Check"):
        load_weights(mae_tnt.create_model("mae_vit_test"), sd)


def test_another_models_weights_fail_with_a_short_count_of_each_misfit():
    vit = mae_tnt.create_model("vit_test_patch8_32", num_classes=10).state_dict()
    wider = mae_tnt.create_model("vit_test_patch8_32", num_classes=10, embed_dim=48)
    with pytest.raises(CheckpointError) as err:  # not the RuntimeError of load_state_dict, one line per tensor
        load_weights(wider, vit)
    own = wider.state_dict()
    reshaped = sum(value.shape != own[key].shape for key, value in vit.items())
    assert str(err.value).startswith(f"checkpoint keys do not fit ViT: {reshaped} of another shape: cls_token "
                                     "[1, 1, 32] vs [1, 1, 48], pos_embed [1, 17, 32] vs [1, 17, 48] and more. Check")
    tnt = mae_tnt.create_model("tnt_test_patch8_32", num_classes=10)
    with pytest.raises(CheckpointError, match=r"do not fit TNT: \d+ missing: blocks\.\* \(\d+\).*; "
                                              r"\d+ unexpected: blocks\.\* \(\d+\)"):
        load_weights(tnt, vit)


class Payload:
    """Unpickling this runs a function: what an attacker's checkpoint would do."""

    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path(__import__('os').environ['PWNED']).write_text('owned')",))


def test_malicious_pickle_is_refused_without_executing(tmp_path, monkeypatch, recwarn):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("PWNED", str(marker))
    path = tmp_path / "evil.pth"
    with open(path, "wb") as handle:
        pickle.dump({"model": {"w": torch.zeros(1)}, "args": Payload()}, handle)
    torch.save({"model": {"w": torch.zeros(1)}, "args": Payload()}, tmp_path / "evil_zip.pth")
    for candidate in (path, tmp_path / "evil_zip.pth"):
        with pytest.raises(CheckpointError, match="cannot read .* safely") as refused:
            read_state_dict(candidate)
        reason = str(refused.value).split("safely (", 1)[1]
        assert re.match(r"UnpicklingError: (?!Weights only load failed)[^.]*(GLOBAL|Unsupported)", reason), reason
        assert "\x1b" not in reason  # what was refused, without terminal styling
        assert refused.value.args[0].endswith("convert a foreign checkpoint with tools/convert_checkpoint.py, adding "
                                              "--unsafe-pickle for a legacy pickle you trust")
    assert not [w for w in recwarn if "pickle protocol" in str(w.message)]  # torch's request to report protocol 4
    with pytest.raises(CheckpointError):
        mae_tnt.create_model("mae_vit_test", checkpoint_path=tmp_path / "evil_zip.pth")
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"\xff\xd8\xff\xe0 a JPEG", b"epoch,loss\n1,0.5\n"])
def test_a_file_that_is_no_checkpoint_is_called_so_not_a_pickle(tmp_path, content):
    (tmp_path / "photo.pth").write_bytes(content)
    with pytest.raises(CheckpointError, match=r"photo.pth: it is no PyTorch checkpoint \(.*\); pass a weights file") \
            as refused:
        read_state_dict(tmp_path / "photo.pth")
    assert "pickle" not in str(refused.value)


def test_a_file_of_a_run_directory_that_is_no_checkpoint_points_to_the_run(tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "config.yaml").write_text("model:\n  name: mae_vit_test\n")
    with pytest.raises(CheckpointError, match=r"config.yaml: it is no PyTorch checkpoint .*directory \(.*run is a run "
                                              r"directory: pass it\)$"):
        read_state_dict(tmp_path / "run" / "config.yaml")
    (tmp_path / "notes.yaml").write_text("a: 1\n")
    with pytest.raises(CheckpointError, match=r"notes.yaml: it is no PyTorch checkpoint .*directory$"):
        read_state_dict(tmp_path / "notes.yaml")


def test_a_run_directory_resolves_to_its_newest_checkpoint(tmp_path):
    model = mae_tnt.create_model("mae_vit_test")
    for step, scale in (("step_00000001", 0.0), ("step_00000002", 1.0)):
        folder = tmp_path / "checkpoints" / step
        folder.mkdir(parents=True)
        save_weights({k: v * scale for k, v in model.state_dict().items()}, folder / "model.safetensors")
    loaded = read_state_dict(tmp_path)
    torch.testing.assert_close(loaded["decoder_pred.weight"], model.state_dict()["decoder_pred.weight"])


def test_saved_weights_get_the_umask_mode_where_safetensors_alone_gives_0600(tmp_path):
    old = os.umask(0o027)
    try:
        save_weights({"w": torch.arange(6.0).view(2, 3).t()}, tmp_path / "w.safetensors")  # a non-contiguous view
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "w.safetensors").stat().st_mode) == 0o640
    assert torch.equal(read_state_dict(tmp_path / "w.safetensors")["w"], torch.arange(6.0).view(2, 3).t())


class LegacyArgs:
    """What old training scripts pickled next to their weights (an argparse-like namespace)."""


def test_convert_tool_errors_are_one_line_naming_the_fix(tmp_path, capsys):
    state = mae_tnt.create_model("vit_test_patch8_32").state_dict()
    torch.save({"model": state, "args": LegacyArgs()}, tmp_path / "legacy.pth")
    args = [str(tmp_path / "legacy.pth"), str(tmp_path / "out.safetensors"), "--model"]
    assert convert_main(args + ["vit_test_patch8_32"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cannot read") and err.count("\n") == 1
    assert err.endswith("Only tensors and plain containers are accepted: add --unsafe-pickle for a legacy pickle you "
                        "trust\n")
    assert convert_main(args + ["vit_tst"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: unknown model 'vit_tst'. Did you mean") and "vit_test_patch8_32" in err
    assert convert_main(args + ["vit_test_patch8_32", "--unsafe-pickle"]) == 0  # the user trusts the file
    assert convert_main([str(tmp_path / "legacy.pth"), str(tmp_path / "out.pth"), "--model", "vit_test_patch8_32",
                         "--unsafe-pickle"]) == 1
    assert capsys.readouterr().err == f"error: {tmp_path / 'out.pth'} must end in .safetensors, the format written; " \
                                      f"e.g. {tmp_path / 'out.safetensors'}\n"
    assert not (tmp_path / "out.pth").exists()


def test_a_conversion_that_cannot_be_written_keeps_an_earlier_output_and_says_to_free_space(tmp_path, monkeypatch,
                                                                                           capsys):
    torch.save({"model": mae_tnt.create_model("vit_test_patch8_32").state_dict()}, tmp_path / "w.pth")
    args = [str(tmp_path / "w.pth"), str(tmp_path / "out.safetensors"), "--model", "vit_test_patch8_32"]
    (tmp_path / "out.safetensors").write_bytes(b"an earlier conversion")

    def full_disk(state_dict, path, metadata=None):
        path.write_bytes(b"the start of a file")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("mae_tnt.convert_checkpoint.save_weights", full_disk)
    assert convert_main(args) == 1
    assert capsys.readouterr().err.startswith(
        f"error: could not write {tmp_path / 'out.safetensors'} (Error while serializing: I/O error: No space left on "
        "device (os error 28)), with ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors", "w.pth"]  # no partial file
    assert (tmp_path / "out.safetensors").read_bytes() == b"an earlier conversion"


def test_arguments_a_builder_refuses_are_a_model_error():
    with pytest.raises(ModelError, match="cannot build vit_test_patch8_32 with {'img_size': 30}: .*divisible"):
        mae_tnt.create_model("vit_test_patch8_32", img_size=30)
    with pytest.raises(ModelError, match=r"^sret_test takes no argument 'patch_size': leave it out \(in a recipe, "
                                         r"remove model.patch_size or set it back to its default\)$"):
        mae_tnt.create_model("sret_test", patch_size=16)
    for name, kwargs, message in [
        ("mae_tnt_test", dict(num_classes=0), "num_classes is for a classifier: an MAE model has no head"),
        ("mae_vit_test", dict(global_pool="avg"), "global_pool is for a classifier"),  # timm drops the final norm
        ("mae_sret_test", dict(decoder_heads=5), "dim should be divisible by num_heads"),  # timm's assertion
        ("tnt_test_patch8_32", dict(num_heads_outer=5), "embed_dim 32 by num_heads_outer 5"),
        ("mae_sret_test", dict(decoder_dim=30), "a 2-D sin-cos position table needs a width divisible by 4, got 30"),
    ]:
        with pytest.raises(ModelError, match=f"cannot build {name} with .*{message}"):
            mae_tnt.create_model(name, **kwargs)


def test_weights_of_the_other_pooling_or_head_name_the_build_arguments_that_fit():
    pooled = mae_tnt.create_model("vit_test_patch8_32", num_classes=10, global_pool="avg").state_dict()
    with pytest.raises(CheckpointError, match="2 missing: norm.bias, norm.weight; 2 unexpected: fc_norm.bias, "
                                              "fc_norm.weight. .* create the model with global_pool='avg'"):
        load_weights(mae_tnt.create_model("vit_test_patch8_32", num_classes=10), pooled)
    with pytest.raises(CheckpointError, match="The checkpoint was trained with global average pooling and has a head "
                                              "of 10 outputs: create the model with global_pool='avg', num_classes=10"):
        load_weights(mae_tnt.create_model("vit_test_patch8_32", num_classes=3), pooled)
    encoder = mae_tnt.create_model("vit_test_patch8_32", num_classes=0).state_dict()
    with pytest.raises(CheckpointError, match="The checkpoint was trained with the class token and has no head: "
                                              "create the model with global_pool='token', num_classes=0$"):
        load_weights(mae_tnt.create_model("vit_test_patch8_32", num_classes=3, global_pool="avg"), encoder)
    with_new_head = mae_tnt.create_model("vit_test_patch8_32", num_classes=3)
    with pytest.raises(CheckpointError, match=re.escape(
            "The checkpoint has no head: create the model with num_classes=0; to train a new head on it, load it "
            "with mae_tnt.load_weights(model, path, allow_missing=('head.*',)) instead, as finetune.py's init= does")
            + "$"):
        load_weights(with_new_head, encoder)
    assert load_weights(with_new_head, encoder, allow_missing=("head.*",)).missing == ["head.bias", "head.weight"]
    with pytest.raises(CheckpointError, match="Check that the model name matches the checkpoint, or convert it with "
                                              "tools/convert_checkpoint.py$"):  # foreign keys: no build argument fits
        load_weights(mae_tnt.create_model("vit_test_patch8_32", num_classes=10, depth=1), pooled)


def test_a_truncated_safetensors_file_is_named_as_such(tmp_path):
    save_weights({"w": torch.zeros(64)}, tmp_path / "w.safetensors")
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "w.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cannot read .*w.safetensors: not a complete safetensors file \(.*\); "
                                              r"write or download it again$"):
        read_state_dict(tmp_path / "w.safetensors")


def test_an_unreadable_checkpoint_of_a_run_names_the_previous_one(tmp_path):
    """A run directory stands for its newest checkpoint (init=, tools/export.py, tools/visualize.py): when that one
    cannot be read, the error names the one before it, which `run.resume=auto` would have fallen back to."""
    steps = [tmp_path / "run" / "checkpoints" / f"step_0000000{step}" for step in (2, 4)]
    for step in steps:
        step.mkdir(parents=True)
        save_weights({"w": torch.zeros(64)}, step / "model.safetensors")
    for step in steps:
        (step / "model.safetensors").write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match=rf"cannot read {steps[1]}/model.safetensors: not a complete safetensors "
                                              rf"file \(.*\); give the run's previous checkpoint, {steps[0]}, instead "
                                              r"\(or write the file again\)$"):
        read_state_dict(tmp_path / "run")
    with pytest.raises(CheckpointError, match=r"write or download it again$"):  # the first has none before it
        read_state_dict(steps[0])


class RunsCode:
    """Pickles into a call of os.system, as a malicious file would."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_deepspeed_checkpoint_naming_other_callables_is_refused_before_deepspeed_unpickles_it(tmp_path):
    engine = tmp_path / "engine" / "pytorch_model"
    engine.mkdir(parents=True)
    rng_state = {"numpy": np.random.default_rng(0).integers(0, 9, 4), "torch": torch.get_rng_state()}
    torch.save(rng_state, tmp_path / "engine" / "random_states_0.pkl")  # numpy arrays, as accelerate saves them
    torch.save({"module": {"w": torch.ones(2)}}, engine / "mp_rank_00_model_states.pt")
    check_engine_pickles(tmp_path / "engine")
    torch.save({"module": RunsCode(tmp_path / "ran")}, engine / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(CheckpointError, match=r"zero_pp_rank_0_mp_rank_00_optim_states.pt would run (posix|os)\.system "
                                              r"when unpickled, which no checkpoint of ours holds; refusing"):
        read_source(tmp_path)  # init= of a DeepSpeed checkpoint directory
    assert not (tmp_path / "ran").exists()


def hostile_engine(tmp_path: Path) -> tuple[Path, Path]:
    """An engine whose `latest` names `pytorch_model`, and a folder outside it holding a pickle that runs code."""
    engine = tmp_path / "run" / "engine"
    (engine / "pytorch_model").mkdir(parents=True)
    (engine / "latest").write_text("pytorch_model")
    torch.save({"module": {"w": torch.ones(2)}}, engine / "pytorch_model" / "mp_rank_00_model_states.pt")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    torch.save({"module": RunsCode(tmp_path / "ran")}, outside / "mp_rank_00_model_states.pt")
    return engine, outside


@pytest.mark.parametrize("escape", ["linked folder", "linked file", "absolute tag", "relative tag"])
def test_a_deepspeed_checkpoint_leading_deepspeed_outside_its_engine_folder_is_refused(tmp_path, escape):
    """The pickles are checked inside `engine/`; DeepSpeed reads the folder `latest` names, through any link."""
    engine, outside = hostile_engine(tmp_path)
    check_engine_pickles(engine)  # as written, it passes
    if escape == "linked folder":
        shutil.rmtree(engine / "pytorch_model")
        (engine / "pytorch_model").symlink_to(outside)
    elif escape == "linked file":
        (engine / "pytorch_model" / "mp_rank_00_model_states.pt").unlink()
        (engine / "pytorch_model" / "mp_rank_00_model_states.pt").symlink_to(outside / "mp_rank_00_model_states.pt")
    else:
        (engine / "latest").write_text(str(outside) if escape == "absolute tag" else "../../elsewhere")
    refusal = "is a symbolic link, which no checkpoint of ours holds" if "linked" in escape else "which is no folder of"
    with pytest.raises(CheckpointError, match=refusal):
        read_source(tmp_path / "run")
    assert not (tmp_path / "ran").exists()


def test_a_checkpoint_file_torch_cannot_scan_or_an_optimizer_naming_callables_is_an_unusable_checkpoint(tmp_path):
    path = tmp_path / "step_00000002"
    (path / "engine").mkdir(parents=True)
    (path / "state.json").write_text(json.dumps({"step": 2, "model": "mae_vit_test", "config": {}}))
    torch.save({"module": {}}, path / "engine" / "mp_rank_00_model_states.pt", pickle_protocol=4)
    with pytest.raises(ResumeError, match="mp_rank_00_model_states.pt cannot be checked as a torch checkpoint file"):
        read_checkpoint(path)
    shutil.rmtree(path / "engine")
    save_file({"w": torch.ones(2)}, path / "model.safetensors")
    torch.save({"state": RunsCode(tmp_path / "ran")}, path / "optimizer.pt")
    with pytest.raises(ResumeError, match=r"optimizer.pt would run (posix|os)\.system when unpickled"):
        read_checkpoint(path)
    assert not (tmp_path / "ran").exists()


def write_engine_checkpoint(out, step: int) -> Path:
    """A checkpoint as a DeepSpeed run writes it: state.json and the engine's torch files."""
    path = out / "checkpoints" / f"step_{step:08d}"
    (path / "engine" / "pytorch_model").mkdir(parents=True)
    torch.save({"module": {"w": torch.ones(2)}}, path / "engine" / "pytorch_model" / "mp_rank_00_model_states.pt")
    (path / "state.json").write_text(json.dumps({"step": step, "model": "mae_vit_test", "config": {}}))
    return path


def test_auto_resume_passes_over_a_deepspeed_checkpoint_with_a_truncated_file_to_the_previous_one(tmp_path):
    write_engine_checkpoint(tmp_path, 4)
    weights = write_engine_checkpoint(tmp_path, 8) / "engine" / "pytorch_model" / "mp_rank_00_model_states.pt"
    weights.write_bytes(weights.read_bytes()[:100])
    logged = []
    assert resolve_resume("auto", tmp_path, log=logged.append).path.name == "step_00000004"
    assert re.fullmatch(r"warning: skipping unusable checkpoint .*step_00000008: .*mp_rank_00_model_states.pt cannot "
                        r"be checked as a torch checkpoint file .*; trying the previous one", logged[0])


def test_a_corrupt_description_beside_the_weights_is_named(tmp_path):
    save_weights(mae_tnt.create_model("vit_test_patch8_32").state_dict(), tmp_path / "model.safetensors")
    (tmp_path / "state.json").write_text("{")
    with pytest.raises(CheckpointError, match=r"state.json is corrupt \(not a JSON object\): restore it, or pass the "
                                              r"weights file in .* itself"):
        read_source(tmp_path)
    assert read_source(tmp_path / "model.safetensors")[1] == {}  # as the message says
    with pytest.raises(CheckpointError, match=r"state.json is corrupt \(not a JSON object\)"):  # not a key mismatch
        mae_tnt.create_model("vit_test_patch8_32", checkpoint_path=tmp_path)  # or settings dropped without a word
    assert mae_tnt.create_model("vit_test_patch8_32", checkpoint_path=tmp_path / "model.safetensors") is not None


def test_an_mae_checkpoint_given_to_another_mae_names_the_model_it_holds(tmp_path):
    save_weights(mae_tnt.create_model("mae_vit_test").state_dict(), tmp_path / "model.safetensors")
    (tmp_path / "state.json").write_text(json.dumps({"model": "mae_vit_test", "step": 1, "config": {"model": {}}}))
    with pytest.raises(CheckpointError, match=rf"^{tmp_path} holds the weights of mae_vit_test, not of mae_tnt_test: "
                                              r"build mae_vit_test, which its description records$"):
        mae_tnt.create_model("mae_tnt_test", checkpoint_path=tmp_path)
    assert mae_tnt.create_model("vit_test_patch8_32", checkpoint_path=tmp_path).num_classes == 0  # its encoder


@pytest.mark.parametrize("legacy", [False, True])
def test_a_truncated_pth_is_named_as_such_not_as_a_pickle_to_trust(tmp_path, legacy):
    """The advice to add --unsafe-pickle, which fails again on such a file, is only for what torch's safe reader
    refused."""
    torch.save(mae_tnt.create_model("vit_test_patch8_32").state_dict(), tmp_path / "w.pth",
               _use_new_zipfile_serialization=not legacy)
    data = (tmp_path / "w.pth").read_bytes()
    (tmp_path / "w.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"w.pth: it is truncated or corrupt \(.*\); write or download it "
                                              r"again$"):
        read_state_dict(tmp_path / "w.pth")


def test_wrapper_prefixes_are_removed_in_either_order_of_nesting():
    state = mae_tnt.create_model("vit_test_patch8_32").state_dict()
    for prefix in ("module._orig_mod.", "_orig_mod.module.", "module."):
        assert without_wrapper_prefixes({prefix + k: v for k, v in state.items()}).keys() == state.keys()


@pytest.mark.parametrize("affine", [False, True])  # False: our and MAE's probe; True: another probe's BatchNorm
def test_a_linear_probe_checkpoint_converts_and_loads_with_the_same_outputs(tmp_path, capsys, affine):
    source = mae_tnt.create_model("vit_test_patch8_32", num_classes=3)
    source.head = torch.nn.Sequential(torch.nn.BatchNorm1d(32, affine=affine, eps=1e-6), torch.nn.Linear(32, 3))
    with torch.no_grad():
        for tensor in source.head.state_dict().values():
            if tensor.is_floating_point():
                tensor.uniform_(0.5, 1.5)
    source.eval()
    torch.save(source.state_dict(), tmp_path / "probe.pth")
    out = tmp_path / "probe.safetensors"
    assert convert_main([str(tmp_path / "probe.pth"), str(out), "--model", "vit_test_patch8_32"]) == 0
    printed = capsys.readouterr().out.splitlines()[-1]
    assert printed.endswith("num_classes=3)")  # read from the probe's head.1, which the fold makes head
    loaded = eval(printed.removeprefix("load it with: "), {"mae_tnt": mae_tnt}).eval()  # noqa: S307 - our own output
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(images), source(images), atol=1e-5, rtol=1e-5)


def test_a_learned_table_of_another_size_is_not_resampled_unasked_into_an_mae_or_by_create_model(tmp_path, capsys):
    """The MAE wrapper renames its encoder's keys, where the check by key name saw no resampled table."""
    source = mae_tnt.create_model("tnt_test_patch8_32", num_classes=7, img_size=64)
    save_weights(source.state_dict(), tmp_path / "tnt64.safetensors")
    args = [str(tmp_path / "tnt64.safetensors"), str(tmp_path / "mae.safetensors"), "--model", "mae_tnt_test",
            "--allow-missing", "decoder_*", "mask_token", "--allow-unexpected", "encoder.head.*"]
    assert convert_main(args) == 1
    assert "patch_pos [1, 65, 32] -> [1, 17, 32]): pass --img-size" in capsys.readouterr().err
    assert convert_main(args + ["--img-size", "64"]) == 0
    with pytest.raises(CheckpointError, match=r"patch_pos \[1, 65, 32\] -> \[1, 17, 32\]\): pass img_size="):
        mae_tnt.create_model("tnt_test_patch8_32", checkpoint_path=tmp_path / "tnt64.safetensors", num_classes=7)
    resampled = mae_tnt.create_model("tnt_test_patch8_32", checkpoint_path=tmp_path / "tnt64.safetensors",
                                     num_classes=7, img_size=32)  # asked for
    assert resampled.patch_pos.shape == (1, 17, 32)


def test_convert_checks_out_and_src_before_reading_even_with_unsafe_pickle(tmp_path, capsys):
    save_weights(mae_tnt.create_model("vit_test_patch8_32").state_dict(), tmp_path / "w.safetensors")
    (tmp_path / "plain_file").write_text("x")
    (tmp_path / "folder.safetensors").mkdir()
    for out, message in ((tmp_path / "plain_file" / "w.safetensors", f"{tmp_path / 'plain_file'} is a file, not a "
                                                                     "directory; choose another OUT"),
                         (tmp_path / "folder.safetensors", f"{tmp_path / 'folder.safetensors'} is a directory; "
                                                           "choose another OUT")):
        assert convert_main([str(tmp_path / "w.safetensors"), str(out), "--model", "vit_test_patch8_32"]) == 1
        assert capsys.readouterr().err == f"error: {message}\n"
    assert convert_main([str(tmp_path / "missing.pth"), str(tmp_path / "o.safetensors"), "--model",
                         "vit_test_patch8_32", "--unsafe-pickle"]) == 1
    assert capsys.readouterr().err.startswith(f"error: checkpoint {tmp_path / 'missing.pth'} does not exist")


@pytest.mark.parametrize("saved_world, saved, message", [
    (2, {"zero_stage": 2, "precision": "bf16"}, r"holds DeepSpeed shards of 2 processes, which load only on as many: "
                                               r"launch 2 processes to continue it"),
    (1, {"zero_stage": 2, "precision": "fp32"}, r"was written by DeepSpeed in fp32, whose optimizer shards load only "
                                               r"in it: set run.precision=fp32 to continue it"),
    (1, {"zero_stage": 3, "precision": "bf16"}, r"was written under ZeRO stage 3, which stage 2 cannot read: launch "
                                               r"with a ZeRO-3 DeepSpeed config to continue it"),
    (1, {"zero_stage": 1, "precision": "bf16"}, None),  # stages 1 and 2 read each other's shards
])
def test_a_deepspeed_checkpoint_resumes_only_in_a_layout_that_can_read_its_shards(tmp_path, saved_world, saved,
                                                                                   message):
    """DeepSpeed itself fails with a missing file or an assertion. The world-size refusal also comes before the
    effective-batch check's advice to adapt optim.accum_steps, which cannot help here."""
    (tmp_path / "engine").mkdir()
    config = {"model": {"name": "mae_vit_test"}, "optim": {"accum_steps": 1}}
    state = {"model": "mae_vit_test", "world_size": saved_world, "plan": {"effective_batch": 8 * saved_world},
             "deepspeed": saved}
    now = {"zero_stage": 2, "precision": "bf16"}
    if message is None:
        check_compatible(Checkpoint(tmp_path, state), config, effective_batch=8, world_size=1, deepspeed=now)
        return
    with pytest.raises(ResumeError, match=message):
        check_compatible(Checkpoint(tmp_path, state), config, effective_batch=8, world_size=1, deepspeed=now)


@pytest.mark.parametrize("saved, message", [
    ({"epoch": 3, "weights": {"w": torch.zeros(1)}}, r"no state dict found under any of \('model', 'state_dict', "
                                                     r"'module', 'model_ema'\) \(its top-level keys: epoch, weights\); "
                                                     r"save the model's state_dict\(\) alone"),
    ({"model": [torch.zeros(1)]}, r"expected a state dict, got list; save the model's state_dict\(\) rather than "
                                  r"the model"),
])
def test_a_file_without_a_state_dict_says_what_it_holds_and_what_to_save(tmp_path, saved, message):
    torch.save(saved, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match=message):
        read_state_dict(tmp_path / "odd.pth")


def forged_pretraining_checkpoint(path: Path, model: str = "mae_vit_test", **forged) -> Path:
    """A 32-px checkpoint of `model` (mae_vit_test: 52,960 elements in 50 tensors) whose state.json records the
    `forged` settings."""
    save_weights(mae_tnt.create_model(model).state_dict(), path / "model.safetensors")
    config = {"model": {"img_size": 32, **forged}, "data": {"mean": [0.5] * 3, "std": [0.25] * 3}}
    (path / "state.json").write_text(json.dumps({"model": model, "step": 1, "config": config}))
    return path


@pytest.mark.parametrize("key, value", [("img_size", 65536), ("decoder_dim", 10**5), ("decoder_depth", 10**5)])
def test_a_description_that_builds_far_more_than_its_weights_is_refused_before_anything_is_built(
        tmp_path, capsys, forbid_real_builds, key, value):
    """Built for real, 65536 px would take 4.3e9 elements and a decoder 10^5 wide 1.2e11, before the weights' shapes
    are compared; 10^5 blocks would take minutes and GBs even on the meta device, so the sizing stops early."""
    forged_pretraining_checkpoint(tmp_path, **{key: value})
    forbid_real_builds()
    refusal = (rf"the state.json of {re.escape(str(tmp_path))} builds mae_vit_test with .*{key}={value}\b.*, which "
               r"holds over 4 times the 52,960 elements or 50 tensors of its weights: it is corrupt or describes "
               r"other weights; restore it")
    with pytest.raises(CheckpointError, match=rf"^{refusal}, or pass .*{key}.* to create_model yourself$"):
        mae_tnt.create_model("mae_vit_test", checkpoint_path=tmp_path)
    assert visualize_main([str(tmp_path), str(tmp_path / "shards")]) == 1
    assert re.fullmatch(rf"error: {refusal}, or copy the weights out of it and describe them with --model \(and "
                        r"--img-size, --no-norm-pix\)\n", capsys.readouterr().err)
    if key == "img_size":  # the only setting the encoder takes from its MAE's description
        with pytest.raises(CheckpointError, match=r"builds vit_test_patch8_32 with num_classes=0, img_size=65536, "):
            mae_tnt.create_model("vit_test_patch8_32", checkpoint_path=tmp_path)


def test_the_callers_own_arguments_are_not_held_to_the_description_and_tables_may_grow_to_them(tmp_path):
    forged_pretraining_checkpoint(tmp_path, img_size=65536)
    assert mae_tnt.create_model("mae_vit_test", checkpoint_path=tmp_path, img_size=32).grid == 4  # overrides it
    forged_pretraining_checkpoint(tmp_path)  # honest: the encoder's num_classes=0 still comes from it
    assert mae_tnt.create_model("vit_test_patch8_32", checkpoint_path=tmp_path, img_size=128).grid == 16  # resampled


def test_fine_tuning_init_builds_from_its_recipe_so_a_forged_description_sizes_nothing(tmp_path):
    forged_pretraining_checkpoint(tmp_path, img_size=65536, decoder_depth=10**5)
    report = load_init(mae_tnt.create_model("vit_test_patch8_32", num_classes=10), tmp_path, log=lambda line: None)
    assert report.missing == ["head.bias", "head.weight"]


def test_a_recorded_image_size_that_differs_from_the_weights_is_refused_not_resampled_to(tmp_path):
    """Resampling is done at a size the caller asks for; a description recording another size than the weights' is
    corrupt (the MAE's own tables are fixed sin-cos ones, built for any size, so only the classifier resamples)."""
    forged_pretraining_checkpoint(tmp_path, img_size=64)  # weights of 32 px
    with pytest.raises(CheckpointError, match=r"than vit_test_patch8_32 at the 64 px its description records "
                                              r"\(pos_embed \[1, 17, 32\] -> \[1, 65, 32\]\): pass img_size= "):
        mae_tnt.create_model("vit_test_patch8_32", checkpoint_path=tmp_path)
    assert mae_tnt.create_model("vit_test_patch8_32", checkpoint_path=tmp_path, img_size=64).grid == 8  # asked for


def test_visualize_refuses_a_run_whose_state_json_records_another_size_than_its_learned_position_table(tmp_path,
                                                                                                         capsys):
    forged_pretraining_checkpoint(tmp_path, "mae_tnt_test", img_size=64)  # TNT learns its patch_pos
    assert visualize_main([str(tmp_path), "data/fashion_mnist"]) == 1
    assert capsys.readouterr().err == (f"error: the state.json of {tmp_path} records img_size=64, another size than "
                                       "its weights' position table (patch_pos [1, 17, 32] -> [1, 65, 32]): it is "
                                       "corrupt; restore it\n")


def test_an_export_whose_config_json_is_truncated_is_refused_by_create_model_as_by_the_tools(tmp_path):
    classifier = mae_tnt.create_model("vit_test_patch8_32", num_classes=10)
    mae_tnt.export.write_export(tmp_path, classifier.state_dict(), {"timm_name": "vit_base_patch16_224"})
    (tmp_path / "config.json").write_text((tmp_path / "config.json").read_text()[:20])
    refusal = rf"^{re.escape(str(tmp_path / 'config.json'))} is corrupt \(not a JSON object\): restore it"
    for load in (lambda: mae_tnt.create_model("vit_test_patch8_32", checkpoint_path=tmp_path, num_classes=10),
                 lambda: read_source(tmp_path)):
        with pytest.raises(CheckpointError, match=refusal):
            load()


def test_weights_of_another_model_than_the_one_named_say_to_check_the_name_not_that_the_description_is_corrupt(
        tmp_path):
    forged_pretraining_checkpoint(tmp_path)  # an honest mae_vit_test checkpoint
    with pytest.raises(CheckpointError, match=rf"^vit_small_patch16_224 holds over 4 times the 52,960 elements or 50 "
                                              rf"tensors of its weights in {re.escape(str(tmp_path))}: they are "
                                              r"another model's weights; check the model name$"):
        mae_tnt.create_model("vit_small_patch16_224", checkpoint_path=tmp_path)


@pytest.mark.parametrize("state, refusal", [
    ({"model": "tnt_test_patch8_32", "config": {"model": [1]}}, r"state.json is corrupt \(its config's model section "
                                                                 r"is no mapping\): restore it"),
    ({"model": "mae_tnt_test", "config": {"model": {"img_size": "big"}}},
     r"state.json: `model.img_size` must be int, got 'big'; the checkpoint's description is corrupt: restore it")])
def test_a_checkpoint_whose_description_is_corrupt_is_one_error_line_of_every_tool(tmp_path, capsys, state, refusal):
    classifier = mae_tnt.create_model("tnt_test_patch8_32", num_classes=10)
    save_weights(classifier.state_dict(), tmp_path / "model.safetensors")
    (tmp_path / "state.json").write_text(json.dumps(state))
    assert convert_main([str(tmp_path), str(tmp_path / "out.safetensors"), "--model", "tnt_test_patch8_32"]) == 1
    assert re.fullmatch(rf"error: {re.escape(str(tmp_path))}/{refusal}\n", capsys.readouterr().err)
    with pytest.raises(CheckpointError, match=refusal):
        mae_tnt.create_model("tnt_test_patch8_32", checkpoint_path=tmp_path)


def test_models_sized_in_several_threads_at_once_are_each_held_to_their_own_limit():
    """Each thread's build is charged to its own budget, by hooks installed once: threads that added and removed
    hooks of their own changed the table another thread's registration was iterating over."""
    results, errors = {"small": set(), "large": set()}, []

    def size(label: str, elements: int) -> None:
        try:
            for _ in range(30):
                results[label].add(_builds_over("vit_test_patch8_32", {}, elements, 10**6))
        except Exception as err:  # noqa: BLE001 - reported by the assertion below
            errors.append(err)

    def build_plain_modules() -> None:
        for _ in range(300):
            torch.nn.Linear(2, 2)

    threads = [threading.Thread(target=size, args=("small", 1000)),
               threading.Thread(target=size, args=("large", 10**9)), threading.Thread(target=build_plain_modules)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and results == {"small": {True}, "large": {False}}


@pytest.mark.parametrize("name", mae_tnt.list_models())
def test_every_registered_model_builds_on_the_meta_device_without_allocating(name):
    """`refuse_oversized_build` sizes the model a checkpoint describes on the meta device, which allocates nothing
    only while every parameter and buffer is made there: one made from numpy or on the CPU would be real."""
    with torch.device("meta"):
        model = mae_tnt.create_model(name)
    assert {tensor.device.type for tensor in model.state_dict().values()} == {"meta"}
