"""Build a dirty copy of an MVTec-layout set: some test defects moved into train/good, as on a real line
where a defective part slips into the "good" folder.

    .venv/bin/python benchmarks/plant_defects.py ../shared/datasets/bottle /tmp/bottle_dirty --n 10

The defects are chosen evenly across the defect types (seeded); they leave the test set, so the clean and
the dirty model are compared on the same remaining test images. Their new names start with "planted_", so
an audit's ranking can be checked against them. The output is benchmark data derived from the source set:
keep it out of the repository.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np


def main(source: str, dest: str, n: int, seed: int = 0) -> list[str]:
    src, out = Path(source), Path(dest)
    shutil.copytree(src, out)
    defect_dirs = sorted(d for d in (out / "test").iterdir() if d.is_dir() and d.name != "good")
    pool = [(d, f) for d in defect_dirs for f in sorted(d.iterdir()) if f.is_file()]
    rng = np.random.default_rng(seed)
    # Round robin over the defect types, a random image of each in turn.
    by_type = {d: [f for dd, f in pool if dd == d] for d in defect_dirs}
    for files in by_type.values():
        rng.shuffle(files)
    chosen = []
    while len(chosen) < n and any(by_type.values()):
        for d in defect_dirs:
            if by_type[d] and len(chosen) < n:
                chosen.append((d, by_type[d].pop()))
    planted = []
    for d, f in chosen:
        target = out / "train" / "good" / f"planted_{d.name}_{f.name}"
        shutil.move(f, target)
        mask = out / "ground_truth" / d.name / f"{f.stem}_mask.png"
        mask.unlink(missing_ok=True)
        planted.append(target.name)
    return planted


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source")
    parser.add_argument("dest")
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print("\n".join(main(args.source, args.dest, args.n, args.seed)))
