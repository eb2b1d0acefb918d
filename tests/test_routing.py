"""Token routing (TREAD): a random subset of tokens skips a span of blocks in training; off, nothing changes."""

import pytest
import torch
from conftest import randomize, tiny_inputs, tiny_model

from xmdpt.diffusion import XMDPTLoss, route_span
from xmdpt.errors import InputError
from xmdpt.models.xmdpt import TokenRoute, random_masking
from xmdpt.training.config import load_config

DEEP = dict(depth=4, decode_layers=1)  # split = 3: blocks 0..2 can be routed around


def token_counts(model) -> tuple[list[int], list]:
    """Hooks that record how many tokens each block sees."""
    seen: list[int] = []
    handles = [
        block.register_forward_pre_hook(lambda m, args, i=i: seen.append((i, args[0].shape[1])))
        for i, block in enumerate(model.blocks)
    ]
    return seen, handles


def tokens_seen_in_sampling(model, x: dict) -> list[int]:
    """How many tokens each block sees in a sampling call (no route, no mask)."""
    seen, handles = token_counts(model)
    with torch.no_grad():
        model(x["sample"], x["timestep"], x["conditions"])
    for handle in handles:
        handle.remove()
    return [count for _, count in seen]


def test_route_span_defaults_to_tread_and_refuses_spans_past_the_side_interpolater():
    assert route_span(None, 12, 2) == (2, 10)  # S/2, B/2: blocks 2..9
    assert route_span(None, 6, 2) == (2, 4)  # the synthetic configs
    assert route_span(None, 2, 1) == (0, 1)
    assert route_span([1, 3], 4, 1) == (1, 3)
    for bad in ([2, 2], [0, 4], [-1, 2], [1], [1.5, 2]):
        with pytest.raises(ValueError, match="route_blocks"):
            route_span(bad, 4, 1)
    with pytest.raises(ValueError, match="no block"):
        route_span(None, 2, 2)


def test_routing_off_draws_and_trains_exactly_as_published():
    """With the ratio 0 nothing more is drawn; with it on, every published draw is still the same."""
    shape, n = (4, 4, 8, 6), 12
    off = XMDPTLoss().draw(shape, n, torch.Generator().manual_seed(3))
    on = XMDPTLoss(route_ratio=0.5).draw(shape, n, torch.Generator().manual_seed(3))
    assert off.route_full is None and off.route_masked is None and off.teacher_timesteps is None
    for name in ("timesteps", "noise", "drop_full", "drop_masked", "ids_keep", "noise_masked"):
        assert torch.equal(getattr(off, name), getattr(on, name)), name
    assert on.route_full.shape == (4, 6) and on.route_masked.shape == (4, int(int(n * 0.7) * 0.5))
    assert on[1:3].route_full.shape == (2, 6) and torch.equal(on[1:3].route_masked, on.route_masked[1:3])
    # Off, the loss is the published one computed by hand (no `route` reaches the model).
    model = randomize(tiny_model(**DEEP))
    x = tiny_inputs(model, batch=4)
    out = XMDPTLoss(route_ratio=0.0)(model, x["sample"], x["conditions"], draws=off)
    published = XMDPTLoss()(model, x["sample"], x["conditions"], draws=off)
    assert torch.equal(out.loss, published.loss) and torch.equal(out.full, published.full)


@pytest.mark.parametrize("masked", [False, True])
def test_routing_every_token_in_any_order_is_the_unrouted_model(masked):
    """A route through all tokens, shuffled, computes the unrouted function: the gather, the scatter back and the
    relative position bias at the tokens' absolute positions (composed with the masked pass's kept ids) are right.
    With the bias read at the wrong positions this fails."""
    model = randomize(tiny_model(**DEEP), std=0.1)
    x = tiny_inputs(model, batch=2)
    g = torch.Generator().manual_seed(0)
    ids_keep = random_masking(2, model.num_tokens, 0.3, g) if masked else None
    n = ids_keep.shape[1] if masked else model.num_tokens
    shuffled = torch.stack([torch.randperm(n, generator=g) for _ in range(2)])
    plain = model(x["sample"], x["timestep"], x["conditions"], ids_keep=ids_keep)
    routed = model(x["sample"], x["timestep"], x["conditions"], ids_keep=ids_keep, route=TokenRoute(shuffled, 1, 3))
    assert plain.abs().mean() > 1e-2
    torch.testing.assert_close(routed, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("masked", [False, True])
def test_routed_out_tokens_skip_the_span_unchanged_and_the_span_sees_fewer(masked):
    model = randomize(tiny_model(**DEEP), std=0.1)
    x = tiny_inputs(model, batch=2)
    g = torch.Generator().manual_seed(1)
    ids_keep = random_masking(2, model.num_tokens, 0.3, g) if masked else None
    n = ids_keep.shape[1] if masked else model.num_tokens
    ids = random_masking(2, n, 0.5, g)  # (2, n // 2) run the span
    seen, handles = token_counts(model)
    inputs: dict[int, torch.Tensor] = {}
    # Block 0's output (all tokens, before the span) and block 2's input (the routed tokens are back).
    handles.append(model.blocks[0].register_forward_hook(lambda m, a, out: inputs.__setitem__(1, out)))
    handles.append(model.blocks[2].register_forward_pre_hook(lambda m, a: inputs.__setitem__(2, a[0])))
    model(x["sample"], x["timestep"], x["conditions"], ids_keep=ids_keep, route=TokenRoute(ids, 1, 2))
    for handle in handles:
        handle.remove()
    full = model.num_tokens
    # (The masked pass first runs the reference tokens through blocks 0-2: its side-interpolater's context.)
    assert seen[-4:] == [(0, n), (1, ids.shape[1]), (2, n), (3, full)]
    before, after = inputs[1], inputs[2]
    routed = torch.zeros(2, n, dtype=torch.bool).scatter(1, ids, True)
    torch.testing.assert_close(after[~routed], before[~routed], rtol=0, atol=0)  # skipped: unchanged
    assert (after[routed] - before[routed]).abs().amax(-1).min() > 0  # routed: changed by block 1


def test_routed_training_reaches_every_parameter_of_the_span_and_only_changes_training():
    model = randomize(tiny_model(**DEEP), std=0.05)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    config = dict(model.config)
    x = tiny_inputs(model, batch=3)
    objective = XMDPTLoss(route_ratio=0.5, route_blocks=[1, 3])
    seen, handles = token_counts(model)
    out = objective(model, x["sample"], x["conditions"], generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    for handle in handles:
        handle.remove()
    kept = int(model.num_tokens * 0.7)
    assert seen[:4] == [(0, 12), (1, 6), (2, 6), (3, 12)]  # the full pass
    assert seen[4:7] == [(0, 12), (1, 12), (2, 12)]  # the masked pass's context: the reference tokens, all of them
    assert seen[7:] == [(0, kept), (1, kept // 2), (2, kept // 2), (3, 12)]  # the masked pass, routed too
    for i in (0, 1, 2):
        assert model.blocks[i].attn.qkv.weight.grad.abs().sum() > 0, i
        assert model.blocks[i].attn.rel_pos_bias.relative_position_bias_table.grad.abs().sum() > 0, i
    # Routing adds no parameter and leaves the model's config alone; sampling (no route) sees every token.
    assert dict(model.config) == config and model.state_dict().keys() == state.keys()
    assert tokens_seen_in_sampling(model, x) == [12] * 4


def test_a_route_past_the_split_is_refused_by_the_model():
    model = tiny_model(**DEEP)
    x = tiny_inputs(model, batch=1)
    with pytest.raises(ValueError, match="must end by block 3"):
        model(x["sample"], x["timestep"], x["conditions"], route=TokenRoute(torch.zeros(1, 2, dtype=torch.long), 1, 4))
    objective = XMDPTLoss(route_ratio=0.5, route_blocks=[1, 4])
    with pytest.raises(ValueError, match="route_blocks"):
        objective(model, x["sample"], x["conditions"], generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "override, message",
    [
        (["objective.route_ratio=1.0"], "objective.route_ratio=1.0 must lie in [0, 1)"),
        (["objective.route_ratio=0.5", "objective.route_blocks=[2,11]"], "objective.route_blocks=[2, 11] must"),
        (["objective.route_blocks=[2,8]"], "route_ratio=0"),
        (["objective.route_ratio=0.5", "model.depth=2", "model.decode_layers=2"], "no block to route around"),
    ],
)
def test_bad_routing_settings_are_one_line_config_errors(override, message):
    with pytest.raises(InputError) as info:
        load_config(None, override)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_routing_is_a_one_line_switch():
    config = load_config(None, ["objective.route_ratio=0.5"])
    assert (config.objective.route_ratio, config.objective.route_blocks) == (0.5, None)


# ---- SPRINT's dense-sparse fusion ------------------------------------------------------------------------------


def fused_pair(std: float = 0.1) -> tuple:
    """A random model and the same model with the fusion around blocks [1, 3), freshly initialised."""
    plain = randomize(tiny_model(**DEEP), std=std)
    fused = tiny_model(**DEEP, fusion_blocks=[1, 3])
    missing, unexpected = fused.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(missing) == ["fusion.mask_token", "fusion.proj.bias", "fusion.proj.weight"] and not unexpected
    return plain, fused


@pytest.mark.parametrize("masked", [False, True])
def test_a_fresh_fusion_is_the_identity_so_a_trained_model_can_start_from_it(masked):
    """At initialisation the fusion passes the span's output through: sampling and both training passes compute the
    unfused model's function, so `model.init_from` a model without it starts where that model is."""
    plain, fused = fused_pair()
    x = tiny_inputs(plain, batch=2)
    ids_keep = random_masking(2, plain.num_tokens, 0.3, torch.Generator().manual_seed(0)) if masked else None
    expected = plain(x["sample"], x["timestep"], x["conditions"], ids_keep=ids_keep)
    got = fused(x["sample"], x["timestep"], x["conditions"], ids_keep=ids_keep)
    assert expected.abs().mean() > 1e-2
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("masked", [False, True])
def test_fusion_gives_routed_around_tokens_the_dense_path_and_the_mask_token(masked):
    """SPRINT, not TREAD: after the span a routed-around token is proj([its dense input, mask token]), whatever the
    span's blocks compute; a routed token is proj([its dense input, the span's output])."""
    model = randomize(tiny_model(**DEEP, fusion_blocks=[1, 3]), std=0.1)
    x = tiny_inputs(model, batch=2)
    g = torch.Generator().manual_seed(2)
    ids_keep = random_masking(2, model.num_tokens, 0.3, g) if masked else None
    n = ids_keep.shape[1] if masked else model.num_tokens
    route = TokenRoute(random_masking(2, n, 0.75, g), 1, 3)
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        model.blocks[0].register_forward_hook(lambda m, a, out: seen.__setitem__("dense", out)),
        model.blocks[2].register_forward_hook(lambda m, a, out: seen.__setitem__("deep", out)),
        model.fusion.register_forward_hook(lambda m, a, out: seen.__setitem__("fused", out)),
        model.blocks[3].register_forward_pre_hook(lambda m, a: seen.__setitem__("next", a[0])),
    ]
    model(x["sample"], x["timestep"], x["conditions"], ids_keep=ids_keep, route=route)
    for hook in hooks:
        hook.remove()
    dense, fused = seen["dense"], seen["fused"]
    assert dense.shape[1] == n and seen["deep"].shape[1] == route.ids.shape[1]  # the span is sparse
    routed = torch.zeros(2, n, dtype=torch.bool).scatter(1, route.ids, True)
    fusion = model.fusion
    masked_out = fusion.proj(torch.cat([dense, fusion.mask_token.expand_as(dense)], -1))
    torch.testing.assert_close(fused[~routed], masked_out[~routed], rtol=1e-5, atol=1e-5)
    deep = torch.zeros_like(dense).scatter(1, route.ids.unsqueeze(-1).expand(-1, -1, dense.shape[-1]), seen["deep"])
    through = fusion.proj(torch.cat([dense, deep], -1))
    torch.testing.assert_close(fused[routed], through[routed], rtol=1e-5, atol=1e-5)
    if not masked:  # what block 3 gets (the masked pass's side-interpolater takes it first)
        torch.testing.assert_close(seen["next"], fused + model.decoder_pos_embed)


def test_fused_training_routes_over_the_fusion_span_and_trains_the_fusion():
    """The objective's route defaults to the model's fusion span; training reaches the mask token and both halves of
    the projection; sampling runs every token through the span; a route over another span is refused."""
    _, model = fused_pair(std=0.05)
    x = tiny_inputs(model, batch=3)
    seen, handles = token_counts(model)
    out = XMDPTLoss(route_ratio=0.75)(model, x["sample"], x["conditions"], generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    for handle in handles:
        handle.remove()
    assert seen[:4] == [(0, 12), (1, 3), (2, 3), (3, 12)]  # the full pass: blocks 1-2 see a quarter
    D = model.config.hidden_size
    grad = model.fusion.proj.weight.grad
    assert model.fusion.mask_token.grad.abs().sum() > 0
    assert grad[:, :D].abs().sum() > 0 and grad[:, D:].abs().sum() > 0
    assert tokens_seen_in_sampling(model, x) == [12] * 4
    with pytest.raises(ValueError, match="fused over"):
        XMDPTLoss(route_ratio=0.5, route_blocks=[0, 2])(
            model, x["sample"], x["conditions"], generator=torch.Generator().manual_seed(0)
        )


def test_a_fused_model_saves_and_loads_with_its_span(tmp_path):
    model = randomize(tiny_model(**DEEP, fusion_blocks=[1, 3]), std=0.1)
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path)
    assert loaded.fusion_span == (1, 3)
    x = tiny_inputs(model, batch=2)
    torch.testing.assert_close(
        loaded(x["sample"], x["timestep"], x["conditions"]), model(x["sample"], x["timestep"], x["conditions"])
    )
    with pytest.raises(ValueError, match="route_blocks=\\[1, 4\\]"):
        tiny_model(**DEEP, fusion_blocks=[1, 4])


@pytest.mark.parametrize(
    "override, message",
    [
        (["model.fusion_blocks=[2,11]"], "model.fusion_blocks=[2, 11] must satisfy"),
        (
            ["model.fusion_blocks=[2,10]", "objective.route_ratio=0.75", "objective.route_blocks=[3,10]"],
            "objective.route_blocks=[3, 10] must be model.fusion_blocks=[2, 10]",
        ),
    ],
)
def test_bad_fusion_settings_are_one_line_config_errors(override, message):
    with pytest.raises(InputError) as info:
        load_config(None, override)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_sprint_is_one_line_on_a_config_and_builds_the_fused_model_and_its_route():
    from pathlib import Path

    from xmdpt.training.build import build_codec, build_denoiser, build_encoders, build_objective

    base = Path(__file__).resolve().parents[1] / "configs" / "synthetic-cpu.yaml"
    tiny = ["model.hidden_size=32", "model.num_heads=2", "conditioning.learned_width=16"]
    config = load_config(base, [*tiny, "model.fusion_blocks=[1,4]", "objective.route_ratio=0.75"])
    pose_encoder, reference_encoder = build_encoders(config)
    codec = build_codec(config)
    denoiser = build_denoiser(config, codec, pose_encoder, reference_encoder)
    objective = build_objective(config, codec, denoiser, reference_encoder)
    assert denoiser.fusion_span == (1, 4) and denoiser.config.fusion_blocks == [1, 4]
    assert objective.route_ratio == 0.75 and objective.span(denoiser) == (1, 4)
