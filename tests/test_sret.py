"""SReT: published sizes and costs, the official weight layout against an independent forward, determinism, and MAE.

The MAE path's one designed deviation from the full forward is the zero padding that the stem and pooling convs see
at unit borders. Two tests pin it down exactly: the stem differs only in the first token row/column of each unit
(the only tokens whose receptive field crosses into the unit above/left), and with every conv reduced to its centre
tap (so no conv reads across a unit border) the visible-only path equals the full forward.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import mae_tnt
from mae_tnt.models import CheckpointError, load_weights
from mae_tnt.models.sret import (
    LearnableCoefficient,
    SlicedAttention,
    reestimate_batchnorm,
    split_units,
    to_official_state_dict,
)

PUBLISHED_HEADS = {"sret_t": (2, 4, 8), "sret_lt": (2, 4, 8), "sret_s": (3, 6, 12)}


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter and BN statistic a distinct random value, so any wiring error changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            noise = torch.rand(tensor.shape, generator=generator)
            if name.endswith(("coefficient1.bias", "coefficient2.bias", "coefficient3.bias", "coefficient4.bias")):
                tensor.copy_(0.5 + noise)
            elif name.endswith("running_var"):
                tensor.copy_(0.5 + noise)
            elif name.endswith(("norm1.weight", "norm2.weight", "norm.weight")):
                tensor.copy_(0.8 + 0.4 * noise)
            else:
                tensor.copy_((noise - 0.5) * 0.2)
    return model


def reference_logits(sd: dict[str, torch.Tensor], heads: tuple[int, ...], images: torch.Tensor) -> torch.Tensor:
    """SReT without slicing written from the paper, on official state-dict tensors, with torch.nn.functional only."""

    def mlp(t, p):
        return F.linear(F.gelu(F.linear(t, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
                        sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])

    def ln(t, p, name):
        return F.layer_norm(t, t.shape[-1:], sd[f"{p}{name}.weight"], sd[f"{p}{name}.bias"], eps=1e-6)

    def attention(t, p, num_heads):
        b, n, c = t.shape
        qkv = F.linear(t, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"]).reshape(b, n, 3, num_heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, H, N, d]
        weights = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1)
        out = (weights @ v).transpose(1, 2).reshape(b, n, c)
        return F.linear(out, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])

    x = images
    for i in (1, 2, 3):  # stem: 3x3/s2 conv + BN + ReLU
        p = f"patch_embed.bn{i}."
        x = F.conv2d(x, sd[f"patch_embed.conv{i}.weight"], sd[f"patch_embed.conv{i}.bias"], stride=2, padding=1)
        x = F.relu(F.batch_norm(x, sd[p + "running_mean"], sd[p + "running_var"], sd[p + "weight"], sd[p + "bias"]))
    x = x + sd["pos_embed"]
    for s, num_heads in enumerate(heads):
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)
        j = 0
        while f"transformers.{s}.blocks.{j}.norm1.weight" in sd:  # even j: block application, odd j: NLL
            p = f"transformers.{s}.blocks.{j}."

            def coefficient(i, p=p):
                return sd[f"{p}coefficient{i}.bias"]

            if j % 2 == 0:
                t = coefficient(1) * t + coefficient(2) * attention(ln(t, p, "norm1"), p, num_heads)
                t = coefficient(3) * t + coefficient(4) * mlp(ln(t, p, "norm2"), p)
            else:
                t = coefficient(1) * t + coefficient(2) * mlp(ln(t, p, "norm1"), p)
            j += 1
        x = t.transpose(1, 2).reshape(b, c, h, w)
        if f"pools.{s}.conv.weight" in sd:  # depthwise 3x3/s2 pooling conv
            x = F.conv2d(x, sd[f"pools.{s}.conv.weight"], sd[f"pools.{s}.conv.bias"], stride=2, padding=1, groups=c)
    features = F.layer_norm(x.mean((2, 3)), (x.shape[1],), sd["norm.weight"], sd["norm.bias"], eps=1e-6)
    return F.linear(features, sd["head.weight"], sd["head.bias"])


@pytest.mark.parametrize("name, params", [("sret_t", 4_755_979), ("sret_lt", 4_988_024), ("sret_s", 20_899_692)])
def test_parameter_counts_match_published(name, params):
    with torch.device("meta"):
        model = mae_tnt.create_model(name)
    count = sum(p.numel() for p in model.parameters())
    assert count == params  # 4.76 M, 4.99 M, 20.90 M as published
    assert len(model.state_dict()) == 350  # unique tensors; the official file stores 510 (shared blocks twice)
    assert len(to_official_state_dict(model)) == 510


def fvcore_macs(model: nn.Module, images: torch.Tensor) -> float:
    """GMACs as fvcore counts them: matmuls and convs, plus 5 per LayerNorm and 2 per eval BatchNorm element."""
    norm_elements = {"ln": 0, "bn": 0}

    def hook(kind):
        def count(module, inputs, output):
            norm_elements[kind] += inputs[0].numel()

        return count

    for module in model.modules():
        if isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)):
            module.register_forward_hook(hook("ln" if isinstance(module, nn.LayerNorm) else "bn"))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(images)
    return (counter.get_total_flops() / 2 + 5 * norm_elements["ln"] + 2 * norm_elements["bn"]) / 1e9


@pytest.mark.parametrize("name, gmacs", [("sret_t", 1.122), ("sret_lt", 1.174), ("sret_s", 4.191),
                                         ("sret_t_wo_slice", 1.375), ("sret_lt_wo_slice", 1.427),
                                         ("sret_s_wo_slice", 4.690)])
def test_macs_match_published(name, gmacs):
    with torch.device("meta"):
        model = mae_tnt.create_model(name).eval()
        images = torch.empty(1, 3, 224, 224)
    assert fvcore_macs(model, images) == pytest.approx(gmacs, abs=6e-4)


def test_official_checkpoint_matches_independent_forward():
    # SReT-T's structure (2/5/3 unique blocks, 2/4/8 heads, ratios 3.6/1) at 8 channels per head to stay fast.
    small = dict(img_size=64, base_dims=(8, 8, 8))
    source = randomize_(mae_tnt.create_model("sret_t", **small)).eval()
    official = to_official_state_dict(source)
    assert torch.equal(official["transformers.1.blocks.4.attn.qkv.weight"],
                       official["transformers.1.blocks.6.attn.qkv.weight"])  # a shared block, saved twice
    images = torch.randn(2, 3, 64, 64)
    expected = reference_logits(official, PUBLISHED_HEADS["sret_t"], images)
    plain = mae_tnt.create_model("sret_t_wo_slice", **small).eval()
    report = load_weights(plain, official)
    assert report.missing == [] and report.unexpected == []
    torch.testing.assert_close(plain(images), expected, atol=1e-5, rtol=1e-5)
    sliced = mae_tnt.create_model("sret_t", **small).eval()
    load_weights(sliced, official)  # slicing has no parameters, so the same file loads
    assert not torch.allclose(sliced(images), expected, atol=1e-3)  # but it changes the function


def test_official_layout_round_trip_and_twin_mismatch():
    model = randomize_(mae_tnt.create_model("sret_test"))
    official = to_official_state_dict(model)
    adapted = mae_tnt.create_model("sret_test").adapt_state_dict(official)
    assert adapted.keys() == model.state_dict().keys()
    assert all(torch.equal(adapted[k], v) for k, v in model.state_dict().items())
    official["transformers.0.blocks.2.mlp.fc1.weight"] = official["transformers.0.blocks.2.mlp.fc1.weight"] + 1
    with pytest.raises(CheckpointError, match="differs from its twin"):
        load_weights(mae_tnt.create_model("sret_test"), official)


def test_eval_is_deterministic_with_slicing_and_training_follows_global_rng():
    model = mae_tnt.create_model("sret_test").eval()
    images = torch.randn(2, 3, 64, 64)

    @torch.no_grad()
    def run(seed):
        torch.manual_seed(seed)
        return model(images)

    assert torch.equal(run(1), run(2))  # eval ignores the global RNG
    model.train()
    assert torch.equal(run(3), run(3)) and not torch.allclose(run(3), run(4))


def test_stem_per_unit_differs_from_dense_only_at_top_left_unit_borders():
    """A stage-1 token in row/column i of its unit sees pixels 8i-7 .. 8i+7: only i = 0 reaches the neighbour."""
    model = randomize_(mae_tnt.create_model("sret_test", img_size=96)).eval()
    images = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        dense = split_units(model.patch_embed(images), model.grid)  # [B, L, C0, 4, 4]
        crops = split_units(images, model.grid).flatten(0, 1)  # [B*L, 3, 32, 32]
        per_unit = model.patch_embed(crops).unflatten(0, dense.shape[:2])  # [B, L, C0, 4, 4]
    torch.testing.assert_close(per_unit[..., 1:, 1:], dense[..., 1:, 1:])
    torch.testing.assert_close(per_unit[:, 0], dense[:, 0])  # the top-left unit borders the image padding only
    for unit in range(1, model.grid**2):
        assert not torch.allclose(per_unit[:, unit], dense[:, unit])


def make_unit_local_(model: nn.Module) -> nn.Module:
    """Keep only the centre tap of every stem and pooling conv, so no conv reads across a unit border."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                centre = module.weight[..., 1, 1].clone()
                module.weight.zero_()
                module.weight[..., 1, 1] = centre
    return model


@pytest.mark.parametrize("dense_stem", [False, True])
def test_all_visible_equals_full_forward_without_border_padding(dense_stem):
    """With unit-local convs and no slicing, MAE's per-unit path with every unit visible is the full forward."""
    model = randomize_(mae_tnt.create_model("sret_test", img_size=96, sliced=False, dense_stem=dense_stem))
    model = make_unit_local_(model).eval()
    images = torch.randn(2, 3, 96, 96)
    ids_keep = torch.stack([torch.randperm(model.grid**2) for _ in range(2)])  # every unit, in shuffled order
    with torch.no_grad():
        visible = model.forward_visible(images, ids_keep)  # [B, L, D] in ids_keep order
        full = model.norm(model.forward_features(images))  # [B, L, D] in raster order
    torch.testing.assert_close(visible, torch.stack([full[b, ids_keep[b]] for b in range(2)]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dense_stem", [False, True])
def test_each_visible_unit_takes_its_own_position_rows(dense_stem):
    """Units 8 and 5 visible: raising the position rows of hidden unit 0 changes nothing, unit 8's change the output
    (a unit placed by its slot, not its index, would read unit 0's rows)."""
    torch.manual_seed(0)
    model = mae_tnt.create_model("sret_test", img_size=96, dense_stem=dense_stem).eval()
    images, ids = torch.randn(1, 3, 96, 96), torch.tensor([[8, 5]])
    t = model.pos_embed.shape[-1] // model.grid  # stem tokens per unit side
    with torch.no_grad():
        before = model.forward_visible(images, ids)
        model.pos_embed[..., :t, :t] += 5  # unit 0
        torch.testing.assert_close(model.forward_visible(images, ids), before)
        model.pos_embed[..., 2 * t : 3 * t, 2 * t : 3 * t] += 5  # unit 8 = row 2, column 2 of the 3 x 3 grid
        assert not torch.allclose(model.forward_visible(images, ids), before)


@pytest.mark.parametrize("stem", [dict(dense_stem=False), dict(dense_stem=True), dict(encoder_mode="mask_tokens")])
def test_masked_pixels_do_not_change_encoder_output(stem):
    model = mae_tnt.create_model("mae_sret_test", img_size=128, **stem).train()
    images, noise = torch.randn(2, 3, 128, 128), torch.rand(2, model.grid**2)
    mask = model.forward_encoder(images, 0.75, noise)[1]
    hidden = model.unpatchify(mask.unsqueeze(-1).expand(-1, -1, model.unit**2 * 3))  # [B, 3, H, W], 1 = hidden
    outputs = []
    for pixels in (images, images + 10 * hidden * torch.randn_like(images)):
        torch.manual_seed(0)  # the same random slices in both passes (train mode, BN on batch statistics)
        outputs.append(model.forward_encoder(pixels, 0.75, noise)[0])
    torch.testing.assert_close(outputs[0], outputs[1])


@pytest.mark.parametrize("second, slices", [(False, 2), (True, 4)])
def test_each_token_attends_only_within_its_slice_and_keeps_its_place(second, slices):
    """Changing token j changes exactly the outputs of its slice, j's own among them: contiguous slices in the first
    application, a random shuffle's slices in the second, whose order is restored before the output."""
    torch.manual_seed(0)
    attention = SlicedAttention(8, num_heads=2, groups1=2, groups2=4).train()
    x = torch.randn(1, 16, 8)
    slice_of = {}
    for j in range(16):
        changed = x.clone()
        changed[0, j] += 1.0
        outputs = []
        for tokens in (x, changed):
            torch.manual_seed(1)  # the same shuffle in both passes
            outputs.append(attention(tokens, second)[0])
        moved = frozenset((outputs[0] - outputs[1]).abs().amax(-1).gt(1e-6).nonzero().flatten().tolist())
        assert j in moved and len(moved) == 16 // slices, (j, moved)
        slice_of[j] = moved
    assert len(set(slice_of.values())) == slices and all(k in slice_of[j] for k in range(16) for j in slice_of[k])
    contiguous = {frozenset(range(start, start + 16 // slices)) for start in range(0, 16, 16 // slices)}
    assert (set(slice_of.values()) == contiguous) != second  # the second application's slices are shuffled


def test_drop_path_rates_follow_the_official_assignment():
    """Official SReT: a stage's applications j get rate * j / sum(depth), and its i-th unique block takes the i-th."""
    depth, recursive_num, rate = (4, 10, 6), (2, 5, 3), 0.2
    official, start = [], 0
    for d, r in zip(depth, recursive_num, strict=True):
        applications = [rate * j / sum(depth) for j in range(start, start + d)]  # the stage's `drop_path_prob`
        official += applications[:r]  # unique block i: drop_path_prob[i]
        start += d
    model = mae_tnt.create_model("sret_s", drop_path_rate=rate)
    rates = [getattr(block.drop_path, "drop_prob", 0.0) for stage in model.stages for block in stage.blocks]
    assert rates == pytest.approx(official)


@pytest.mark.parametrize("encoder_mode", ["visible", "mask_tokens"])
def test_mae_builder_kwargs_and_shapes(encoder_mode):
    model = mae_tnt.create_model("mae_sret_test", img_size=96, norm_pix_loss=False, decoder_dim=16, decoder_depth=2,
                                 decoder_heads=4, drop_path_rate=0.1, mask_ratio=0.6, encoder_mode=encoder_mode,
                                 dense_stem=True)
    images = torch.randn(2, 3, 96, 96)
    loss, pred, mask = model(images)
    loss.backward()
    assert pred.shape == (2, 9, 32 * 32 * 3) and mask.sum(1).tolist() == [6, 6]
    assert torch.isfinite(loss) and model.encoder.pos_embed.grad is not None
    blocks = model.decoder_blocks
    assert (model.decoder_embed.out_features, len(blocks), blocks[0].attn.num_heads) == (16, 2, 4)
    rates = [getattr(block.drop_path, "drop_prob", 0.0) for stage in model.encoder.stages for block in stage.blocks]
    assert 0 < max(rates) <= 0.1 and model.encoder.dense_stem  # per-block rates: test_drop_path_rates_follow_...
    if encoder_mode == "mask_tokens":  # hidden units enter as the learned mask token
        assert model.encoder_mask_token.grad.abs().sum() > 0


def test_short_mae_run_lowers_loss():
    torch.manual_seed(0)
    model = mae_tnt.create_model("mae_sret_test", mask_ratio=0.5)
    images, noise = torch.randn(4, 3, 64, 64), torch.rand(4, model.grid**2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(15):
        loss = model(images, noise=noise)[0]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_pretrained_encoder_loads_into_classifier_with_only_head_missing():
    pretrained = randomize_(mae_tnt.create_model("mae_sret_test"))
    classifier = mae_tnt.create_model("sret_test", num_classes=10)
    report = load_weights(classifier, pretrained.state_dict(), allow_missing=("head.*",))
    assert report.missing == ["head.bias", "head.weight"] and report.unexpected == []
    assert report.dropped and all(not k.startswith("encoder.") for k in report.dropped)
    images = torch.randn(2, 3, 64, 64)
    encoder, classifier = pretrained.encoder.eval(), classifier.eval()
    torch.testing.assert_close(classifier.forward_features(images), encoder.forward_features(images))


def test_position_map_is_resampled_for_another_input_size():
    source = mae_tnt.create_model("sret_test", img_size=64)
    target = mae_tnt.create_model("sret_test", img_size=128)
    load_weights(target, to_official_state_dict(source))
    expected = F.interpolate(source.pos_embed.detach(), size=(16, 16), mode="bicubic", align_corners=False)
    torch.testing.assert_close(target.pos_embed.detach(), expected)


def test_initialisation_is_deit_style():
    """Truncated-normal(0.02) Linear weights and position map (timm's truncation is at +-2 absolute, so in effect
    normal), zero Linear biases, LayerNorm 1/0, and the learnable coefficients at 1."""
    torch.manual_seed(0)
    model = mae_tnt.create_model("sret_s", img_size=64)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            assert module.weight.std().item() == pytest.approx(0.02, rel=0.1), name
            assert not module.bias.any(), name
        elif isinstance(module, nn.LayerNorm):
            assert (module.weight == 1).all() and not module.bias.any(), name
    assert model.pos_embed.std().item() == pytest.approx(0.02, rel=0.1)
    coefficients = [m.bias for m in model.modules() if isinstance(m, LearnableCoefficient)]
    assert coefficients and all((bias == 1).all() for bias in coefficients)


def test_each_shared_blocks_second_application_slices_in_shuffled_groups(monkeypatch):
    """The official schedule: a shared block's first application slices the sequence as it comes, its second in
    random groups (the official `(i + 2) % 4 == 0`); SReT-T applies each of its 10 unique blocks twice."""
    applications = []
    forward = SlicedAttention.forward
    monkeypatch.setattr(SlicedAttention, "forward", lambda self, x, second: (
        applications.append(second) or forward(self, x, second)))
    mae_tnt.create_model("sret_t", img_size=64, base_dims=(8, 8, 8)).eval()(torch.randn(1, 3, 64, 64))
    assert applications == [False, True] * 10


def test_reestimate_batchnorm_matches_data_statistics():
    model = mae_tnt.create_model("sret_test").eval()
    batches = [torch.randn(4, 3, 64, 64) * 3 + 1 for _ in range(2)]
    assert reestimate_batchnorm(model, batches) == 8  # images seen
    bn1 = model.patch_embed.bn1
    with torch.no_grad():
        first = torch.cat([model.patch_embed.conv1(b) for b in batches])  # [8, C0/2, 32, 32]
    torch.testing.assert_close(bn1.running_mean, first.mean((0, 2, 3)), atol=1e-5, rtol=1e-4)
    per_batch_var = torch.stack([model.patch_embed.conv1(b).var((0, 2, 3)) for b in batches]).detach()
    torch.testing.assert_close(bn1.running_var, per_batch_var.mean(0), atol=1e-5, rtol=1e-4)  # cumulative average
    assert not model.training and bn1.momentum == 0.1


def test_group_matcher_puts_pools_with_the_stage_they_feed():
    from timm.models._manipulate import group_parameters

    model = mae_tnt.create_model("sret_test")
    groups = list(group_parameters(model, model.group_matcher()).values())
    assert groups[0][0] == "pos_embed" and all(k.startswith(("pos_embed", "patch_embed")) for k in groups[0])
    assert sum(len(g) for g in groups) == sum(1 for _ in model.parameters())
    stage2 = next(g for g in groups if "stages.1.blocks.0.attn.qkv.weight" in g)
    assert "pools.0.conv.weight" in stage2 and "stages.1.nlls.1.mlp.fc1.weight" in stage2
    assert groups[-1] == ["norm.weight", "norm.bias", "head.weight", "head.bias"]  # MAE: norms join the head
