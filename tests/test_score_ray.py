"""`python -m core score`: Ray Data over two local workers writes exactly the local engine's CSV and heatmaps.

One Ray session for the module (Ray's start-up and its workers' imports take most of the time): the command
itself, run as a user runs it, in a subprocess under a deadline. Ray is a requirement: if it cannot start here
the test fails with Ray's own message, it is never skipped.
"""
import csv
import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import ray  # noqa: F401  (a missing Ray is a collection error, not a skip)
from PIL import Image

from core.cli import _image_paths, main

from conftest import DEMO, REPO

RAY_DEADLINE_S = 240    # start-up, two workers importing torch and scoring 24 images, on a loaded 2-core machine


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A PatchCore model small enough to score in milliseconds, and settings that give every verdict: a threshold
    at the median test score, a review band below it, and defect rules (a region of interest, an array the workers
    must get, and regions from a pixel threshold at the median of the maps' maxima)."""
    from core.data import load_mvtec, read_image
    from core.detectors import create_detector
    root = tmp_path_factory.mktemp("score")
    demo = load_mvtec(DEMO)
    detector = create_detector("patchcore", resize=64, coreset_ratio=0.1, score_border=0,
                               calibration_fraction=0).fit(demo.subset(split="train")[:5])
    model = detector.save(root / "model")
    predicted = detector.predict([read_image(s.path) for s in demo.subset(split="test").samples])
    scores = np.sort(predicted.scores)
    pixel = float(np.median([m.max() for m in predicted.maps]))
    roi = np.zeros((64, 64), np.uint8)
    roi[:, :48] = 255
    Image.fromarray(roi).save(root / "roi.png")
    (root / "broken.png").write_bytes(b"not an image")
    settings = ["--model", str(model), "--threshold", f"{scores[len(scores) // 2]:.6g}",
                "--review-threshold", f"{scores[len(scores) // 4]:.6g}", "--roi", str(root / "roi.png"), "--pixel-threshold", f"{pixel:.6g}"]
    return root, settings


def rows_of(text: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(text)))


def test_ray_with_two_workers_writes_exactly_the_local_engines_csv_and_heatmaps(tmp_path, tiny, capsys):
    root, settings = tiny
    images = [str(DEMO / "test"), str(root / "broken.png")]

    # The single-process engine at one torch thread, the same as each Ray worker (scores are bit-identical across
    # engines at equal thread counts; oneDNN sums in another order at other counts).
    assert main(["score", "--engine", "local", "--threads", "1", *settings, *images,
                 "--out", str(tmp_path / "local")]) == 1
    captured = capsys.readouterr()
    assert "skipped: " in captured.err and "broken.png" in captured.err
    local = rows_of(captured.out)

    command = [sys.executable, "-m", "core", "score", "--engine", "ray", "--workers", "2", *settings, *images,
               "--out", str(tmp_path / "ray"), "--csv", str(tmp_path / "ray.csv")]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=RAY_DEADLINE_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"score --engine ray did not finish within {RAY_DEADLINE_S} s:\n{err[-4000:]}")
    # 1: every readable image scored and the broken one skipped; anything else is Ray failing (shown in full).
    assert proc.returncode == 1, f"exit {proc.returncode}\n{err[-4000:]}"
    assert out == ""    # the CSV went to --csv
    assert "Ray: 2 workers x 1 CPU" in err and "skipped: " in err and "broken.png" in err
    assert "scored 23 images (1 skipped)" in err
    remote = rows_of((tmp_path / "ray.csv").read_text())

    # Input order (the folder sorted, then the broken file), the same cells, the same heatmap names and bytes.
    assert [r["path"] for r in remote] == [str(p) for p in _image_paths([str(DEMO / "test")])]
    assert {r["verdict"] for r in remote} == {"OK", "review", "NG"}
    assert any(r["reason"].startswith("defect region at") for r in remote)     # the workers applied the rules
    names = [Path(r.pop("heatmap")).name for r in remote]
    assert names == [Path(r.pop("heatmap")).name for r in local]
    assert "04_2_heatmap.png" in names      # good/04.jpg after colour/04.jpg: deduplicated as predict does
    assert remote == local
    for name in names:
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name


def test_predict_is_the_local_engine(tmp_path, tiny, capsys):
    root, settings = tiny
    image = str(DEMO / "test" / "colour" / "00.jpg")
    assert main(["predict", *settings, image, "--out", str(tmp_path / "a")]) == 0
    predicted = capsys.readouterr()
    assert main(["score", *settings, image, "--out", str(tmp_path / "b"), "--csv", str(tmp_path / "b.csv")]) == 0
    scored = capsys.readouterr()
    assert scored.out == "" and "scored 1 images (0 skipped)" in scored.err and predicted.err == ""
    assert rows_of(predicted.out.replace(str(tmp_path / "a"), "X")) == \
        rows_of((tmp_path / "b.csv").read_text().replace(str(tmp_path / "b"), "X"))
    assert (tmp_path / "a" / "00_heatmap.png").read_bytes() == (tmp_path / "b" / "00_heatmap.png").read_bytes()


def test_score_refuses_bad_settings_before_starting_anything(tiny, capsys):
    _, settings = tiny
    image = str(DEMO / "test" / "colour" / "00.jpg")
    assert main(["score", "--engine", "ray", "--workers", "0", *settings, image]) == 2
    assert "workers must be at least 1" in capsys.readouterr().err
    assert main(["score", "--threads", "0", *settings, image]) == 2
    assert "threads must be at least 1" in capsys.readouterr().err
