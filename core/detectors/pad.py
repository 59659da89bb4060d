"""PAD: pose-agnostic inspection (after Zhou et al., "PAD: A Dataset and Benchmark for Pose-agnostic Anomaly
Detection", NeurIPS 2023; reference code EricLee0224/PAD).

A detector that memorised one pose calls every other pose a defect. PAD's answer is to compare the test image
with a normal view of the object *in the same pose*: it fits a NeRF of the object to the training views,
estimates the test image's camera pose, renders the normal object at that pose and compares the two locally.

Built here without a NeRF (the retrieval-plus-alignment path of the same idea, which runs in CPU seconds):

1. Global retrieval: every training view is described by the pooled (position-free, so roughly roll-invariant)
   unit-norm features of its backbone stages; a test image retrieves the `n_candidates` most similar views.
2. Alignment: each candidate is registered to the test image, by local-feature matches (SIFT, ratio test) and a
   RANSAC homography, and by a search over in-plane rotations refined with ECC (an affine fit on intensities);
   the better of the two by normalised cross-correlation wins, and the `n_references` best-aligned candidates
   are kept. This stands in for PAD's pose estimation plus rendering at that pose.
3. Local comparison: each reference, warped into the test image's frame, goes through the backbone; every test
   patch takes its cosine distance to the nearest patch of the aligned references within a small window (CPR's
   local retrieval), per stage; maps are upsampled, summed and blurred. Positions no warped reference covers
   (warped-in padding) score 0, so an image border brought in by a rotation is never a defect.

The image score is the mean of the highest `top_share` of the map, as CPR's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ..backbones import DEFAULT_BACKBONE
from ..data import image_batches
from .base import BackboneDetector, Progress, register_detector, store_params
from .cpr import window_min_distance
from .ops import upsample_blur

ALIGNMENTS = ("auto", "features", "rotation", "none")
# Alignment works on grey images with this longer side (rotation search, ECC, the quality measure): enough
# for an object's silhouette and large parts, cheap enough for a few candidates per test image.
WORK_SIDE = 96
ROTATION_STEP_DEGREES = 10
# Lowe's ratio test, the RANSAC reprojection tolerance (px at the model frame), and the most a homography may
# scale or squash the reference (a fit beyond it is a wrong match, not a pose).
RATIO, RANSAC_PX, MAX_SCALE = 0.75, 4.0, 3.0
ECC_ITERATIONS, ECC_EPS = 60, 1e-4
# A warped reference's pixels this close to its edge are not trusted: the backbone sees the replicated border.
VALID_ERODE_PX = 4


@dataclass
class AlignedReference:
    """A training view registered to a test image."""
    index: int                  # the training view (its position among the fitted images)
    homography: np.ndarray      # 3x3, reference pixel coordinates -> test pixel coordinates (model frame)
    quality: float              # normalised cross-correlation of the warped reference with the test image
    method: str                 # "features", "rotation" or "none"
    view: np.ndarray            # HxWx3 uint8: the training view as it was fitted
    warped: np.ndarray          # HxWx3 uint8: the view turned into the test image's pose and frame
    valid: np.ndarray           # HxW bool: where the warped reference holds real pixels


def _grey(frame: np.ndarray, side: int) -> tuple[np.ndarray, float]:
    """Float32 grey image with longer side `side`, blurred a little, and the scale from the frame to it."""
    scale = side / max(frame.shape[:2])
    small = cv2.resize(frame, (max(1, round(frame.shape[1] * scale)), max(1, round(frame.shape[0] * scale))),
                       interpolation=cv2.INTER_AREA)
    grey = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0
    return cv2.GaussianBlur(grey, (0, 0), 1.0), scale


def _ncc(a: np.ndarray, b: np.ndarray, valid: np.ndarray) -> float:
    """Normalised cross-correlation of two grey images over the valid pixels (-1 to 1; -1 if too few)."""
    if valid.sum() < 16:
        return -1.0
    x, y = a[valid] - a[valid].mean(), b[valid] - b[valid].mean()
    return float((x * y).sum() / (np.sqrt((x * x).sum() * (y * y).sum()) + 1e-8))


def _warp_quality(reference: np.ndarray, target: np.ndarray, homography: np.ndarray) -> float:
    """How well `homography` (at this working scale) maps the grey reference onto the grey target."""
    h, w = target.shape
    warped = cv2.warpPerspective(reference, homography, (w, h), flags=cv2.INTER_LINEAR)
    valid = cv2.warpPerspective(np.ones_like(reference), homography, (w, h), flags=cv2.INTER_NEAREST) > 0
    return _ncc(warped, target, valid)


def _plausible(homography: np.ndarray) -> bool:
    """A homography that a pose change could give: finite, orientation kept, neither scale beyond MAX_SCALE."""
    if homography is None or not np.isfinite(homography).all():
        return False
    singular = np.linalg.svd(homography[:2, :2] / homography[2, 2], compute_uv=False)
    return np.linalg.det(homography[:2, :2]) > 0 and singular[0] < MAX_SCALE and singular[1] > 1 / MAX_SCALE


def _feature_homography(reference: np.ndarray, target: np.ndarray, min_matches: int) -> np.ndarray | None:
    """Reference -> target homography from SIFT matches (ratio test, RANSAC), or None if too few agree."""
    sift = cv2.SIFT_create()
    kp_r, des_r = sift.detectAndCompute(cv2.cvtColor(reference, cv2.COLOR_RGB2GRAY), None)
    kp_t, des_t = sift.detectAndCompute(cv2.cvtColor(target, cv2.COLOR_RGB2GRAY), None)
    if des_r is None or des_t is None or len(kp_r) < min_matches or len(kp_t) < 2:
        return None
    pairs = cv2.BFMatcher(cv2.NORM_L2).knnMatch(des_r, des_t, k=2)
    good = [p[0] for p in pairs if len(p) == 2 and p[0].distance < RATIO * p[1].distance]
    if len(good) < min_matches:
        return None
    src = np.float32([kp_r[m.queryIdx].pt for m in good])
    dst = np.float32([kp_t[m.trainIdx].pt for m in good])
    homography, inliers = cv2.findHomography(src, dst, cv2.RANSAC, RANSAC_PX)
    if inliers is None or int(inliers.sum()) < min_matches or not _plausible(homography):
        return None
    return homography


def _rotation_homography(reference: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Reference -> target homography at the working scale: the best in-plane rotation about the image centre
    (by normalised cross-correlation), refined by ECC to an affine map (translation, scale and shear too)."""
    h, w = target.shape
    centre = ((w - 1) / 2, (h - 1) / 2)
    best, best_q = np.eye(3), -np.inf
    for angle in range(0, 360, ROTATION_STEP_DEGREES):
        candidate = np.vstack([cv2.getRotationMatrix2D(centre, angle, 1.0), [0, 0, 1]])
        q = _warp_quality(reference, target, candidate)
        if q > best_q:
            best, best_q = candidate, q
    # ECC finds the map from target to reference coordinates (warped = reference(W x)): start from the inverse.
    start = np.linalg.inv(best)[:2].astype(np.float32)
    try:
        _, refined = cv2.findTransformECC(target, reference, start, cv2.MOTION_AFFINE,
                                          (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, ECC_ITERATIONS, ECC_EPS),
                                          None, 1)
    except cv2.error:   # did not converge: the rotation search's answer stands
        return best
    forward = np.linalg.inv(np.vstack([refined, [0, 0, 1]]).astype(np.float64))
    return forward if _plausible(forward) and _warp_quality(reference, target, forward) >= best_q else best


def align(reference: np.ndarray, target: np.ndarray, method: str = "auto",
          min_matches: int = 8) -> tuple[np.ndarray, float, str]:
    """Register a reference view (HxWx3 uint8) to a target image of the same size: (3x3 homography from
    reference to target pixel coordinates, quality, the method that gave it).

    "features": SIFT matches and a RANSAC homography (identity when too few matches agree); "rotation": the
    best in-plane rotation refined by ECC; "auto": both, the better by normalised cross-correlation; "none":
    the identity. Quality is the normalised cross-correlation of the warped reference with the target."""
    ref_grey, scale = _grey(reference, WORK_SIDE)
    target_grey, _ = _grey(target, WORK_SIDE)
    to_work = np.diag([scale, scale, 1.0])
    to_frame = np.diag([1 / scale, 1 / scale, 1.0])
    found = {"none": np.eye(3)}
    if method in ("auto", "features"):
        homography = _feature_homography(reference, target, min_matches)
        if homography is not None:
            found["features"] = homography
    if method in ("auto", "rotation"):
        found["rotation"] = to_frame @ _rotation_homography(ref_grey, target_grey) @ to_work
    if method != "none" and len(found) > 1:
        del found["none"]
    rated = {name: _warp_quality(ref_grey, target_grey, to_work @ h @ to_frame) for name, h in found.items()}
    name = max(rated, key=rated.get)
    return found[name], rated[name], name


@register_detector("pad", family="representation", summary=(
                   "For parts that arrive in any pose: finds the good training views most like the image, turns "
                   "them to the image's pose, then compares patch by patch; needs good views covering the poses."))
class PAD(BackboneDetector):
    """PAD-style pose-agnostic detector: retrieval of similar training views, alignment, local comparison.

    Parameters
    ----------
    backbone, stages, weights : timm name, feature stages (timm out_indices) and optional weights file.
        Default: EfficientNet-Lite0 stages 1 and 2 (strides 4 and 8).
    resize : the longer side of the input with the aspect ratio kept (default 256), or (h, w) for an exact frame.
    crop : centre crop after resizing; None (default) keeps the whole image.
    n_candidates : training views retrieved per test image by pooled features and aligned to it (an int >= 1).
    n_references : of those, the best-aligned views the test image is compared with (an int >= 1, at most
        n_candidates).
    alignment : how a view is registered to the test image: "features" (SIFT matches and a RANSAC homography),
        "rotation" (in-plane rotation search refined by ECC to an affine map), "auto" (default: both, the better
        fit wins) or "none" (no alignment: retrieval and local comparison only).
    min_matches : fewest RANSAC inliers a feature homography needs to be trusted (an int >= 4).
    windows : local comparison window side, per stage, in cells (odd ints): the alignment error tolerated.
    blur_sigma : Gaussian blur of the summed, upsampled distance map.
    top_share : the image score is the mean of this highest share of the map's pixels.

    Attributes
    ----------
    frames_ : (N, H, W, 3) uint8 training views in the model frame (warped into each test image's pose).
    descriptors_ : (N, D) unit-norm pooled features of the training views (global retrieval).
    """

    def __init__(self, backbone: str = DEFAULT_BACKBONE, stages: tuple = (1, 2), weights: str | None = None,
                 resize: int | str | tuple = 256, crop: int | None = None, n_candidates: int = 10,
                 n_references: int = 5, alignment: str = "auto", min_matches: int = 8, windows: tuple = (7, 5),
                 blur_sigma: float = 4.0, top_share: float = 0.005, calibration_fraction: float = 0.1,
                 seed: int = 0, device: str = "auto"):
        store_params(self, locals())

    def _validate(self) -> None:
        self._require_stages()
        self._require_positive("n_candidates", "n_references")
        if self.n_references > self.n_candidates:
            raise ValueError(f"n_references ({self.n_references}) cannot exceed n_candidates ({self.n_candidates})")
        if self.alignment not in ALIGNMENTS:
            raise ValueError(f"alignment must be one of {', '.join(map(repr, ALIGNMENTS))}, not {self.alignment!r}")
        if not (isinstance(self.min_matches, int) and self.min_matches >= 4):
            raise ValueError(f"min_matches must be an int >= 4 (a homography needs 4 points), not {self.min_matches!r}")
        if len(self.windows) != len(self.stages) or not all(
                isinstance(w, int) and w >= 1 and w % 2 == 1 for w in self.windows):
            raise ValueError(f"windows needs one odd window side >= 1 per stage ({len(self.stages)}), "
                             f"got {self.windows!r}")
        if not 0 < self.top_share <= 1:
            raise ValueError(f"top_share must be in (0, 1], got {self.top_share!r}")

    # --- features -------------------------------------------------------------------------------------
    def embed(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Unit-norm stage maps of a preprocessed batch, on the CPU."""
        return [F.normalize(f.float(), dim=1).cpu() for f in self.backbone_features(x)]

    @staticmethod
    def describe(feats: list[torch.Tensor]) -> torch.Tensor:
        """(N, D) unit-norm global descriptors: every stage's map averaged over positions (so an in-plane
        rotation of the view changes it little), concatenated."""
        return F.normalize(torch.cat([f.mean((2, 3)) for f in feats], dim=1), dim=1)

    # --- fit ------------------------------------------------------------------------------------------
    def _fit(self, images: Sequence[np.ndarray], progress: Progress, batch_size: int = 16) -> None:
        frames, descriptors = [], []
        for start, batch in image_batches(images, batch_size):
            x = self.preprocess.images_to_tensor(batch)
            with torch.no_grad():
                descriptors.append(self.describe(self.embed(x)))
            frames.append(self.preprocess.tensor_to_frames(x))
            progress("features", start + len(batch), len(images))
        self.frames_ = torch.from_numpy(np.concatenate(frames))
        self.descriptors_ = torch.cat(descriptors)

    # --- alignment ------------------------------------------------------------------------------------
    def retrieve(self, descriptors: torch.Tensor, k: int) -> torch.Tensor:
        """(N, k) indices of the training views most similar to each query descriptor, most similar first."""
        similarity = descriptors @ self.descriptors_.T
        return similarity.topk(min(k, len(self.descriptors_)), dim=1).indices

    def aligned_references(self, frame: np.ndarray, descriptor: torch.Tensor | None = None) -> list[AlignedReference]:
        """The `n_references` training views best aligned to one image in the model frame (HxWx3 uint8, e.g. a
        test result's frame), best first: what the image is compared with (the Heatmaps page shows it)."""
        self._check_fitted()
        if descriptor is None:
            with torch.no_grad():
                descriptor = self.describe(self.embed(self.preprocess.frames_to_tensor(frame[None])))[0]
        h, w = frame.shape[:2]
        found = []
        for j in self.retrieve(descriptor[None], self.n_candidates)[0].tolist():
            reference = self.frames_[j].numpy()
            homography, quality, method = align(reference, frame, self.alignment, self.min_matches)
            found.append((quality, j, homography, method))
        found.sort(key=lambda item: -item[0])
        out = []
        for quality, j, homography, method in found[:self.n_references]:
            reference = self.frames_[j].numpy()
            warped = cv2.warpPerspective(reference, homography, (w, h), flags=cv2.INTER_LINEAR,
                                         borderMode=cv2.BORDER_REPLICATE)
            inside = cv2.warpPerspective(np.ones((h, w), np.uint8), homography, (w, h), flags=cv2.INTER_NEAREST)
            valid = cv2.erode(inside, np.ones((2 * VALID_ERODE_PX + 1,) * 2, np.uint8)) > 0
            out.append(AlignedReference(j, homography, quality, method, reference, warped, valid))
        return out

    # --- scoring --------------------------------------------------------------------------------------
    def _score_batch(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        size = tuple(x.shape[-2:])
        feats = self.embed(x)
        descriptors = self.describe(feats)
        frames = self.preprocess.tensor_to_frames(x)
        maps = torch.zeros((len(x), *size))
        for i in range(len(x)):
            refs = self.aligned_references(frames[i], descriptors[i])
            with torch.no_grad():
                ref_feats = self.embed(self.preprocess.frames_to_tensor(np.stack([r.warped for r in refs])))
            valid = torch.from_numpy(np.stack([r.valid for r in refs])).float()[:, None]        # (K, 1, H, W)
            for f, rf, window in zip(feats, ref_feats, self.windows):
                grid = tuple(f.shape[-2:])
                inside = F.interpolate(valid, size=grid, mode="area") > 0.5                     # (K, 1, h, w)
                distance = window_min_distance(f[i], rf * inside, window)
                # A test patch with no real reference pixel in reach is not compared: it scores 0.
                covered = F.max_pool2d(inside.float(), window, stride=1, padding=window // 2).amax(0)[0]
                maps[i] += upsample_blur((distance * covered)[None], size, 0.0)[0]
        if self.blur_sigma > 0:
            maps = upsample_blur(maps, size, self.blur_sigma)
        top = max(1, int(round(self.top_share * size[0] * size[1])))
        return maps.flatten(1).topk(top, dim=1).values.mean(1).numpy(), maps.numpy().astype(np.float32)

    # --- persistence ----------------------------------------------------------------------------------
    def _fitted_tensors(self) -> dict[str, torch.Tensor]:
        return {"frames": self.frames_, "descriptors": self.descriptors_}

    def _restore(self, tensors: dict[str, torch.Tensor], fitted: dict) -> None:
        self.frames_, self.descriptors_ = tensors["frames"], tensors["descriptors"]

    def _card_extra(self) -> dict:
        return {"pad": {
                    "from_the_paper": "the setting (normal views of an object in many poses; test images in poses "
                                      "never seen) and the idea: compare a test image with a normal view of the "
                                      "object brought to the same pose, locally",
                    "ours": "no NeRF and no learned pose estimation: the nearest training views by pooled backbone "
                            "features, registered to the test image by SIFT + RANSAC homography or an in-plane "
                            "rotation search refined by ECC (the better fit wins), then CPR-style windowed "
                            "patch comparison with a validity mask for warped-in padding",
                    "training_views": int(len(self.frames_)), "candidates": self.n_candidates,
                    "references": self.n_references, "alignment": self.alignment, "windows": list(self.windows)},
                "score": f"cosine distance to the nearest patch in the window of the {self.n_references} aligned "
                         f"views, per stage, summed and blurred; image = mean of the top {self.top_share:.1%}"}
