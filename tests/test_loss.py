"""The training objective: schedule, targets, the learned-range bound, full + masked passes, dropout, learning."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize, tiny_features, tiny_inputs, tiny_model

from xmdpt.diffusion import (
    PaletteTerm,
    TextureTerm,
    XMDPTLoss,
    local_contrast,
    local_covariance,
    make_train_scheduler,
    normal_kl,
)


def test_schedule_is_the_published_linear_one():
    s = make_train_scheduler()
    assert s.config.num_train_timesteps == 1000
    torch.testing.assert_close(s.betas, torch.linspace(1e-4, 0.02, 1000, dtype=torch.float32))
    assert s.config.variance_type == "learned_range"


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_target_and_predicted_x0_are_consistent(prediction_type):
    loss = XMDPTLoss(make_train_scheduler(prediction_type))
    x0, noise = torch.randn(4, 4, 8, 6), torch.randn(4, 4, 8, 6)
    t = torch.tensor([0, 10, 500, 999])
    x_t = loss.scheduler.add_noise(x0, noise, t)
    torch.testing.assert_close(loss.predicted_x0(loss.target(x0, noise, t), x_t, t), x0, rtol=1e-4, atol=1e-4)
    if prediction_type == "v_prediction":
        torch.testing.assert_close(loss.target(x0, noise, t), loss.scheduler.get_velocity(x0, noise, t))


def test_variational_bound_is_zero_for_the_true_posterior_and_positive_otherwise():
    loss = XMDPTLoss()
    x0, noise = torch.randn(3, 4, 8, 6), torch.randn(3, 4, 8, 6)
    t = torch.tensor([1, 300, 999])
    x_t = loss.scheduler.add_noise(x0, noise, t)
    # Exact epsilon and v = -1 (log-variance = the posterior's clipped log-variance) give KL = 0.
    v = -torch.ones_like(x0)
    torch.testing.assert_close(loss.variational_bound(noise, v, x0, x_t, t), torch.zeros(3), atol=1e-4, rtol=0)
    # At small t the posterior and beta_t variances differ most, so a wrong variance costs most there.
    assert (loss.variational_bound(noise, v + 0.5, x0, x_t, t)[:1] > 1e-3).all()
    assert (loss.variational_bound(noise + 0.1, v, x0, x_t, t) > 0).all()


def test_variational_bound_at_t0_is_the_decoder_nll():
    loss = XMDPTLoss()
    x0 = torch.rand(1, 4, 8, 6) * 2 - 1
    t = torch.tensor([0])
    noise = torch.randn_like(x0)
    x_t = loss.scheduler.add_noise(x0, noise, t)
    vb = loss.variational_bound(noise, torch.zeros_like(x0), x0, x_t, t)
    # A discretised Gaussian likelihood is at most 1 per dimension: the NLL in bits is >= 0 (a KL could be 0).
    assert vb.item() > 0
    kl = normal_kl(torch.zeros(1), torch.zeros(1), torch.ones(1), torch.zeros(1))
    assert kl.item() == pytest.approx(0.5)


def test_loss_is_full_pass_plus_masked_pass_at_the_same_t_with_their_own_noise():
    model = randomize(tiny_model())
    x = tiny_inputs(model, batch=2)
    objective = XMDPTLoss(mask_ratio=0.3, condition_dropout=0.5)
    conds = x["conditions"]
    draws = objective.draw(tuple(x["sample"].shape), model.num_tokens, torch.Generator().manual_seed(5))
    assert draws.ids_keep.shape == (2, int(model.num_tokens * 0.7))
    out = objective(model, x["sample"], conds, draws=draws)
    # Recompute by hand from the same draws.
    t = draws.timesteps
    x_t = objective.scheduler.add_noise(x["sample"], draws.noise, t)
    full = objective.pass_loss(model(x_t, t, conds, drop_condition=draws.drop_full), x["sample"], draws.noise, x_t, t)
    assert not torch.equal(draws.noise_masked, draws.noise)  # each pass draws its own noise, as published
    x_t_masked = objective.scheduler.add_noise(x["sample"], draws.noise_masked, t)
    masked_out = model(x_t_masked, t, conds, drop_condition=draws.drop_masked, ids_keep=draws.ids_keep)
    masked = objective.pass_loss(masked_out, x["sample"], draws.noise_masked, x_t_masked, t)
    torch.testing.assert_close(out.full, full.detach())
    torch.testing.assert_close(out.masked, masked.detach())
    torch.testing.assert_close(out.loss, full.mean() + masked.mean())
    assert not torch.allclose(out.full, out.masked)
    # The same generator seed gives the same draws; slicing gives a sample's own draws.
    again = objective.draw(tuple(x["sample"].shape), model.num_tokens, torch.Generator().manual_seed(5))
    assert torch.equal(again.noise, draws.noise) and torch.equal(again.ids_keep, draws.ids_keep)
    assert torch.equal(draws[1:].noise, draws.noise[1:]) and draws[1:].timesteps.shape == (1,)
    assert torch.equal(draws[1:].noise_masked, draws.noise_masked[1:])


def test_mask_ratio_zero_trains_the_full_pass_only():
    model = randomize(tiny_model())
    x = tiny_inputs(model, batch=2)
    out = XMDPTLoss(mask_ratio=0.0)(model, x["sample"], x["conditions"])
    assert out.masked is None
    torch.testing.assert_close(out.loss, out.full.mean())


def test_condition_dropout_one_ignores_the_conditions():
    model = randomize(tiny_model())
    x = tiny_inputs(model, batch=2)
    other = tiny_inputs(model, batch=2, seed=9)

    def loss(dropout, inputs):
        # Without the masked pass: its cross-attention reads the reference latent even when y is dropped.
        objective = XMDPTLoss(condition_dropout=dropout, mask_ratio=0.0)
        return objective(model, x["sample"], inputs["conditions"], generator=torch.Generator().manual_seed(0)).loss

    torch.testing.assert_close(loss(1.0, x), loss(1.0, other))
    assert not torch.allclose(loss(0.0, x), loss(0.0, other))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_a_few_adamw_steps_reduce_the_loss(prediction_type):
    model = tiny_model()
    x = tiny_inputs(model, batch=8)
    objective = XMDPTLoss(make_train_scheduler(prediction_type))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    features = tiny_features(model, batch=8)
    fixed = objective.draw(tuple(x["sample"].shape), model.num_tokens, torch.Generator().manual_seed(123))

    def evaluate():
        with torch.no_grad():
            return objective(model, x["sample"], model.encode_conditions(*features), draws=fixed).loss.item()

    before = evaluate()
    g = torch.Generator().manual_seed(1)
    for _ in range(60):
        opt.zero_grad()
        objective(model, x["sample"], model.encode_conditions(*features), generator=g).loss.backward()
        opt.step()
    after = evaluate()
    assert math.isfinite(after) and after < 0.85 * before


def _stripes(shift: int, period: int = 4, size=(16, 12)) -> torch.Tensor:
    rows = (torch.arange(size[0]) + shift) % period < period // 2
    return torch.where(rows[None, None, :, None], 1.0, -1.0).expand(1, 3, *size).clone()


def test_local_contrast_sees_kind_and_place_of_detail_not_its_phase():
    a, b = _stripes(0), _stripes(2)  # horizontal stripes, half a period apart
    assert not torch.equal(a, b)
    inner = (slice(None), slice(None), slice(2, -2), slice(2, -2))
    torch.testing.assert_close(local_contrast(a)[inner], local_contrast(b)[inner])
    assert local_contrast(a)[:, 0].abs().max() == 0  # no left-right change in horizontal stripes
    assert local_contrast(a)[0, 1, 2:-2, 2:-2].min() > 0.5
    assert local_contrast(torch.full_like(a, 0.3)).abs().max() == 0  # a flat tint has none
    checks = a * torch.where((torch.arange(12) % 4 < 2)[None, None, None, :], 1.0, -1.0)
    assert local_contrast(checks)[0, 0, 2:-2, 2:-2].min() > 0.5  # checks: both directions
    assert local_contrast(a, window=5).shape == (1, 2, 16, 12)
    with pytest.raises(ValueError, match="odd"):
        local_contrast(a, window=4)


def test_texture_term_scores_a_tint_worse_than_the_detail_at_another_phase():
    """x0-prediction: the MSE prefers the flat mean of two phases; a large texture weight prefers either phase."""
    decode = lambda z: F.pixel_shuffle(z, 2)  # noqa: E731 - a pixel codec, 12 channels <-> RGB
    x0 = F.pixel_unshuffle(_stripes(0), 2)
    shifted = F.pixel_unshuffle(_stripes(2), 2)
    tint = torch.zeros_like(x0)
    t, noise = torch.tensor([500]), torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    plain = XMDPTLoss(make_train_scheduler("sample", learn_sigma=False))
    scheduler = make_train_scheduler("sample", learn_sigma=False)
    textured = XMDPTLoss(scheduler, image_terms=[TextureTerm(20.0)], decode=decode)
    x_t = plain.scheduler.add_noise(x0, noise, t)

    def score(objective, prediction):
        return objective.pass_loss(prediction, x0, noise, x_t, t).item()

    assert score(plain, tint) < score(plain, shifted)
    assert score(textured, shifted) < score(textured, tint)
    assert score(textured, x0) == pytest.approx(0.0, abs=1e-7)  # the truth costs nothing
    tint_texture = 20.0 * local_contrast(_stripes(0)).pow(2).mean().item()
    assert score(textured, tint) == pytest.approx(score(plain, tint) + tint_texture, rel=1e-5)
    # The other phase is charged only where the box window meets the image's edge.
    assert score(textured, shifted) - score(plain, shifted) < 0.1 * tint_texture


def test_local_contrast_at_several_lags_tells_grain_from_cells():
    """One-pixel grain at half the amplitude has the lag-1 contrast of two-pixel stripes; lag 2 tells them apart."""
    stripes = _stripes(0)  # cells of 2 rows, amplitude 1
    grain = 0.5 * torch.where((torch.arange(16) % 2 == 0)[None, None, :, None], 1.0, -1.0).expand(1, 3, 16, 12)
    inner = (slice(None), slice(None), slice(3, -3), slice(3, -3))
    one, two = local_contrast(stripes, lags=(1, 2))[inner], local_contrast(grain, lags=(1, 2))[inner]
    assert one.shape[1] == 4  # (horizontal, vertical) at lag 1, then at lag 2
    torch.testing.assert_close(one[:, :2], local_contrast(stripes)[inner])  # lag 1 as before
    assert one[:, 1].mean() == pytest.approx(two[:, 1].mean())  # the same vertical detail at lag 1
    assert one[:, 3].mean() == pytest.approx(2.0) and two[:, 3].abs().max() == 0  # not at lag 2
    for lags in [(), (0,), (1.5,), (True,), (12,)]:  # 12: not smaller than the 16x12 image
        with pytest.raises(ValueError, match="lags"):
            local_contrast(stripes, lags=lags)
    with pytest.raises(ValueError, match="lags"):
        TextureTerm(1.0, lags=(0,))


def _two_colour_stripes(a, b, shift: int = 0, period: int = 4, size=(16, 12)) -> torch.Tensor:
    rows = ((torch.arange(size[0]) + shift) % period < period // 2)[None, None, :, None]
    a, b = (torch.tensor(c, dtype=torch.float32).view(1, 3, 1, 1) for c in (a, b))
    return torch.where(rows, a, b).expand(1, 3, *size).clone()


def test_local_covariance_is_the_pattern_colours_outer_product_whatever_the_phase():
    a, b = (0.8, -0.6, 0.8), (-0.6, 0.6, -0.6)  # magenta on green
    stripes = _two_colour_stripes(a, b)
    inner = (slice(None), slice(None), slice(2, -2), slice(2, -2))
    cov = local_covariance(stripes)  # (1, 6, H, W)
    d = torch.tensor(a) - torch.tensor(b)
    expected = 0.24 * torch.stack([d[i] * d[j] for i, j in ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2))])
    torch.testing.assert_close(cov[inner], expected.view(1, 6, 1, 1).expand_as(cov[inner]))  # p(1-p) = 2/5 * 3/5
    torch.testing.assert_close(local_covariance(_two_colour_stripes(a, b, shift=1))[inner], cov[inner])
    assert local_covariance(torch.full_like(stripes, 0.3)).abs().max() < 1e-6  # a flat tint has none
    # Stripes in other colours with the same per-pixel contrast: local_contrast cannot tell, the covariance can.
    other = _two_colour_stripes((0.8, 0.8, -0.6), (-0.6, -0.4, 0.8))
    torch.testing.assert_close(local_contrast(other), local_contrast(stripes))
    assert (local_covariance(other)[inner] - cov[inner]).abs().amax() > 0.5
    with pytest.raises(ValueError, match="RGB"):
        local_covariance(stripes[:, :2])
    with pytest.raises(ValueError, match="odd"):
        local_covariance(stripes, window=2)


def test_palette_term_scores_detail_in_the_wrong_colours_worse_than_at_another_phase():
    """The texture term charges stripes in other colours nothing; with a palette weight they cost more than the
    right colours at another phase."""
    decode = lambda z: F.pixel_shuffle(z, 2)  # noqa: E731 - a pixel codec, 12 channels <-> RGB
    a, b = (0.8, -0.6, 0.8), (-0.6, 0.6, -0.6)
    x0 = F.pixel_unshuffle(_two_colour_stripes(a, b), 2)
    shifted = F.pixel_unshuffle(_two_colour_stripes(a, b, shift=2), 2)
    recoloured = F.pixel_unshuffle(_two_colour_stripes((0.8, 0.8, -0.6), (-0.6, -0.4, 0.8)), 2)
    t, noise = torch.tensor([500]), torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    scheduler = make_train_scheduler("sample", learn_sigma=False)
    plain = XMDPTLoss(scheduler)
    texture = XMDPTLoss(scheduler, image_terms=[TextureTerm(20.0)], decode=decode)
    both = XMDPTLoss(scheduler, image_terms=[TextureTerm(20.0), PaletteTerm(20.0)], decode=decode)
    x_t = plain.scheduler.add_noise(x0, noise, t)

    def extra(objective, prediction):  # what the image terms add to the MSE
        with_terms = objective.pass_loss(prediction, x0, noise, x_t, t)
        return (with_terms - plain.pass_loss(prediction, x0, noise, x_t, t)).item()

    assert extra(texture, recoloured) == pytest.approx(0.0, abs=1e-6)
    assert extra(both, recoloured) > 10 * extra(both, shifted)
    assert extra(both, x0) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="image terms need `decode`"):
        XMDPTLoss(image_terms=[PaletteTerm(1.0)])
    with pytest.raises(ValueError, match="PaletteTerm weight"):
        PaletteTerm(-1.0)


def test_texture_term_trains_the_model_and_needs_a_decoder():
    with pytest.raises(ValueError, match="decode"):
        XMDPTLoss(image_terms=[TextureTerm(1.0)])
    with pytest.raises(ValueError, match="TextureTerm weight"):
        TextureTerm(float("nan"))
    model = randomize(tiny_model())
    x = tiny_inputs(model, batch=2)
    features = tiny_features(model, batch=2)
    decode = lambda z: F.pixel_shuffle(z, 2)  # noqa: E731 - 4 latent channels -> 1 "colour"
    draws = XMDPTLoss().draw(tuple(x["sample"].shape), model.num_tokens, torch.Generator().manual_seed(0))
    losses = {}
    for weight in (0.0, 2.0):
        model.zero_grad()
        terms = [TextureTerm(weight)] if weight else []
        objective = XMDPTLoss(image_terms=terms, decode=decode)
        out = objective(model, x["sample"], model.encode_conditions(*features), draws=draws)
        out.loss.backward()
        losses[weight] = (out.loss.item(), model.final_layer.linear.weight.grad.clone())
    assert losses[2.0][0] > losses[0.0][0]
    assert not torch.allclose(losses[2.0][1], losses[0.0][1])
