"""Does a model's condition know the reference's garment patterns? A linear probe on a synthetic-set pipeline.

    python scripts/probe_pattern.py                          # the embedded default
    python scripts/probe_pattern.py runs/NAME/checkpoints/step_00001000/pipeline

Renders the first `--identities` synthetic people (one view each, at the pipeline's size), computes what the
denoiser is given about the reference (the aggregation vector y, the reference attention memory's mean), fits a
multinomial logistic regression on the first 75% and reports its accuracy on the rest, for the shirt's and the
trousers' pattern (plain / stripes / checks), beside always guessing the commonest class. docs/default-model.md
quotes it.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np
import torch

from xmdpt.data.synthetic import make_identity
from xmdpt.default_model import default_model_path, load_pipeline, synthetic_set
from xmdpt.demo import PATTERNS, _view


def probe(features: torch.Tensor, labels: torch.Tensor, fit: int, steps: int = 300) -> float:
    mean, std = features[:fit].mean(0), features[:fit].std(0) + 1e-6
    x = (features - mean) / std
    weight = torch.zeros(x.shape[1], len(PATTERNS), requires_grad=True)
    bias = torch.zeros(len(PATTERNS), requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x[:fit] @ weight + bias, labels[:fit]) + 1e-3 * weight.square().sum()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return ((x[fit:] @ weight + bias).argmax(1) == labels[fit:]).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default=None, help="a pipeline folder (default: the embedded model)")
    parser.add_argument("--identities", type=int, default=1200)
    parser.add_argument("--pattern-cell", type=float, nargs=2, default=None, help="override the set's cell range")
    args = parser.parse_args()
    torch.manual_seed(0)

    pipe = load_pipeline(args.model, "cpu")
    synth = synthetic_set(args.model or default_model_path())
    synth = synth if args.pattern_cell is None else replace(synth, pattern_cell=tuple(args.pattern_cell))
    images, labels = [], {"shirt": [], "trousers": []}
    for index in range(args.identities):
        identity = make_identity(synth.seed, index, synth.pattern_cell)
        image = _view(synth, identity, index, 0, pipe.image_size)[1]
        images.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1))
        labels["shirt"].append(PATTERNS.index(identity.shirt_pattern))
        labels["trousers"].append(PATTERNS.index(identity.trouser_pattern))
    references = torch.stack(images)  # (N, 3, H, W) in [-1, 1]
    features: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad():
        for batch in references.split(100):
            conditions = pipe.encode_conditions(batch, torch.zeros_like(batch))  # the pose does not reach these
            features.setdefault("y", []).append(conditions.y)
            if conditions.reference_memory is not None:
                features.setdefault("memory (mean)", []).append(conditions.reference_memory.mean(1))
    fit = int(0.75 * args.identities)
    for part, values in labels.items():
        truth = torch.tensor(values)
        commonest = np.bincount(truth[fit:].numpy()).max() / len(truth[fit:])
        scores = ", ".join(f"{name} {probe(torch.cat(f).float(), truth, fit):.3f}" for name, f in features.items())
        print(f"{part} pattern: {scores}; commonest class {commonest:.3f}")


if __name__ == "__main__":
    main()
