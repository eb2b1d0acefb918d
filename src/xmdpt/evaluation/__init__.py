"""Evaluation under the PIDM/CFLD protocol: preprocessing, FID, SSIM, LPIPS, PSNR, L1, colour fidelity.

`protocol` has the order of operations, `fid` the feature networks, statistics files and Frechet distance, and
`metrics` the per-pair scores and the `PairMetrics` accumulator. All metric inputs are uint8 images at the
evaluation size; model outputs in [-1, 1] go through `model_output_to_uint8` first.

How this maps onto the published scripts (CFLD: `pose_transfer_test.py`, `models/metrics.py`,
`datasets/deepfashion.py`; PIDM: `utils/gen.py`, `utils/metrics.py` with GFLA's `script/inception.py`):

* Generated images: ours = CFLD. [-1, 1] -> [0, 1], clamp, bicubic antialiased resize in float to the evaluation
  size, x 255, clamp, truncate to uint8 (CFLD scores these in memory; we write them as PNG, which is lossless).
  PIDM truncates to uint8 at the model's 256x256 first, saves PNG, and resizes at scoring time with
  cv2.resize (bilinear, float, not re-quantised) to 176x256 for FID and LPIPS: quantise-then-resize.
* Real images: ours = CFLD: PIL bicubic to the evaluation size (a no-op for the 256x176 images), uint8.
  PIDM reads pre-made 256x256 PNGs and resizes them with cv2 bilinear.
* FID features: ours = CFLD = PIDM: torchvision inception_v3 IMAGENET1K_V1, [0, 1] input, bilinear 299,
  `transform_input`'s affine map on [0, 1], pool 2048-d; real set = the whole training set. PIDM (GFLA code) drops
  the last incomplete batch of 64 (8,512 of 8,570 test images); we score every image. PIDM caches the real
  statistics as an unkeyed `statistics.npz` in the image folder; ours are keyed by set, size, network and protocol.
* Frechet distance: the same TTUR formula in float64 with scipy's sqrtm (singular fallback eps 1e-6).
* SSIM: data_range 1, win_size 51, uniform window, on [0, 1] float32 (CFLD: channel_axis=0; PIDM: multichannel
  HWC; identical). SSIM_256: x 255, gaussian sigma 1.5, use_sample_covariance False, data_range = pred range, as
  CFLD and GFLA; PIDM's copy of the script uses sigma 1.2, and scores SSIM/PSNR on the files as read, without
  the 176-wide resize its FID and LPIPS get (256x256 in its `__main__`).
* LPIPS: lpips AlexNet v0.1 on [0, 1] with normalize=True (PIDM: the same on x / 127.5 - 1; drops the last batch).
* PSNR: data_range 1. L1: mean |pred - target| on [0, 1] (GFLA/PIDM `compare_l1`).
* Second FID: TF-Inception weights through torch-fidelity (its TF1-compatible bilinear resize to 299), on the same
  uint8 images: comparable with torch-fidelity's numbers; pytorch-fid (torch bilinear) and clean-fid (PIL bicubic)
  resize to 299 differently and can differ slightly.

Offline weights (nothing is downloaded when a file is given; None means torch's hub cache, downloading if online):

* torchvision Inception-v3: `inception_v3_google-0cc3c7bd.pth`
  (https://download.pytorch.org/models/inception_v3_google-0cc3c7bd.pth) -> `InceptionV3Features(weights=path)`.
* TF-Inception: `pt_inception-2015-12-05-6726825d.pth` (pytorch-fid's release; torch-fidelity's
  `weights-inception-2015-12-05-6726825d.pth` has the same layout) -> `TFInceptionFeatures(weights=path)`.
* LPIPS backbone: `alexnet-owt-7be5be79.pth` (https://download.pytorch.org/models/alexnet-owt-7be5be79.pth)
  -> `LPIPSMetric(alexnet_weights=path)`; the linear heads ship inside the lpips wheel.
* Or copy the files into `$TORCH_HOME/hub/checkpoints/` (default `~/.cache/torch/hub/checkpoints/`), the
  TF-Inception one under torch-fidelity's name `weights-inception-2015-12-05-6726825d.pth`, and pass None.
"""

from xmdpt.evaluation.fid import (
    TF_INCEPTION_FILE,
    TORCHVISION_INCEPTION_FILE,
    FeatureAccumulator,
    FeatureExtractor,
    FeatureStats,
    InceptionV3Features,
    ModuleFeatureExtractor,
    StatsKey,
    TFInceptionFeatures,
    default_stats_path,
    fid_from_stats,
    fingerprint_names,
    frechet_distance,
    load_stats,
    real_set_stats,
    save_stats,
)
from xmdpt.evaluation.metrics import (
    ALEXNET_FILE,
    HIGHER_IS_BETTER,
    PAIR_SCORES,
    SSIM_WINDOW,
    EvaluationResult,
    LPIPSMetric,
    PairMetrics,
    color_fidelity,
    l1,
    load_mask,
    match_generated_folder,
    psnr,
    ssim,
    ssim_256,
)
from xmdpt.evaluation.protocol import (
    EVAL_SIZES,
    PROTOCOL_VERSION,
    format_size,
    load_generated_image,
    load_real_image,
    model_output_to_uint8,
    parse_size,
    save_png,
    uint8_to_unit,
    unit_to_uint8,
)

__all__ = [
    "ALEXNET_FILE",
    "EVAL_SIZES",
    "HIGHER_IS_BETTER",
    "PAIR_SCORES",
    "PROTOCOL_VERSION",
    "SSIM_WINDOW",
    "TF_INCEPTION_FILE",
    "TORCHVISION_INCEPTION_FILE",
    "EvaluationResult",
    "FeatureAccumulator",
    "FeatureExtractor",
    "FeatureStats",
    "InceptionV3Features",
    "LPIPSMetric",
    "ModuleFeatureExtractor",
    "PairMetrics",
    "StatsKey",
    "TFInceptionFeatures",
    "color_fidelity",
    "default_stats_path",
    "fid_from_stats",
    "fingerprint_names",
    "format_size",
    "frechet_distance",
    "l1",
    "load_generated_image",
    "load_mask",
    "load_real_image",
    "load_stats",
    "match_generated_folder",
    "model_output_to_uint8",
    "parse_size",
    "psnr",
    "real_set_stats",
    "save_png",
    "save_stats",
    "ssim",
    "ssim_256",
    "uint8_to_unit",
    "unit_to_uint8",
]
