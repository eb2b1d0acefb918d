"""Sampling: batched guidance and once-per-image conditioning equal the public schedule; schedulers; round trip."""

import numpy as np
import pytest
import torch
from conftest import randomize, tiny_model
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler
from public_schedule import PublicSchedulePipeline

from xmdpt import XMDPTPipeline, make_sampling_scheduler, make_train_scheduler
from xmdpt.conditioning import DinoV2Encoder, LearnedImageEncoder, PixelCodec, VAECodec
from xmdpt.errors import InputError
from xmdpt.pipeline import SAMPLING_DEFAULTS, guidance_ramp, sampler_name
from xmdpt.schedulers import PublicDDIMScheduler


@pytest.fixture
def pipe(tiny_hub):
    pose_encoder = DinoV2Encoder.from_dinov2(tiny_hub / "dinov2", image_size=28, input_transform="unit")
    reference_encoder = DinoV2Encoder.from_dinov2(tiny_hub / "dinov2", image_size=28, input_transform="signed")
    model = tiny_model(pose_feature_dim=32, pose_num_tokens=5, reference_feature_dim=32, reference_num_tokens=5)
    randomize(model, std=0.05).eval()
    scheduler = make_sampling_scheduler("ddim", make_train_scheduler().config)
    return XMDPTPipeline(
        model, VAECodec.from_vae(tiny_hub / "vae"), pose_encoder, reference_encoder, scheduler, precision="fp32"
    )  # exact comparisons, on any CPU


def inputs(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, 64, 48, generator=g) * 2 - 1, torch.rand(batch, 3, 64, 48, generator=g)


def run(pipe, ref, pose, public_schedule=False, **kwargs):
    """Sample; with `public_schedule`, the same components through bench/public_schedule.py's pipeline."""
    if public_schedule:
        pipe = PublicSchedulePipeline(**pipe.components, **{k: pipe.config[k] for k in SAMPLING_DEFAULTS})
    kwargs = {"num_inference_steps": 4, "generator": torch.Generator().manual_seed(0), **kwargs}
    return pipe(ref, pose, output_type="pt", progress=False, **kwargs).images


def guided_by_hand(pipe, x, t, conditions, scale=3.0):
    """Classifier-free guidance as two separate passes, the unconditional one with y and the memory dropped."""
    c = pipe.denoiser(x, t, conditions)
    u = pipe.denoiser(x, t, conditions, drop_condition=torch.ones(x.shape[0], dtype=torch.bool))
    return u + guidance_ramp(scale, t, 1000, 1.0) * (c - u), c, u


def test_batched_guidance_equals_two_separate_passes(pipe):
    ref, pose = inputs()
    conditions = pipe.encode_conditions(ref, pose)
    x, t = torch.randn(2, 4, 8, 6), torch.tensor(500)
    guided = pipe.guided_prediction(x, t, conditions, guidance_scale=3.0, power=1.0)
    expected, c, u = guided_by_hand(pipe, x, t, conditions)
    torch.testing.assert_close(guided, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(c, u)


def test_efficient_sampling_equals_the_public_schedule(pipe):
    ref, pose = inputs()
    ours = run(pipe, ref, pose)
    public = run(pipe, ref, pose, public_schedule=True)
    torch.testing.assert_close(ours, public, rtol=1e-4, atol=1e-5)
    assert ours.shape == (2, 3, 64, 48)


def test_batch_of_one_equals_that_sample_in_a_batch(pipe):
    ref, pose = inputs(batch=3)
    latents = torch.randn(3, 4, 8, 6, generator=torch.Generator().manual_seed(7))
    batch = run(pipe, ref, pose, latents=latents)
    single = run(pipe, ref[1:2], pose[1:2], latents=latents[1:2])
    torch.testing.assert_close(single, batch[1:2], rtol=1e-4, atol=1e-5)


def test_same_seed_same_image_and_conditions_matter(pipe):
    ref, pose = inputs()
    torch.testing.assert_close(run(pipe, ref, pose), run(pipe, ref, pose), rtol=0, atol=0)
    other_ref, other_pose = inputs(seed=3)
    assert not torch.allclose(run(pipe, ref, pose), run(pipe, other_ref, pose), atol=1e-4)
    assert not torch.allclose(run(pipe, ref, pose), run(pipe, ref, other_pose), atol=1e-4)


def test_guidance_interval_guides_only_the_steps_inside_it(pipe):
    ref, pose = inputs()
    batches = []
    hook = pipe.denoiser.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    try:
        pipe.scheduler.set_timesteps(4)
        visited = pipe.scheduler.timesteps.tolist()  # 999, 666, 333, 0 (linspace)
        full = run(pipe, ref, pose, guidance_scale=3.0)
        unguided = run(pipe, ref, pose, guidance_scale=1.0)
        batches.clear()
        middle = run(pipe, ref, pose, guidance_scale=3.0, guidance_interval=(200, 800))
        public = run(pipe, ref, pose, guidance_scale=3.0, guidance_interval=(200, 800), public_schedule=True)
    finally:
        hook.remove()
    # One batched pass (2B) inside the interval, one conditional pass (B) outside it.
    assert batches[:4] == [4 if 200 <= t <= 800 else 2 for t in visited] == [2, 4, 4, 2]
    torch.testing.assert_close(public, middle, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(run(pipe, ref, pose, guidance_scale=3.0, guidance_interval=(0, 1000)), full)
    torch.testing.assert_close(run(pipe, ref, pose, guidance_scale=3.0, guidance_interval=(400, 600)), unguided)
    assert not torch.allclose(middle, full, atol=1e-4) and not torch.allclose(middle, unguided, atol=1e-4)
    for bad in [(800, 200), (-1, 5), (0, 2000), ("a", "b"), (1, 2, 3), (float("nan"), 5), "28"]:
        with pytest.raises(InputError, match="guidance_interval"):
            run(pipe, ref, pose, guidance_interval=bad)


def test_ddim_visits_the_public_codes_respaced_timesteps():
    scheduler = make_sampling_scheduler("ddim", make_train_scheduler().config)
    scheduler.set_timesteps(50)
    # ADM's space_timesteps(1000, "50"): round(i * 999 / 49), visited from the largest.
    stride, expected, cur = 999 / 49, [], 0.0
    for _ in range(50):
        expected.append(round(cur))
        cur += stride
    assert scheduler.timesteps.tolist() == expected[::-1]
    assert scheduler.config.clip_sample is False


def test_guidance_ramp_is_power_cosine():
    t = torch.tensor([0, 500, 999])
    ramp = guidance_ramp(2.0, t, 1000, 0.01)
    expected = [(1 - np.cos(np.pi * (1 - v / 1000) ** 0.01)) / 2 + 1 for v in t.tolist()]
    np.testing.assert_allclose(ramp.numpy(), expected, rtol=1e-5)
    assert ramp[0] == pytest.approx(2.0) and 1.9 < ramp[-1] < 2.0


@pytest.mark.parametrize("sampler", ["dpmsolver++", "ddpm"])
def test_other_samplers_run(pipe, sampler):
    pipe.scheduler = make_sampling_scheduler(sampler, pipe.scheduler.config)
    ref, pose = inputs()
    images = run(pipe, ref, pose, num_inference_steps=5)
    assert images.shape == (2, 3, 64, 48) and torch.isfinite(images).all()
    if sampler == "ddpm":
        assert isinstance(pipe.scheduler, DDPMScheduler) and pipe.scheduler.config.variance_type == "learned_range"
        assert pipe._sampler_input(torch.zeros(1, 8, 8, 6), 4).shape[1] == 8  # the v channels reach DDPM
    else:
        assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler)
        assert pipe._sampler_input(torch.zeros(1, 8, 8, 6), 4).shape[1] == 4


def test_ddpm_keeps_a_drifted_learned_variance_inside_its_range(pipe):
    """An under-trained v far outside [-1, 1] would extrapolate Eq. 15's log-variance on the respaced schedule and
    blow the sample up (the embedded model's did at 50 steps); clamped, it samples as any v >= 1 does."""
    pipe.scheduler = make_sampling_scheduler("ddpm", pipe.scheduler.config)
    ref, pose = inputs()
    bias = pipe.denoiser.final_layer.linear.bias
    C = pipe.denoiser.config.in_channels
    is_v = torch.arange(bias.numel()) % (2 * C) >= C  # the last dimension of a token's output is (p, p, 2C)
    images = {}
    for shift in (3.0, 8.0):
        with torch.no_grad():
            bias[is_v] = shift  # v about `shift` everywhere (the random weights add little)
        images[shift] = run(pipe, ref, pose, num_inference_steps=50)
    assert torch.isfinite(images[8.0]).all() and images[8.0].abs().max() < 10
    torch.testing.assert_close(images[8.0], images[3.0], rtol=0, atol=0)
    inside = torch.linspace(-1, 1, 4 * 8 * 6).reshape(1, 4, 8, 6)
    assert torch.equal(pipe._sampler_input(torch.cat([inside, inside], 1), 4)[:, 4:], inside)  # in range: as is


@pytest.mark.parametrize("name", ["UniPCMultistepScheduler", "EulerDiscreteScheduler"])
def test_any_diffusers_scheduler_swaps_in_by_from_config(pipe, name):
    """UniPC's step() takes no generator and Euler scales its inputs; both sample as diffusers' pipelines run them."""
    import diffusers

    pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config)
    ref, pose = inputs()
    first, again = run(pipe, ref, pose, num_inference_steps=5), run(pipe, ref, pose, num_inference_steps=5)
    assert first.shape == (2, 3, 64, 48) and torch.isfinite(first).all()
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.allclose(
        first, run(pipe, ref, pose, num_inference_steps=5, generator=torch.Generator().manual_seed(1))
    )


def test_set_sampler_gives_ddpm_the_denoisers_variance_whatever_the_current_scheduler(pipe):
    """The embedded model ships with DPM-Solver++, whose config has no variance type; DDPM must still use the
    learned variance of a learn_sigma model, and a fixed one otherwise."""
    pipe.set_sampler("dpmsolver++")
    assert pipe.scheduler.config.variance_type is None
    pipe.set_sampler("ddpm")
    assert isinstance(pipe.scheduler, DDPMScheduler) and pipe.scheduler.config.variance_type == "learned_range"
    assert pipe._sampler_input(torch.zeros(1, 8, 8, 6), 4).shape[1] == 8
    pipe.denoiser.register_to_config(learn_sigma=False)  # as a model trained without it would say
    pipe.set_sampler("ddpm")
    assert pipe.scheduler.config.variance_type == "fixed_small"
    assert pipe._sampler_input(torch.zeros(1, 8, 8, 6), 4).shape[1] == 4


def test_unknown_sampler_is_an_input_error():
    with pytest.raises(InputError, match="unknown sampler"):
        make_sampling_scheduler("euler-magic", make_train_scheduler().config)


def test_pipeline_round_trip_and_scheduler_swap(pipe, tmp_path):
    ref, pose = inputs()
    before = run(pipe, ref, pose)
    pipe.save_pretrained(tmp_path)
    loaded = XMDPTPipeline.from_pretrained(tmp_path)
    torch.testing.assert_close(run(loaded, ref, pose), before, rtol=0, atol=0)
    loaded.scheduler = DPMSolverMultistepScheduler.from_config(loaded.scheduler.config, variance_type=None)
    assert torch.isfinite(run(loaded, ref, pose)).all()


def test_pixel_space_pipeline_with_learned_encoders():
    model = randomize(
        tiny_model(
            sample_size=(16, 12),
            in_channels=12,
            pose_feature_dim=32,
            pose_num_tokens=1 + 4 * 3,
            reference_feature_dim=32,
            reference_num_tokens=1 + 4 * 3,
        ),
        std=0.05,
    ).eval()
    pose_encoder = LearnedImageEncoder(image_size=(32, 24), width=32, input_transform="unit")
    reference_encoder = LearnedImageEncoder(image_size=(32, 24), width=32, input_transform="signed")
    scheduler = make_sampling_scheduler("ddim", make_train_scheduler().config)
    pipe = XMDPTPipeline(
        model, PixelCodec(factor=2), pose_encoder, reference_encoder, scheduler, precision="fp32"
    )  # exact comparisons, on any CPU
    assert pipe.image_size == (32, 24)
    ref, pose = torch.rand(1, 3, 32, 24) * 2 - 1, torch.rand(1, 3, 32, 24)
    images = pipe(ref, pose, num_inference_steps=3, progress=False).images
    assert images[0].size == (24, 32)


def test_wrong_input_shapes_are_input_errors(pipe):
    ref, pose = inputs()
    with pytest.raises(InputError, match="reference_image"):
        pipe(ref[:, :, :32], pose, progress=False)
    with pytest.raises(InputError, match="reference images"):
        pipe(ref, pose[:1], progress=False)
    for steps in (0, 1001):
        with pytest.raises(InputError, match=r"must lie in \[1, 1000\]"):
            pipe(ref, pose, num_inference_steps=steps, progress=False)
    with pytest.raises(InputError, match="finite"):
        pipe(ref, pose, guidance_scale=float("inf"), progress=False)
    with pytest.raises(InputError, match="empty list"):
        pipe([], [], progress=False)


def test_pose_map_model_samples_equal_the_public_schedule_and_follow_the_pose(tiny_hub):
    pose_encoder = DinoV2Encoder.from_dinov2(tiny_hub / "dinov2", image_size=28, input_transform="unit")
    reference_encoder = DinoV2Encoder.from_dinov2(tiny_hub / "dinov2", image_size=28, input_transform="signed")
    model = tiny_model(
        pose_feature_dim=32, pose_num_tokens=5, reference_feature_dim=32, reference_num_tokens=5, pose_map_channels=192
    )  # 64x48 images on the 8x6 latent grid: factor 8, so 3 * 64 channels
    randomize(model, std=0.05).eval()
    scheduler = make_sampling_scheduler("ddim", make_train_scheduler().config)
    pipe = XMDPTPipeline(
        model, VAECodec.from_vae(tiny_hub / "vae"), pose_encoder, reference_encoder, scheduler, precision="fp32"
    )  # exact comparisons, on any CPU
    ref, pose = inputs()
    assert pipe.encode_conditions(ref, pose).pose_map.shape == (2, 192, 8, 6)
    ours = run(pipe, ref, pose)
    torch.testing.assert_close(ours, run(pipe, ref, pose, public_schedule=True), rtol=1e-4, atol=1e-5)
    moved = pose.clone()
    moved[..., :8, :8] = 1 - moved[..., :8, :8]
    assert not torch.allclose(ours, run(pipe, ref, moved))
    # Guidance batches the pose map with both halves.
    conditions = pipe.encode_conditions(ref, pose)
    x, t = torch.randn(2, 4, 8, 6), torch.tensor(500)
    guided = pipe.guided_prediction(x, t, conditions, 3.0, 1.0)
    torch.testing.assert_close(guided, guided_by_hand(pipe, x, t, conditions)[0], rtol=1e-5, atol=1e-6)


def test_reference_attention_model_samples_equal_the_public_schedule_and_round_trip(tmp_path):
    from tiny_pipeline import tiny_pipeline

    pipe = tiny_pipeline(reference_layers=1, pose_map_channels=12, refine_channels=8)  # factor 2: 32x24 -> 16x12
    randomize(pipe.denoiser.refiner, std=0.05)
    ref, pose = torch.rand(2, 3, 32, 24) * 2 - 1, torch.rand(2, 3, 32, 24)
    conditions = pipe.encode_conditions(ref, pose)
    assert conditions.reference_memory.shape == (2, 48, 32)  # once per image, with the other conditions
    ours = run(pipe, ref, pose)
    # The public schedule with every part the model has: pose map, reference attention, refiner.
    torch.testing.assert_close(ours, run(pipe, ref, pose, public_schedule=True), rtol=1e-4, atol=1e-5)
    # Guidance: one batched forward whose unconditional half drops y and the memory, not the pose map.
    x, t = torch.randn(2, 12, 16, 12), torch.tensor(500)
    guided = pipe.guided_prediction(x, t, conditions, 3.0, 1.0)
    torch.testing.assert_close(guided, guided_by_hand(pipe, x, t, conditions)[0], rtol=1e-5, atol=1e-6)
    pipe.save_pretrained(tmp_path)
    loaded = XMDPTPipeline.from_pretrained(tmp_path)
    assert loaded.denoiser.config.reference_layers == 1
    torch.testing.assert_close(run(loaded, ref, pose), ours, rtol=0, atol=0)


def test_the_pipeline_owns_its_sampling_defaults_and_saves_them(pipe, tmp_path):
    """A bare call samples with the pipeline's own settings; a call's keyword arguments override them once; the
    settings travel in model_index.json."""
    ref, pose = inputs()
    pipe.set_sampling_defaults(num_inference_steps=3, guidance_scale=3.0, guidance_interval=(200, 800))
    settings = pipe.sampling_settings()
    assert (settings.sampler, settings.num_inference_steps, settings.guidance_scale) == ("ddim", 3, 3.0)
    assert settings.guidance_interval == (200.0, 800.0)
    explicit = run(pipe, ref, pose, num_inference_steps=3, guidance_scale=3.0, guidance_interval=(200, 800))
    bare = pipe(ref, pose, output_type="pt", progress=False, generator=torch.Generator().manual_seed(0)).images
    torch.testing.assert_close(bare, explicit, rtol=0, atol=0)
    assert not torch.allclose(bare, run(pipe, ref, pose, num_inference_steps=3, guidance_scale=1.0), atol=1e-4)
    pipe.save_pretrained(tmp_path)
    loaded = XMDPTPipeline.from_pretrained(tmp_path)
    assert loaded.sampling_settings() == settings
    for bad in (dict(num_inference_steps=0), dict(guidance_scale=float("nan")), dict(guidance_interval=(9, 1))):
        with pytest.raises(InputError):
            pipe.set_sampling_defaults(**bad)
    with pytest.raises(TypeError, match="unknown"):
        pipe.sampling_settings(steps=3)


def test_seeds_give_each_image_the_noise_it_gets_alone(pipe):
    ref, pose = inputs(batch=3)
    batch = run(pipe, ref, pose, generator=None, seed=[5, 6, 7])
    alone = run(pipe, ref[1:2], pose[1:2], generator=None, seed=[6])
    torch.testing.assert_close(alone, batch[1:2], rtol=1e-4, atol=1e-5)
    # One int seeds the whole batch, as a generator would.
    torch.testing.assert_close(
        run(pipe, ref, pose, generator=None, seed=5), run(pipe, ref, pose, generator=torch.Generator().manual_seed(5))
    )
    with pytest.raises(InputError, match="seeds for 3 images"):
        run(pipe, ref, pose, generator=None, seed=[1, 2])
    with pytest.raises(InputError, match="not both"):
        run(pipe, ref, pose, seed=1)


def test_ddim_public_is_a_sampler_by_name(pipe, tmp_path):
    pipe.set_sampler("ddim-public")
    assert isinstance(pipe.scheduler, PublicDDIMScheduler) and sampler_name(pipe.scheduler) == "ddim-public"
    ref, pose = inputs()
    ours = run(pipe, ref, pose)
    pipe.set_sampler("ddim")
    assert not torch.allclose(ours, run(pipe, ref, pose), atol=1e-5)  # DDIM steps to t - T/n, not the next visited


def test_threads_sharing_one_pipeline_each_get_what_they_get_alone(pipe):
    """A server holds one pipeline: concurrent calls with other samplers' state and other step counts must not step
    each other's schedules (the multistep solver kept its history on the shared scheduler)."""
    from concurrent.futures import ThreadPoolExecutor

    pipe.set_sampler("dpmsolver++")
    ref, pose = inputs(batch=1)
    steps = [3, 5, 7, 4, 6, 8]
    alone = [run(pipe, ref, pose, num_inference_steps=n) for n in steps]
    with ThreadPoolExecutor(max_workers=4) as pool:
        together = list(pool.map(lambda n: run(pipe, ref, pose, num_inference_steps=n), steps))
    for a, b in zip(alone, together, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_precision_is_a_sampling_setting(pipe, monkeypatch):
    """bf16 autocast runs the whole call (encoders, loop, VAE) when asked, and "auto" picks it only on hardware with
    native bf16 matrix units."""
    import xmdpt.pipeline as pipeline_module

    ref, pose = inputs()
    fp32, bf16 = run(pipe, ref, pose), run(pipe, ref, pose, precision="bf16")
    assert fp32.dtype == bf16.dtype == torch.float32
    assert not torch.equal(fp32, bf16) and (fp32 - bf16).abs().mean() < 0.05
    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(pipeline_module, "native_bf16", lambda device, native=native: native)
        assert pipe.sampling_settings(precision="auto").precision == expected
    with pytest.raises(InputError, match="precision"):
        pipe.sampling_settings(precision="int8")
    assert pipe.sampling_settings().precision == "fp32"  # the default: unchanged models sample as before
