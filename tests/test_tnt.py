"""TNT: timm parity (keys, logits, gradients), the official importer, the MAE encoder contract and word masking."""

from functools import partial

import pytest
import timm
import torch
from timm.models import group_parameters
from timm.optim import param_groups_layer_decay

import mae_tnt
from mae_tnt.models.loading import CheckpointError
from mae_tnt.models.tnt import Attention, WordMaskedAutoencoder

MAE_TEST_KWARGS = dict(img_size=32, norm_pix_loss=True, decoder_dim=32, decoder_depth=1, decoder_heads=2,
                       drop_path_rate=0.0, mask_ratio=0.75, encoder_mode="visible")


TIMM_TINY = dict(img_size=32, patch_size=8, inner_dim=8, embed_dim=32, depth=2, num_heads_inner=2, num_heads_outer=2)


def timm_and_ours(name: str, timm_kwargs: dict, **kwargs):
    """timm's non-legacy TNT (random init) and ours with its weights."""
    torch.manual_seed(0)
    theirs = timm.create_model("tnt_s_patch16_224", pretrained=False, **timm_kwargs, **kwargs)
    ours = mae_tnt.create_model(name, **kwargs)
    mae_tnt.load_weights(ours, theirs.state_dict())
    return theirs, ours


@pytest.fixture(scope="module")
def tiny_pair():
    """timm's TNT code at our test size, and `tnt_test_patch8_32` with its weights."""
    return timm_and_ours("tnt_test_patch8_32", TIMM_TINY, num_classes=10)


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return mae_tnt.create_model("tnt_test_patch8_32", num_classes=0).eval()


def images(batch=2, size=32):
    return torch.randn(batch, 3, size, size)


RELEASED_NAMES = {"patch_pos": "outer_pos", "pixel_pos": "inner_pos", "pixel_embed": "patch_embed",
                  "norm1_proj": "proj_norm1", "norm2_proj": "proj_norm2", "norm_in": "inner_norm1",
                  "attn_in": "inner_attn", "norm_mlp_in": "inner_norm2", "mlp_in": "inner_mlp",
                  "norm_out": "outer_norm1", "attn_out": "outer_attn", "norm_mlp": "outer_norm2", "mlp": "outer_mlp"}
"""timm's module names -> those of the released TNT files (huawei-noah Efficient-AI-Backbones `tnt_pytorch`), written
out here rather than taken from the importer's table, so that a misspelt entry there fails the tests."""


def official_layout(timm_sd: dict) -> dict:
    """Invert timm's `checkpoint_filter_fn`: official names, `pixel_pos` as [1, W, c], the dead `outer_tokens`."""
    out = {}
    for key, value in timm_sd.items():
        key = ".".join(RELEASED_NAMES.get(part, part) for part in key.split("."))
        if key == "inner_pos":
            value = value.flatten(2).transpose(1, 2)  # [1, c, s, s] -> [1, W, c]
        out[key] = value
    out["outer_tokens"] = torch.zeros(1, out["outer_pos"].shape[1] - 1, out["outer_pos"].shape[2])
    return out


def assert_grads_close(ours, theirs):
    named = dict(theirs.named_parameters())
    for name, param in ours.named_parameters():
        ref = named[name].grad
        scale = ref.abs().max().item() + 1e-12
        assert (param.grad - ref).abs().max().item() <= 1e-4 * scale, name


# ---- timm parity --------------------------------------------------------------------------------------------------
def test_timm_weights_round_trip(tiny_pair):
    theirs, ours = tiny_pair
    report = mae_tnt.load_weights(ours, theirs.state_dict())
    assert report.missing == [] and report.unexpected == []
    theirs.load_state_dict(ours.state_dict(), strict=True)


def check_parity(theirs, ours, x, mode):
    getattr(theirs, mode)(), getattr(ours, mode)()  # no dropout or drop path in either, so train mode is exact too
    logits, ref = ours(x), theirs(x)
    assert (logits - ref).abs().max().item() < 1e-5
    weights = torch.randn_like(ref)
    ours.zero_grad(), theirs.zero_grad()
    (logits * weights).sum().backward()
    (ref * weights).sum().backward()
    assert_grads_close(ours, theirs)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_logits_and_gradients_match_timm(tiny_pair, mode):
    check_parity(*tiny_pair, images(4), mode)


@pytest.fixture(scope="module")
def tnt_s_pair():
    return timm_and_ours("tnt_s_patch16_224", {})


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_tnt_s_matches_timm(tnt_s_pair, mode):
    theirs, ours = tnt_s_pair
    assert len(ours.state_dict()) == 363
    check_parity(theirs, ours, images(1, 224), mode)


def test_a_seed_draws_the_same_initial_weights_as_timm():
    torch.manual_seed(0)
    theirs = timm.create_model("tnt_s_patch16_224", pretrained=False, **TIMM_TINY, num_classes=10).state_dict()
    torch.manual_seed(0)
    ours = mae_tnt.create_model("tnt_test_patch8_32", num_classes=10).state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_parameter_counts():
    with torch.device("meta"):
        counts = {n: sum(p.numel() for p in mae_tnt.create_model(n).parameters()) / 1e6
                  for n in ("tnt_ti_patch16_224", "tnt_s_patch16_224", "tnt_b_patch16_224")}
    assert counts == pytest.approx({"tnt_ti_patch16_224": 6.08, "tnt_s_patch16_224": 23.77,
                                    "tnt_b_patch16_224": 65.43}, abs=0.005)


@pytest.mark.parametrize("size", ["s", "b"])
def test_keys_and_shapes_match_timm(size):
    with torch.device("meta"):
        ours = mae_tnt.create_model(f"tnt_{size}_patch16_224")
        theirs = timm.create_model(f"tnt_{size}_patch16_224", pretrained=False)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert len(ours.state_dict()) == 363


def test_official_checkpoint_converts(tiny_pair):
    theirs, _ = tiny_pair
    official = official_layout(theirs.state_dict())
    assert "blocks.0.inner_attn.qk.weight" in official and official["inner_pos"].shape == (1, 4, 8)
    model = mae_tnt.create_model("tnt_test_patch8_32", num_classes=10)
    report = mae_tnt.load_weights(model, official)
    assert report.missing == [] and report.unexpected == []
    for key, value in theirs.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    by_timm = timm.models.tnt.checkpoint_filter_fn(dict(official), theirs)  # timm's own importer agrees
    assert by_timm.keys() == model.state_dict().keys()
    assert all(torch.equal(by_timm[key], value) for key, value in model.state_dict().items())


@pytest.mark.parametrize("name", ["tnt_s_patch16_224", "mae_tnt_s_patch16"])
def test_timms_legacy_tnt_layout_is_refused_naming_it(name):
    legacy = timm.create_model("tnt_s_legacy_patch16_224").state_dict()  # the key check would only list misfits
    with pytest.raises(CheckpointError, match="this is timm's legacy TNT layout .* use the official TNT "
                                                      "release or timm's tnt_s_patch16_224"):
        mae_tnt.load_weights(mae_tnt.create_model(name), legacy)


def test_patch_pos_is_resampled_for_another_grid(tiny):
    bigger = mae_tnt.create_model("tnt_test_patch8_32", img_size=48, num_classes=0)
    mae_tnt.load_weights(bigger, tiny.state_dict())
    assert bigger.patch_pos.shape == (1, 1 + 36, 32)
    assert bigger.forward_features(images(1, 48)).shape == (1, 37, 32)


def test_layer_decay_groups(tiny):
    layer_of = group_parameters(tiny, tiny.group_matcher(), reverse=True)
    for name in ("pixel_embed.proj.weight", "patch_pos", "pixel_pos", "cls_token", "norm1_proj.weight",
                 "proj.weight", "norm2_proj.bias"):
        assert layer_of[name] == 0, name
    assert layer_of["blocks.0.proj.weight"] == 1 and layer_of["blocks.1.attn_in.qk.weight"] == 2
    assert layer_of["norm.weight"] == 3  # on top, with the head: MAE's rule (timm's TNT merges it into block 1's)
    groups = param_groups_layer_decay(tiny, layer_decay=0.5, no_weight_decay_list=tiny.no_weight_decay())
    assert sorted({g["lr_scale"] for g in groups}) == [0.125, 0.25, 0.5, 1.0]


# ---- encoder contract ---------------------------------------------------------------------------------------------
def test_all_visible_equals_full_forward(tiny):
    """Every sentence, in a shuffled order per image: each keeps its own position, whatever slot it comes in."""
    x = images(2)
    ids_all = torch.stack([torch.randperm(tiny.grid**2) for _ in range(2)])  # [B, L]
    visible, full = tiny.forward_visible(x, ids_all), tiny.forward_features(x)  # [B, 1 + L, D] each
    torch.testing.assert_close(visible[:, 0], full[:, 0])
    torch.testing.assert_close(visible[:, 1:], torch.stack([full[b, 1:][ids_all[b]] for b in range(2)]))


def test_masked_pixels_do_not_change_the_encoder():
    torch.manual_seed(0)
    mae = mae_tnt.create_model("mae_tnt_test").eval()
    x, noise = images(2), torch.rand(2, mae.grid**2)
    latent, mask, _ = mae.forward_encoder(x, 0.75, noise)
    hidden = mae.unpatchify(mask.unsqueeze(-1).expand(-1, -1, mae.unit**2 * 3))  # [B, 3, H, W], 1 on hidden pixels
    torch.testing.assert_close(mae.forward_encoder(x + 10 * hidden * torch.randn_like(x), 0.75, noise)[0], latent)
    assert not torch.allclose(mae.forward_encoder(x + torch.randn_like(x), 0.75, noise)[0], latent)


def test_mask_token_baseline_runs_every_sentence_without_leaking():
    torch.manual_seed(0)
    mae = mae_tnt.create_model("mae_tnt_test", encoder_mode="mask_tokens").eval()
    x, noise = images(2), torch.rand(2, mae.grid**2)
    latent, mask, _ = mae.forward_encoder(x, 0.75, noise)
    assert latent.shape == (2, 1 + mae.grid**2, 32)
    hidden = mae.unpatchify(mask.unsqueeze(-1).expand(-1, -1, mae.unit**2 * 3))
    torch.testing.assert_close(mae.forward_encoder(x + 10 * hidden * torch.randn_like(x), 0.75, noise)[0], latent)


def test_global_pool_and_drop_path():
    torch.manual_seed(0)
    model = mae_tnt.create_model("tnt_test_patch8_32", num_classes=5, global_pool="avg", drop_path_rate=0.5)
    x = images(4)
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (4, 32)
    assert not torch.equal(model.train()(x), model(x))  # stochastic depth draws a new pattern each call
    assert torch.equal(model.eval()(x), model(x))


# ---- MAE ----------------------------------------------------------------------------------------------------------
def test_mae_entrypoints_accept_the_recipe_kwargs():
    model = mae_tnt.create_model("mae_tnt_test", **MAE_TEST_KWARGS, word_mask_ratio=0.0)
    assert type(model) is mae_tnt.MaskedAutoencoder and model.unit == 8 and model.grid == 4
    with torch.device("meta"):
        small = mae_tnt.create_model("mae_tnt_s_patch16")
    assert (small.unit, small.grid, len(small.decoder_blocks), small.decoder_embed.out_features) == (16, 14, 4, 256)


def test_two_steps_lower_the_loss():
    torch.manual_seed(0)
    mae = mae_tnt.create_model("mae_tnt_test")
    x, noise = images(4), torch.rand(4, mae.grid**2)
    optimizer = torch.optim.AdamW(mae.parameters(), lr=1e-3)
    losses = []
    for _ in range(3):
        loss = mae(x, noise=noise)[0]
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[2] < losses[0]


# ---- word masking -------------------------------------------------------------------------------------------------
def test_word_masking_is_off_by_default():
    names = [n for n, _ in mae_tnt.create_model("mae_tnt_test").named_parameters()]
    assert not any("word" in n for n in names)


@pytest.fixture
def word_mae():
    torch.manual_seed(0)
    return mae_tnt.create_model("mae_tnt_test", word_mask_ratio=0.5)


def test_word_loss_is_added_and_repeats_under_a_seed(word_mae):
    x, noise = images(2), torch.rand(2, word_mae.grid**2)
    torch.manual_seed(1)
    loss, pred, mask = word_mae(x, noise=noise)
    sentence_loss = word_mae.forward_loss(x, pred, mask)
    assert isinstance(word_mae, WordMaskedAutoencoder) and loss.item() > sentence_loss.item() + 1e-3
    torch.manual_seed(1)
    assert torch.equal(word_mae(x, noise=noise)[0], loss)


@pytest.mark.parametrize("word_mask_ratio", [0.0, 0.5])
def test_a_grid_title_says_when_its_loss_holds_the_word_term(tmp_path, monkeypatch, word_mask_ratio):
    from mae_tnt.train import recon

    titles = []
    monkeypatch.setattr(recon, "save_grid", lambda *args: titles.append(args[-1]))
    model = mae_tnt.create_model("mae_tnt_test", word_mask_ratio=word_mask_ratio)
    recon.write_reconstructions(model, torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8), [0.5] * 3,
                                [0.5] * 3, tmp_path / "grid.png", label="step 1", seed=0)
    assert titles[0].startswith("step 1, loss ")
    assert (" (hidden sentences + hidden words)" in titles[0]) == bool(word_mask_ratio)


def test_word_mask_counts_and_polarity():
    word_mae = mae_tnt.create_model("mae_tnt_test", word_mask_ratio=0.75)
    word_mask = word_mae.random_word_mask(10, torch.device("cpu"))
    assert word_mask.dtype == torch.bool and word_mask.shape == (10, 4)
    assert word_mask.sum(dim=1).tolist() == [3] * 10  # 4 words per 8-px sentence, three of them hidden (True)


def test_only_hidden_words_contribute(word_mae):
    x = images(2)
    ids_keep = torch.tensor([[0, 5, 9, 12], [3, 4, 8, 15]])
    word_mask = word_mae.random_word_mask(8, torch.device("cpu"))
    words = torch.randn(8, 4, 8, requires_grad=True)
    word_mae.word_loss(x, ids_keep, words, word_mask).backward()
    assert (words.grad.abs().sum(-1) > 0).equal(word_mask)


def test_a_words_target_is_the_4x4_pixel_block_that_hiding_that_word_hides_from_the_encoder():
    model = mae_tnt.create_model("mae_tnt_test", word_mask_ratio=0.5, norm_pix_loss=False)
    x, ids_keep = images(2), torch.tensor([[0, 5, 9, 14], [3, 4, 8, 15]])
    target = model.word_target(x, ids_keep)  # [B*K, W, 4*4*3]
    for b, units in enumerate(ids_keep.tolist()):
        for k, unit in enumerate(units):
            top, left = (model.unit * i for i in divmod(unit, model.grid))
            for word in range(4):  # 8-px sentences: 2 x 2 words in raster order
                row, col = (top + 4 * (word // 2), left + 4 * (word % 2))
                block = x[b, :, row : row + 4, col : col + 4].permute(1, 2, 0).flatten()  # channel-last
                torch.testing.assert_close(target[4 * b + k, word], block, rtol=0, atol=0)
    encoder = model.encoder
    changed = x.clone()
    changed.view(2, 3, 4, 8, 4, 8)[:, :, :, :4, :, 4:] += 5  # [B, C, gh, u, gw, u]: word 1 of every sentence

    def words(image, hidden_word):
        hidden = torch.zeros(8, 4, dtype=torch.bool)
        hidden[:, hidden_word] = True
        return encoder.embed_words(encoder.patch_pixels(image, ids_keep), hidden, model.word_mask_token)

    assert torch.equal(words(x, 1), words(changed, 1)) and not torch.equal(words(x, 2), words(changed, 2))


def test_hidden_words_are_replaced_and_reach_the_token(word_mae):
    x, noise = images(2), torch.rand(2, word_mae.grid**2)
    word_mae(x, noise=noise)[0].backward()
    assert word_mae.word_mask_token.grad.abs().sum() > 0
    assert word_mae.decoder_word_pred.weight.grad.abs().sum() > 0


def test_the_inner_attentions_cpu_and_gpu_paths_equal_sdpa_with_their_gradients():
    """The narrow-head paths (channel-first on CPU, batched matmuls on CUDA) against SDPA, forward and backward."""
    torch.manual_seed(0)
    attention = Attention(24, 4, narrow_heads=True)
    x = torch.randn(5, 16, 24, requires_grad=True)
    results = []
    for path in (attention._attend_channel_first, partial(attention._attend, fused=False),
                 partial(attention._attend, fused=True)):  # the last: plain SDPA
        out = path(x)
        grads = torch.autograd.grad(out.square().sum(), [x, *attention.parameters()])
        results.append((out, *grads))
    for result in results[:2]:
        for got, expected in zip(result, results[2], strict=True):
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_a_model_whose_inner_attention_takes_sdpa_gives_the_same_features(tiny):
    x = images(2)
    fast = tiny.forward_features(x)
    for block in tiny.blocks:
        block.attn_in.narrow_heads = False
    torch.testing.assert_close(tiny.forward_features(x), fast, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_the_model_matches_its_cpu_forward(tiny, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # full fp32, as on the CPU
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    x = images(2)
    expected = tiny.forward_features(x)
    torch.testing.assert_close(tiny.cuda().forward_features(x.cuda()).cpu(), expected, atol=1e-4, rtol=1e-4)
