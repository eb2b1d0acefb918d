"""A pre-computed cache of the frozen parts' outputs, so that the VAE and DINOv2 do not run every epoch.

For every training image and both orientations (the flip augmentation), the cache holds the VAE posterior's mean and
standard deviation (a fresh latent is still sampled every step, as published), the reference encoder's features of
the image and the pose encoder's features of its rendered skeleton, in float16 safetensors shards. The reference/
target swap and the flip stay random per step; the random scale-and-crop cannot be cached and must be off
(`data.scale=0`). Size on DeepFashion 256x176 with DINOv2 B + g: about 1.2 MB per image and orientation, about 115 GB
for the 48,674 training images; it is computed once (resumable, shard by shard) and reused by every run with the same
encoders, codec and size.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from PIL import ImageOps
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from xmdpt.conditioning import encode_features
from xmdpt.data.deepfashion import PairDataset
from xmdpt.errors import InputError
from xmdpt.pose.render import skeleton_tensor

log = logging.getLogger(__name__)
SHARD = 256  # images per shard file


def cache_key(config) -> str:
    """The cache depends on the encoders, the codec and the image size, nothing else."""
    c = config.conditioning
    parts = [c.encoder, c.pose_encoder, c.reference_encoder, str(c.public_quirks), c.codec, c.vae, str(c.pixel_factor)]
    parts.append("x".join(map(str, config.data.size)))
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:12]


def image_tensors(dataset: PairDataset, name: str, flip: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The image (3, H, W) in [-1, 1] and its rendered skeleton (3, H, W) in [0, 1], without random scaling."""
    view = dataset.load_view(name)
    height, width = dataset.image_size
    image = view.image.resize((width, height)) if view.image.size != (width, height) else view.image
    pose = view.pose.resized(height, width)
    if flip:
        image, pose = ImageOps.mirror(image), pose.flipped()
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
    return pixels, skeleton_tensor(pose)


@torch.no_grad()
def build_cache(dataset: PairDataset, folder: Path, codec, pose_encoder, reference_encoder, batch_size: int = 16):
    """Compute every shard that is not on disk yet (resumable); each shard is written atomically."""
    names = sorted({n for record in dataset.pairs for n in (*record.sources, record.target)})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "names.json").write_text(json.dumps(names))
    device = next(iter(pose_encoder.parameters())).device
    shards = range(0, len(names), SHARD)
    for start in tqdm(shards, desc="feature cache", unit="shard"):
        path = folder / f"shard_{start // SHARD:05d}.safetensors"
        if path.exists():
            continue
        tensors: dict[str, torch.Tensor] = {}
        for flip in (False, True):
            chunk = names[start : start + SHARD]
            for i in range(0, len(chunk), batch_size):
                pairs = [image_tensors(dataset, n, flip) for n in chunk[i : i + batch_size]]
                images = torch.stack([p[0] for p in pairs]).to(device)
                poses = torch.stack([p[1] for p in pairs]).to(device)
                mean, std = posterior(codec, images)
                # An image's features as a reference and its skeleton's as a target pose, by the sampler's function.
                pose_features, reference_features = encode_features(pose_encoder, reference_encoder, images, poses)
                out = {
                    "mean": mean,
                    "std": std,
                    "reference_features": reference_features,
                    "pose_features": pose_features,
                }
                for j, name in enumerate(chunk[i : i + batch_size]):
                    for key, value in out.items():
                        tensors[f"{name}|{int(flip)}|{key}"] = value[j].half().cpu().contiguous()
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file(tensors, tmp)
        os.replace(tmp, path)
    return names


def posterior(codec, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled posterior mean and standard deviation; a pixel codec is deterministic (std 0)."""
    if hasattr(codec, "vae"):
        dist = codec.vae.encode(images.to(codec.dtype)).latent_dist
        scale = codec.config.scaling_factor
        return dist.mean * scale, dist.std * scale
    latents = codec.encode(images)
    return latents, torch.zeros_like(latents)


class CachedPairs(Dataset):
    """Training pairs served from the cache: the same source choice, swap and flip as the image data set."""

    def __init__(self, dataset: PairDataset, folder: Path, target_features: bool = False):
        """target_features: also serve the target image's reference-encoder features (REPA's targets)."""
        if dataset.augment.scale > 0:
            raise InputError("the feature cache cannot hold the random scale augmentation: set data.scale=0")
        self.dataset, self.folder, self.target_features = dataset, folder, target_features
        names = json.loads((folder / "names.json").read_text())
        self.index = {name: i // SHARD for i, name in enumerate(names)}
        self._open: dict[int, object] = {}  # lazily opened shards: a tensor is read alone, not its whole shard

    def __len__(self) -> int:
        return len(self.dataset.pairs)

    def entry(self, name: str, flip: bool) -> dict[str, torch.Tensor]:
        if name not in self.index:
            raise InputError(f"{name}: not in the feature cache {self.folder}; delete the folder to rebuild it")
        shard = self.index[name]
        if shard not in self._open:
            self._open[shard] = safe_open(str(self.folder / f"shard_{shard:05d}.safetensors"), "pt")
        handle = self._open[shard]
        keys = ("mean", "std", "reference_features", "pose_features")
        return {k: handle.get_tensor(f"{name}|{int(flip)}|{k}").float() for k in keys}

    def __getitem__(self, index: int) -> dict:
        record = self.dataset.pairs[index]
        aug = self.dataset.augment
        source = record.sources[int(torch.randint(len(record.sources), ()))]
        names = [source, record.target]
        if aug.swap and torch.rand(()) < 0.5:
            names.reverse()
        flip = aug.flip and bool(torch.rand(()) < 0.5)
        reference, target = self.entry(names[0], flip), self.entry(names[1], flip)
        item = {
            "reference_latent": reference["mean"],
            "reference_latent_std": reference["std"],
            "reference_features": reference["reference_features"],
            "target_latent_mean": target["mean"],
            "target_latent_std": target["std"],
            "pose_features": target["pose_features"],
        }
        if self.target_features:  # every image's reference-encoder features are cached: REPA's costs no encoder pass
            item["target_features"] = target["reference_features"]
        return item
