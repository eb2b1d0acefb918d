"""Score synthetic-set pipelines on held-out pairs: how the checkpoint and sampler choices in docs/default-model.md
were made.

    python scripts/score_checkpoints.py runs/NAME/checkpoints/step_0000{0500,1000} --guidance 1
    python scripts/score_checkpoints.py default                      # the shipped model at its sampling defaults
    python scripts/score_checkpoints.py default --guidance 1.0 1.5 --guidance-interval all
    python scripts/score_checkpoints.py runs/NAME/checkpoints/step_00001000 --guidance 2.5 --guidance-interval 200 800
    python scripts/score_checkpoints.py runs/synthetic-cpu-palette/checkpoints/step_00001000 --pattern-cell 0.08 0.14

For each pipeline (a checkpoint folder, its `pipeline` folder, or `default` for the embedded model) and guidance
scale, runs `xmdpt demo`'s scoring on the pairs of each `--seeds` (32 pairs each, DPM-Solver++; steps, guidance and
its interval from the folder's `xmdpt_default.json` unless told; a checkpoint's carries the training defaults, so
give them; `--pattern-cell` draws the pairs with another cell range than the model's set) and prints SSIM, PSNR, the
pattern match and `xmdpt.demo.palette_error` (local colour covariance against the ground truth: the pattern's
colours, which the pattern match does not see). Lower is better; the same person with both garments plain in the
right pose scores about 0.0022 and 0.0029 on seeds 1 and 2.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch

from xmdpt.default_model import default_model_path, load_pipeline, synthetic_set
from xmdpt.demo import palette_error, run_demo
from xmdpt.settings import parse_guidance_interval


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("pipelines", nargs="+", help="checkpoint or pipeline folders, or `default`")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--guidance", type=float, nargs="+", help="scales to try; default: the model's")
    parser.add_argument(
        "--guidance-interval", nargs="+", metavar="LO HI | all", help="guide only at [LO, HI]; default: the model's"
    )
    parser.add_argument("--steps", type=int, help="default: the model's")
    parser.add_argument("--sampler", default="dpmsolver++")
    parser.add_argument("--pattern-cell", type=float, nargs=2, help="override the set's cell range (LOW HIGH)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 leaves a core to a training run)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.pipelines:
        folder = None if name == "default" else Path(name)
        if folder is not None and (folder / "pipeline").is_dir():
            folder = folder / "pipeline"
        pipe = load_pipeline(folder, "cpu")
        pipe.set_sampler(args.sampler)
        synth = synthetic_set(folder or default_model_path())
        synth = synth if args.pattern_cell is None else replace(synth, pattern_cell=tuple(args.pattern_cell))
        interval = None  # "all" guides every step: (0, T)
        if args.guidance_interval:
            interval = parse_guidance_interval(",".join(args.guidance_interval))
        for guidance in args.guidance or [None]:
            settings = pipe.sampling_settings(
                num_inference_steps=args.steps, guidance_scale=guidance, guidance_interval=interval
            )
            guidance, steps, interval = (
                settings.guidance_scale,
                settings.num_inference_steps,
                settings.guidance_interval,
            )
            for seed in args.seeds:
                result = run_demo(pipe, synth, settings, args.pairs, seed, progress=False)
                m, copy = result.model, result.copy_reference
                palette = palette_error(result.generated, [p.target for p in result.pairs])
                print(
                    f"{name} guidance {guidance:g} interval {settings.guidance_interval} steps {steps} seed {seed}: "
                    f"SSIM {m.ssim.mean():.3f} PSNR {m.psnr.mean():.2f} "
                    f"pattern match {m.pattern_match.sum()}/{args.pairs} palette error {palette:.4f} "
                    f"(copying the reference: SSIM {copy.ssim.mean():.3f}, pattern match "
                    f"{copy.pattern_match.sum()}/{args.pairs})",
                    flush=True,
                )


if __name__ == "__main__":
    main()
