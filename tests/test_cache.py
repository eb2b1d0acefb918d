"""Feature caching across sampling steps (FORA, TeaCache): what each reuses, when, and that it stays opt-in."""

import itertools

import pytest
import torch
from conftest import randomize, tiny_features, tiny_model
from tiny_pipeline import tiny_pipeline

from xmdpt.errors import InputError
from xmdpt.models.cache import FeatureCache, FORACache, TeaCache, make_feature_cache
from xmdpt.settings import SamplingSettings, parse_cache


@pytest.fixture
def pipe():
    return tiny_pipeline(reference_layers=1)  # reference attention: FORA caches its cross-attention too


def inputs(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, 32, 24, generator=g) * 2 - 1, torch.rand(batch, 3, 32, 24, generator=g)


def sample(pipe, cache, steps=6, **kwargs):
    ref, pose = inputs()
    kwargs = dict(
        num_inference_steps=steps, guidance_scale=2.0, seed=[1, 2], output_type="pt", progress=False, **kwargs
    )
    return pipe(ref, pose, cache=cache, **kwargs).images


class Counting:
    """Counts the calls of each block layer, by name."""

    def __init__(self, model):
        self.calls = {"attn": 0, "cross_attn": 0, "mlp": 0, "blocks": 0}
        self.handles = [model.blocks[0].register_forward_hook(lambda *a: self._add("blocks"))]
        for name in ("attn", "cross_attn", "mlp"):
            self.handles += [
                getattr(b, name).register_forward_hook(lambda *a, n=name: self._add(n))
                for b in model.blocks
                if hasattr(b, name)
            ]

    def _add(self, name):
        self.calls[name] += 1

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def __enter__(self):
        return self


def test_settings_that_cache_nothing_give_the_uncached_result(pipe):
    plain = sample(pipe, "none")
    torch.testing.assert_close(sample(pipe, "fora:1"), plain, rtol=0, atol=0)
    torch.testing.assert_close(sample(pipe, "teacache:0"), plain, rtol=0, atol=0)


def test_fora_recomputes_the_layers_every_n_steps_and_reuses_them_between(pipe):
    depth = pipe.denoiser.config.depth
    with Counting(pipe.denoiser) as count:
        cached = sample(pipe, "fora:3", steps=7)
    # Steps 0, 3 and 6 compute every layer of every block; the other four reuse them. The adaLN modulation still
    # runs at every step (7 block calls), so the reused outputs are gated by the current timestep.
    assert count.calls == {"attn": 3 * depth, "cross_attn": 3 * depth, "mlp": 3 * depth, "blocks": 7}
    plain = sample(pipe, "none", steps=7)
    assert not torch.equal(cached, plain)
    assert (cached - plain).abs().max() < 0.5 * plain.abs().max()  # an approximation, not a different image


def test_fora_recomputes_when_the_guided_batch_changes(pipe):
    """Inside the guidance interval a step runs 2B rows, outside it B: stored outputs of the other size are stale."""
    pipe.scheduler.set_timesteps(6)
    visited = pipe.scheduler.timesteps.tolist()  # 999, 799, 599, 400, 200, 0
    with Counting(pipe.denoiser) as count:
        sample(pipe, "fora:100", guidance_interval=(300, 700))
    guided = [300 <= t <= 700 for t in visited]
    changes = 1 + sum(a != b for a, b in itertools.pairwise(guided))  # full steps: the first and each change
    assert count.calls["attn"] == changes * pipe.denoiser.config.depth


def test_teacache_skips_the_stack_while_the_input_barely_changes():
    model = randomize(tiny_model()).eval()
    conditions = model.encode_conditions(*tiny_features(model, batch=2))
    x = torch.randn(2, model.config.in_channels, *model.config.sample_size)
    cache = TeaCache(threshold=10.0)
    outputs = []
    with torch.no_grad(), Counting(model) as count:
        for i, t in enumerate([900, 890, 880, 870]):
            cache.begin_step(i, 4)
            outputs.append(model(x + 0.001 * i, torch.tensor(t), conditions, cache=cache))
    # The first and the last step always run in full; the two between change little and add the stored residual.
    assert count.calls["attn"] == 2 * model.config.depth and cache.full_steps == 2
    with torch.no_grad():
        exact = model(x + 0.001, torch.tensor(890), conditions)
    assert not torch.equal(outputs[1], exact) and (outputs[1] - exact).abs().max() < 0.1 * exact.abs().max()
    same = TeaCache(threshold=0.1)  # an unchanged input and timestep: reusing the residual is exact
    with torch.no_grad():
        for i in range(3):
            same.begin_step(i, 3)
            out = model(x, torch.tensor(500), conditions, cache=same)
            torch.testing.assert_close(out, model(x, torch.tensor(500), conditions))
    assert same.full_steps == 2

    strict = TeaCache(threshold=1e-6)  # any change exceeds it: every step runs in full
    with torch.no_grad():
        for i, t in enumerate([900, 890, 880, 870]):
            strict.begin_step(i, 4)
            torch.testing.assert_close(
                model(x + 0.001 * i, torch.tensor(t), conditions, cache=strict),
                (model(x + 0.001 * i, torch.tensor(t), conditions)),
            )
    assert strict.full_steps == 4


def test_teacache_saves_steps_in_the_pipeline_and_stays_close(pipe):
    plain = sample(pipe, "none", steps=10)
    with Counting(pipe.denoiser) as count:
        cached = sample(pipe, "teacache:0.5", steps=10)
    assert 2 * pipe.denoiser.config.depth <= count.calls["attn"] < 10 * pipe.denoiser.config.depth
    assert (cached - plain).abs().mean() < 0.2 * plain.abs().mean()


def test_a_cache_is_a_sampling_setting_saved_with_the_pipeline(pipe, tmp_path):
    assert pipe.sampling_settings().cache == "none"
    pipe.set_sampling_defaults(cache="FORA:2")
    assert pipe.sampling_settings().cache == "fora:2"  # normalised spelling, what generation.json records
    assert pipe.sampling_settings(cache="teacache:0.10").cache == "teacache:0.1"
    pipe.save_pretrained(tmp_path)
    assert type(pipe).from_pretrained(tmp_path).sampling_settings().cache == "fora:2"


@pytest.mark.parametrize("bad", ["fora", "fora:0", "fora:1.5", "fora:x", "teacache:-1", "teacache:11", "lru:3", "", 3])
def test_bad_cache_settings_are_one_line_input_errors(bad):
    with pytest.raises(InputError, match="cache="):
        parse_cache(bad)
    with pytest.raises(InputError, match="cache="):
        SamplingSettings("ddim", 10, 2.0, None, 0.01, cache=bad)


def test_cache_objects_by_name_and_refused_in_training():
    assert type(make_feature_cache("none")) is FeatureCache
    assert make_feature_cache("fora:4").interval == 4 and isinstance(make_feature_cache("fora:4"), FORACache)
    assert make_feature_cache("teacache:0.2").threshold == 0.2
    model = tiny_model()
    conditions = model.encode_conditions(*tiny_features(model, batch=2))
    x = torch.randn(2, model.config.in_channels, *model.config.sample_size)
    with pytest.raises(ValueError, match="masked pass"):
        model(x, torch.tensor(5), conditions, ids_keep=torch.tensor([[0, 1], [2, 3]]), cache=FORACache(2))
