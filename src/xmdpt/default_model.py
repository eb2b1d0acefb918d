"""The embedded default model and loading any pipeline folder the way the CLI and the web page need it.

The default is a small pixel-space X-MDPT trained on the synthetic set, shipped in `xmdpt/assets/default/` (a
`save_pretrained` folder) so that `xmdpt demo`, `xmdpt generate` and `xmdpt serve` work with no download.
`XMDPT_DEFAULT_MODEL=/some/folder` points at another folder (tests, or trying a new checkpoint).

Beside the pipeline, `xmdpt_default.json` records how the model was made and how to sample it:

    {"num_identities": 2000, "poses_per_identity": 4, "size": [64, 48], "seed": 0, "test_fraction": 0.1,
     "masks": true, "pattern_cell": [0.08, 0.14], "num_inference_steps": 25, "guidance_scale": 2.5,
     "guidance_interval": [200, 800], "trained": {...}}

the `SynthConfig` fields describe the training set (the demo regenerates its held-out identities from them; missing
ones take their defaults), `num_inference_steps`, `guidance_scale` and `guidance_interval` the sampling defaults
(optional; 50, 2.0 and guidance at every step otherwise), and `trained` where the weights came from. Any pipeline
folder may carry this file.
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from xmdpt.data.synthetic import SynthConfig
from xmdpt.errors import InputError
from xmdpt.guidance import check_guidance_interval

log = logging.getLogger(__name__)

ENV_VAR = "XMDPT_DEFAULT_MODEL"
INFO_FILE = "xmdpt_default.json"
PIPELINE_CLASS = "XMDPTPipeline"
DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 2.0


def default_model_path() -> Path:
    """The embedded default pipeline folder (or the one `XMDPT_DEFAULT_MODEL` names)."""
    override = os.environ.get(ENV_VAR)
    path = Path(override) if override else Path(__file__).parent / "assets" / "default"
    if not (path / "model_index.json").is_file():
        where = f"{ENV_VAR}={override}" if override else f"the embedded default model ({path})"
        raise InputError(f"{where} is missing: reinstall xmdpt, or pass --model with a pipeline folder or Hub id")
    return path


@dataclass(frozen=True)
class ModelInfo:
    """The contents of `xmdpt_default.json`: the synthetic training set and the sampling defaults."""

    synth: SynthConfig | None = None
    num_inference_steps: int = DEFAULT_STEPS
    guidance_scale: float = DEFAULT_GUIDANCE
    guidance_interval: tuple[float, float] | None = None  # guide only at timesteps in [lo, hi]; None: at every step


def read_model_info(folder: str | Path | None) -> ModelInfo:
    """`xmdpt_default.json` of a local pipeline folder; defaults when there is none (a Hub id, another model)."""
    path = Path(folder) / INFO_FILE if folder is not None else None
    if path is None or not path.is_file():
        return ModelInfo()
    try:
        obj = json.loads(path.read_text())
        synth_keys = {f.name for f in fields(SynthConfig)} & obj.keys()
        synth = None
        if "size" in synth_keys:
            synth = SynthConfig(**{k: obj[k] for k in synth_keys} | {"size": tuple(int(v) for v in obj["size"])})
        return ModelInfo(
            synth=synth,
            num_inference_steps=int(obj.get("num_inference_steps", DEFAULT_STEPS)),
            guidance_scale=float(obj.get("guidance_scale", DEFAULT_GUIDANCE)),
            guidance_interval=check_guidance_interval(obj.get("guidance_interval")),
        )
    except InputError as err:
        raise InputError(f"{path}: {err}") from None
    except (OSError, ValueError, TypeError, AttributeError) as err:
        raise InputError(f"{path}: not a valid {INFO_FILE} ({err})") from None


def write_model_info(
    folder: str | Path,
    synth: SynthConfig | None,
    num_inference_steps: int,
    guidance_scale: float,
    guidance_interval: tuple[float, float] | None = None,
    **extra,
) -> Path:
    """Write `xmdpt_default.json` beside a saved pipeline (`extra`: more keys, e.g. how it was trained)."""
    info = {} if synth is None else asdict(synth)  # tuples are written as JSON lists
    info.update(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)
    if guidance_interval is not None:
        info.update(guidance_interval=list(check_guidance_interval(guidance_interval)))
    info.update(extra)
    path = Path(folder) / INFO_FILE
    path.write_text(json.dumps(info, indent=1) + "\n")
    return path


def resolve_device(device: str | None) -> torch.device:
    """`None` or "auto": CUDA when present, else the CPU; an explicit device must exist."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise InputError(f"unknown device {device!r} ({err})") from None
    if resolved.type not in ("cpu", "cuda", "mps"):
        raise InputError(f"device {device!r}: use cpu, cuda, cuda:N or mps")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r} asked for, but no CUDA GPU is available here")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"device {device!r} asked for, but MPS is not available here")
    return resolved


def _check_local_folder(path: Path) -> None:
    """Refuse, in one line, a local folder that is not a saved `XMDPTPipeline`."""
    index = path / "model_index.json"
    if not path.is_dir():
        raise InputError(f"{path}: not a folder (give a pipeline folder written by save_pretrained, or a Hub id)")
    if not index.is_file():
        raise InputError(f"{path}: not an xmdpt pipeline folder (no model_index.json)")
    try:
        name = json.loads(index.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError) as err:
        raise InputError(f"{index}: unreadable ({err})") from None
    if name != PIPELINE_CLASS:
        raise InputError(f"{path}: not an xmdpt pipeline folder (model_index.json names {name!r})")


@contextmanager
def _quiet_loading():
    """No per-component loading bar and no warnings (e.g. "Couldn't connect to the Hub ... will try the local
    cache", printed before an offline miss): they are noise on the one-line error contract of the CLI."""
    from diffusers.utils import logging as diffusers_logging

    was_enabled = diffusers_logging.is_progress_bar_enabled()
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(verbosity)
        if was_enabled:
            diffusers_logging.enable_progress_bar()


def load_pipeline(model: str | Path | None = None, device: str | torch.device | None = None):
    """An `XMDPTPipeline` from a local folder, a Hub id, or (None) the embedded default, on `device`, in eval mode.
    Returns (pipeline, model info)."""
    from xmdpt.pipeline import XMDPTPipeline  # the pipeline imports diffusers; keep `--help` fast

    device = device if isinstance(device, torch.device) else resolve_device(device)
    path = default_model_path() if model is None else Path(model)
    local = path.exists() or model is None or str(model).startswith((".", "/", "~")) or str(model).count("/") != 1
    if local:
        _check_local_folder(path)
    try:
        with _quiet_loading():
            pipe = XMDPTPipeline.from_pretrained(str(path))
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, ImportError) as err:
        # Offline Hub misses, corrupt safetensors and mismatched configs all land here; one line says which.
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if not local and "not fully cached locally" in first:
            first = "not a local folder, and not in the Hugging Face cache while the Hub cannot be reached"
        raise InputError(f"{model or path}: cannot load the pipeline ({first})") from None
    if not isinstance(pipe, XMDPTPipeline):
        raise InputError(f"{model or path}: loads as {type(pipe).__name__}, not an xmdpt pipeline")
    pipe.to(device)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    log.debug("loaded %s on %s", path, device)
    return pipe, read_model_info(path if local else None)
