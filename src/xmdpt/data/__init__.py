"""Data: safe image loading, pair data sets (DeepFashion, Market-1501, folders), preparation, a synthetic set."""

from xmdpt.data.deepfashion import (
    Augment,
    CsvPairs,
    FolderPairs,
    PairDataset,
    PidmPairs,
    deepfashion_csv,
    market1501,
)
from xmdpt.data.images import load_image

__all__ = [
    "Augment",
    "CsvPairs",
    "FolderPairs",
    "PairDataset",
    "PidmPairs",
    "deepfashion_csv",
    "load_image",
    "market1501",
]
