"""Generation of the test set: per-pair determinism, batch and process invariance, resume, the protocol's files."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_pipeline import tiny_pipeline

from xmdpt.data.deepfashion import PairRecord, deepfashion_csv
from xmdpt.data.synthetic import SynthConfig, generate
from xmdpt.errors import InputError
from xmdpt.evaluation.generate import (
    GENERATION_FILE,
    GenerationSettings,
    eval_set_from_dataset,
    generate_test_set,
    pair_file_name,
    pair_seed,
)
from xmdpt.evaluation.protocol import model_output_to_uint8
from xmdpt.settings import SamplingSettings

MODEL_SIZE = (32, 24)  # PixelCodec(2) -> 16x12 latents, 8x6 tokens at patch 2


# ------------------------------------------------------------------------------------- helpers (shared with CLI)


def synthetic_set(folder: Path, size: tuple[int, int] = MODEL_SIZE, identities: int = 8) -> Path:
    """A small synthetic set in the DeepFashion CSV layout: 2 held-out identities, 6 test pairs."""
    generate(
        folder,
        SynthConfig(num_identities=identities, poses_per_identity=3, size=size, seed=1, test_fraction=0.25),
        progress=False,
    )
    return folder


def settings(sampler="ddim", steps=2, **changes) -> GenerationSettings:
    sampling = SamplingSettings(sampler, steps, 2.0, None, 0.01)
    values = dict(model="tiny", sampling=sampling, seed=0, image_size=MODEL_SIZE, model_size=MODEL_SIZE)
    return GenerationSettings(**{**values, **changes})


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return synthetic_set(tmp_path_factory.mktemp("synth"))


def _test_set(root: Path, size: tuple[int, int] = MODEL_SIZE):
    return eval_set_from_dataset(deepfashion_csv(root, "test", image_size=size, fail_fast=True))


# --------------------------------------------------------------------------------------------------------- tests


def test_batch_size_and_seed(synth, tmp_path) -> None:
    """DDPM draws noise at every step: each pair's own generator keeps its image independent of the batch."""
    pipe, eval_set = tiny_pipeline(sampler="ddpm"), _test_set(synth)
    assert len(eval_set.pairs) == 6
    generate_test_set(pipe, eval_set, tmp_path / "b1", settings(sampler="ddpm"), batch_size=1, progress=False)
    generate_test_set(pipe, eval_set, tmp_path / "b3", settings(sampler="ddpm"), batch_size=3, progress=False)
    generate_test_set(pipe, eval_set, tmp_path / "s1", settings(sampler="ddpm", seed=1), batch_size=3, progress=False)
    one, three, other_seed = files(tmp_path / "b1"), files(tmp_path / "b3"), files(tmp_path / "s1")
    assert sorted(one) == sorted(eval_set.targets()) and len(one) == 6
    assert one == three
    assert all(one[name] != other_seed[name] for name in one)
    assert len(set(one.values())) == 6  # every pair has its own noise


def test_files_are_the_protocol_output_at_the_evaluation_size(synth, tmp_path) -> None:
    """A file is model_output_to_uint8 (float resize, then truncation) of the pipeline's output for its seed."""
    pipe, eval_set = tiny_pipeline(), _test_set(synth)
    eval_size = (56, 40)  # another size than the model's: the resize must happen before quantising
    run = settings(image_size=eval_size, seed=7)
    generate_test_set(pipe, eval_set, tmp_path, run, batch_size=4, progress=False)
    pair = eval_set.pairs[2]
    item = eval_set.dataset[pair.index]
    latents, generators = pipe.seeded_latents([pair_seed(7, pair.name)])
    output = pipe(
        item["reference_image"][None],
        item["target_pose"][None],
        num_inference_steps=2,
        guidance_scale=2.0,
        generator=generators,
        latents=latents,
        output_type="pt",
        progress=False,
    ).images
    written = np.asarray(Image.open(tmp_path / pair.name))
    assert written.shape == (56, 40, 3) and written.dtype == np.uint8
    expected = model_output_to_uint8(output, eval_size)[0].permute(1, 2, 0).numpy()
    rounded = model_output_to_uint8(output, eval_size, rounding="round")[0].permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(written, expected)
    assert (written != rounded).any()  # truncation, not rounding
    quantised_first = torch.nn.functional.interpolate(
        ((output * 0.5 + 0.5).clamp(0, 1) * 255).floor() / 255, size=eval_size, mode="bicubic", antialias=True
    )
    assert (written != model_output_to_uint8(quantised_first * 2 - 1, eval_size)[0].permute(1, 2, 0).numpy()).any()


def test_resume_skips_existing_and_completes_missing(synth, tmp_path) -> None:
    pipe, eval_set = tiny_pipeline(), _test_set(synth)
    first = generate_test_set(pipe, eval_set, tmp_path, settings(), batch_size=2, progress=False)
    assert (first.written, first.skipped) == (6, 0)
    original = files(tmp_path)
    names = sorted(original)
    for name in names[:2]:
        (tmp_path / name).unlink()
    marker = np.full((*MODEL_SIZE, 3), 7, dtype=np.uint8)  # a file that exists must not be regenerated
    Image.fromarray(marker).save(tmp_path / names[2])
    (tmp_path / (names[3] + ".partial")).write_bytes(b"interrupted")  # a leftover of an interrupted write
    second = generate_test_set(pipe, eval_set, tmp_path, settings(), batch_size=3, progress=False)
    assert (second.written, second.skipped) == (2, 4)
    now = files(tmp_path)
    assert now[names[0]] == original[names[0]] and now[names[1]] == original[names[1]]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / names[2])), marker)
    assert {name: now[name] for name in names[3:]} == {name: original[name] for name in names[3:]}


def test_processes_split_the_pairs_and_give_the_same_files(synth, tmp_path) -> None:
    pipe, eval_set = tiny_pipeline(), _test_set(synth)
    generate_test_set(pipe, eval_set, tmp_path / "one", settings(), batch_size=4, progress=False)
    shares = []
    for rank in range(2):
        fake = SimpleNamespace(process_index=rank, num_processes=2, wait_for_everyone=lambda: None)
        summary = generate_test_set(
            pipe, eval_set, tmp_path / "two", settings(), batch_size=4, accelerator=fake, progress=False
        )
        shares.append(summary.written)
    assert shares == [3, 3]
    assert files(tmp_path / "two") == files(tmp_path / "one")


def test_other_settings_are_refused_in_a_used_folder(synth, tmp_path) -> None:
    pipe, eval_set = tiny_pipeline(), _test_set(synth)
    generate_test_set(pipe, eval_set, tmp_path / "run", settings(), progress=False)
    with pytest.raises(InputError, match=r"num_inference_steps 2 there, 3 now"):
        generate_test_set(pipe, eval_set, tmp_path / "run", settings(steps=3), progress=False)
    sampling = SamplingSettings("ddim", 2, 2.0, None, 0.01, cache="fora:2")
    with pytest.raises(InputError, match=r"cache 'none' there, 'fora:2' now"):
        generate_test_set(pipe, eval_set, tmp_path / "run", settings(sampling=sampling), progress=False)
    # A folder recorded before precision and the cache were settings was made at their defaults: it resumes.
    record = tmp_path / "run" / GENERATION_FILE
    old = {k: v for k, v in json.loads(record.read_text()).items() if k not in ("precision", "cache")}
    record.write_text(json.dumps(old))
    assert generate_test_set(pipe, eval_set, tmp_path / "run", settings(), progress=False).written == 0
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    Image.fromarray(np.zeros((*MODEL_SIZE, 3), np.uint8)).save(foreign / "x.png")
    with pytest.raises(InputError, match=f"no {GENERATION_FILE}"):
        generate_test_set(pipe, eval_set, foreign, settings(), progress=False)
    with pytest.raises(InputError, match="inputs, the model takes"):
        generate_test_set(pipe, _test_set(synth, (64, 48)), tmp_path / "other", settings(), progress=False)


def test_file_names_and_repeated_pairs(synth) -> None:
    assert (
        pair_file_name("img/WOMEN/Blouses_Shirts/id_00003372/03_3_back.jpg", "fashionMENTeesid0000000101_1front.jpg")
        == "fashionWOMENBlouses_Shirtsid0000337203_3back___fashionMENTeesid0000000101_1front.png"
    )
    assert pair_file_name("a/b.jpg", "c.png") == "a-b___c.png"  # not an In-shop path: still one flat name
    dataset = deepfashion_csv(synth, "test", image_size=MODEL_SIZE, fail_fast=True)
    dataset.pairs.append(PairRecord(dataset.pairs[0].sources, dataset.pairs[0].target, "repeated"))
    eval_set = eval_set_from_dataset(dataset, limit=4)
    assert eval_set.total == 6 and len(eval_set.pairs) == 4
    assert len({pair.name for pair in eval_set.pairs}) == 4
    assert all(pair.mask_path is not None and pair.mask_path.is_file() for pair in eval_set.pairs)


def test_pidm_layout_gives_the_same_files_as_the_csv_layout(synth, tmp_path) -> None:
    from xmdpt.data.deepfashion import PidmPairs
    from xmdpt.data.layouts import csv_to_pidm

    csv_to_pidm(synth, tmp_path, "test")
    pidm = eval_set_from_dataset(PidmPairs(root=tmp_path, split="test", image_size=MODEL_SIZE, fail_fast=True))
    csv = _test_set(synth)
    assert sorted(pidm.targets()) == sorted(csv.targets())
    for name, path in pidm.targets().items():  # the same target image, found through the In-shop path
        assert path.read_bytes() == csv.targets()[name].read_bytes()
    assert pidm.masks() is not None and sorted(pidm.masks()) == sorted(csv.masks())
