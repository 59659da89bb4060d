"""Few-shot benchmark, leave one category out: for each category, RegAD's registration is trained on the
other categories, then RegAD (with it, and without registration) and PatchCore are fitted on the same 2, 4
and 8 random good images (3 draws) and scored on the category's whole test set.

    .venv/bin/python benchmarks/few_shot.py ../shared/datasets/{bottle,magnetic_tile,pcb,hazelnut_toy} \
        --out bench_results/few_shot

Registration files are kept in --out and reused when present (delete them to train again).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.bench import FEW_SHOT_COLUMNS, format_table, run_few_shot, write_json  # noqa: E402
from core.data import load_mvtec  # noqa: E402
from core.detectors.regad import train_registration  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("categories", nargs="+", help="MVTec-layout category folders (at least two)")
    parser.add_argument("--out", default="bench_results/few_shot")
    parser.add_argument("--shots", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200, help="registration training steps")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    rows = []
    for target in args.categories:
        name = Path(target).name
        registration = out / f"registration_without_{name}.safetensors"
        if not registration.is_file():
            others = {}
            for root in args.categories:
                if root != target:
                    good = load_mvtec(root).subset(split="train", label=0)
                    others[Path(root).name] = [good[i] for i in range(len(good))]
            train_registration(others, registration, steps=args.steps, log=log)
        for detector, params in (("regad", {"registration": str(registration)}), ("regad", {}), ("patchcore", {})):
            found = run_few_shot(target, detector, args.shots, args.draws, params, log=log)
            for row in found:
                row["detector"] = f"{detector} (no registration)" if detector == "regad" and not params else detector
            rows += found
            write_json(rows, out / "few_shot.json")
            print(format_table(found, FEW_SHOT_COLUMNS), file=sys.stderr, flush=True)
    print(format_table(rows, FEW_SHOT_COLUMNS))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
