"""The embedded default model, and loading any pipeline folder the way the CLI and the web page need it.

The default is a small pixel-space X-MDPT trained on the synthetic set, shipped in `xmdpt/assets/default/` (a
`save_pretrained` folder) so that `xmdpt demo`, `xmdpt generate` and `xmdpt serve` work with no download.
`XMDPT_DEFAULT_MODEL=/some/folder` points at another folder (tests, or trying a new checkpoint). Its sampling
defaults are the pipeline's own config (`model_index.json`), like any pipeline's.

Beside the pipeline, `xmdpt_default.json` says which synthetic set the model was trained on, so that the demo can
regenerate its held-out people: the `SynthConfig` fields (missing ones take their defaults) and `trained`, where the
weights came from. Any pipeline folder trained on the synthetic set may carry it.
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from dataclasses import asdict, fields
from pathlib import Path

import torch

from xmdpt.data.synthetic import SynthConfig
from xmdpt.errors import InputError

log = logging.getLogger(__name__)

ENV_VAR = "XMDPT_DEFAULT_MODEL"
INFO_FILE = "xmdpt_default.json"
PIPELINE_CLASS = "XMDPTPipeline"
# Said wherever the embedded default is used on the user's own images (the CLI's log, the web page, the Python API).
EMBEDDED_NOTICE = (
    "the embedded default model was trained only on synthetic 64x48 figures: on a real photo it draws a blob. A real "
    "photo needs a real model: convert the authors' published checkpoint with `xmdpt convert` and pass its folder "
    "with --model (README: Use a real model)"
)
# Sampling keys that folders written before the pipeline owned its defaults kept in INFO_FILE.
LEGACY_SAMPLING_KEYS = ("num_inference_steps", "guidance_scale", "guidance_interval")


def default_model_path() -> Path:
    """The embedded default pipeline folder (or the one `XMDPT_DEFAULT_MODEL` names)."""
    override = os.environ.get(ENV_VAR)
    path = Path(override) if override else Path(__file__).parent / "assets" / "default"
    if not (path / "model_index.json").is_file():
        where = f"{ENV_VAR}={override}" if override else f"the embedded default model ({path})"
        raise InputError(f"{where} is missing: reinstall xmdpt, or pass --model with a pipeline folder or Hub id")
    return path


def _read_info(folder: str | Path | None) -> dict:
    path = Path(folder) / INFO_FILE if folder is not None else None
    if path is None or not path.is_file():
        return {}
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: not a valid {INFO_FILE} ({err})") from None
    if not isinstance(obj, dict):
        raise InputError(f"{path}: not a valid {INFO_FILE} (not a JSON object)")
    return obj


def synthetic_set(folder: str | Path | None) -> SynthConfig | None:
    """The synthetic set a pipeline folder was trained on (its `xmdpt_default.json`); None when there is none."""
    obj = _read_info(folder)
    keys = {f.name for f in fields(SynthConfig)} & obj.keys()
    if "size" not in keys:
        return None
    try:
        return SynthConfig(**{k: obj[k] for k in keys} | {"size": tuple(int(v) for v in obj["size"])})
    except (ValueError, TypeError) as err:
        raise InputError(f"{Path(folder) / INFO_FILE}: not a valid {INFO_FILE} ({err})") from None


def write_synthetic_set(folder: str | Path, synth: SynthConfig, **extra) -> Path:
    """Write `xmdpt_default.json` beside a saved pipeline (`extra`: more keys, e.g. how it was trained)."""
    path = Path(folder) / INFO_FILE
    path.write_text(json.dumps(asdict(synth) | extra, indent=1) + "\n")  # tuples are written as JSON lists
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
def quiet_loading():
    """No per-component loading bar and no warnings (e.g. "Couldn't connect to the Hub ... will try the local
    cache", printed before an offline miss), from diffusers or transformers: they are noise on the one-line error
    contract of the CLI."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    saved = []
    for library in (diffusers_logging, transformers_logging):
        saved.append((library, library.is_progress_bar_enabled(), library.get_verbosity()))
        library.disable_progress_bar()
        library.set_verbosity_error()
    try:
        yield
    finally:
        for library, was_enabled, verbosity in saved:
            library.set_verbosity(verbosity)
            if was_enabled:
                library.enable_progress_bar()


def load_pipeline(model: str | Path | None = None, device: str | torch.device | None = None, notice: bool = True):
    """An `XMDPTPipeline` from a local folder, a Hub id, or (None) the embedded default, on `device`, in eval mode,
    with the folder's own sampling defaults. For the embedded default, `notice` logs a warning that it knows only
    synthetic figures (the demo, which shows exactly those, turns it off)."""
    from xmdpt.pipeline import SAMPLING_DEFAULTS, XMDPTPipeline  # the pipeline imports diffusers; keep `--help` fast

    device = device if isinstance(device, torch.device) else resolve_device(device)
    path = default_model_path() if model is None else Path(model)
    local = path.exists() or model is None or str(model).startswith((".", "/", "~")) or str(model).count("/") != 1
    if local:
        _check_local_folder(path)
    try:
        with quiet_loading():
            pipe = XMDPTPipeline.from_pretrained(str(path))
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, ImportError) as err:
        # Offline Hub misses, corrupt safetensors and mismatched configs all land here; one line says which.
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if not local and "not fully cached locally" in first:
            first = "not a local folder, and not in the Hugging Face cache while the Hub cannot be reached"
        raise InputError(f"{model or path}: cannot load the pipeline ({first})") from None
    if not isinstance(pipe, XMDPTPipeline):
        raise InputError(f"{model or path}: loads as {type(pipe).__name__}, not an xmdpt pipeline")
    if local:
        index = json.loads((path / "model_index.json").read_text())
        legacy = {k: v for k, v in _read_info(path).items() if k in LEGACY_SAMPLING_KEYS and k not in index}
        if legacy and not any(k in index for k in SAMPLING_DEFAULTS):
            try:
                pipe.set_sampling_defaults(**legacy)
            except InputError as err:
                raise InputError(f"{path / INFO_FILE}: {err}") from None
    pipe.to(device)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    log.debug("loaded %s on %s", path, device)
    if model is None and notice and not os.environ.get(ENV_VAR):
        log.warning("note: %s", EMBEDDED_NOTICE)
    return pipe
