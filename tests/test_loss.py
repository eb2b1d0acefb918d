"""The training objective: schedule, targets, the learned-range bound, full + masked passes, dropout, learning."""

import math

import pytest
import torch
from conftest import randomize, tiny_inputs, tiny_model

from xmdpt.diffusion import XMDPTLoss, make_train_scheduler, normal_kl
from xmdpt.models.xmdpt import random_masking


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


def test_loss_is_full_pass_plus_masked_pass_on_the_same_x_t():
    model = randomize(tiny_model())
    x = tiny_inputs(model, batch=2)
    objective = XMDPTLoss(mask_ratio=0.3, condition_dropout=0.0)
    t = torch.tensor([3, 700])
    g = torch.Generator().manual_seed(5)
    out = objective(model, x["sample"], x["pose_features"], x["reference_features"], x["reference_latent"], g, t)
    # Recompute by hand with the same random draws.
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(x["sample"].shape, generator=g)
    x_t = objective.scheduler.add_noise(x["sample"], noise, t)
    conds = (x["pose_features"], x["reference_features"], x["reference_latent"])
    full = objective.pass_loss(model(x_t, t, *conds), x["sample"], noise, x_t, t)
    torch.rand(2, generator=g)  # the full pass's dropout draw
    ids = random_masking(2, model.num_tokens, 0.3, generator=g)
    masked = objective.pass_loss(model(x_t, t, *conds, ids_keep=ids), x["sample"], noise, x_t, t)
    torch.testing.assert_close(out.full, full.detach())
    torch.testing.assert_close(out.masked, masked.detach())
    torch.testing.assert_close(out.loss, full.mean() + masked.mean())
    assert not torch.allclose(out.full, out.masked)


def test_mask_ratio_zero_trains_the_full_pass_only():
    model = randomize(tiny_model())
    x = tiny_inputs(model, batch=2)
    out = XMDPTLoss(mask_ratio=0.0)(
        model, x["sample"], x["pose_features"], x["reference_features"], x["reference_latent"]
    )
    assert out.masked is None
    torch.testing.assert_close(out.loss, out.full.mean())


def test_condition_dropout_one_ignores_the_conditions():
    model = randomize(tiny_model())
    x = tiny_inputs(model, batch=2)
    other = tiny_inputs(model, batch=2, seed=9)
    objective = XMDPTLoss(condition_dropout=1.0, mask_ratio=0.0)
    t = torch.tensor([5, 600])
    a = objective(
        model,
        x["sample"],
        x["pose_features"],
        x["reference_features"],
        x["reference_latent"],
        torch.Generator().manual_seed(0),
        t,
    )
    b = objective(
        model,
        x["sample"],
        other["pose_features"],
        other["reference_features"],
        other["reference_latent"],
        torch.Generator().manual_seed(0),
        t,
    )
    torch.testing.assert_close(a.loss, b.loss)
    c = XMDPTLoss(condition_dropout=0.0, mask_ratio=0.0)(
        model,
        x["sample"],
        other["pose_features"],
        other["reference_features"],
        other["reference_latent"],
        torch.Generator().manual_seed(0),
        t,
    )
    assert not torch.allclose(a.loss, c.loss)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_a_few_adamw_steps_reduce_the_loss(prediction_type):
    model = tiny_model()
    x = tiny_inputs(model, batch=8)
    objective = XMDPTLoss(make_train_scheduler(prediction_type))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    t = torch.randint(0, 1000, (8,), generator=torch.Generator().manual_seed(0))

    def evaluate():
        with torch.no_grad():
            out = objective(
                model,
                x["sample"],
                x["pose_features"],
                x["reference_features"],
                x["reference_latent"],
                torch.Generator().manual_seed(123),
                t,
            )
        return out.loss.item()

    before = evaluate()
    g = torch.Generator().manual_seed(1)
    for _ in range(60):
        opt.zero_grad()
        objective(
            model, x["sample"], x["pose_features"], x["reference_features"], x["reference_latent"], g
        ).loss.backward()
        opt.step()
    after = evaluate()
    assert math.isfinite(after) and after < 0.85 * before
