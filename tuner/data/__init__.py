"""The shared captioned-image data pipeline: sources, checks, buckets, captions, caches and batches.

Public API: `build_training_data(config, parts, needs)` -> `TrainingData` (batches, report, holdout), and
`check_data(config)` -> `DataReport` (what `tuner check-data` prints, via `check_data_main`).
"""

from tuner.data.build import build_training_data
from tuner.data.check import check_data, check_data_main
from tuner.data.loader import HeldOutExample, TrainingData
from tuner.data.report import DataReport, FileRecord

__all__ = [
    "DataReport",
    "FileRecord",
    "HeldOutExample",
    "TrainingData",
    "build_training_data",
    "check_data",
    "check_data_main",
]
