"""Build a non-square MVTec-layout set from a square one: pairs of images side by side.

    .venv/bin/python benchmarks/side_by_side.py ../shared/datasets/bottle /tmp/bottle_pairs

Training pairs join consecutive normal images; each test pair joins a test image with a normal test image
(the defect, and its mask, on the left or right by turns), so the defect keeps its own size in pixels.
The output is benchmark data derived from the source set: keep it out of the repository.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from core.data import load_mvtec  # noqa: E402


def pair(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    h = min(left.shape[0], right.shape[0])
    return np.concatenate([left[:h], right[:h]], axis=1)


def main(source: str, dest: str) -> None:
    data, out = load_mvtec(source), Path(dest)
    train = data.subset(split="train", label=0)
    (out / "train" / "good").mkdir(parents=True, exist_ok=False)
    for i in range(0, len(train) - 1, 2):
        Image.fromarray(pair(train[i], train[i + 1])).save(out / "train" / "good" / f"{i:04d}.png")
    test = data.subset(split="test")
    good = [i for i in range(len(test)) if test.samples[i].label == 0]
    for k in range(len(test)):
        s = test.samples[k]
        partner = good[(good.index(k) + 1) % len(good)] if s.label == 0 else good[k % len(good)]
        images, masks = [test[k], test[partner]], [test.mask(k), test.mask(partner)]
        if k % 2:
            images, masks = images[::-1], masks[::-1]
        folder = out / "test" / s.defect
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pair(*images)).save(folder / f"{k:04d}.png")
        if s.label == 1 and masks[0] is not None and masks[1] is not None:
            gt = out / "ground_truth" / s.defect
            gt.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pair(*masks).astype(np.uint8) * 255).save(gt / f"{k:04d}_mask.png")
    print(f"wrote {out}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
