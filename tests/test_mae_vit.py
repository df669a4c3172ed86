"""MAE semantics with the ViT encoder, checked against a straightforward reference computation."""

import numpy as np
import pytest
import timm
import torch

import mae_tnt
from mae_tnt.models.layers import in_mode
from mae_tnt.models.loading import save_weights
from mae_tnt.models.masking import random_masking
from mae_tnt.models.pos_embed import sincos_2d
from mae_tnt.models.registry import ModelError


@pytest.fixture
def model():
    torch.manual_seed(0)
    return mae_tnt.create_model("mae_vit_test").eval()


def reference_mae_loss(model, images, noise, mask_ratio=0.75, norm_pix=True):
    """The published algorithm written out step by step with the model's weights (facebookresearch/mae)."""
    enc = model.encoder
    batch, num = images.shape[0], model.grid**2
    keep = int(num * (1 - mask_ratio))
    # patch embed + pos (no cls row), shuffle by noise, keep the first `keep`
    x = enc.patch_embed.proj(images).flatten(2).transpose(1, 2) + enc.pos_embed[:, 1:]
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    x = torch.stack([x[b, ids_shuffle[b, :keep]] for b in range(batch)])
    mask = torch.ones(batch, num)
    mask[:, :keep] = 0
    mask = torch.stack([mask[b, ids_restore[b]] for b in range(batch)])
    cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(batch, -1, -1)
    x = torch.cat([cls, x], 1)
    for blk in enc.blocks:
        x = blk(x)
    x = enc.norm(x)
    # decoder: embed, append mask tokens, unshuffle, add pos, blocks, predict, drop cls
    x = model.decoder_embed(x)
    tokens = torch.cat([x[:, 1:], model.mask_token.expand(batch, num - keep, -1)], 1)
    tokens = torch.stack([tokens[b, ids_restore[b]] for b in range(batch)])
    x = torch.cat([x[:, :1], tokens], 1) + model.decoder_pos_embed
    for blk in model.decoder_blocks:
        x = blk(x)
    pred = model.decoder_pred(model.decoder_norm(x))[:, 1:]
    # target: patchify channel-last, per-patch normalisation with unbiased variance
    p = model.unit
    h = images.shape[2] // p
    target = images.reshape(batch, 3, h, p, h, p).permute(0, 2, 4, 3, 5, 1).reshape(batch, h * h, p * p * 3)
    if norm_pix:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    loss = ((pred - target) ** 2).mean(-1)
    return (loss * mask).sum() / mask.sum(), pred, mask


@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_matches_reference(norm_pix):
    torch.manual_seed(0)
    model = mae_tnt.create_model("mae_vit_test", norm_pix_loss=norm_pix).eval()
    images = torch.randn(3, 3, 32, 32)
    noise = torch.rand(3, model.grid**2)
    loss, pred, mask = model(images, mask_ratio=0.75, noise=noise)
    ref_loss, ref_pred, ref_mask = reference_mae_loss(model, images, noise, norm_pix=norm_pix)
    torch.testing.assert_close(mask, ref_mask)
    torch.testing.assert_close(pred, ref_pred, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-5)


def test_nothing_hidden_gives_a_zero_loss_not_nan(model):
    images = torch.randn(2, 3, 32, 32)
    loss, pred, mask = model(images, mask_ratio=0.0)
    assert mask.sum() == 0 and pred.shape == (2, model.grid**2, model.unit**2 * 3)
    assert loss.item() == 0.0
    loss.backward()  # the graph stays intact for callers that always backpropagate
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_masking_polarity_and_count():
    noise = torch.tensor([[0.9, 0.1, 0.5, 0.3]])
    ids_keep, ids_restore, mask = random_masking(noise, 2)
    assert ids_keep.tolist() == [[1, 3]]  # lowest noise stays visible
    assert mask.tolist() == [[1, 0, 1, 0]]  # 1 = hidden
    assert torch.equal(torch.argsort(torch.argsort(noise, 1), 1), ids_restore)
    _, _, mask_from_ranks = random_masking(torch.tensor([[3, 0, 2, 1]]), 2)  # a permutation works as noise too
    assert mask_from_ranks.dtype == torch.float32 and mask_from_ranks.tolist() == [[1, 0, 1, 0]]


def test_all_visible_equals_full_encoder(model):
    images = torch.randn(2, 3, 32, 32)
    ids_all = torch.arange(model.grid**2).expand(2, -1)
    torch.testing.assert_close(model.encoder.forward_visible(images, ids_all), model.encoder.forward_features(images))


@pytest.mark.parametrize("encoder_mode", ["visible", "mask_tokens"])
def test_masked_pixels_do_not_change_encoder_output(encoder_mode):
    torch.manual_seed(0)
    model = mae_tnt.create_model("mae_vit_test", encoder_mode=encoder_mode).eval()
    images = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, model.grid**2)
    latent, mask, _ = model.forward_encoder(images, 0.75, noise)
    hidden = model.unpatchify(mask.unsqueeze(-1).expand(-1, -1, model.unit**2 * 3))
    changed = images + hidden * torch.randn_like(images) * 10
    latent2, _, _ = model.forward_encoder(changed, 0.75, noise)
    torch.testing.assert_close(latent, latent2)
    assert not torch.allclose(model.forward_encoder(images + torch.randn_like(images), 0.75, noise)[0], latent)


@pytest.mark.parametrize("name", ["mae_vit_test", "mae_tnt_test", "mae_sret_test"])
def test_the_mask_token_baseline_puts_its_learned_token_in_place_of_the_hidden_units(name):
    torch.manual_seed(0)
    model = mae_tnt.create_model(name, encoder_mode="mask_tokens").eval()
    size = model.grid * model.unit
    images, noise = torch.randn(2, 3, size, size), torch.rand(2, model.grid**2)
    latent = model.forward_encoder(images, 0.75, noise)[0]
    latent.square().mean().backward()
    assert model.encoder_mask_token.grad.abs().sum() > 0
    with torch.no_grad():
        model.encoder_mask_token.add_(1.0)
        assert not torch.allclose(model.forward_encoder(images, 0.75, noise)[0], latent)


@pytest.mark.parametrize("options", [dict(encoder_mode="visible"), dict(encoder_mode="mask_tokens")])
@pytest.mark.parametrize("name", ["mae_vit_test", "mae_tnt_test", "mae_sret_test"])
def test_every_trained_parameter_gets_a_gradient_as_ddp_requires(name, options):
    model = mae_tnt.create_model(name, **options)
    size = model.grid * model.unit
    model(torch.randn(2, 3, size, size))[0].backward()
    unused = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert unused == []


def test_word_masking_trains_every_parameter_too():
    test_every_trained_parameter_gets_a_gradient_as_ddp_requires("mae_tnt_test", dict(word_mask_ratio=0.3))


def test_loss_ignores_visible_patches(model):
    images = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, model.grid**2)
    _, pred, mask = model(images, noise=noise)
    target = model.target(images)
    perfect = torch.where(mask.bool().unsqueeze(-1), target, pred + 5)
    assert model.forward_loss(images, perfect, mask).item() == pytest.approx(0.0, abs=1e-10)


def test_reference_initialisation():
    """MAE's init: xavier-uniform Linear weights (and the flattened patch projection), zero Linear biases (the patch
    projection's keeps Conv2d's uniform default), LayerNorm 1/0."""
    torch.manual_seed(0)
    mae = mae_tnt.create_model("mae_vit_tiny_patch16", decoder_dim=128, decoder_depth=2, decoder_heads=4)
    for name, module in mae.named_modules():
        if isinstance(module, torch.nn.Linear) or name == "encoder.patch_embed.proj":
            weight = module.weight.flatten(1)  # [out, in]; the conv's [D, 3, u, u] as a matrix
            bound = (6 / sum(weight.shape)) ** 0.5
            assert weight.abs().max() <= bound and weight.abs().max() > 0.99 * bound, name
            assert weight.std().item() == pytest.approx(bound / 3**0.5, rel=0.05), name
            if isinstance(module, torch.nn.Linear):
                assert not module.bias.any(), name
            else:  # uniform within 1 / sqrt(fan_in), untouched by MAE's initialize_weights
                fan_in = weight.shape[1]
                assert module.bias.abs().max() <= fan_in**-0.5 < 2 * module.bias.abs().max(), name
        elif isinstance(module, torch.nn.LayerNorm):
            assert (module.weight == 1).all() and not module.bias.any(), name
    for token in (mae.encoder.cls_token, mae.mask_token):
        assert token.std().item() == pytest.approx(0.02, rel=0.1)


def mae_reference_table(dim: int, grid: int) -> np.ndarray:
    """MAE's `get_2d_sincos_pos_embed(dim, grid, cls_token=True)`, as its formula reads, in NumPy float64."""
    def axis(width: int, positions: np.ndarray) -> np.ndarray:
        frequencies = 1.0 / 10000 ** (np.arange(width // 2) / (width / 2))
        angles = np.outer(positions.ravel(), frequencies)  # [grid * grid, width / 2]
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    columns, rows = np.meshgrid(np.arange(grid), np.arange(grid))  # MAE passes (w, h): the column coordinate first
    table = np.concatenate([axis(dim // 2, columns), axis(dim // 2, rows)], axis=1)  # [grid * grid, dim]
    return np.concatenate([np.zeros((1, dim)), table])


@pytest.mark.parametrize("dim, grid", [(8, 3), (768, 14), (512, 14)])
def test_sincos_table_equals_maes_so_official_weights_stay_interchangeable(dim, grid):
    np.testing.assert_allclose(sincos_2d(dim, grid, num_prefix_tokens=1).numpy(), mae_reference_table(dim, grid),
                               rtol=0, atol=1e-7)


def test_sincos_table_matches_mae_layout():
    table = sincos_2d(8, 3, num_prefix_tokens=1)
    assert table.shape == (10, 8) and table[0].abs().sum() == 0
    # first half encodes the column (w), second half the row (h): MAE's meshgrid puts w first
    row0_col2, row2_col0 = table[1 + 2], table[1 + 6]
    torch.testing.assert_close(row0_col2[:4], row2_col0[4:])
    torch.testing.assert_close(table[1 + 0, :4], table[1 + 6, :4])  # same column, different row


@pytest.mark.parametrize("name, timm_name", [("vit_base_patch16_224", "vit_base_patch16_224"),
                                             ("vit_huge_patch14_224", "vit_huge_patch14_224")])
def test_encoder_keys_match_timm(name, timm_name):
    with torch.device("meta"):
        ours = mae_tnt.create_model(name, num_classes=1000)
        theirs = timm.create_model(timm_name, pretrained=False, num_classes=1000)
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert ours_shapes == {k: tuple(v.shape) for k, v in theirs.state_dict().items()}


def test_encoder_weights_load_into_timm():
    encoder = mae_tnt.create_model("mae_vit_test").encoder
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                              num_classes=0, pretrained=False)
    model.load_state_dict(encoder.state_dict(), strict=True)
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model.eval().forward_features(images), encoder.eval().forward_features(images))


@pytest.mark.parametrize("name", [n for n in mae_tnt.list_models("mae_*") if n.endswith("test")])
def test_registered_test_models_train(name):
    torch.manual_seed(0)
    model = mae_tnt.create_model(name)
    size = model.grid * model.unit
    images = torch.randn(2, 3, size, size)
    loss, pred, mask = model(images)
    loss.backward()
    assert torch.isfinite(loss) and pred.shape == (2, model.grid**2, model.unit**2 * 3)
    assert mask.sum().item() == 2 * (model.grid**2 - max(1, int(model.grid**2 * 0.25)))


def test_mae_reference_parameter_counts():
    with torch.device("meta"):
        counts = {n: sum(p.numel() for p in mae_tnt.create_model(n).parameters()) / 1e6
                  for n in ("mae_vit_base_patch16", "mae_vit_large_patch16", "mae_vit_huge_patch14")}
    assert counts == pytest.approx({"mae_vit_base_patch16": 111.91, "mae_vit_large_patch16": 329.54,
                                    "mae_vit_huge_patch14": 657.07}, abs=0.01)


@pytest.mark.parametrize("name, img_size", [("mae_vit_test", 36), ("mae_tnt_test", 36), ("mae_sret_test", 48)])
def test_an_image_size_the_mask_unit_does_not_divide_is_refused_at_build(name, img_size):
    with pytest.raises(ValueError, match=f"divisible.*{img_size}|{img_size} must divide"):
        mae_tnt.create_model(name, img_size=img_size)


@pytest.mark.parametrize("name, img_size", [("mae_vit_test", 8), ("mae_tnt_test", 8), ("mae_sret_test", 32)])
def test_images_of_one_mask_unit_are_refused_at_build_since_nothing_would_be_hidden(name, img_size):
    with pytest.raises(ModelError, match=f"one {img_size}-px mask unit leave nothing to hide: use images of at least "
                                         f"{2 * img_size} px"):
        mae_tnt.create_model(name, img_size=img_size)

@pytest.mark.parametrize("name", ["vit_test_patch8_32", "tnt_test_patch8_32", "sret_test", "mae_vit_test",
                                  "mae_tnt_test", "mae_sret_test"])
@pytest.mark.parametrize("kwargs, message", [
    (dict(img_size="224"), "img_size must be a positive int, got '224'"),
    (dict(drop_path_rate=1.5), r"drop_path_rate must be in \[0, 1\), got 1.5"),
    (dict(num_classes=-1), "num_classes must be an int >= 0"),
])
def test_backbone_arguments_that_would_fail_later_or_build_another_model_are_refused(name, kwargs, message):
    """The API refuses what the config layer refuses in recipes: a string size fails only in a format string, a
    negative class count built a bare encoder (TNT) and a drop-path rate above 1 failed in the forward."""
    if name.startswith("mae_") and "num_classes" in kwargs:
        message = "num_classes is for a classifier: an MAE model has no head"
    with pytest.raises(ModelError, match=message):
        mae_tnt.create_model(name, **kwargs)


@pytest.mark.parametrize("name, unit", [("vit_test_patch8_32", 8), ("mae_tnt_test", 8), ("tnt_s_patch16_224", 16),
                                        ("mae_vit_base_patch16", 16), ("sret_test", 32), ("mae_sret_test", 32)])
def test_an_image_size_that_is_no_multiple_of_the_mask_unit_names_the_nearest_that_are(name, unit):
    """Only sizes of two units or more are named: an MAE refuses one unit, which leaves nothing to hide."""
    family = next(word for word in ("ViT", "TNT", "SReT") if word.lower() in name)
    message = f"{family} needs img_size divisible by its mask unit of {unit} px, got"
    with pytest.raises(ModelError, match=f"{message} {3 * unit + 3}: use img_size={3 * unit} or img_size={4 * unit}$"):
        mae_tnt.create_model(name, img_size=3 * unit + 3)
    for size in (unit - 1, unit + unit // 2):  # below one unit, and between one and two
        with pytest.raises(ModelError, match=f"{message} {size}: use img_size={2 * unit}$"):
            mae_tnt.create_model(name, img_size=size)
    assert mae_tnt.create_model(name, img_size=2 * unit).grid == 2  # the size named builds


def test_a_tnt_sentence_that_is_no_whole_number_of_words_is_refused():
    with pytest.raises(ModelError, match="TNT needs patch_size divisible by its word stride 4, got 10"):
        mae_tnt.create_model("tnt_s_patch16_224", patch_size=10, img_size=40)


@pytest.mark.parametrize("ratio", [-0.1, 1.0])
def test_a_word_mask_ratio_outside_0_1_is_refused_rather_than_read_as_off(ratio):
    message = rf"word_mask_ratio must be in \(0, 1\), or 0 for no word masking, got {ratio}"
    with pytest.raises(ModelError, match=message):
        mae_tnt.create_model("mae_tnt_test", word_mask_ratio=ratio)



@pytest.mark.parametrize("kwargs, message", [(dict(mask_ratio=1.0), r"mask_ratio must be in \[0, 1\)"),
                                             (dict(mask_ratio=-0.2), r"mask_ratio must be in \[0, 1\)"),
                                             (dict(noise=torch.rand(2, 5)), r"noise must be \[batch, units\]")])
@pytest.mark.parametrize("build", [dict(name="mae_vit_test"), dict(name="mae_tnt_test", word_mask_ratio=0.5)],
                         ids=["vit", "tnt-word-masking"])
def test_bad_masking_arguments_are_refused(build, kwargs, message):
    model = mae_tnt.create_model(**build)
    with pytest.raises(ValueError, match=message):
        model(torch.randn(2, 3, 32, 32), **kwargs)


MODELS = ["mae_vit_test", "mae_tnt_test", "mae_sret_test", "vit_test_patch8_32", "tnt_test_patch8_32", "sret_test"]


@pytest.mark.parametrize("name", MODELS)
def test_images_of_another_size_are_refused_naming_the_size_to_build(name):
    model = mae_tnt.create_model(name)
    size = model.grid * model.unit
    with pytest.raises(ValueError, match=f"expected {size}x{size} images, got {2 * size}x{2 * size}; build the model "
                                         f"with img_size={2 * size}"):
        model(torch.randn(1, 3, 2 * size, 2 * size))
    odd = size + model.unit // 2  # no whole number of units: no model builds at this size
    with pytest.raises(ValueError, match=f"expected {size}x{size} images, got {odd}x{odd}; resize them to {size} px, "
                                         f"or to another multiple of {model.unit} px and build the model at that size"):
        model(torch.randn(1, 3, odd, odd))


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("make, message", [
    (lambda s: torch.randint(0, 255, (1, 3, s, s), dtype=torch.uint8),
     r"expected float images normalised with the data mean and std, got torch.uint8; .*normalize"),
    (lambda s: torch.randn(1, s, s, 3), r"got shape \[1, \d+, \d+, 3\]; for channels-last images pass "
                                        r"images.permute\(0, 3, 1, 2\)"),
    (lambda s: torch.randn(3, s, s), r"expected images \[batch, 3, height, width\], got shape \[3, \d+, \d+\]$"),
    (lambda s: torch.randn(1, 1, s, s), r"got shape \[1, 1, \d+, \d+\]$"),
])
def test_input_other_than_float_rgb_batches_is_refused_saying_what_to_pass(name, make, message):
    model = mae_tnt.create_model(name)
    with pytest.raises(ValueError, match=message):
        model(make(model.grid * model.unit))


@pytest.mark.parametrize("name", ["mae_vit_test", "mae_tnt_test", "mae_sret_test"])
def test_an_mae_checkpoint_loads_at_another_image_size(tmp_path, name):
    """Learned position tables are resampled; fixed sin-cos ones (the decoder's, ViT's encoder's) are rebuilt."""
    torch.manual_seed(0)
    trained = mae_tnt.create_model(name)
    save_weights(trained.state_dict(), tmp_path / "model.safetensors")
    size = 2 * trained.grid * trained.unit
    loaded = mae_tnt.create_model(name, checkpoint_path=tmp_path / "model.safetensors", img_size=size)
    fresh = mae_tnt.create_model(name, img_size=size)
    fixed = [name for name, p in fresh.named_parameters() if not p.requires_grad]
    assert "decoder_pos_embed" in fixed and ("encoder.pos_embed" in fixed) == (name == "mae_vit_test")
    assert all(torch.equal(loaded.get_parameter(name), fresh.get_parameter(name)) for name in fixed)
    assert torch.equal(loaded.decoder_pred.weight, trained.decoder_pred.weight)
    assert loaded(torch.randn(2, 3, size, size))[0].isfinite()


def test_a_learned_position_table_of_another_grid_is_resampled_into_an_mae_not_replaced():
    """A supervised ViT's learned table (here 8x8) is not a sin-cos one: it is resampled, as the classifier would."""
    torch.manual_seed(0)
    mae = mae_tnt.create_model("mae_vit_test")
    learned = torch.randn(1, 1 + 8 * 8, 32)  # [1, 1 + L, D] at twice the grid
    adapted = mae.adapt_state_dict({"encoder.pos_embed": learned})["encoder.pos_embed"]
    classifier = mae_tnt.create_model("vit_test_patch8_32")
    assert torch.equal(adapted, classifier.adapt_state_dict({"pos_embed": learned})["pos_embed"])
    assert not torch.allclose(adapted, mae.encoder.pos_embed)
    sincos = sincos_2d(32, 8, num_prefix_tokens=1).unsqueeze(0)  # [1, 1 + L, D]: rebuilt exactly for the own grid
    assert torch.equal(mae.adapt_state_dict({"encoder.pos_embed": sincos})["encoder.pos_embed"], mae.encoder.pos_embed)


def test_only_the_mae_encoder_keeps_its_position_table_frozen():
    assert not mae_tnt.create_model("mae_vit_test").encoder.pos_embed.requires_grad
    assert mae_tnt.create_model("vit_test_patch8_32", num_classes=10).pos_embed.requires_grad  # trained, as in timm


@pytest.mark.parametrize("name, first", [("mae_vit_base_patch_16", "mae_vit_base_patch16"),
                                         ("TNT_S_PATCH16_224", "tnt_s_patch16_224"),  # capitals
                                         ("tnt_s", "tnt_s_patch16_224"), ("vit_b", "vit_base_patch16_224")])  # short
def test_unknown_model_suggests(name, first):
    with pytest.raises(ValueError, match=f"unknown model '{name}'. Did you mean {first}[,?]"):
        mae_tnt.create_model(name)


def test_a_grid_of_one_image_shows_its_whole_title_and_no_loss_when_nothing_is_hidden(tmp_path, monkeypatch):
    from PIL import Image, ImageDraw

    from mae_tnt.train import recon

    titles, save_grid = [], recon.save_grid
    monkeypatch.setattr(recon, "save_grid", lambda *args: titles.append(args[-1]) or save_grid(*args))
    model = mae_tnt.create_model("mae_vit_test", mask_ratio=0.0)
    images = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    recon.write_reconstructions(model, images, [0.5] * 3, [0.5] * 3, tmp_path / "grid.png", label="step 3", seed=0)
    assert titles[0].startswith("step 3, loss n/a, nothing is hidden (norm-pix")
    width = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(titles[0])
    assert Image.open(tmp_path / "grid.png").width >= width


def test_reconstructing_gives_the_model_back_its_training_mode_even_when_it_fails(tmp_path, monkeypatch):
    from mae_tnt.train import recon

    model = mae_tnt.create_model("mae_vit_test").train()
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    recon.write_reconstructions(model, images, [0.5] * 3, [0.5] * 3, tmp_path / "grid.png", label="step 1", seed=0)
    assert model.training and (tmp_path / "grid.png").exists()
    monkeypatch.setattr(recon, "reconstruct", lambda *args: 1 / 0)  # e.g. out of memory
    with pytest.raises(ZeroDivisionError):
        recon.write_reconstructions(model, images, [0.5] * 3, [0.5] * 3, tmp_path / "grid.png", label="step 2", seed=0)
    assert model.training
    with pytest.raises(ZeroDivisionError), in_mode(model, training=False):
        assert not model.training and not model.decoder_blocks[0].training
        raise ZeroDivisionError
    assert model.training and model.decoder_blocks[0].training


def test_position_tables_are_resampled_as_in_mae_fine_tuning():
    """MAE's `interpolate_pos_embed`: the prefix token row kept, the grid bicubic without antialiasing."""
    torch.manual_seed(0)
    small = mae_tnt.create_model("vit_test_patch8_32")
    small.pos_embed.data.normal_()  # a learned-looking table, so that the kernel shows
    big = mae_tnt.create_model("vit_test_patch8_32", img_size=56)
    mae_tnt.load_weights(big, small.state_dict())
    grid = small.pos_embed[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)  # [1, 16, D] -> [1, D, 4, 4]
    resized = torch.nn.functional.interpolate(grid, size=(7, 7), mode="bicubic", align_corners=False)
    expected = torch.cat([small.pos_embed[:, :1], resized.flatten(2).transpose(1, 2)], dim=1)  # [1, 1 + 49, D]
    torch.testing.assert_close(big.pos_embed, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_a_perfect_prediction_reconstructs_the_image_and_the_masked_row_blanks_exactly_the_hidden_units(norm_pix):
    from mae_tnt.train.recon import reconstruct

    model = mae_tnt.create_model("mae_vit_test", norm_pix_loss=norm_pix).eval()
    forward = model.forward

    def perfect(images, noise):  # the model's loss and mask, with the target as the prediction
        loss, _, mask = forward(images, noise=noise)
        return loss, model.target(images), mask

    model.forward = perfect
    images, noise = torch.randn(2, 3, 32, 32), torch.rand(2, model.grid**2)
    rows = reconstruct(model, images, noise)
    mask = forward(images, noise=noise)[2]
    hidden = model.unpatchify(mask[..., None].expand(-1, -1, model.unit**2 * 3))  # [B, 3, H, W], 1 = hidden
    assert 0 < hidden.mean() < 1
    torch.testing.assert_close(rows["reconstruction"], images, atol=1e-4, rtol=0)  # un-normalised with the true stats
    torch.testing.assert_close(rows["reconstruction + visible"], images, atol=1e-4, rtol=0)
    assert torch.equal(rows["masked"], images * (1 - hidden)) and (rows["masked"][hidden.bool()] == 0).all()


def test_every_grid_of_a_run_hides_the_same_units_so_that_grids_of_different_steps_compare():
    from mae_tnt.train.recon import write_reconstructions

    model = mae_tnt.create_model("mae_vit_test")
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    losses = [write_reconstructions(model, images, [0.5] * 3, [0.5] * 3, None, label="", seed=seed)
              for seed in (7, 7, 8)]
    assert losses[0] == losses[1] != losses[2]


def test_the_reconstruction_row_with_visible_patches_pastes_the_prediction_only_where_hidden():
    from mae_tnt.train.recon import reconstruct

    model = mae_tnt.create_model("mae_vit_test", norm_pix_loss=False).eval()
    forward = model.forward

    def blank(images, noise):  # predicts 0 everywhere, so the pasted row shows which units it took from where
        loss, pred, mask = forward(images, noise=noise)
        return loss, torch.zeros_like(pred), mask

    model.forward = blank
    images, noise = torch.randn(2, 3, 32, 32), torch.rand(2, model.grid**2)
    rows = reconstruct(model, images, noise)
    assert torch.equal(rows["reconstruction"], torch.zeros_like(images))
    assert torch.equal(rows["reconstruction + visible"], rows["masked"])  # visible units kept, hidden ones predicted


def test_grids_show_each_image_upright_enlarged_and_in_its_own_colours(tmp_path):
    """A 32-px image, reddish on its left half and bluish on its right, normalised: the tile is enlarged 3x to 96 px,
    denormalised back to its colours, and not transposed (the red half stays on the left)."""
    from PIL import Image

    from mae_tnt.data.transforms import normalize
    from mae_tnt.train.recon import save_grid

    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    image = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    image[0, :, :, :16] = torch.tensor([200, 60, 0], dtype=torch.uint8).view(3, 1, 1)  # mid-range: no clamping
    image[0, :, :, 16:] = torch.tensor([0, 100, 150], dtype=torch.uint8).view(3, 1, 1)
    save_grid({"original": normalize(image, mean, std)}, mean, std, tmp_path / "grid.png", "title")
    grid = Image.open(tmp_path / "grid.png").convert("RGB")
    left, header = 150, 18  # the row label's width and the title's height
    assert grid.height == header + 96 + 2
    pixel = {(x, y): grid.getpixel((left + x, header + y)) for x, y in ((10, 80), (47, 50), (48, 50), (90, 5))}
    red, blue = (200, 60, 0), (0, 100, 150)
    assert pixel == {(10, 80): red, (47, 50): red, (48, 50): blue, (90, 5): blue}


@pytest.mark.parametrize("name", ["mae_vit_test", "mae_tnt_test", "mae_sret_test"])
def test_a_half_precision_mae_encodes_in_its_dtype_and_takes_its_target_from_the_pixels_given(name):
    """DeepSpeed's bf16 mode holds bf16 weights and runs no autocast: the encoder needs bf16 input, but a norm-pix
    target of bf16-rounded pixels would be off in flat units (by up to ~1 on Fashion-MNIST)."""
    torch.manual_seed(0)
    model = mae_tnt.create_model(name).eval().to(torch.bfloat16)
    size = model.grid * model.unit
    images, noise = torch.randn(2, 3, size, size), torch.rand(2, model.grid**2)
    loss, pred, mask = model(images, noise=noise)
    assert pred.dtype == torch.bfloat16
    assert loss == model.forward_loss(images, pred, mask)
    assert loss != model.forward_loss(images.bfloat16(), pred, mask)


def test_a_half_precision_word_masking_mae_encodes_in_its_dtype_too():
    torch.manual_seed(0)
    model = mae_tnt.create_model("mae_tnt_test", word_mask_ratio=0.5).eval().to(torch.bfloat16)
    loss, pred, _ = model(torch.randn(2, 3, 32, 32))  # fp32 pixels, as the loop hands them over
    assert pred.dtype == torch.bfloat16
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


@pytest.mark.parametrize("name", ["mae_vit_test", "mae_tnt_test", "mae_sret_test"])
def test_an_encoder_argument_given_to_an_mae_builds_its_encoder(name):
    """`mlp_ratio` is the encoder's; the decoder keeps MAE's 4 (it once went to the decoder alone)."""
    default, changed = mae_tnt.create_model(name), mae_tnt.create_model(name, mlp_ratio=3.0)
    def hidden_widths(model, part):
        return {m.out_features for n, m in model.named_modules() if n.startswith(part) and n.endswith("mlp.fc1")}
    assert hidden_widths(changed, "decoder") == hidden_widths(default, "decoder")
    assert hidden_widths(changed, "encoder") != hidden_widths(default, "encoder")


def test_list_models_filters_by_pattern_and_lists_every_model_for_none_or_an_empty_one():
    every = mae_tnt.list_models()
    assert "mae_vit_test" in every and "vit_test_patch8_32" in every
    assert mae_tnt.list_models("") == mae_tnt.list_models(None) == every  # as timm's list_models gives
    assert mae_tnt.list_models("mae_vit_*") == [name for name in every if name.startswith("mae_vit_")]
