"""Turn a training checkpoint of the synthetic CPU configs into the embedded default model (docs/default-model.md).

    xmdpt train -c configs/synthetic-cpu.yaml                               # stage 1: about 90 min on 2 CPU cores
    xmdpt train -c configs/default-model/synthetic-cpu-reference.yaml       # stage 2: about 16 min
    xmdpt train -c configs/default-model/synthetic-cpu-texture.yaml         # stage 3: about 2 h 40 min
    xmdpt train -c configs/default-model/synthetic-cpu-texture-strong.yaml  # stage 4: about 14 min
    xmdpt train -c configs/default-model/synthetic-cpu-palette.yaml         # stage 5: about 19 min
    xmdpt train -c configs/default-model/synthetic-cpu-bold.yaml            # stage 6: about 60 min, bold pattern cells
    # reference attention and the refiner add 7 MB in float32; --dtype float16 keeps the folder at 13 MB
    python scripts/ship_default_model.py runs/synthetic-cpu-bold/checkpoints/step_00004000 \
        --config configs/default-model/synthetic-cpu-bold.yaml --dtype float16 \
        --guidance 2.5 --guidance-interval 200 800 --steps 25 --sampler dpmsolver++ --precision auto --cache fora:3

Writes `src/xmdpt/assets/default/`: an `XMDPTPipeline` folder (safetensors) without the training-only side blocks,
its weights stored in float32 or (`--dtype float16`, half the size) float16, which loads as float32; and
`xmdpt_default.json` with the synthetic set's settings (the demo regenerates its held-out identities from them), the
sampling defaults and where the weights came from.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from xmdpt.default_model import write_synthetic_set
from xmdpt.diffusion import make_train_scheduler
from xmdpt.pipeline import SAMPLERS, XMDPTPipeline, make_sampling_scheduler
from xmdpt.settings import PRECISIONS
from xmdpt.training.build import build_codec, build_denoiser, build_encoders, synth_config
from xmdpt.training.config import load_config

OUT = Path(__file__).resolve().parents[1] / "src" / "xmdpt" / "assets" / "default"


def strip(state: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--weights", choices=["ema", "model"], default="ema")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument(
        "--guidance-interval", type=float, nargs=2, metavar=("LO", "HI"), help="guide only at timesteps in [LO, HI]"
    )
    parser.add_argument("--sampler", choices=SAMPLERS, default="ddim", help="the saved scheduler: the default sampler")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto", help="the sampling precision it ships with")
    parser.add_argument("--cache", default="none", help="the feature cache it ships with (none, fora:N, teacache:D)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--dtype", choices=["float32", "float16"], default="float32", help="of the stored weights")
    parser.add_argument("--config", default="configs/synthetic-cpu.yaml", help="recorded: the config that trained it")
    args = parser.parse_args()

    state = json.loads((args.checkpoint / "trainer_state.json").read_text())
    sections = ("model", "conditioning", "data", "objective")  # what inference needs of the training config
    config = load_config(None, [f"{s}.{k}={json.dumps(v)}" for s in sections for k, v in state["config"][s].items()])
    config.objective.mask_ratio = 0.0  # inference only: no side blocks
    pose_encoder, reference_encoder = build_encoders(config)
    codec = build_codec(config)
    denoiser = build_denoiser(config, codec, pose_encoder, reference_encoder)
    weights = load_file(args.checkpoint / f"{args.weights}.safetensors")
    prefix = "module." if args.weights == "ema" else ""
    sides = ("sideblocks", "sideblocks_cross", "mask_token", "interpolater.")  # training only
    den = {k: v for k, v in strip(weights, prefix + "denoiser.").items() if not k.startswith(sides)}
    denoiser.load_state_dict(den)
    pose_encoder.load_state_dict(strip(weights, prefix + "pose_encoder."))
    reference_encoder.load_state_dict(strip(weights, prefix + "reference_encoder."))
    scheduler = make_sampling_scheduler(args.sampler, make_train_scheduler(config.objective.prediction_type).config)
    components = (denoiser.eval(), codec, pose_encoder.eval(), reference_encoder.eval(), scheduler)
    pipe = XMDPTPipeline(*components, num_inference_steps=args.steps, guidance_scale=args.guidance)
    pipe.set_sampling_defaults(guidance_interval=args.guidance_interval, precision=args.precision, cache=args.cache)

    shutil.rmtree(args.out, ignore_errors=True)
    pipe.to(getattr(torch, args.dtype)).save_pretrained(args.out)
    trained = {"config": args.config, "step": state["step"], "weights": args.weights, "stored_as": args.dtype}
    trained["sampler"] = args.sampler
    if config.model.init_from:
        trained["init_from"] = config.model.init_from
    write_synthetic_set(args.out, synth_config(config), trained=trained)
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"wrote {args.out} ({size / 2**20:.1f} MiB, {denoiser.num_parameters():,} denoiser parameters)")


if __name__ == "__main__":
    main()
