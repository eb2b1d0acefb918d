"""The denoiser: shapes on any grid, initialisation, masking, batch independence, presets, save/load."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import randomize, tiny_features, tiny_inputs, tiny_model

from xmdpt.models.xmdpt import (
    LEGACY_PREFIXES,
    XMDPT,
    XMDPT_PRESETS,
    gather_tokens,
    random_masking,
    relative_position_index,
    sincos_2d,
    xmdpt_from_preset,
)


@pytest.mark.parametrize("sample_size", [(8, 6), (6, 8), (32, 22), (64, 44)])
def test_output_shape_on_non_square_grids(sample_size):
    model = randomize(tiny_model(sample_size=sample_size, depth=1, decode_layers=1))
    x = tiny_inputs(model, batch=2)
    out = model(**x)
    assert out.shape == (2, 8, *sample_size)
    assert model.grid_size == (sample_size[0] // 2, sample_size[1] // 2)
    assert torch.isfinite(out).all()


def test_unpatchify_inverts_patch_layout_on_non_square_grid():
    model = tiny_model(sample_size=(8, 6), learn_sigma=False)
    p, C = 2, 4
    image = torch.randn(1, C, 8, 6)
    # (B, N, p * p * C) in the order the final layer writes: token (row, col), then (p, q, c).
    tokens = image.reshape(1, C, 4, p, 3, p).permute(0, 2, 4, 3, 5, 1).reshape(1, 12, p * p * C)
    assert torch.equal(model.unpatchify(tokens), image)


def test_zero_initialised_model_outputs_zeros():
    model = tiny_model()
    out = model(**tiny_inputs(model))
    assert torch.count_nonzero(out) == 0
    # ... and so does the masked pass.
    ids = random_masking(3, model.num_tokens, 0.3)
    assert torch.count_nonzero(model(**tiny_inputs(model), ids_keep=ids)) == 0


def test_sincos_table_matches_mae_on_square_and_varies_on_rectangles():
    D = 16
    table = sincos_2d(D, (4, 4))
    # MAE: first half encodes the column (w), second half the row (h); each half is [sin | cos].
    omega = 1.0 / 10000 ** (np.arange(D // 4) / (D / 4))
    row, col = 2, 3
    expected = np.concatenate([np.sin(col * omega), np.cos(col * omega), np.sin(row * omega), np.cos(row * omega)])
    np.testing.assert_allclose(table[row * 4 + col], expected, atol=1e-12)
    rect = sincos_2d(D, (3, 5))
    assert rect.shape == (15, D)
    assert len({tuple(r) for r in rect.round(8)}) == 15  # every position distinct


def test_relative_position_index_follows_beit_formula_on_rectangles():
    H, W = 3, 5
    index = relative_position_index((H, W))
    assert index.shape == (15, 15) and index.dtype == torch.int64
    for q in range(15):
        for k in range(15):
            dh, dw = q // W - k // W, q % W - k % W
            assert index[q, k] == (dh + H - 1) * (2 * W - 1) + (dw + W - 1)
    assert index.max() == (2 * H - 1) * (2 * W - 1) - 1


def test_masked_bias_is_the_full_bias_gathered_on_both_axes():
    model = randomize(tiny_model())
    bias_module = model.blocks[0].attn.rel_pos_bias
    ids = random_masking(2, model.num_tokens, 0.3, generator=torch.Generator().manual_seed(3))
    full = bias_module()[0]  # (h, N, N)
    gathered = bias_module(ids)
    for b in range(2):
        assert torch.equal(gathered[b], full[:, ids[b]][:, :, ids[b]])


def test_random_masking_keeps_int_n_times_0_7_distinct_tokens():
    ids = random_masking(4, 176, 0.3, generator=torch.Generator().manual_seed(0))
    assert ids.shape == (4, int(176 * 0.7))
    for row in ids:
        assert len(set(row.tolist())) == ids.shape[1]
    assert not torch.equal(ids[0], ids[1])


def test_side_interpolater_restores_every_position():
    """With identity side blocks (adaLN-Zero), kept positions hold their own token and dropped ones the mask token,
    each plus the decoder position table: every position is restored to its place."""
    model = tiny_model()
    B, N, D = 2, model.num_tokens, 32
    tokens = torch.randn(B, N, D)
    ids = random_masking(B, N, 0.3, generator=torch.Generator().manual_seed(1))
    c = torch.randn(B, D)
    out = model.interpolater(gather_tokens(tokens, ids), c, ids, torch.randn(B, N, D), model.decoder_pos_embed)
    for b in range(B):
        kept = set(ids[b].tolist())
        for n in range(N):
            expected = tokens[b, n] if n in kept else model.interpolater.mask_token[0, 0]
            torch.testing.assert_close(out[b, n], expected + model.decoder_pos_embed[0, n])


def test_masked_shortcut_keeps_kept_tokens_and_interpolates_dropped_ones():
    model = randomize(tiny_model())
    B, N, D = 2, model.num_tokens, 32
    tokens = torch.randn(B, N, D)
    ids = random_masking(B, N, 0.3, generator=torch.Generator().manual_seed(1))
    context, c = torch.randn(B, N, D), torch.randn(B, D)
    out = model.interpolater(gather_tokens(tokens, ids), c, ids, context, model.decoder_pos_embed)
    for b in range(B):
        kept = set(ids[b].tolist())
        for n in range(N):
            if n in kept:
                torch.testing.assert_close(out[b, n], tokens[b, n] + model.decoder_pos_embed[0, n])
            else:
                mask = model.interpolater.mask_token[0, 0]
                assert not torch.allclose(out[b, n], mask + model.decoder_pos_embed[0, n])


def test_masked_pass_reference_context_gets_no_gradient_and_depends_on_reference():
    model = randomize(tiny_model())
    x = tiny_inputs(model, batch=2)
    ids = random_masking(2, model.num_tokens, 0.3)
    features = tiny_features(model, batch=2)
    cond = model.encode_conditions(*features)
    reference = features[2].clone().requires_grad_(True)
    tokens = model.embed_latent(reference)  # y held fixed: the reference reaches the masked pass as its context only
    out = model(x["sample"], x["timestep"], replace(cond, reference_tokens=tokens), ids_keep=ids)
    assert out.shape == (2, 8, 8, 6)
    out.sum().backward()  # the cross-attention context is computed without gradient, as published
    assert reference.grad is None
    assert model.interpolater.sideblocks_cross[0].attn.to_kv.weight.grad.abs().sum() > 0
    # ... and the masked output does change with the reference context.
    other = model(x["sample"], x["timestep"], replace(cond, reference_tokens=tokens + 1), ids_keep=ids)
    assert not torch.allclose(out, other)


def test_batch_of_one_equals_that_sample_in_a_larger_batch():
    model = randomize(tiny_model()).eval()
    x = tiny_inputs(model, batch=4)
    full = model(**x)
    for i in range(4):
        single = model(**{k: v[i : i + 1] for k, v in x.items()})
        torch.testing.assert_close(single, full[i : i + 1], rtol=1e-5, atol=1e-6)


def test_drop_condition_gives_the_unconditional_model():
    model = randomize(tiny_model())
    x = tiny_inputs(model, batch=2)
    dropped = model(**x, drop_condition=torch.tensor([True, False]))
    uncond = model(x["sample"], x["timestep"], replace(x["conditions"], y=torch.zeros(2, 32)))
    torch.testing.assert_close(dropped[0], uncond[0])
    assert not torch.allclose(dropped[1], uncond[1])


def test_conditions_are_the_aggregation_network_of_the_three_branches():
    model = randomize(tiny_model())
    pose, reference, latent, _ = tiny_features(model)
    cond = model.encode_conditions(pose, reference, latent)
    assert cond.y.shape == (3, 32) and cond.reference_memory is None and cond.pose_map is None
    agg = model.aggregation  # y = mlp_final(v_P + v_G + v_L), paper Sec. 3.2
    v = agg.conv1d_pose(agg.mlp_dino_pose(pose)) + agg.conv1d_global(agg.mlp_dino_img(reference))
    v = v + agg.conv1d_local(model.x_embedder(latent) + model.pos_embed)
    torch.testing.assert_close(cond.y, agg.mlp_final(v[:, 0]))
    # Each branch matters.
    for i in range(3):
        changed = list((pose, reference, latent))
        changed[i] = changed[i] + 1
        assert not torch.allclose(model.encode_conditions(*changed).y, cond.y)


def test_public_and_earlier_key_names_load_by_every_path(tmp_path):
    """Public checkpoints and folders saved before the paper's modules were classes name their tensors flat
    (`mlp_dino_pose.*`, `sideblocks.*`, `reference_blocks.*`): `load_state_dict` and `from_pretrained` rename them."""
    from safetensors.torch import save_file

    model = randomize(tiny_model(reference_layers=1))
    state = model.state_dict()
    flat = {}
    for key, value in state.items():
        for old, new in LEGACY_PREFIXES.items():
            if key.startswith(new):
                key = old + key[len(new) :]
                break
        flat[key] = value
    assert "mlp_dino_pose.0.weight" in flat and "sideblocks.0.attn.qkv.weight" in flat and "mask_token" in flat
    assert "reference_blocks.0.attn.qkv.weight" in flat and "reference_norm.weight" in flat
    fresh = tiny_model(reference_layers=1)
    fresh.load_state_dict(dict(flat))
    x = tiny_inputs(model)
    torch.testing.assert_close(fresh(**x), model(**x), rtol=0, atol=0)
    # A folder written before the rename: the config and the weights under their old names.
    model.save_pretrained(tmp_path)
    save_file({k: v.contiguous() for k, v in flat.items()}, tmp_path / "diffusion_pytorch_model.safetensors")
    loaded = XMDPT.from_pretrained(tmp_path)
    torch.testing.assert_close(loaded(**x), model(**x), rtol=0, atol=0)


def test_save_load_round_trip(tmp_path):
    model = randomize(tiny_model(sample_size=(8, 6)))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    loaded = XMDPT.from_pretrained(tmp_path)
    assert loaded.config.sample_size == [8, 6] or tuple(loaded.config.sample_size) == (8, 6)
    x = tiny_inputs(model)
    torch.testing.assert_close(loaded(**x), model(**x), rtol=0, atol=0)


def test_invalid_configs_are_rejected():
    with pytest.raises(ValueError, match="divisible"):
        tiny_model(sample_size=(7, 6))
    with pytest.raises(ValueError, match="decode_layers"):
        tiny_model(decode_layers=0)
    with pytest.raises(ValueError, match="unknown preset"):
        xmdpt_from_preset("M/2")
    with pytest.raises(ValueError, match="side_interpolater"):
        model = tiny_model(side_interpolater=False)
        model(**tiny_inputs(model), ids_keep=random_masking(3, model.num_tokens, 0.3))


# Counted from the public code at 256 tokens (reference Sec. 2): (with side blocks, without).
PUBLISHED_COUNTS = {
    "S/2": (39_117_301, 33_785_797),
    "B/2": (153_731_269, 132_451_429),
    "L/2": (498_945_445, 461_135_141),
    "XL/2": (726_544_933, None),
}


@pytest.mark.parametrize("preset", list(XMDPT_PRESETS))
def test_preset_parameter_counts_equal_the_public_code(preset):
    with torch.device("meta"):  # counts need shapes only
        model = xmdpt_from_preset(preset, sample_size=(32, 32))
    total, inference = PUBLISHED_COUNTS[preset]
    assert model.num_parameters() == total
    if inference is not None:
        assert model.num_parameters(inference=True) == inference
    # The public checkpoints hold 207 entries for S and B (blocks, side blocks, buffers).
    if preset in ("S/2", "B/2"):
        assert len(model.state_dict()) == 207


# ---- beyond the paper: the spatial pose map -----------------------------------------------------------------------


def pose_map_model():
    # 8x6 latents from 32x24 images: factor 4, so 3 * 16 = 48 pose-map channels.
    return randomize(tiny_model(pose_map_channels=48), std=0.05)


def test_pose_map_is_a_lossless_unshuffle_of_the_rendered_pose():
    model = pose_map_model()
    pose = torch.rand(2, 3, 32, 24)
    grid = model.pose_map(pose)
    assert grid.shape == (2, 48, 8, 6)
    torch.testing.assert_close((torch.nn.functional.pixel_shuffle(grid, 4) + 1) / 2, pose)
    with pytest.raises(ValueError, match="does not give 48 channels"):
        model.pose_map(torch.rand(2, 3, 64, 48))


def test_pose_map_steers_the_prediction_where_the_pose_changes():
    model = pose_map_model()
    x = tiny_inputs(model, batch=1)
    pose = torch.zeros(1, 3, 32, 24)
    moved = pose.clone()
    moved[..., 0:4, 0:4] = 1.0  # a limb in the top-left latent cell only
    features = tiny_features(model, batch=1)[:3]
    at, to = x["sample"], x["timestep"]
    a = model(at, to, model.encode_conditions(*features, pose))
    b = model(at, to, model.encode_conditions(*features, moved))
    assert not torch.allclose(a, b)
    # Unconditional (y dropped) still sees the pose: guidance sharpens appearance, not where the limbs go.
    drop = torch.ones(1, dtype=torch.bool)
    assert not torch.allclose(
        model(at, to, model.encode_conditions(*features, pose), drop_condition=drop),
        model(at, to, model.encode_conditions(*features, moved), drop_condition=drop),
    )
    # The masked pass takes it too.
    ids_keep = random_masking(1, model.num_tokens, 0.3, torch.Generator().manual_seed(0))
    assert model(at, to, model.encode_conditions(*features, pose), ids_keep=ids_keep).shape == a.shape


def test_pose_map_is_required_exactly_when_built_with_it():
    with_map, without = pose_map_model(), tiny_model()
    features = tiny_features(without, batch=1)[:3]
    with pytest.raises(ValueError, match="needs a pose image"):
        with_map.encode_conditions(*features)
    with pytest.raises(ValueError, match="built without a pose image"):
        without.encode_conditions(*features, torch.rand(1, 3, 32, 24))
    with pytest.raises(ValueError, match="must be 3 x"):
        tiny_model(pose_map_channels=10)


# ---- beyond the paper: reference attention -----------------------------------------------------------------------


def test_reference_attention_starts_as_the_plain_model_it_fine_tunes_from():
    plain = randomize(tiny_model())
    model = tiny_model(reference_layers=1)
    missing = model.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all(".cross_attn." in k or k.startswith("reference_memory.") for k in missing)
    x = tiny_inputs(model)
    plain_x = tiny_inputs(plain)
    torch.testing.assert_close(x["conditions"].y, plain_x["conditions"].y, rtol=0, atol=0)
    x["conditions"] = replace(plain_x["conditions"], reference_memory=x["conditions"].reference_memory)
    ids_keep = random_masking(3, model.num_tokens, 0.3, torch.Generator().manual_seed(0))
    drop = torch.tensor([True, False, False])
    torch.testing.assert_close(model(**x), plain(**plain_x), rtol=0, atol=0)
    torch.testing.assert_close(model(**x, drop_condition=drop), plain(**plain_x, drop_condition=drop), rtol=0, atol=0)
    torch.testing.assert_close(model(**x, ids_keep=ids_keep), plain(**plain_x, ids_keep=ids_keep), rtol=0, atol=0)


def test_reference_attention_reads_the_reference_tokens_and_drops_with_the_condition():
    model = randomize(tiny_model(reference_layers=1))
    x = tiny_inputs(model, batch=2)
    cond = x["conditions"]
    assert cond.reference_memory.shape == (2, model.num_tokens, 32)
    other = replace(cond, reference_memory=model.reference_memory(cond.reference_tokens.flip(0)))
    # y held fixed: the reference still reaches the prediction, through the memory alone ...
    assert not torch.allclose(model(x["sample"], x["timestep"], cond), model(x["sample"], x["timestep"], other))
    # ... except in the unconditional model of guidance, which sees no reference at all.
    drop = torch.ones(2, dtype=torch.bool)
    torch.testing.assert_close(
        model(x["sample"], x["timestep"], cond, drop_condition=drop),
        model(x["sample"], x["timestep"], other, drop_condition=drop),
    )
    with pytest.raises(ValueError, match="reference_layers"):
        tiny_model(reference_layers=-1)
    assert tiny_model().reference_memory is None


# ---- beyond the paper: the convolutional refiner -----------------------------------------------------------------


def test_refiner_starts_as_the_identity_then_sees_the_noisy_input():
    plain = randomize(tiny_model())
    model = tiny_model(refine_channels=8)
    missing = model.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all(k.startswith("refiner.") for k in missing)
    x = tiny_inputs(model)
    torch.testing.assert_close(model(**x), plain(**x), rtol=0, atol=0)  # adding it to a trained model changes nothing

    randomize(model.refiner, seed=3)
    out = model(**x)
    assert not torch.allclose(out[:, :4], plain(**x)[:, :4])
    torch.testing.assert_close(out[:, 4:], plain(**x)[:, 4:])  # variance as is
    # It reads x_t itself, locally: moving one latent cell of x_t moves the refined prediction within 2 cells only.
    prediction, c = plain(**x), torch.randn(3, 32)
    moved = x["sample"].clone()
    moved[:, :, 0, 0] += 1.0
    changed = (model.refiner(prediction, moved, c) - model.refiner(prediction, x["sample"], c)).abs().amax((0, 1)) > 0
    assert changed[0, 0] and changed[2, 2] and not changed[3:, :].any() and not changed[:, 3:].any()
    with pytest.raises(ValueError, match="refine_channels"):
        tiny_model(refine_channels=-1)
