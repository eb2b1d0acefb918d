"""Representation alignment: REPA (a frozen encoder's features of the target) and self-alignment (the EMA model)."""

import copy

import pytest
import torch
from conftest import randomize, tiny_features, tiny_inputs, tiny_model

from xmdpt.diffusion import (
    AlignmentInputs,
    RepaTerm,
    SelfAlignmentTerm,
    XMDPTLoss,
    patch_features_on_grid,
    teacher_tokens,
)
from xmdpt.errors import InputError
from xmdpt.training.config import load_config

DEEP = dict(depth=4, decode_layers=1)


def test_patch_features_are_interpolated_to_the_token_grid_without_the_class_token():
    # A 4x4 patch grid whose feature is the row index, class token 100: a 2x3 token grid sees rows 0.5 and 2.5.
    rows = torch.arange(4.0).repeat_interleave(4)  # (16,)
    features = torch.cat([torch.full((1,), 100.0), rows])[None, :, None].expand(2, 17, 3)
    out = patch_features_on_grid(features, (2, 3))
    assert out.shape == (2, 6, 3)
    torch.testing.assert_close(out[0, :, 0], torch.tensor([0.5, 0.5, 0.5, 2.5, 2.5, 2.5]))
    with pytest.raises(ValueError, match="square"):
        patch_features_on_grid(torch.zeros(1, 16, 3), (2, 3))


def test_alignment_term_is_minus_the_weighted_mean_cosine_similarity():
    term = RepaTerm(0.5, block=1, hidden_size=8, target_dim=5, width=16)
    tokens = torch.randn(3, 6, 8)
    with torch.no_grad():
        projected = term.projector(tokens)
    torch.testing.assert_close(term(tokens, 2 * projected), torch.full((3,), -0.5))  # aligned: cosine 1
    torch.testing.assert_close(term(tokens, -projected), torch.full((3,), 0.5))  # opposed: cosine -1
    half = torch.cat([projected[:, :3], -projected[:, 3:]], dim=1)
    torch.testing.assert_close(term(tokens, half), torch.zeros(3), atol=1e-6, rtol=0)


def test_repa_trains_the_block_towards_the_target_features():
    torch.manual_seed(0)
    model = tiny_model(**DEEP)
    term = RepaTerm(1.0, block=1, hidden_size=32, target_dim=10, width=64)
    objective = XMDPTLoss(alignment_terms=[term])
    x = tiny_inputs(model, batch=4)
    features = tiny_features(model, batch=4)
    target_features = torch.randn(4, 1 + 4 * 4, 10, generator=torch.Generator().manual_seed(2))
    fixed = objective.draw(tuple(x["sample"].shape), model.num_tokens, torch.Generator().manual_seed(3))
    opt = torch.optim.AdamW([*model.parameters(), *term.parameters()], lr=3e-3)

    def step():
        out = objective(
            model, x["sample"], model.encode_conditions(*features), draws=fixed,
            alignment=AlignmentInputs(target_features=target_features),
        )  # fmt: skip
        return out

    before = step().alignment["repa"].mean().item()
    for _ in range(15):
        opt.zero_grad()
        out = step()
        out.loss.backward()
        opt.step()
    after = step().alignment["repa"].mean().item()
    assert -1 <= after < before - 0.2
    # The total is the published loss plus the term.
    torch.testing.assert_close(out.loss, out.full.mean() + out.masked.mean() + out.alignment["repa"].mean())
    with pytest.raises(ValueError, match="frozen encoder"):
        objective(model, x["sample"], model.encode_conditions(*features), draws=fixed)


def test_teacher_tokens_are_the_teachers_block_output_without_the_blocks_after_it():
    teacher = randomize(tiny_model(**DEEP), std=0.05)
    x = tiny_inputs(teacher, batch=2)
    captured, calls = {}, []
    hooks = [teacher.blocks[1].register_forward_hook(lambda m, a, out: captured.setdefault("x", out))]
    hooks += [teacher.blocks[2].register_forward_hook(lambda *a: calls.append(1))]
    with torch.no_grad():
        teacher(x["sample"], x["timestep"], x["conditions"])
    assert calls == [1]
    calls.clear()
    tokens = teacher_tokens(teacher, 1, x["sample"], x["timestep"], x["conditions"], None)
    assert calls == [] and not tokens.requires_grad  # stopped after block 1, no graph
    torch.testing.assert_close(tokens, captured["x"])
    for hook in hooks:
        hook.remove()


def test_self_alignment_aligns_to_the_ema_at_lower_noise_and_trains():
    torch.manual_seed(0)
    model = tiny_model(**DEEP)
    teacher = copy.deepcopy(randomize(tiny_model(**DEEP), std=0.05)).requires_grad_(False)
    term = SelfAlignmentTerm(1.0, block=0, teacher_block=2, gap=200, hidden_size=32, width=64)
    objective = XMDPTLoss(alignment_terms=[term], route_ratio=0.5, route_blocks=[0, 2])
    x = tiny_inputs(model, batch=4)
    features = tiny_features(model, batch=4)
    fixed = objective.draw(tuple(x["sample"].shape), model.num_tokens, torch.Generator().manual_seed(3))
    lower = fixed.timesteps - fixed.teacher_timesteps
    assert (lower >= 0).all() and (lower <= 200).all() and (fixed.teacher_timesteps >= 0).all() and lower.any()
    opt = torch.optim.AdamW([*model.parameters(), *term.parameters()], lr=3e-3)
    inputs = AlignmentInputs(teacher=teacher, teacher_conditions=teacher.encode_conditions(*features))

    def step():  # block 0 lies in the routed span: the targets are taken at the routed tokens
        return objective(model, x["sample"], model.encode_conditions(*features), draws=fixed, alignment=inputs)

    before = step().alignment["self"].mean().item()
    for _ in range(15):
        opt.zero_grad()
        step().loss.backward()
        opt.step()
    after = step().alignment["self"].mean().item()
    assert -1 <= after < before - 0.2
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize(
    "override, message",
    [
        (["objective.repa_weight=0.5", "conditioning.encoder=learned"], "conditioning.encoder=dinov2"),
        (
            ["objective.repa_weight=0.5", "objective.repa_block=12"],
            "objective.repa_block=12 must lie in [0, depth=12)",
        ),
        (["objective.self_align_weight=0.5", "objective.self_align_blocks=[8,3]"], "self_align_blocks=[8, 3]"),
        (["objective.self_align_weight=0.5", "objective.self_align_gap=0"], "self_align_gap=0"),
        (["objective.self_align_weight=-1"], "objective.self_align_weight=-1.0 must be"),
    ],
)
def test_bad_alignment_settings_are_one_line_config_errors(override, message):
    with pytest.raises(InputError) as info:
        load_config(None, override)
    assert message in str(info.value) and "\n" not in str(info.value)
