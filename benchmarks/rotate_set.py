"""Copy an MVTec-layout set with every image in a random pose: an in-plane rotation and a mild perspective tilt.

    .venv/bin/python benchmarks/rotate_set.py ../shared/datasets/bottle /tmp/bottle_rotated
    .venv/bin/python benchmarks/rotate_set.py ../shared/datasets/hazelnut_toy /tmp/hazelnut_rotated --train-copies 4

Parts on a real line arrive unfixtured: this turns an aligned set into one where no two images share a pose.
Each image gets its own homography: a rotation by an angle uniform in [0, 360) about the centre, then each
corner moved by up to `--tilt` of the image side (a mild change of viewpoint). Training images (`--train-copies`
poses each) cover the poses as test images do; a defect's mask goes through the same homography (nearest
neighbour), so it still marks the defect. What a pose brings in from outside the photo is filled with the
photo's own border colour (the median of its edge pixels). Deterministic for a seed; `poses.json` records each
image's homography. The output is derived from the source set: keep it out of the repository.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.data import load_mvtec, read_image  # noqa: E402


def random_pose(rng: np.random.Generator, width: int, height: int, tilt: float) -> np.ndarray:
    """3x3 homography: rotation about the image centre by a uniform angle, then corners moved by up to `tilt`
    of the image side."""
    angle = rng.uniform(0, 360)
    rotation = np.vstack([cv2.getRotationMatrix2D(((width - 1) / 2, (height - 1) / 2), angle, 1.0), [0, 0, 1]])
    corners = np.float32([[0, 0], [width - 1, 0], [width - 1, height - 1], [0, height - 1]])
    moved = corners + rng.uniform(-tilt, tilt, size=(4, 2)).astype(np.float32) * np.float32([width, height])
    return cv2.getPerspectiveTransform(corners, moved) @ rotation


def warp_image(image: np.ndarray, homography: np.ndarray) -> np.ndarray:
    """The image in its new pose, the area brought in from outside filled with its median edge colour."""
    h, w = image.shape[:2]
    edge = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    fill = tuple(int(v) for v in np.median(edge, axis=0))
    return cv2.warpPerspective(image, homography, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                               borderValue=fill)


def warp_mask(mask: np.ndarray, homography: np.ndarray) -> np.ndarray:
    h, w = mask.shape
    return cv2.warpPerspective(mask.astype(np.uint8), homography, (w, h), flags=cv2.INTER_NEAREST) > 0


def generate(source: str | Path, out: str | Path, train_copies: int = 1, test_copies: int = 1, tilt: float = 0.05,
             seed: int = 0) -> Path:
    """Write the posed copy of `source` to `out` and return it. Same arguments, same bytes."""
    data, out = load_mvtec(source), Path(out)
    rng = np.random.default_rng(seed)
    poses = {}
    for i, sample in enumerate(data.samples):
        image = read_image(sample.path)
        h, w = image.shape[:2]
        mask = data.mask(i) if sample.label == 1 else None
        group = "good" if sample.label == 0 else sample.defect
        for copy in range(train_copies if sample.split == "train" else test_copies):
            homography = random_pose(rng, w, h, tilt)
            name = f"{sample.path.stem}_{copy}"
            target = out / sample.split / group / f"{name}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(warp_image(image, homography)).save(target)
            poses[str(target.relative_to(out))] = homography.round(6).tolist()
            if mask is not None:
                mask_path = out / "ground_truth" / group / f"{name}_mask.png"
                mask_path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(warp_mask(mask, homography).astype(np.uint8) * 255).save(mask_path)
    (out / "poses.json").write_text(json.dumps({"source": str(source), "seed": seed, "tilt": tilt,
                                                "homographies": poses}, indent=1))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="an MVTec-layout category")
    p.add_argument("out", help="output folder")
    p.add_argument("--train-copies", type=int, default=1, help="poses per training image (default 1)")
    p.add_argument("--test-copies", type=int, default=1, help="poses per test image (default 1)")
    p.add_argument("--tilt", type=float, default=0.05, help="largest corner shift, as a share of the side")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    print(generate(a.source, a.out, a.train_copies, a.test_copies, a.tilt, a.seed))


if __name__ == "__main__":
    main()
