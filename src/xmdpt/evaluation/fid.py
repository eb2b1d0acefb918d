"""FID under the PIDM/CFLD protocol: feature networks, cached real-set statistics, Frechet distance.

Feature networks are `FeatureExtractor` modules taking uint8 images (B, 3, H, W) and returning float32 (B, D):

* `InceptionV3Features`: torchvision `inception_v3` ImageNet weights (IMAGENET1K_V1, file
  `inception_v3_google-0cc3c7bd.pth`), 2048-d pool features. This is the protocol's FID ("FID" in the tables).
  Input handling is the lineage's, bit for bit: x / 255, bilinear resize to 299x299 (`F.interpolate`,
  align_corners=False, no antialias), then torchvision's `transform_input` affine map
  x * (std / 0.5) + (mean - 0.5) / 0.5 applied to the [0, 1] image, then the Inception blocks up to the final
  average pool. GFLA's `script/inception.py` (imported by PIDM's `utils/metrics.py`) and CFLD's
  `models/metrics.py` both do exactly this; note that it is that affine map on [0, 1] input, not a textbook
  Normalize(mean, std) before the network.
* `TFInceptionFeatures`: the TF-Inception (2015-12-05) FID weights of TTUR / clean-fid / torch-fidelity /
  pytorch-fid (`pt_inception-2015-12-05-6726825d.pth`; torch-fidelity's `weights-inception-2015-12-05-6726825d.pth`
  has the same layout and sha256 prefix), run by torch-fidelity's `FeatureExtractorInceptionV3`
  (TF1-compatible bilinear resize to 299, (x - 128) / 128). This is the second, labelled number ("FID (TF-Inception)").
* `ModuleFeatureExtractor`: any module on [0, 1] floats; tests use a tiny seeded network.

Real-set statistics (mean, covariance, count) are cached in a safetensors file whose metadata records the set
(name and a fingerprint of its file names), the image size, the feature network (name and a fingerprint of its
weights) and the protocol version; `load_stats` refuses a file that differs in any of them and names what differs.

The Frechet distance is computed in float64 with `scipy.linalg.sqrtm` of sigma1 @ sigma2, with the eps-on-the-
diagonal fallback and the imaginary-part check of the reference implementation (TTUR, copied by GFLA, PIDM and
CFLD), so numbers match theirs given the same statistics.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from xmdpt.errors import InputError, describe
from xmdpt.evaluation.protocol import PROTOCOL_VERSION, format_size, load_real_image, parse_size, uint8_to_unit

logger = logging.getLogger(__name__)

#: torchvision's ImageNet Inception-v3 checkpoint (what `Inception_V3_Weights.IMAGENET1K_V1` downloads).
TORCHVISION_INCEPTION_FILE = "inception_v3_google-0cc3c7bd.pth"
TORCHVISION_INCEPTION_URL = "https://download.pytorch.org/models/inception_v3_google-0cc3c7bd.pth"
#: The TF-Inception FID weights as converted by pytorch-fid; torch-fidelity's weights-inception-2015-12-05-6726825d.pth
#: has the same layout and sha256 prefix.
TF_INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
TF_INCEPTION_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + TF_INCEPTION_FILE

_STATS_FORMAT = "xmdpt-fid-stats-1"
# torchvision's Inception3.transform_input constants: per channel x * (std / 0.5) + (mean - 0.5) / 0.5.
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------------------- feature networks


class FeatureExtractor(nn.Module):
    """A feature network for FID: uint8 (B, 3, H, W) in [0, 255] -> float32 (B, dim).

    Subclasses set `name` (human readable, e.g. "torchvision-inception-v3-pool") and `dim`; `identity` adds a
    fingerprint of the weights and is what statistics files are keyed by. `num_features` lets torchmetrics use the
    module as a custom feature extractor.
    """

    name: str
    dim: int

    @property
    def num_features(self) -> int:
        return self.dim

    @property
    def identity(self) -> str:
        cached = getattr(self, "_identity", None)
        if cached is None:
            cached = f"{self.name}@{state_fingerprint(self)}"
            self._identity = cached
        return cached

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class ModuleFeatureExtractor(FeatureExtractor):
    """Wrap any module mapping float images on [0, 1] (B, 3, H, W) to (B, D) or (B, D, 1, 1)."""

    def __init__(self, net: nn.Module, *, name: str, dim: int) -> None:
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self.name = name
        self.dim = dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(uint8_to_unit(images)).flatten(1).float()


class InceptionV3Features(FeatureExtractor):
    """torchvision Inception-v3 (ImageNet) 2048-d pool features with the PIDM/CFLD input handling.

    Args:
        weights: a local torchvision checkpoint (`inception_v3_google-0cc3c7bd.pth`, .pth or .safetensors), a state
            dict, or None for torchvision's own cache ($TORCH_HOME/hub/checkpoints), which downloads the file if it
            is absent and the machine is online and otherwise raises `InputError` saying which file to give.
    """

    name = "torchvision-inception-v3-imagenet1k-v1-pool"
    dim = 2048

    def __init__(self, weights: Path | str | Mapping[str, torch.Tensor] | None = None) -> None:
        super().__init__()
        from torchvision.models import inception_v3

        net = inception_v3(weights=None, aux_logits=True, init_weights=False)
        from torchvision.models import Inception_V3_Weights

        state = pretrained_state(
            weights,
            Inception_V3_Weights.IMAGENET1K_V1,
            "torchvision Inception-v3 weights (xmdpt evaluate --inception-weights)",
            TORCHVISION_INCEPTION_URL,
        )
        _load_strict(net, state, what="torchvision Inception-v3")
        # The block list of CFLD's build_metric (and GFLA's InceptionV3 blocks 0-3): everything up to the pool.
        self.blocks = nn.Sequential(
            net.Conv2d_1a_3x3,
            net.Conv2d_2a_3x3,
            net.Conv2d_2b_3x3,
            nn.MaxPool2d(kernel_size=3, stride=2),
            net.Conv2d_3b_1x1,
            net.Conv2d_4a_3x3,
            nn.MaxPool2d(kernel_size=3, stride=2),
            net.Mixed_5b,
            net.Mixed_5c,
            net.Mixed_5d,
            net.Mixed_6a,
            net.Mixed_6b,
            net.Mixed_6c,
            net.Mixed_6d,
            net.Mixed_6e,
            net.Mixed_7a,
            net.Mixed_7b,
            net.Mixed_7c,
            nn.AdaptiveAvgPool2d(output_size=(1, 1)),
        )
        self.register_buffer("scale", torch.tensor([s / 0.5 for s in _IMAGENET_STD]).view(1, 3, 1, 1))
        self.register_buffer("shift", torch.tensor([(m - 0.5) / 0.5 for m in _IMAGENET_MEAN]).view(1, 3, 1, 1))
        self.eval().requires_grad_(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = uint8_to_unit(images)
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = x * self.scale + self.shift
        return self.blocks(x).flatten(1)


class TFInceptionFeatures(FeatureExtractor):
    """TF-Inception (2015-12-05) 2048-d pool features through torch-fidelity's `FeatureExtractorInceptionV3`.

    Args:
        weights: local `pt_inception-2015-12-05-6726825d.pth` (pytorch-fid) or torch-fidelity's
            `weights-inception-2015-12-05-6726825d.pth`; None lets torch-fidelity use torch's hub cache, downloading
            if absent (offline: `InputError` saying which file to give).
    """

    name = "tf-inception-2015-12-05-pool"
    dim = 2048

    def __init__(self, weights: Path | str | None = None) -> None:
        super().__init__()
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError as error:
            raise InputError("the TF-Inception FID needs torch-fidelity: pip install 'xmdpt[eval]'") from error
        if weights is not None and not Path(weights).is_file():
            raise InputError(f"TF-Inception weights file {weights} does not exist (expected {TF_INCEPTION_FILE})")
        try:
            self.net = FeatureExtractorInceptionV3(
                "inception-v3-compat",
                ["2048"],
                feature_extractor_weights_path=None if weights is None else str(weights),
            )
        except (OSError, RuntimeError) as error:
            raise InputError(
                f"cannot load the TF-Inception weights ({error}); download {TF_INCEPTION_URL} and give the file"
            ) from error
        self.eval().requires_grad_(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise InputError(f"expected uint8 images, got dtype {images.dtype}")
        (features,) = self.net(images)
        return features.float()


def state_fingerprint(module: nn.Module) -> str:
    """Short sha256 of a module's state dict (names, dtypes, shapes, values): which weights a feature net has."""
    digest = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        data = tensor.detach().to("cpu").contiguous()
        digest.update(f"{key}:{data.dtype}:{tuple(data.shape)};".encode())
        digest.update(data.view(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()[:16]


def load_state_file(path: Path | str) -> dict[str, torch.Tensor]:
    """Read a state dict from .safetensors or a torch .pth/.pt file (tensors only, no pickled code)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load fails in many ways (KeyError, UnpicklingError...) on other files
        raise InputError(f"weights file {path} cannot be read ({describe(error)})") from None
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise InputError(f"weights file {path} holds a {type(state).__name__}, not a state dict")
    return dict(state)


def pretrained_state(
    weights: Path | str | Mapping[str, torch.Tensor] | None, torchvision_weights, what: str, url: str
):
    """A state dict given in memory, as a file, or (None) torchvision's `torchvision_weights` from the hub cache;
    offline and uncached, one line naming the file to get."""
    if isinstance(weights, Mapping):
        return weights
    if weights is not None:
        return load_state_file(weights)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(torchvision_weights.url).name
    fetch = not cached.is_file()
    try:
        # torch.hub prints its own "Downloading: ..." line to stdout, even offline right before failing; the CLI
        # then prints one line: the error below, or on success the log line after it.
        with contextlib.redirect_stdout(io.StringIO()):
            state = torchvision_weights.get_state_dict(progress=False)
    except (OSError, RuntimeError) as error:  # URLError is an OSError
        raise InputError(
            f"{what} are not in the torch hub cache and cannot be downloaded ({error}); "
            f"download {url} and give the file"
        ) from error
    if fetch:
        logger.info("downloaded %s to %s", torchvision_weights.url, cached)
    return state


def _load_strict(net: nn.Module, state: Mapping[str, torch.Tensor], *, what: str) -> None:
    expected, given = set(net.state_dict()), set(state)
    if expected != given:
        missing, unexpected = sorted(expected - given), sorted(given - expected)
        raise InputError(
            f"{what} weights do not fit: {len(missing)} missing keys (first {missing[:3]}), "
            f"{len(unexpected)} unexpected keys (first {unexpected[:3]})"
        )
    try:
        net.load_state_dict(state)
    except RuntimeError as error:
        raise InputError(f"{what} weights do not fit: {str(error).splitlines()[-1].strip()}") from error


# ------------------------------------------------------------------------------------------------------ statistics


@dataclass(frozen=True)
class StatsKey:
    """What a set of FID statistics was computed from; two statistics are comparable only if these agree."""

    set_name: str
    set_fingerprint: str
    image_size: tuple[int, int]
    feature: str
    protocol: str = PROTOCOL_VERSION

    def differences(self, other: StatsKey) -> list[str]:
        """Human-readable list of what differs, `self` being the file and `other` what is expected."""
        labels = {
            "set_name": "set",
            "set_fingerprint": "set file list",
            "image_size": "image size",
            "feature": "feature network",
            "protocol": "protocol",
        }
        out = []
        for field in fields(self):
            mine, theirs = getattr(self, field.name), getattr(other, field.name)
            if mine != theirs:
                if field.name == "image_size":
                    mine, theirs = format_size(mine), format_size(theirs)
                out.append(f"{labels[field.name]} {mine!r} in the file, {theirs!r} expected")
        return out

    def to_metadata(self) -> dict[str, str]:
        return {
            "set_name": self.set_name,
            "set_fingerprint": self.set_fingerprint,
            "image_size": format_size(self.image_size),
            "feature": self.feature,
            "protocol": self.protocol,
        }

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str]) -> StatsKey:
        return cls(
            set_name=metadata["set_name"],
            set_fingerprint=metadata["set_fingerprint"],
            image_size=parse_size(metadata["image_size"]),
            feature=metadata["feature"],
            protocol=metadata["protocol"],
        )


@dataclass(frozen=True)
class FeatureStats:
    """Gaussian statistics of a set's features: mean (D,), covariance (D, D) (unbiased, as np.cov), count."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int
    key: StatsKey


def fingerprint_names(names: Iterable[str]) -> str:
    """Order-independent fingerprint of a set's file names (relative paths): 'n=<count>:<sha256 prefix>'."""
    ordered = sorted(names)
    digest = hashlib.sha256("\n".join(ordered).encode()).hexdigest()[:16]
    return f"n={len(ordered)}:{digest}"


def save_stats(stats: FeatureStats, path: Path | str) -> None:
    """Write statistics to a safetensors file (float64 mu/sigma, key and count in the metadata), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": _STATS_FORMAT, "count": str(stats.count), **stats.key.to_metadata()}
    tensors = {
        "mu": np.ascontiguousarray(stats.mu, dtype=np.float64),
        "sigma": np.ascontiguousarray(stats.sigma, dtype=np.float64),
    }
    partial = path.with_name(path.name + f".partial-{os.getpid()}")
    save_file(tensors, str(partial), metadata=metadata)
    partial.replace(path)


def load_stats(path: Path | str, expected: StatsKey | None = None) -> FeatureStats:
    """Read statistics written by `save_stats`; with `expected`, raise `InputError` naming every difference."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"FID statistics file {path} does not exist")
    try:
        with safe_open(str(path), framework="np") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != _STATS_FORMAT:
                raise InputError(f"{path} is not an xmdpt FID statistics file (format {metadata.get('format')!r})")
            mu, sigma = handle.get_tensor("mu"), handle.get_tensor("sigma")
    except (SafetensorError, OSError) as error:
        raise InputError(f"FID statistics file {path} cannot be read: {error}") from error
    key = StatsKey.from_metadata(metadata)
    if expected is not None and key != expected:
        raise InputError(
            f"FID statistics file {path} does not match this evaluation: {'; '.join(key.differences(expected))} "
            "(delete it to recompute, or give the right file)"
        )
    return FeatureStats(mu=mu, sigma=sigma, count=int(metadata["count"]), key=key)


def default_stats_path(cache_dir: Path | str, key: StatsKey) -> Path:
    """A cache file name that spells out the key: fid-stats_<set>_<HxW>_<feature>.safetensors."""

    def slug(text: str) -> str:
        return re.sub(r"[^A-Za-z0-9.@-]+", "-", text).strip("-")

    return (
        Path(cache_dir)
        / f"fid-stats_{slug(key.set_name)}_{format_size(key.image_size)}_{slug(key.feature)}.safetensors"
    )


class FeatureAccumulator:
    """Running float64 sums of features (sum and sum of outer products), so a whole set need not stay in memory.

    The covariance is the unbiased one, (S2 - n mu mu^T) / (n - 1), equal to np.cov of the stacked features.
    """

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.count = 0
        self._sum = torch.zeros(dim, dtype=torch.float64)
        self._outer = torch.zeros(dim, dim, dtype=torch.float64)

    def update(self, features: torch.Tensor) -> None:
        """Add a batch of features (B, dim)."""
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise InputError(f"features must be (B, {self.dim}), got {tuple(features.shape)}")
        batch = features.detach().to("cpu", torch.float64)
        self._sum += batch.sum(dim=0)
        self._outer += batch.T @ batch
        self.count += batch.shape[0]

    def stats(self, key: StatsKey) -> FeatureStats:
        if self.count < 2:
            raise InputError(f"FID needs at least 2 images per set, got {self.count} for {key.set_name!r}")
        mu = self._sum / self.count
        sigma = (self._outer - self.count * torch.outer(mu, mu)) / (self.count - 1)
        return FeatureStats(mu=mu.numpy(), sigma=sigma.numpy(), count=self.count, key=key)


@torch.inference_mode()
def extract_features(extractor: FeatureExtractor, images: torch.Tensor) -> torch.Tensor:
    """Features of a uint8 batch (B, 3, H, W) on the extractor's device, returned on the CPU as float32."""
    device = next(iter(extractor.parameters()), torch.empty(0)).device
    return extractor(images.to(device)).float().cpu()


def real_set_stats(
    paths: Sequence[Path | str],
    *,
    set_name: str,
    image_size: tuple[int, int],
    extractor: FeatureExtractor,
    cache_path: Path | str | None = None,
    root: Path | str | None = None,
    batch_size: int = 50,
    num_workers: int = 0,
    progress: bool = True,
) -> FeatureStats:
    """Statistics of a real image set (the whole training set, by the protocol), computed once and cached.

    Images are read with the protocol's real-image path (PIL bicubic to `image_size`, uint8). The set is identified
    by `set_name` and the fingerprint of its file names (relative to `root` if given, else base names). If
    `cache_path` exists it is loaded and must match (set, size, feature network, protocol), else `InputError`;
    if it does not exist the statistics are computed and written there. `num_workers` > 0 decodes and resizes
    images in DataLoader worker processes (the DeepFashion training set is about 100k images).
    """
    if not paths:
        raise InputError(f"real set {set_name!r} has no images")
    try:
        names = [Path(p).relative_to(root).as_posix() if root is not None else Path(p).name for p in paths]
    except ValueError as error:
        raise InputError(f"real set {set_name!r}: {error}") from error
    key = StatsKey(
        set_name=set_name,
        set_fingerprint=fingerprint_names(names),
        image_size=tuple(image_size),
        feature=extractor.identity,
    )
    if cache_path is not None and Path(cache_path).exists():
        logger.info("FID statistics of %s from %s", set_name, cache_path)
        return load_stats(cache_path, expected=key)
    accumulator = FeatureAccumulator(extractor.dim)
    loader = DataLoader(_RealImages(paths, key.image_size), batch_size=batch_size, num_workers=num_workers)
    batches = iter(loader)
    try:
        for images in tqdm(batches, total=len(loader), desc=f"FID {set_name}", unit="batch", disable=not progress):
            accumulator.update(extract_features(extractor, images))
    except InputError as error:
        if num_workers == 0:
            raise
        # A worker's error comes back with its whole traceback in the message; keep the one line that names the file.
        raise InputError(str(error).strip().splitlines()[-1].split("InputError: ", 1)[-1]) from None
    finally:
        # Drop the iterator now so its worker processes stop even while a traceback keeps this frame alive.
        del batches
    stats = accumulator.stats(key)
    if cache_path is not None:
        save_stats(stats, cache_path)
        logger.info("wrote FID statistics of %s (%d images) to %s", set_name, stats.count, cache_path)
    return stats


class _RealImages(Dataset):
    """Real images through the protocol reader, for a DataLoader."""

    def __init__(self, paths: Sequence[Path | str], size: tuple[int, int]) -> None:
        self.paths, self.size = list(paths), size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return load_real_image(self.paths[index], self.size)


# ------------------------------------------------------------------------------------------------ Frechet distance


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, *, eps: float = 1e-6
) -> float:
    """||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2)), in float64.

    sqrtm is `scipy.linalg.sqrtm` (Schur method) as in the TTUR reference code copied by GFLA/PIDM/CFLD: if the
    product is singular (non-finite root) eps is added to both diagonals; an imaginary part above 1e-3 on the
    diagonal raises, a smaller one is dropped. (An eigenvalue form, sum(sqrt(eig(sigma1 sigma2))), as torchmetrics
    uses, gives the same trace up to rounding; tests check both against a closed form.)
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0],) * 2:
        raise InputError(
            f"FID statistics have different dimensions: mean {mu1.shape} vs {mu2.shape}, "
            f"covariance {sigma1.shape} vs {sigma2.shape}"
        )
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        logger.warning("FID: singular product of covariances; adding %g to the diagonals", eps)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: imaginary component {np.max(np.abs(covmean.imag)):.3g} in sqrtm(sigma1 sigma2)")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def fid_from_stats(real: FeatureStats, generated: FeatureStats) -> float:
    """FID between two statistics, after checking they share image size, feature network and protocol."""
    checks = [
        ("image size", format_size(real.key.image_size), format_size(generated.key.image_size)),
        ("feature network", real.key.feature, generated.key.feature),
        ("protocol", real.key.protocol, generated.key.protocol),
    ]
    differences = [f"{label} {a!r} for the real set, {b!r} for the generated" for label, a, b in checks if a != b]
    if differences:
        raise InputError("real and generated FID statistics are not comparable: " + "; ".join(differences))
    return frechet_distance(real.mu, real.sigma, generated.mu, generated.sigma)
