"""A reference is encoded once for all the poses asked of it: in one call, across calls, and in a batch of jobs."""

import torch
from tiny_pipeline import tiny_pipeline

from xmdpt.generation import Job, generate_batches
from xmdpt.pipeline import ReferenceEncodings


def images(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(1, 3, 32, 24, generator=g) * 2 - 1 for _ in range(n)]


def poses(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(1, 3, 32, 24, generator=g) for _ in range(n)]


class EncoderCalls:
    """Batch sizes the reference encoder and the codec's encoder were called with."""

    def __init__(self, pipe):
        self.reference, self.codec = [], []
        self.handles = [
            pipe.reference_encoder.register_forward_pre_hook(lambda m, a: self.reference.append(a[0].shape[0])),
        ]
        original = pipe.codec.encode
        pipe.codec.encode = lambda x: (self.codec.append(x.shape[0]), original(x))[1]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def sample(pipe, refs, targets, **kwargs):
    kwargs = dict(num_inference_steps=2, seed=list(range(len(refs))), output_type="pt", progress=False, **kwargs)
    return pipe(torch.cat(refs), torch.cat(targets), **kwargs).images


def test_one_reference_in_many_poses_is_encoded_once_with_the_same_result():
    pipe, plain = tiny_pipeline(), tiny_pipeline()
    plain.reference_encodings = ReferenceEncodings(capacity=0)  # encodes every row, as before
    (ref,), targets = images(1), poses(4)
    with EncoderCalls(pipe) as calls:
        cached = sample(pipe, [ref] * 4, targets)
    assert calls.reference == [1] and calls.codec == [1]
    torch.testing.assert_close(cached, sample(plain, [ref] * 4, targets), rtol=0, atol=1e-6)
    # Later calls with the same photo (a web page's repeated requests) encode nothing; a new photo is encoded alone.
    with EncoderCalls(pipe) as calls:
        sample(pipe, [ref], poses(1, seed=5))
        other = images(2, seed=9)
        sample(pipe, [other[0], ref, other[0]], poses(3))
    assert calls.reference == [1] and calls.codec == [1]
    assert (pipe.reference_encodings.hits, pipe.reference_encodings.misses) == (3 + 1 + 2, 1 + 1)


def test_a_batch_of_jobs_repeating_references_encodes_each_once():
    pipe = tiny_pipeline()
    refs, targets = images(2), poses(6)
    jobs = [Job(f"line {i}", i, lambda i=i: (refs[i % 2], targets[i])) for i in range(6)]
    with EncoderCalls(pipe) as calls:
        results = list(generate_batches(pipe, jobs, pipe.sampling_settings(num_inference_steps=2), batch_size=3))
    assert all(r.error is None for r in results)
    assert calls.reference == [2] and calls.codec == [2]  # the second batch of 3 finds both held


def test_precision_and_weights_are_part_of_the_key():
    pipe = tiny_pipeline()
    (ref,), (pose,) = images(1), poses(1)
    with EncoderCalls(pipe) as calls:
        sample(pipe, [ref], [pose])
        sample(pipe, [ref], [pose], precision="bf16")  # encoded under another autocast: anew
        with torch.no_grad():
            next(pipe.reference_encoder.parameters()).mul_(1.5)  # weights changed in place: anew
        changed = sample(pipe, [ref], [pose])
    assert calls.reference == [1, 1, 1]
    fresh = tiny_pipeline()
    with torch.no_grad():
        next(fresh.reference_encoder.parameters()).mul_(1.5)
    torch.testing.assert_close(changed, sample(fresh, [ref], [pose]), rtol=0, atol=1e-6)


def test_the_cache_holds_at_most_its_capacity_least_recently_used_first():
    cache = ReferenceEncodings(capacity=2)
    encoded = []

    def encode(x):
        encoded.append(x.shape[0])
        return x.flatten(1)[:, :4], x[:, :1]

    a, b, c = images(3)
    for batch in ([a, b], [a], [c], [b]):  # c evicts b (a was used more recently), then b evicts a
        cache(torch.cat(batch), encode)
    assert encoded == [2, 1, 1] and len(cache._entries) == 2
    features, latents = cache(torch.cat([b, c, b]), encode)  # both held
    assert encoded == [2, 1, 1]
    torch.testing.assert_close(features, torch.cat([b, c, b]).flatten(1)[:, :4])
    cache(a, encode)
    assert encoded == [2, 1, 1, 1]
