"""`PublicDDIMScheduler` against a plain restatement of the public respaced DDIM loop (ADM/MDT `space_timesteps`,
`SpacedDiffusion`, `ddim_sample_loop` with eta 0 and clip_denoised=False), written here from the public behaviour."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from tiny_pipeline import SIZE as IMAGE_SIZE
from tiny_pipeline import tiny_pipeline

from xmdpt import XMDPTPipeline
from xmdpt.diffusion import make_train_scheduler
from xmdpt.schedulers import PublicDDIMScheduler, respaced_timesteps

T = 1000
SHAPE = (2, 4, 6, 5)


def public_space_timesteps(num_timesteps: int, section_counts: str) -> set[int]:
    """ADM's rule: "ddimN" -> range(0, T, s) with the first stride s giving N; "N" -> one section of N, fractional
    stride (T - 1) / (N - 1) accumulated and rounded."""
    if section_counts.startswith("ddim"):
        wanted = int(section_counts[4:])
        for s in range(1, num_timesteps):
            if len(range(0, num_timesteps, s)) == wanted:
                return set(range(0, num_timesteps, s))
        raise ValueError(section_counts)
    count = int(section_counts)
    frac = 1 if count <= 1 else (num_timesteps - 1) / (count - 1)
    steps, cur = [], 0.0
    for _ in range(count):
        steps.append(round(cur))
        cur += frac
    return set(steps)


def public_ddim_loop(model, noise: torch.Tensor, respacing: str, prediction: str = "epsilon"):
    """The public sampler: float64 linear betas, respaced betas 1 - a(t) / a(last kept), coefficients extracted as
    float32, eps -> x0 -> eps re-derived -> x at the next visited timestep, eta 0. Returns (x, visited timesteps)."""
    base = np.cumprod(1.0 - np.linspace(1e-4, 0.02, T, dtype=np.float64))
    use = public_space_timesteps(T, respacing)
    new_betas, timestep_map, last = [], [], 1.0
    for i, a in enumerate(base):
        if i in use:
            new_betas.append(1 - a / last)
            last = a
            timestep_map.append(i)
    alphas_cumprod = np.cumprod(1.0 - np.array(new_betas, dtype=np.float64))
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    sqrt_recip = np.sqrt(1.0 / alphas_cumprod)
    sqrt_recipm1 = np.sqrt(1.0 / alphas_cumprod - 1)

    def extract(arr: np.ndarray, i: int) -> torch.Tensor:
        return torch.from_numpy(arr)[torch.full((noise.shape[0],), i)].float().view(-1, 1, 1, 1)

    x, visited = noise, []
    for i in reversed(range(len(timestep_map))):
        visited.append(timestep_map[i])
        out = model(x, torch.full((noise.shape[0],), timestep_map[i]))  # the model sees the original timestep
        if prediction == "epsilon":
            x0 = extract(sqrt_recip, i) * x - extract(sqrt_recipm1, i) * out
        elif prediction == "sample":
            x0 = out
        else:  # v: x0 = sqrt(a) x - sqrt(1 - a) v
            x0 = extract(np.sqrt(alphas_cumprod), i) * x - extract(np.sqrt(1 - alphas_cumprod), i) * out
        eps = (extract(sqrt_recip, i) * x - x0) / extract(sqrt_recipm1, i)
        a_prev = extract(alphas_cumprod_prev, i)
        x = x0 * torch.sqrt(a_prev) + torch.sqrt(1 - a_prev) * eps
    return x, visited


class ToyModel:
    """A fixed deterministic "denoiser": roughly the ideal eps for N(0, I) data plus a random linear map of x and a
    fixed pattern in t, so that the loop stays bounded and every step matters."""

    def __init__(self, seed: int = 0, channels_out: int = SHAPE[1]):
        g = torch.Generator().manual_seed(seed)
        d = math.prod(SHAPE[1:])
        self.weight = torch.randn(d, d, generator=g) * 0.2 / math.sqrt(d)
        self.pattern = torch.randn(SHAPE[1:], generator=g) * 0.1
        base = np.cumprod(1.0 - np.linspace(1e-4, 0.02, T))
        self.scale = torch.from_numpy(np.sqrt(1 - base)).float()
        self.channels_out = channels_out

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        lin = (x.flatten(1) @ self.weight).view_as(x)
        out = self.scale[t].view(-1, 1, 1, 1) * x + lin + torch.cos(t.float() / 97).view(-1, 1, 1, 1) * self.pattern
        if self.channels_out > x.shape[1]:  # learned-sigma channels, which DDIM ignores
            out = torch.cat([out, torch.randn_like(out) * 5], dim=1)
        return out


def run(scheduler, model, noise: torch.Tensor, steps: int):
    scheduler.set_timesteps(steps)
    x = noise
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t.expand(x.shape[0])), t, x).prev_sample
    return x


def noise(seed: int = 1) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("steps", [10, 25, 50])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_loop_equals_the_public_respaced_ddim(steps, prediction):
    scheduler = PublicDDIMScheduler.from_config(make_train_scheduler(prediction).config)
    model = ToyModel()
    ours = run(scheduler, model, noise(), steps)
    expected, visited = public_ddim_loop(model, noise(), str(steps), prediction)
    assert scheduler.timesteps.tolist() == visited
    assert visited == sorted(public_space_timesteps(T, str(steps)), reverse=True)
    assert torch.isfinite(expected).all() and expected.abs().max() < 50
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    if prediction != "v_prediction":  # the public code's own prediction types: the same float32 arithmetic
        assert torch.equal(ours, expected)


@pytest.mark.parametrize("steps", [10, 25, 50])
def test_ddim_respacing_equals_the_public_ddimN_loop(steps):
    scheduler = PublicDDIMScheduler(respacing="ddim")
    model = ToyModel(seed=3)
    ours = run(scheduler, model, noise(4), steps)
    expected, visited = public_ddim_loop(model, noise(4), f"ddim{steps}")
    assert scheduler.timesteps.tolist() == visited == list(range(0, T, T // steps))[::-1]
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("steps", [1, 2, 7, 10, 25, 50, 999, 1000])
def test_visited_timesteps_are_the_public_ones(steps):
    scheduler = PublicDDIMScheduler()
    scheduler.set_timesteps(steps)
    expected = sorted(public_space_timesteps(T, str(steps)), reverse=True)
    assert scheduler.timesteps.tolist() == expected
    assert scheduler.timesteps.dtype == torch.int64 and scheduler.num_inference_steps == len(expected)
    assert respaced_timesteps(T, steps) == expected[::-1]


def test_differs_from_diffusers_ddim_on_the_same_timesteps():
    config = make_train_scheduler().config
    ours = PublicDDIMScheduler.from_config(config)
    ddim = DDIMScheduler.from_config(config, timestep_spacing="linspace", clip_sample=False)
    model = ToyModel()
    for steps in (10, 50):
        a, b = run(ours, model, noise(), steps), run(ddim, model, noise(), steps)
        assert ours.timesteps.tolist() == ddim.timesteps.tolist()  # same visits, different step targets
        assert (a - b).abs().max() > 1e-3


def test_learned_sigma_channels_are_ignored():
    scheduler = PublicDDIMScheduler()
    x = noise()
    plain, with_sigma = ToyModel(), ToyModel(channels_out=2 * SHAPE[1])
    torch.testing.assert_close(run(scheduler, with_sigma, x, 10), run(scheduler, plain, x, 10), atol=0, rtol=0)


def test_save_and_load_keep_the_class_and_config(tmp_path):
    scheduler = PublicDDIMScheduler(prediction_type="v_prediction", respacing="ddim", beta_end=0.012)
    scheduler.save_pretrained(tmp_path)
    loaded = PublicDDIMScheduler.from_pretrained(tmp_path)
    assert type(loaded) is PublicDDIMScheduler
    public_keys = {k: v for k, v in scheduler.config.items() if not k.startswith("_")}
    assert {k: v for k, v in loaded.config.items() if not k.startswith("_")} == public_keys
    assert "timestep_spacing" not in loaded.config and loaded.config.respacing == "ddim"
    again = PublicDDIMScheduler.from_config(loaded.config)
    for s in (scheduler, loaded, again):
        s.set_timesteps(20)
    assert scheduler.timesteps.tolist() == loaded.timesteps.tolist() == again.timesteps.tolist()
    model = ToyModel()
    torch.testing.assert_close(run(loaded, model, noise(), 20), run(scheduler, model, noise(), 20), atol=0, rtol=0)
    # and back to diffusers' DDIM on the same training schedule
    ddim = DDIMScheduler.from_config(loaded.config)
    assert ddim.config.beta_end == 0.012 and ddim.config.prediction_type == "v_prediction"


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="respacing"):
        PublicDDIMScheduler(respacing="linspace")
    scheduler = PublicDDIMScheduler()
    with pytest.raises(ValueError, match="call set_timesteps"):
        scheduler.step(torch.zeros(SHAPE), 999, torch.zeros(SHAPE))
    for bad in (0, 1001, 2.5):
        with pytest.raises(ValueError, match="number of steps"):
            scheduler.set_timesteps(bad)
    with pytest.raises(ValueError, match="integer stride"):
        PublicDDIMScheduler(respacing="ddim").set_timesteps(900)
    scheduler.set_timesteps(10)
    with pytest.raises(ValueError, match="not one of the 10 visited"):
        scheduler.step(torch.zeros(SHAPE), 900, torch.zeros(SHAPE))


def test_a_pipeline_saves_and_loads_it(tmp_path):
    pipe = tiny_pipeline()
    pipe.scheduler = PublicDDIMScheduler.from_config(pipe.scheduler.config)
    g = torch.Generator().manual_seed(0)
    ref, pose = torch.rand(2, 3, *IMAGE_SIZE, generator=g) * 2 - 1, torch.rand(2, 3, *IMAGE_SIZE, generator=g)

    def images(p: XMDPTPipeline) -> torch.Tensor:
        generator = torch.Generator().manual_seed(5)
        return p(ref, pose, num_inference_steps=4, generator=generator, output_type="pt", progress=False).images

    before = images(pipe)
    pipe.save_pretrained(tmp_path)
    loaded = XMDPTPipeline.from_pretrained(tmp_path)
    assert type(loaded.scheduler) is PublicDDIMScheduler
    assert loaded.scheduler.config.prediction_type == "v_prediction"
    torch.testing.assert_close(images(loaded), before, atol=0, rtol=0)
    assert torch.isfinite(before).all()
