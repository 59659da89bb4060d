"""A run's test results on disk: every test image's score, anomaly map and ground-truth mask.

Training writes them once next to the model (:data:`RESULTS_FILE`), so the dashboard, the report and the
CLI read maps instead of re-scoring the test set on every view. Maps are stored as float16 (half the size;
their 3 significant digits are far finer than any colour scale) and masks as packed bits. Everything is
in the model's input frame (after resize and crop), where the maps were computed.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .data import Preprocess, Sample, image_size, read_image
from .files import save_arrays
from .rules import Decision, DefectRules, decide
from .thresholds import ScoreDistribution

RESULTS_FILE = "test_results.npz"


@dataclass(frozen=True)
class RunResults:
    """Read-only arrays (writes raise), so one copy can be shared by every dashboard session."""
    paths: tuple[str, ...]
    labels: np.ndarray        # (N,) 0 normal, 1 anomalous
    defects: tuple[str, ...]  # "good" for normal images
    scores: np.ndarray        # (N,) float32 image scores
    maps: np.ndarray          # (N, H, W) float16 anomaly maps, never rescaled per image
    masks: np.ndarray         # (N, H, W) bool ground truth (all False where there is none)
    has_mask: np.ndarray      # (N,) bool: False for anomalous images without a usable mask
    preprocess: Preprocess

    def __post_init__(self):
        for array in (self.labels, self.scores, self.maps, self.masks, self.has_mask):
            array.flags.writeable = False

    def __len__(self) -> int:
        return len(self.paths)

    def name(self, i: int) -> str:
        """A short display name: defect folder and file name."""
        return f"{self.defects[i]}/{Path(self.paths[i]).name}"

    def frame(self, i: int) -> np.ndarray:
        """Test image i resized and cropped exactly as the model saw it (HxWx3 uint8)."""
        return self.preprocess.image_to_frame(read_image(self.paths[i]))

    def map(self, i: int) -> np.ndarray:
        return self.maps[i].astype(np.float32)

    def mask(self, i: int) -> np.ndarray | None:
        return self.masks[i] if self.has_mask[i] else None

    def image_distribution(self) -> ScoreDistribution:
        return ScoreDistribution.from_scores(self.labels, self.scores)

    def pixel_distribution(self) -> ScoreDistribution | None:
        """None when no image has a ground-truth mask to judge pixels by."""
        if not self.has_mask.any():
            return None
        return ScoreDistribution.from_maps(self.maps, [self.mask(i) for i in range(len(self))])

    def colour_scale(self) -> tuple[float, float]:
        return colour_scale(self.maps, self.labels)

    def decide(self, i: int, threshold: float, review: float | None = None, pixel_threshold: float | None = None,
               rules: DefectRules | None = None) -> Decision:
        """Test image i's verdict and the rule that decided it (core.rules.decide on its map in the model
        frame; areas and positions in the image's own pixels)."""
        with_rules = rules is not None and not rules.empty and pixel_threshold is not None
        return decide(float(self.scores[i]), self.map(i), threshold, review, pixel_threshold, rules, self.preprocess,
                      image_size(self.paths[i]) if with_rules else None)


def colour_scale(maps: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(vmin, vmax) shared by every heatmap of a run.

    vmin is the 1st percentile of all map values (the background of a good part is dark). vmax is the
    99.9th percentile, but at least twice the distance from vmin to the 99.9th percentile of the normal
    images alone: a test set without defects then shows its worst normal pixels at mid-scale, not as
    glowing defects.
    """
    sample = np.asarray(maps[:, ::4, ::4], dtype=np.float32)    # quantiles of a 1/16 sample are plenty
    vmin = float(np.quantile(sample, 0.01))
    vmax = float(np.quantile(sample, 0.999))
    normal = sample[np.asarray(labels) == 0]
    if normal.size:
        vmax = max(vmax, vmin + 2 * (float(np.quantile(normal, 0.999)) - vmin))
    return vmin, vmax if vmax > vmin else vmin + 1.0


def save_results(folder: str | Path, samples: Sequence[Sample], evaluation, preprocess: Preprocess) -> Path:
    """Write an evaluation (see :func:`core.pipeline.evaluate`) of ``samples`` into a model folder."""
    hw = evaluation.maps.shape[-2:]
    has_mask = np.array([m is not None for m in evaluation.masks], dtype=bool)
    masks = np.stack([np.zeros(hw, bool) if m is None else m for m in evaluation.masks])
    meta = {"paths": [str(s.path) for s in samples], "defects": [s.defect for s in samples],
            "preprocess": preprocess.to_dict()}
    return save_arrays(Path(folder) / RESULTS_FILE, labels=np.asarray(evaluation.labels, np.int64),
                       scores=np.asarray(evaluation.scores, np.float32), maps=evaluation.maps.astype(np.float16),
                       masks=np.packbits(masks, axis=-1), has_mask=has_mask, meta=np.array(json.dumps(meta)))


def load_results(folder: str | Path) -> RunResults | None:
    """The results saved in a model folder, or None if it has none (e.g. a run without a test set)."""
    path = Path(folder) / RESULTS_FILE
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(str(data["meta"]))
        maps = data["maps"]
        masks = np.unpackbits(data["masks"], axis=-1, count=maps.shape[-1]).astype(bool)
        return RunResults(tuple(meta["paths"]), data["labels"], tuple(meta["defects"]), data["scores"], maps,
                          masks, data["has_mask"], Preprocess.from_dict(meta["preprocess"]))
