"""The contract every detector follows, and the registry that finds detectors by name.

A detector is configured by keyword parameters stored unchanged in `__init__` (as in scikit-learn), learns
attributes ending in `_` in `fit`, scores images into raw anomaly maps that are never rescaled per image, and
saves to one folder as `config.json` plus `fitted.safetensors`: loading never unpickles anything.
"""
from __future__ import annotations

import inspect
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Callable, ClassVar, Iterator, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..backbones import FeatureExtractor
from ..data import Preprocess, fit_frame, image_batches
from ..files import json_default
from . import calibration

# progress(stage, done, total); raising core.Cancelled from it stops the work.
Progress = Callable[[str, int, int], None]
# 2: `resize` as an int keeps the training images' aspect ratio and the fitted frame is saved; version 1
# models (an int meant a square) load with their square frame and score as before.
FORMAT_VERSION = 2
# resize="auto": the longer side follows the training images' own size within these bounds (the lower one
# is the backbones' pretraining scale; the upper one keeps CPU cost near 5x that of 224 px).
AUTO_LONG_SIDE = (256, 512)


class NotFittedError(RuntimeError):
    pass


class ModelFolderError(ValueError):
    """A saved model folder that cannot be loaded; the message names the folder and the reason."""


# The longest image side a frame may have (tiling keeps memory bounded; this bounds time and nonsense).
MAX_FRAME_SIDE = 16384


def no_progress(stage: str, done: int, total: int) -> None:
    pass


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a device: use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None


@contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """All torch randomness inside runs from `seed`; the caller's RNG state is restored afterwards, so that
    fitting a model never reseeds the caller's own random numbers."""
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(int(seed))
        yield


class SeededTraining:
    """For detectors that train networks: `_fit` runs their `_train` inside :func:`seeded` with their `seed`."""

    def _fit(self, images: Sequence[np.ndarray], progress: Progress) -> None:
        dev = resolve_device(self.device)
        with seeded(self.seed, dev):
            self._train(images, progress, dev)


@dataclass
class Prediction:
    """Scores and maps for a batch of images, maps at each image's own resolution."""
    scores: np.ndarray            # (N,) image anomaly scores
    maps: list[np.ndarray]        # N arrays of HxW float32, same scale as the scores


class Detector:
    """Base class: subclasses implement `_fit`, `_score_batch`, `_fitted_tensors` and `_restore`, and check
    their parameters in `_validate` (fit calls it)."""

    name: ClassVar[str] = ""
    family: ClassVar[str] = ""    # "representation" or "reconstruction"
    summary: ClassVar[str] = ""   # one plain sentence for people choosing a detector
    square_input: ClassVar[bool] = False  # True where the network needs a square input: the frame is square
    # Whether a small set is cross-fitted for calibration (five more fits): yes where a fit is a pass over the
    # features; detectors that train a network for minutes calibrate only on a held-out share.
    cross_fit: ClassVar[bool] = True
    # Whether the detector is meant for a handful of images (2 to 8): such a set is still calibrated.
    few_shot: ClassVar[bool] = False

    # --- parameters -------------------------------------------------------------------------------
    @classmethod
    def param_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        return [p for p in sig.parameters if p != "self"]

    def get_params(self) -> dict:
        return {p: getattr(self, p) for p in self.param_names()}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    @property
    def preprocess(self) -> Preprocess:
        """Geometry and normalisation of model inputs; subclasses with a backbone override mean/std."""
        return Preprocess(resize=self.frame(), crop=self.crop)

    def frame(self) -> tuple[int, int]:
        """(height, width) the images are resized to: fixed by `resize` or learned in fit from the images."""
        if hasattr(self, "input_frame_"):
            return self.input_frame_
        if isinstance(self.resize, (tuple, list)):
            return (int(self.resize[0]), int(self.resize[1]))
        raise NotFittedError(f"resize={self.resize!r} follows the training images' shape: fit this "
                             f"{type(self).__name__} first")

    def _fit_frame(self, sizes_hw: list[tuple[int, int]], auto_long_side: int | None = None) -> tuple[int, int]:
        """The frame for these training image sizes: an exact (h, w), or the images' aspect ratio kept with
        the longer side `resize` (an int), or for "auto" `auto_long_side` where the detector chose one from
        the data, else the images' own median longer side within AUTO_LONG_SIDE."""
        self._check_resize()
        if isinstance(self.resize, (tuple, list)):
            return (int(self.resize[0]), int(self.resize[1]))
        long_side = int(auto_long_side or native_long_side(sizes_hw)) if self.resize == "auto" else int(self.resize)
        return (long_side, long_side) if self.square_input else fit_frame(sizes_hw, long_side)

    def _check_resize(self) -> None:
        if isinstance(self.resize, (tuple, list)):
            if len(self.resize) != 2 or not all(isinstance(v, (int, np.integer)) and 1 <= v <= MAX_FRAME_SIDE
                                                for v in self.resize):
                raise ValueError(f"resize as (height, width) needs two ints from 1 to {MAX_FRAME_SIDE}, "
                                 f"not {self.resize!r}")
        elif self.resize != "auto" and not (
                isinstance(self.resize, (int, np.integer)) and not isinstance(self.resize, bool) and (
                self.resize >= 32 or self.square_input and self.resize >= 1) and self.resize <= MAX_FRAME_SIDE):
            raise ValueError(f"resize must be 'auto', a number of pixels from 32 to {MAX_FRAME_SIDE} (the longer "
                             f"side; the aspect ratio is kept) or a (height, width) pair, not {self.resize!r}")

    def check_params(self) -> "Detector":
        """Refuse a bad parameter with a ValueError that names it and its allowed values, before any work: fit
        starts with it, and the Train form calls it as the user types."""
        calibration.held_out_index(0, self.calibration_fraction, 0)
        resolve_device(getattr(self, "device", "auto"))
        self._check_resize()
        self._validate()
        return self

    def feature_extractor(self) -> FeatureExtractor | None:
        """The frozen pretrained backbone, for detectors that have one (benchmarks time it alone)."""
        return None

    def is_fitted(self) -> bool:
        return hasattr(self, "fit_info_")

    def _check_fitted(self) -> None:
        if not self.is_fitted():
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet: call fit() or load()")

    # --- training and scoring ---------------------------------------------------------------------
    def fit(self, images: Sequence[np.ndarray], progress: Progress | None = None) -> "Detector":
        """Learn normality from normal images (HxWx3 uint8 RGB arrays, any sizes)."""
        if len(images) == 0:
            raise ValueError("cannot fit on an empty set of images")
        progress = progress or no_progress
        start = time.perf_counter()
        for attr in ("fit_info_", "input_frame_", "auto_settings_", "calibration_"):   # a refit starts afresh
            self.__dict__.pop(attr, None)
        self.check_params()
        seed = int(getattr(self, "seed", 0))
        held = calibration.held_out_index(len(images), self.calibration_fraction, seed)
        fitted_on = calibration.take(images, np.setdiff1d(np.arange(len(images)), held)) if len(held) else images
        sizes = (fitted_on.sizes() if hasattr(fitted_on, "sizes")
                 else [fitted_on[i].shape[:2] for i in range(len(fitted_on))])
        try:
            self.auto_settings_ = self._auto_settings(fitted_on, sizes, progress)
            frame = self._fit_frame(sizes, self.auto_settings_.get("long_side"))
            Preprocess(resize=frame, crop=self.crop)  # refuses a crop larger than the frame before any work
            self.input_frame_ = frame
            self._fit(fitted_on, progress)
            summary = fitted_on.summary() if hasattr(fitted_on, "summary") else {"n_images": len(fitted_on)}
            self.fit_info_ = {"n_images": len(fitted_on), "training_set": summary, "input_frame_hw": list(frame),
                              "aspect_stretch": _aspect_stretch(sizes, frame)}
            if self.auto_settings_:
                self.fit_info_["auto_settings"] = self.auto_settings_
            self.calibration_ = calibration.calibrate(self, images, held, progress, seed)
        except BaseException:
            for attr in ("input_frame_", "auto_settings_", "fit_info_", "calibration_"):
                self.__dict__.pop(attr, None)
            raise
        if self.calibration_ is not None:
            self.fit_info_["calibration"] = self.calibration_.summary()
        self.fit_info_["fit_seconds"] = time.perf_counter() - start
        return self

    def fold_params(self) -> dict:
        """Parameters that fit another model like this fitted one (the frame and every choice made from the
        data fixed, no calibration of its own): the cross-fit's fold models."""
        return {**self.get_params(), "resize": tuple(self.input_frame_), "calibration_fraction": 0.0}

    def score_maps(self, images: Sequence[np.ndarray], progress: Progress | None = None,
                   batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
        """Image scores (N,) and anomaly maps (N, H, W) in the model's input frame (after resize and crop)."""
        self._check_fitted()
        progress = progress or no_progress
        scores, maps = [], []
        for start, batch in image_batches(images, batch_size):
            s, m = self.score_tensor(self.preprocess.images_to_tensor(batch))
            scores.append(s)
            maps.append(m)
            progress("score", start + len(batch), len(images))
        return np.concatenate(scores), np.concatenate(maps)

    @torch.no_grad()
    def score_tensor(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Scores and maps of an already preprocessed batch (N, 3, H, W)."""
        self._check_fitted()
        return self._score_batch(x)

    def predict(self, images: Sequence[np.ndarray], batch_size: int = 16) -> Prediction:
        """Scores and anomaly maps at each input image's own resolution."""
        scores, maps = self.score_maps(images, batch_size=batch_size)
        sizes = [images[i].shape[:2] for i in range(len(images))]
        return Prediction(scores, [self.preprocess.map_to_input(m, hw) for m, hw in zip(maps, sizes)])

    def model_card(self) -> dict:
        self._check_fitted()
        return {"detector": self.name, "family": self.family, "params": self.get_params(),
                **self.fit_info_, **self._card_extra()}

    # --- persistence ------------------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        """Write config.json and fitted.safetensors atomically: a crash leaves the old folder or none."""
        self._check_fitted()
        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            tensors = {k: v.detach().cpu().contiguous() for k, v in self._fitted_tensors().items()}
            config = {"format_version": FORMAT_VERSION, "detector": self.name, "params": self.get_params(),
                      "input_frame": list(self.input_frame_), "fit_info": self.fit_info_,
                      "fitted": self._fitted_json(), "card": self.model_card()}
            cal = getattr(self, "calibration_", None)
            if cal is not None:
                tensors[calibration.CALIBRATION_SCORES] = torch.from_numpy(cal.scores)
                tensors[calibration.SYNTHETIC_SCORES] = torch.from_numpy(cal.synthetic_scores)
                if cal.maps is not None:
                    tensors[calibration.CALIBRATION_MAPS] = torch.from_numpy(cal.maps)
                config["calibration"] = cal.to_json()
            save_file(tensors, tmp / "fitted.safetensors")
            (tmp / "config.json").write_text(json.dumps(config, indent=2, default=json_default))
            if folder.exists():
                old = folder.with_name(f".{folder.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(folder, old)
                os.replace(tmp, folder)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "Detector":
        """A saved model. The folder is untrusted input: whatever is wrong with it (missing, cut short,
        edited, from another program) is one ModelFolderError naming the folder and the reason."""
        folder = Path(folder)
        try:
            return cls._load(folder)
        except ModelFolderError:
            raise
        except FileNotFoundError as exc:
            raise ModelFolderError(f"{folder}: not a saved model ({Path(exc.filename or '').name or exc} is "
                                   "missing)") from None
        except Exception as exc:  # noqa: BLE001 - any parse or shape failure is a damaged folder, not a crash
            raise ModelFolderError(f"{folder}: the saved model is damaged or not AnomalyScope's "
                                   f"({type(exc).__name__}: {str(exc)[:200]}); train it again or restore a good "
                                   "copy") from None

    @classmethod
    def _load(cls, folder: Path) -> "Detector":
        config = json.loads((folder / "config.json").read_text())
        version = config.get("format_version")
        if version not in (1, FORMAT_VERSION):
            raise ValueError(f"{folder}: unsupported model format {version!r}")
        if cls is Detector:
            cls = get_detector_class(config["detector"])
        elif config["detector"] != cls.name:
            raise ValueError(f"{folder} holds a {config['detector']!r} model, not {cls.name!r}")
        params = {k: tuple(v) if isinstance(v, list) else v for k, v in config["params"].items()}
        if version == 1:  # an int resize meant a square then
            params["resize"] = (int(params["resize"]),) * 2
            config["input_frame"] = list(params["resize"])
        det = create_detector(cls.name, **params)   # unknown or non-finite parameters are refused by name
        det.input_frame_ = tuple(int(v) for v in config["input_frame"])
        if len(det.input_frame_) != 2 or not all(1 <= v <= MAX_FRAME_SIDE for v in det.input_frame_):
            raise ModelFolderError(f"{folder}: input frame {config['input_frame']!r} is not a plausible image size")
        tensors = load_file(folder / "fitted.safetensors")
        for key, value in tensors.items():
            if value.is_floating_point() and not torch.isfinite(value).all():
                # A NaN in a memory bank or a statistic turns every score into NaN: refuse the model.
                raise ModelFolderError(f"{folder}: the fitted tensor {key!r} holds NaN or infinite values; the "
                                       f"model file is damaged: train the model again or restore a good copy")
        det.calibration_ = None   # models saved before calibration existed have none
        if "calibration" in config:
            det.calibration_ = calibration.Calibration.from_saved(config["calibration"],
                                                                  tensors.pop(calibration.CALIBRATION_SCORES),
                                                                  tensors.pop(calibration.SYNTHETIC_SCORES),
                                                                  tensors.pop(calibration.CALIBRATION_MAPS, None))
        det._restore(tensors, config["fitted"])
        det.fit_info_ = config["fit_info"]
        return det

    # --- for subclasses ---------------------------------------------------------------------------
    def _require_positive(self, *names: str) -> None:
        """Raise a ValueError naming the first of these integer parameters that is below 1."""
        for name in names:
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def _validate(self) -> None:
        """Check the parameters, once, when `fit` starts (before any work); raise a ValueError naming the bad one."""

    def _auto_settings(self, images: Sequence[np.ndarray], sizes_hw: list[tuple[int, int]],
                       progress: Progress) -> dict:
        """Settings chosen from the training images for parameters left at "auto" (with the evidence), run
        before the frame is fixed; {} where the detector chooses nothing from the data. A "long_side" key
        sets the frame's longer side for resize="auto"."""
        return {}

    def _fit(self, images: Sequence[np.ndarray], progress: Progress) -> None:
        raise NotImplementedError

    def _score_batch(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        scores, maps = self.score_graph(x)
        return scores.cpu().numpy(), maps.cpu().numpy().astype(np.float32)

    def score_graph(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores (N,) and maps (N, H, W) of a preprocessed batch in torch operations only: the graph an
        export traces (core.line.export). Detectors that score through another library override
        `_score_batch` as well, and give here the same computation written in torch."""
        raise NotImplementedError(f"{type(self).__name__} has no torch-only scoring graph to export")

    def _fitted_tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _fitted_json(self) -> dict:
        return {}

    def _restore(self, tensors: dict[str, torch.Tensor], fitted: dict) -> None:
        raise NotImplementedError

    def _card_extra(self) -> dict:
        return {}


class BackboneDetector(Detector):
    """A detector on a frozen pretrained backbone; subclasses store `backbone`, `stages` and `weights`."""

    def feature_extractor(self) -> FeatureExtractor:
        # Built lazily and never saved: the weights come from the backbone's own package or file.
        if getattr(self, "_extractor", None) is None:
            self._extractor = FeatureExtractor(self.backbone, tuple(self.stages), self.weights)
            self._extractor.to(resolve_device(self.device))
        return self._extractor

    @property
    def preprocess(self) -> Preprocess:
        extractor = self.feature_extractor()
        return Preprocess(resize=self.frame(), crop=self.crop, mean=extractor.mean, std=extractor.std)

    def model_card(self) -> dict:
        """The card, with the backbone block every backbone detector shows; a subclass's own "backbone" entries
        (a note on what stands in for the paper's backbone) are added to it."""
        card = super().model_card()
        ex = self.feature_extractor()
        card["backbone"] = {"name": self.backbone, "stages": list(self.stages), "channels": list(ex.channels),
                            "strides": list(ex.strides), **card.get("backbone", {})}
        return card

    def _require_stages(self) -> None:
        if len(self.stages) < 1:
            raise ValueError("stages must name at least one backbone stage")

    def backbone_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The chosen stages' feature maps of a preprocessed batch, on the detector's device."""
        return self.feature_extractor()(x.to(resolve_device(self.device)))


def store_params(obj, params: dict) -> None:
    """Every detector's __init__ body: store each parameter unchanged (scikit-learn's rule: no checks and no
    derived values here; `_validate` checks them when `fit` runs)."""
    for k, v in params.items():
        if k not in ("self", "__class__"):
            setattr(obj, k, v)


def native_long_side(sizes_hw) -> int:
    """The training images' median longer side, rounded to the stride 32 and kept within AUTO_LONG_SIDE."""
    native = int(np.median([max(hw) for hw in sizes_hw]))
    return int(np.clip(round(native / 32) * 32, *AUTO_LONG_SIDE))


def _aspect_stretch(sizes_hw, frame: tuple[int, int]) -> float:
    """How far the frame stretches the training images at worst: 1.0 when every aspect ratio is kept."""
    target = frame[1] / frame[0]
    return float(max(max(w / h / target, target * h / w) for h, w in sizes_hw))


# --- registry ---------------------------------------------------------------------------------------
_DETECTORS: dict[str, type[Detector]] = {}


def register_detector(name: str, family: str, summary: str = ""):
    """Register a detector class by name; `summary` says in one plain sentence what it does and when to use it
    (the Train form shows it)."""
    def add(cls: type[Detector]) -> type[Detector]:
        if name in _DETECTORS:
            raise ValueError(f"detector {name!r} already registered by {_DETECTORS[name].__module__}")
        cls.name, cls.family, cls.summary = name, family, summary
        _DETECTORS[name] = cls
        return cls
    return add


def list_detectors(pattern: str = "*") -> list[str]:
    return sorted(n for n in _DETECTORS if fnmatch(n, pattern))


def get_detector_class(name: str) -> type[Detector]:
    if name not in _DETECTORS:
        raise KeyError(f"unknown detector {name!r}; known: {', '.join(list_detectors())}")
    return _DETECTORS[name]


def create_detector(name: str, **params) -> Detector:
    cls = get_detector_class(name)
    unknown = sorted(set(params) - set(cls.param_names()))
    if unknown:
        raise ValueError(f"{name} has no parameter {', '.join(map(repr, unknown))}; "
                         f"its parameters: {', '.join(cls.param_names())}")
    for key, value in params.items():
        if isinstance(value, (float, np.floating)) and not np.isfinite(value):
            raise ValueError(f"{name} parameter {key!r} must be a finite number, not {value!r}")
    return cls(**params)


def load_detector(folder: str | Path) -> Detector:
    return Detector.load(folder)
