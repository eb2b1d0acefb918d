"""Per-pair metrics of the PIDM/CFLD protocol (reference section 10) and the accumulator that scores a test set.

Every function here takes **uint8** images, (3, H, W) for one image or (B, 3, H, W) for a batch, already at the
evaluation size (see `xmdpt.evaluation.protocol`), and converts them to float32 x / 255 as CFLD's metric module
receives them. Scores, with the exact scikit-image / lpips calls of CFLD's `models/metrics.py`:

* ``ssim``: RGB, data_range 1, win_size 51, uniform window, on [0, 1].
* ``ssim_256``: the same images x 255, gaussian_weights, sigma 1.5, use_sample_covariance False,
  data_range = pred.max() - pred.min().
* ``psnr``: data_range 1 (inf for identical images, as scikit-image).
* ``l1``: mean absolute difference on [0, 1].
* ``lpips``: AlexNet backbone, lpips v0.1 linear heads, normalize=True on [0, 1] inputs.
* ``color_de`` / ``color_hist`` (synthetic benchmark only, needs the figure mask): see `color_fidelity`.

Lower is better for l1, lpips, color_de, color_hist and FID; higher for ssim, ssim_256 and psnr
(`HIGHER_IS_BETTER`), which the report uses to pick best and worst pairs.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from skimage.color import rgb2lab
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from tqdm.auto import tqdm

from xmdpt.errors import InputError
from xmdpt.evaluation.fid import (
    FeatureAccumulator,
    FeatureExtractor,
    FeatureStats,
    StatsKey,
    extract_features,
    fid_from_stats,
    fingerprint_names,
    pretrained_state,
)
from xmdpt.evaluation.protocol import (
    IMAGE_SUFFIXES,
    format_size,
    load_generated_image,
    load_real_image,
    read_rgb,
    uint8_to_unit,
)

logger = logging.getLogger(__name__)

#: torchvision's ImageNet AlexNet checkpoint, the LPIPS backbone (what `AlexNet_Weights.IMAGENET1K_V1` downloads).
ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
ALEXNET_URL = "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"

HIGHER_IS_BETTER: dict[str, bool] = {
    "ssim": True,
    "ssim_256": True,
    "psnr": True,
    "l1": False,
    "lpips": False,
    "color_de": False,
    "color_hist": False,
    "fid": False,
    "fid_tf": False,
}

#: Side of the uniform SSIM window of the protocol ("SSIM", win_size 51).
SSIM_WINDOW = 51

#: Bins per RGB channel of the colour histogram of `color_fidelity`.
COLOR_HIST_BINS = 8


# ------------------------------------------------------------------------------------------------ per-pair scores


def ssim(pred: torch.Tensor, target: torch.Tensor) -> float:
    """ "SSIM" of the protocol: RGB on [0, 1], data_range 1, 51x51 uniform window (scikit-image)."""
    p, t = _unit_pair(pred, target)
    if min(p.shape[1:]) < SSIM_WINDOW:
        raise InputError(
            f"SSIM's {SSIM_WINDOW}x{SSIM_WINDOW} window needs images of at least that size, got {p.shape[1:]}"
        )
    return float(structural_similarity(t, p, data_range=1.0, win_size=SSIM_WINDOW, channel_axis=0))


def ssim_256(pred: torch.Tensor, target: torch.Tensor) -> float:
    """ "SSIM_256": 0-255 scale, gaussian sigma 1.5, population covariance, data_range = pred.max() - pred.min()."""
    p, t = _unit_pair(pred, target)
    p, t = p * 255.0, t * 255.0
    return float(
        structural_similarity(
            t,
            p,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            channel_axis=0,
            data_range=float(p.max() - p.min()),
        )
    )


def psnr(pred: torch.Tensor, target: torch.Tensor) -> float:
    """PSNR in dB with data_range 1 on [0, 1]; inf when the images are identical."""
    p, t = _unit_pair(pred, target)
    with np.errstate(divide="ignore"):
        return float(peak_signal_noise_ratio(t, p, data_range=1.0))


def l1(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Mean absolute error on [0, 1] (PIDM/GFLA's `compare_l1`)."""
    p, t = _unit_pair(pred, target)
    return float(np.mean(np.abs(p - t), dtype=np.float64))


def color_fidelity(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | np.ndarray) -> dict[str, float]:
    """Colour fidelity on the figure's pixels, for the synthetic benchmark (no pretrained network).

    Args:
        pred, target: uint8 (3, H, W).
        mask: bool (H, W), True on the target figure's pixels (the synthetic generator knows them).

    Returns:
        ``color_de``: mean CIE76 colour difference (Euclidean distance in CIELAB, sRGB D65, scikit-image
        `rgb2lab`) between pred and target over the masked pixels. 0 is exact; about 2.3 is a just-noticeable
        difference; black vs white is 100. Pixelwise, so it also grows when the figure is misplaced.
        ``color_hist``: 1 - histogram intersection of the normalised 8x8x8 RGB histograms of the masked pixels of
        pred and target, in [0, 1]. It ignores where a colour sits inside the mask, so it separates "wrong colours"
        from "right colours slightly misplaced".
    """
    _check_pair(pred, target)
    mask_array = _mask_array(mask, tuple(target.shape[-2:]))
    if not mask_array.any():
        raise InputError("figure mask is empty: colour fidelity needs at least one figure pixel")
    p = pred.detach().cpu().permute(1, 2, 0).numpy()[mask_array]  # (N, 3) uint8
    t = target.detach().cpu().permute(1, 2, 0).numpy()[mask_array]
    lab_p = rgb2lab(p[None].astype(np.float64) / 255.0)[0]
    lab_t = rgb2lab(t[None].astype(np.float64) / 255.0)[0]
    delta_e = float(np.linalg.norm(lab_p - lab_t, axis=-1).mean())
    hist_p, hist_t = _color_histogram(p), _color_histogram(t)
    return {"color_de": delta_e, "color_hist": float(1.0 - np.minimum(hist_p, hist_t).sum())}


def _color_histogram(pixels: np.ndarray) -> np.ndarray:
    bins = (pixels.astype(np.int64) * COLOR_HIST_BINS) // 256
    index = (bins[:, 0] * COLOR_HIST_BINS + bins[:, 1]) * COLOR_HIST_BINS + bins[:, 2]
    counts = np.bincount(index, minlength=COLOR_HIST_BINS**3).astype(np.float64)
    return counts / counts.sum()


#: The per-pair scores every pair gets (colour fidelity and LPIPS are added when masks / a network are given).
PAIR_SCORES = {"ssim": ssim, "ssim_256": ssim_256, "psnr": psnr, "l1": l1}


class LPIPSMetric(nn.Module):
    """LPIPS with the AlexNet backbone through the `lpips` package, on uint8 batches (B, 3, H, W).

    Equal to ``lpips.LPIPS(net="alex")(pred / 255, target / 255, normalize=True)``, built without any download:
    lpips is constructed with ``pnet_rand=True`` (so torchvision's alexnet is created with pretrained=False) and
    the backbone is then loaded from `alexnet_weights`; the v0.1 linear heads come from the lpips wheel itself
    (or `lin_weights`).

    Args:
        alexnet_weights: torchvision AlexNet checkpoint (`alexnet-owt-7be5be79.pth`, .pth or .safetensors), a
            state dict, or None for torchvision's hub cache (downloading if absent and online; offline
            `InputError` saying which file to give).
        lin_weights: optional path of lpips' linear heads (default: the `weights/v0.1/alex.pth` in the package).
    """

    def __init__(
        self,
        alexnet_weights: Path | str | Mapping[str, torch.Tensor] | None = None,
        *,
        lin_weights: Path | str | None = None,
    ) -> None:
        super().__init__()
        try:
            import lpips
        except ImportError as error:
            raise InputError("LPIPS needs the lpips package: pip install 'xmdpt[eval]'") from error
        if lin_weights is not None and not Path(lin_weights).is_file():
            raise InputError(f"LPIPS linear-head weights file {lin_weights} does not exist")
        with warnings.catch_warnings():
            # lpips 0.1.4 still calls torchvision's alexnet(pretrained=False); the deprecation is lpips', not ours.
            warnings.filterwarnings("ignore", category=UserWarning, module="torchvision.models._utils")
            self.lpips = lpips.LPIPS(
                net="alex",
                version="0.1",
                pretrained=True,
                pnet_rand=True,
                model_path=None if lin_weights is None else str(lin_weights),
                verbose=False,
            )
        backbone = self.lpips.net
        backbone.load_state_dict(alexnet_to_lpips_backbone(_alexnet_state(alexnet_weights), backbone))
        self.eval().requires_grad_(False)

    @torch.inference_mode()
    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-pair LPIPS distances (B,) as float32 on the CPU."""
        _check_batch_pair(pred, target)
        device = next(self.parameters()).device
        p, t = uint8_to_unit(pred).to(device), uint8_to_unit(target).to(device)
        return self.lpips(p, t, normalize=True).reshape(-1).float().cpu()


def alexnet_to_lpips_backbone(state: Mapping[str, torch.Tensor], backbone: nn.Module) -> dict[str, torch.Tensor]:
    """Rename torchvision AlexNet keys (features.<i>.<param>) to lpips' sliced backbone (slice<k>.<i>.<param>)."""
    mapped = {}
    for key in backbone.state_dict():
        match = re.fullmatch(r"slice\d+\.(\d+)\.(\w+)", key)
        source = f"features.{match[1]}.{match[2]}" if match else key
        if source not in state:
            raise InputError(f"AlexNet weights have no {source!r}: not a torchvision AlexNet checkpoint")
        mapped[key] = state[source]
    return mapped


def _alexnet_state(weights: Path | str | Mapping[str, torch.Tensor] | None) -> Mapping[str, torch.Tensor]:
    from torchvision.models import AlexNet_Weights

    return pretrained_state(
        weights,
        AlexNet_Weights.IMAGENET1K_V1,
        "AlexNet weights for LPIPS (xmdpt evaluate --alexnet-weights)",
        ALEXNET_URL,
    )


# ------------------------------------------------------------------------------------------------ the accumulator


@dataclass
class EvaluationResult:
    """What `PairMetrics.result` returns: per-pair scores, their means, and FID numbers by label."""

    per_pair: list[dict[str, float | str]]
    means: dict[str, float]
    image_size: tuple[int, int]
    fid: dict[str, float] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return len(self.per_pair)

    def as_dict(self) -> dict:
        """JSON-ready summary (the body of metrics.json)."""
        return {
            "count": self.count,
            "image_size": format_size(self.image_size),
            "means": self.means,
            "fid": self.fid,
            "per_pair": self.per_pair,
        }


class PairMetrics:
    """Score (generated, target) pairs of a test set: per-pair scores, means, and FID features.

    Args:
        image_size: evaluation size (height, width); every image must already have it.
        lpips: an `LPIPSMetric`, or None to skip LPIPS (the synthetic benchmark runs without pretrained networks).
        fid_extractors: label -> feature network, e.g. {"fid": InceptionV3Features(...), "fid_tf":
            TFInceptionFeatures(...)}; the generated images' features are accumulated for each.
        device: where LPIPS and the feature networks run (they are moved there).
        pair_metrics: which of `PAIR_SCORES` to compute; None means all those defined at `image_size`: every one
            at the DeepFashion sizes, all but "ssim" below 51 pixels a side (the synthetic set's 64x44), where its
            51x51 window does not fit; that omission is logged, and "ssim" is then absent from the rows and means.

    Nothing is skipped silently: a repeated name, a size other than `image_size`, masks given for some pairs and
    not others, and a generated folder with missing or extra images all raise `InputError`.
    """

    def __init__(
        self,
        image_size: tuple[int, int],
        *,
        lpips: LPIPSMetric | None = None,
        fid_extractors: Mapping[str, FeatureExtractor] | None = None,
        device: str | torch.device = "cpu",
        pair_metrics: Sequence[str] | None = None,
    ) -> None:
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.pair_metrics = _pair_metrics_for(self.image_size, pair_metrics)
        self.device = torch.device(device)
        self.lpips = None if lpips is None else lpips.to(self.device)
        self.fid_extractors = {label: net.to(self.device) for label, net in (fid_extractors or {}).items()}
        self._features = {label: FeatureAccumulator(net.dim) for label, net in self.fid_extractors.items()}
        self._rows: list[dict[str, float | str]] = []
        self._names: set[str] = set()
        self._with_masks: bool | None = None

    def __len__(self) -> int:
        return len(self._rows)

    def add(
        self,
        names: Sequence[str],
        pred: torch.Tensor,
        target: torch.Tensor,
        masks: torch.Tensor | np.ndarray | None = None,
    ) -> list[dict[str, float | str]]:
        """Score a batch. pred, target: uint8 (B, 3, H, W) at `image_size`; masks: bool (B, H, W) figure masks.

        Returns the batch's per-pair rows ({"name": ..., "ssim": ..., ...}), also kept for `result`.
        """
        self._check_batch(names, pred, target, masks)
        rows: list[dict[str, float | str]] = []
        for i, name in enumerate(names):
            row: dict[str, float | str] = {"name": name}
            row.update({metric: PAIR_SCORES[metric](pred[i], target[i]) for metric in self.pair_metrics})
            if masks is not None:
                row.update(color_fidelity(pred[i], target[i], masks[i]))
            rows.append(row)
        if self.lpips is not None:
            for row, value in zip(rows, self.lpips(pred, target).tolist(), strict=True):
                row["lpips"] = value
        for label, extractor in self.fid_extractors.items():
            self._features[label].update(extract_features(extractor, pred))
        self._rows.extend(rows)
        self._names.update(names)
        return rows

    def add_folder(
        self,
        generated_dir: Path | str,
        targets: Mapping[str, Path | str],
        *,
        masks: Mapping[str, Path | str | torch.Tensor | np.ndarray] | None = None,
        batch_size: int = 16,
        progress: bool = True,
    ) -> None:
        """Score a folder of generated PNGs against real target images.

        Args:
            generated_dir: the generation loop's output folder; its image files must be exactly `targets`' keys.
            targets: generated file name (e.g. "a_2_b.png") -> path of the real target image, which is read with
                the protocol's real-image path (PIL bicubic to `image_size` if needed).
            masks: optional generated file name -> figure mask of its target (synthetic benchmark), for every
                pair: a bool (H, W) array or the path of a mask PNG (read with `load_mask`).
        """
        paths = match_generated_folder(generated_dir, targets.keys())
        if masks is not None:
            missing = sorted(set(targets) - set(masks))
            if missing:
                raise InputError(f"no figure mask for {len(missing)} of {len(targets)} pairs (first: {missing[0]})")
        names = sorted(targets)
        batches = range(0, len(names), batch_size)
        for start in tqdm(batches, desc="scoring pairs", unit="batch", disable=not progress):
            chunk = names[start : start + batch_size]
            pred = torch.stack([load_generated_image(paths[n], self.image_size) for n in chunk])
            target = torch.stack([load_real_image(targets[n], self.image_size) for n in chunk])
            chunk_masks = None if masks is None else np.stack([self._mask(masks[n]) for n in chunk])
            self.add(chunk, pred, target, chunk_masks)

    def _mask(self, mask: Path | str | torch.Tensor | np.ndarray) -> np.ndarray:
        if isinstance(mask, (Path, str)):
            return load_mask(mask, self.image_size)
        return _mask_array(mask, self.image_size)

    def per_pair(self) -> list[dict[str, float | str]]:
        """One row per pair, in the order added."""
        return [dict(row) for row in self._rows]

    def means(self) -> dict[str, float]:
        """Mean of every per-pair score over all pairs (inf/NaN propagate: nothing is dropped)."""
        if not self._rows:
            raise InputError("no pairs were scored")
        keys = [k for k in self._rows[0] if k != "name"]
        return {k: float(np.mean([row[k] for row in self._rows], dtype=np.float64)) for k in keys}

    def generated_stats(self, label: str) -> FeatureStats:
        """FID statistics of the generated images for one feature network label."""
        if label not in self._features:
            raise InputError(f"no FID feature network labelled {label!r} (have {sorted(self._features)})")
        key = StatsKey(
            set_name="generated",
            set_fingerprint=fingerprint_names(self._names),
            image_size=self.image_size,
            feature=self.fid_extractors[label].identity,
        )
        return self._features[label].stats(key)

    def fid(self, real_stats: Mapping[str, FeatureStats]) -> dict[str, float]:
        """FID per label against the real-set statistics of the same label (see `fid.real_set_stats`)."""
        missing = sorted(set(self._features) - set(real_stats))
        if missing:
            raise InputError(f"no real-set FID statistics for {missing}")
        return {label: fid_from_stats(real_stats[label], self.generated_stats(label)) for label in self._features}

    def result(self, real_stats: Mapping[str, FeatureStats] | None = None) -> EvaluationResult:
        """Per-pair rows, means, and FID (only if `real_stats` is given)."""
        fid_values = {} if real_stats is None else self.fid(real_stats)
        return EvaluationResult(self.per_pair(), self.means(), self.image_size, fid_values)

    def _check_batch(
        self,
        names: Sequence[str],
        pred: torch.Tensor,
        target: torch.Tensor,
        masks: torch.Tensor | np.ndarray | None,
    ) -> None:
        _check_batch_pair(pred, target)
        if len(names) != pred.shape[0]:
            raise InputError(f"{len(names)} names for a batch of {pred.shape[0]} images")
        if tuple(pred.shape[-2:]) != self.image_size:
            raise InputError(
                f"images are {pred.shape[-2]}x{pred.shape[-1]}, expected the evaluation size "
                f"{format_size(self.image_size)} (first pair: {names[0]})"
            )
        seen: set[str] = set()
        for name in names:
            if name in self._names or name in seen:
                raise InputError(f"pair {name!r} was given twice")
            seen.add(name)
        with_masks = masks is not None
        if self._with_masks is not None and with_masks != self._with_masks:
            raise InputError(
                "figure masks were given for some pairs and not for others "
                f"(first pair of this batch: {names[0]}); colour fidelity needs them for every pair"
            )
        if masks is not None and (len(masks) != len(names) or tuple(masks.shape[-2:]) != self.image_size):
            raise InputError(
                f"masks have shape {tuple(masks.shape)}, expected ({len(names)}, {self.image_size[0]}, "
                f"{self.image_size[1]})"
            )
        self._with_masks = with_masks


def _pair_metrics_for(size: tuple[int, int], requested: Sequence[str] | None) -> tuple[str, ...]:
    fits = min(size) >= SSIM_WINDOW
    if requested is None:
        if not fits:
            logger.warning(
                "SSIM (%dx%d window) is not defined on %s images; scoring SSIM_256, PSNR and L1 without it",
                SSIM_WINDOW,
                SSIM_WINDOW,
                format_size(size),
            )
        return tuple(m for m in PAIR_SCORES if fits or m != "ssim")
    unknown = sorted(set(requested) - set(PAIR_SCORES))
    if unknown:
        raise InputError(f"unknown pair metrics {unknown}; known: {list(PAIR_SCORES)}")
    if "ssim" in requested and not fits:
        raise InputError(f"SSIM's {SSIM_WINDOW}x{SSIM_WINDOW} window does not fit {format_size(size)} images")
    return tuple(requested)


def load_mask(path: Path | str, size: tuple[int, int]) -> np.ndarray:
    """Read a figure mask PNG (255 on the figure, as the synthetic generator writes) as bool (H, W) at `size`."""
    image = read_rgb(path).convert("L")
    width, height = image.size
    if (height, width) != tuple(size):
        raise InputError(f"figure mask {path} is {height}x{width}, expected {format_size(size)}")
    return np.asarray(image) > 127


def match_generated_folder(folder: Path | str, expected: Iterable[str]) -> dict[str, Path]:
    """Map each expected generated file name to its path, or raise `InputError` naming what is missing or extra.

    Image files are those with a suffix in `IMAGE_SUFFIXES`, directly in `folder`; other files (logs, metrics.json)
    are not images and are ignored.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"generated folder {folder} does not exist")
    present = {p.name: p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES}
    wanted = set(expected)
    missing, extra = sorted(wanted - set(present)), sorted(set(present) - wanted)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} of {len(wanted)} expected images missing (first: {', '.join(missing[:3])})")
        if extra:
            parts.append(f"{len(extra)} images not in the test list (first: {', '.join(extra[:3])})")
        raise InputError(f"generated folder {folder} does not match the test list: {'; '.join(parts)}")
    return {name: present[name] for name in wanted}


# ----------------------------------------------------------------------------------------------------- helpers


def _check_pair(pred: torch.Tensor, target: torch.Tensor) -> None:
    if pred.dtype != torch.uint8 or target.dtype != torch.uint8:
        raise InputError(f"metrics take uint8 images, got {pred.dtype} and {target.dtype}")
    if pred.shape != target.shape:
        raise InputError(f"generated image is {tuple(pred.shape)}, target is {tuple(target.shape)}")
    if pred.ndim != 3 or pred.shape[0] != 3:
        raise InputError(f"expected (3, H, W) images, got {tuple(pred.shape)}")


def _check_batch_pair(pred: torch.Tensor, target: torch.Tensor) -> None:
    if pred.ndim != 4 or pred.shape[1] != 3:
        raise InputError(f"expected (B, 3, H, W) batches, got {tuple(pred.shape)}")
    if pred.shape != target.shape:
        raise InputError(f"generated batch is {tuple(pred.shape)}, target batch is {tuple(target.shape)}")
    if pred.dtype != torch.uint8 or target.dtype != torch.uint8:
        raise InputError(f"metrics take uint8 images, got {pred.dtype} and {target.dtype}")


def _unit_pair(pred: torch.Tensor, target: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (3, H, W) tensors -> float32 numpy on [0, 1], the arrays CFLD hands to scikit-image."""
    _check_pair(pred, target)
    return uint8_to_unit(pred.detach().cpu()).numpy(), uint8_to_unit(target.detach().cpu()).numpy()


def _mask_array(mask: torch.Tensor | np.ndarray, size: tuple[int, int]) -> np.ndarray:
    array = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if array.shape != tuple(size):
        raise InputError(f"figure mask is {array.shape}, expected {tuple(size)}")
    if array.dtype != np.bool_:
        raise InputError(f"figure mask must be boolean, got {array.dtype}")
    return array
