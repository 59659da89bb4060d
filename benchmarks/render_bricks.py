"""Render a multi-view anomaly set of a LEGO-like brick figure, in MVTec layout, for pose-agnostic inspection.

    .venv/bin/python benchmarks/render_bricks.py /tmp/bricks --train 120 --test-good 30 --per-defect 15 --size 128

PAD's own data (MAD: LEGO toys from many views) cannot be downloaded here, so this makes a small stand-in from
primitives with Mitsuba 3 (BSD-3; its CPU variant `scalar_rgb` installs from PyPI and renders headless, no GPU
or OpenGL): a red 2 x 4 brick with a yellow 2 x 2 brick on it and a blue peg on one end. The camera looks at it
from directions uniform over the whole view sphere, with a random roll; training views and test views are
drawn from different seeds, so every test pose is unseen. Defects, each placed where it shows at that pose:

- missing_stud: one stud of the red brick left out;
- burr: a small blob of the brick's own plastic on one of its faces;
- stain: a thin brown disc lying on a face (a colour change);
- crack: a thin black slit across a face.

Every defective view is rendered twice at the same pose and sampler seed, with and without the defect; its
mask (`ground_truth/<defect>/<name>_mask.png`) marks exactly the pixels that differ by more than MASK_TOLERANCE
grey levels (the defect and the shading it changes, e.g. its own small shadow). Deterministic for a seed;
`views.json` records each image's camera. The output is generated data: keep it out of the repository.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

DEFECTS = ("missing_stud", "burr", "stain", "crack")
# A pixel belongs to a defect's mask when its rendering with and without the defect differs by more than this
# (8-bit levels, any channel): unchanged pixels are bit-identical (same pose, same sampler seed).
MASK_TOLERANCE = 4
# A defect must cover at least this share of the image to count as visible at a pose; else the pose is redrawn.
MIN_DEFECT_SHARE = 0.002
CAMERA_DISTANCE, FOV_DEGREES = 12.0, 30.0
BACKGROUND = np.array([0.55, 0.57, 0.6])       # linear RGB behind the object
RED, YELLOW, BLUE = [0.75, 0.06, 0.05], [0.85, 0.65, 0.05], [0.05, 0.2, 0.7]
STAIN, CRACK = [0.16, 0.1, 0.04], [0.01, 0.01, 0.01]
# The red brick: 4 x 2 x 1.2 units centred at the origin; studs of radius 0.3 and height 0.35 on a 1-unit grid.
HALF = np.array([2.0, 1.0, 0.6])
STUD_RADIUS, STUD_HEIGHT = 0.3, 0.35
RED_STUDS = [(x, y) for x in (-1.5, -0.5) for y in (-0.5, 0.5)]       # the others are under the yellow brick
YELLOW_CENTRE = np.array([1.0, 0.0, 0.6 + 0.6])


def _mitsuba():
    try:
        import mitsuba as mi
    except ImportError as exc:
        raise SystemExit(f"render_bricks needs the renderer Mitsuba 3: pip install mitsuba (in requirements.txt) "
                         f"[{exc}]") from None
    mi.set_variant("scalar_rgb")    # the CPU variant: no GPU, OpenGL or LLVM needed
    return mi


def _diffuse(rgb) -> dict:
    return {"type": "diffuse", "reflectance": {"type": "rgb", "value": list(map(float, rgb))}}


def _stud(mi, x: float, y: float, z: float, colour) -> dict:
    """A closed cylinder (Mitsuba's cylinder is open: a disc caps it) standing on height z."""
    top = z + STUD_HEIGHT
    return {"side": {"type": "cylinder", "p0": [x, y, z], "p1": [x, y, top], "radius": STUD_RADIUS,
                     "bsdf": _diffuse(colour)},
            "cap": {"type": "disk", "to_world": mi.ScalarTransform4f().translate([x, y, top]).scale(STUD_RADIUS),
                    "bsdf": _diffuse(colour)}}


def figure(mi) -> dict[str, dict]:
    """The normal brick figure: named Mitsuba shapes."""
    parts = {"red_brick": {"type": "cube", "to_world": mi.ScalarTransform4f().scale(HALF.tolist()),
                           "bsdf": _diffuse(RED)},
             "yellow_brick": {"type": "cube", "to_world": mi.ScalarTransform4f().translate(YELLOW_CENTRE.tolist())
                              .scale([1.0, 1.0, 0.6]), "bsdf": _diffuse(YELLOW)},
             "peg": {"type": "cylinder", "p0": [-HALF[0], 0, 0], "p1": [-HALF[0] - 0.8, 0, 0], "radius": 0.25,
                     "bsdf": _diffuse(BLUE)},
             "peg_cap": {"type": "disk", "to_world": mi.ScalarTransform4f().translate([-HALF[0] - 0.8, 0, 0])
                         .rotate([0, 1, 0], -90).scale(0.25), "bsdf": _diffuse(BLUE)}}
    for i, (x, y) in enumerate(RED_STUDS):
        for name, shape in _stud(mi, x, y, HALF[2], RED).items():
            parts[f"red_stud{i}_{name}"] = shape
    for i, (x, y) in enumerate((x, y) for x in (0.5, 1.5) for y in (-0.5, 0.5)):
        for name, shape in _stud(mi, x, y, YELLOW_CENTRE[2] + 0.6, YELLOW).items():
            parts[f"yellow_stud{i}_{name}"] = shape
    return parts


def _face_frame(rng: np.random.Generator, margin: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A random point on a side or the bottom of the red brick (the top is crowded by studs), its outward
    normal, and a tangent direction in the face."""
    axis = rng.choice([0, 1, 2])
    sign = rng.choice([-1.0, 1.0]) if axis != 2 else -1.0
    normal = np.zeros(3)
    normal[axis] = sign
    point = np.array([rng.uniform(-h + margin, h - margin) if h > margin else 0.0 for h in HALF])
    point[axis] = sign * HALF[axis]
    in_face = [a for a in range(3) if a != axis]
    angle = rng.uniform(0, np.pi)
    tangent = np.zeros(3)
    tangent[in_face[0]], tangent[in_face[1]] = np.cos(angle), np.sin(angle)
    return point, normal, tangent


def _rotation_onto(normal: np.ndarray):
    """Axis and angle (degrees) that turn +z onto `normal` (for Mitsuba's discs, which face +z)."""
    z = np.array([0.0, 0.0, 1.0])
    axis = np.cross(z, normal)
    if np.linalg.norm(axis) < 1e-9:
        return [1.0, 0.0, 0.0], (0.0 if normal[2] > 0 else 180.0)
    return (axis / np.linalg.norm(axis)).tolist(), float(np.degrees(np.arccos(np.clip(normal @ z, -1, 1))))


def defective(mi, parts: dict[str, dict], defect: str, rng: np.random.Generator) -> dict[str, dict]:
    """A copy of the figure with one defect of this kind, placed at random."""
    parts = dict(parts)
    if defect == "missing_stud":
        i = int(rng.integers(len(RED_STUDS)))
        del parts[f"red_stud{i}_side"], parts[f"red_stud{i}_cap"]
        return parts
    point, normal, tangent = _face_frame(rng, margin=0.35)
    if defect == "burr":
        radius = rng.uniform(0.14, 0.22)
        parts["defect"] = {"type": "sphere", "center": (point + 0.4 * radius * normal).tolist(), "radius": radius,
                           "bsdf": _diffuse(RED)}
    elif defect == "stain":
        axis, angle = _rotation_onto(normal)
        parts["defect"] = {"type": "disk", "to_world": mi.ScalarTransform4f().translate((point + 0.004 * normal)
                           .tolist()).rotate(axis, angle).scale(rng.uniform(0.22, 0.35)), "bsdf": _diffuse(STAIN)}
    elif defect == "crack":
        # A thin black slab across the face, barely proud of it: the slit's dark inside.
        length, width = rng.uniform(0.9, 1.4), 0.12
        across = np.cross(normal, tangent)
        basis = np.stack([tangent * length / 2, across * width / 2, normal * 0.01], axis=1)   # cube [-1,1]^3 -> slab
        matrix = np.eye(4)
        matrix[:3, :3], matrix[:3, 3] = basis, point
        parts["defect"] = {"type": "cube", "to_world": mi.ScalarTransform4f(matrix.tolist()), "bsdf": _diffuse(CRACK)}
    else:
        raise ValueError(f"unknown defect {defect!r}; known: {', '.join(DEFECTS)}")
    return parts


def random_view(rng: np.random.Generator) -> dict:
    """A camera direction uniform on the view sphere and a roll uniform in [0, 360) degrees."""
    direction = rng.normal(size=3)
    return {"direction": (direction / np.linalg.norm(direction)).tolist(), "roll_degrees": float(rng.uniform(0, 360))}


def _camera(view: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Camera origin, up vector (rolled) and the direction light comes from (over the camera's shoulder)."""
    direction = np.asarray(view["direction"], float)
    origin = CAMERA_DISTANCE * direction
    helper = np.array([0.0, 0.0, 1.0]) if abs(direction[2]) < 0.95 else np.array([1.0, 0.0, 0.0])
    right = np.cross(helper, direction)
    right /= np.linalg.norm(right)
    up = np.cross(direction, right)
    roll = np.radians(view["roll_degrees"])
    up_rolled = np.cos(roll) * up + np.sin(roll) * right
    towards_light = direction + 0.35 * up + 0.25 * right       # a headlight a little above and aside
    return origin, up_rolled, towards_light / np.linalg.norm(towards_light)


def render(mi, parts: dict[str, dict], view: dict, size: int, spp: int, seed: int) -> np.ndarray:
    """HxWx3 uint8 sRGB image of the parts from this view, over a plain background."""
    origin, up, towards_light = _camera(view)
    scene = mi.load_dict({
        "type": "scene", "integrator": {"type": "direct"},
        "sensor": {"type": "perspective", "fov": FOV_DEGREES,
                   "to_world": mi.ScalarTransform4f().look_at(origin=origin.tolist(), target=[0, 0, 0], up=up.tolist()),
                   "film": {"type": "hdrfilm", "width": size, "height": size, "pixel_format": "rgba",
                            "rfilter": {"type": "box"}},
                   "sampler": {"type": "independent", "sample_count": spp}},
        # One directional light: every sample sees the same light, so pixels the defect does not touch render
        # bit for bit alike with and without it.
        "light": {"type": "directional", "direction": (-towards_light).tolist(),
                  "irradiance": {"type": "rgb", "value": 2.6}},
        **parts})
    rgba = np.array(mi.render(scene, seed=seed), dtype=np.float64)
    linear = rgba[..., :3] + (1.0 - np.clip(rgba[..., 3:], 0, 1)) * BACKGROUND   # film colour is premultiplied
    srgb = np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * np.power(np.clip(linear, 0, None), 1 / 2.4) - 0.055)
    return np.round(np.clip(srgb, 0, 1) * 255).astype(np.uint8)


def changed_pixels(image: np.ndarray, twin: np.ndarray) -> np.ndarray:
    """HxW bool: where two renderings differ by more than MASK_TOLERANCE levels in any channel."""
    return (np.abs(image.astype(np.int16) - twin.astype(np.int16)) > MASK_TOLERANCE).any(-1)


def defective_view(mi, defect: str, size: int, spp: int, rng: np.random.Generator, seed: int,
                   tries: int = 50) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """(defective image, the same view without the defect, mask, view): a pose and placement at which the
    defect covers at least MIN_DEFECT_SHARE of the image, redrawn until one does."""
    normal = figure(mi)
    for _ in range(tries):
        view = random_view(rng)
        image = render(mi, defective(mi, normal, defect, rng), view, size, spp, seed)
        twin = render(mi, normal, view, size, spp, seed)
        mask = changed_pixels(image, twin)
        if mask.mean() >= MIN_DEFECT_SHARE:
            return image, twin, mask, view
    raise RuntimeError(f"no visible {defect} in {tries} poses at {size} px: use a larger --size")


def generate(out: str | Path, n_train: int = 120, n_test_good: int = 30, n_per_defect: int = 15, size: int = 128,
             spp: int = 16, seed: int = 0, defects=DEFECTS) -> Path:
    """Write the set to `out` (MVTec layout) and return it. Same arguments, same bytes."""
    mi = _mitsuba()
    out = Path(out)
    normal = figure(mi)
    views = {}
    # Separate random streams: training poses, test poses and defects never share draws.
    train_rng, test_rng = np.random.default_rng([seed, 0]), np.random.default_rng([seed, 1])

    def save(image: np.ndarray, rel: str) -> None:
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)

    for split, rng, count in (("train", train_rng, n_train), ("test", test_rng, n_test_good)):
        for i in range(count):
            view = random_view(rng)
            save(render(mi, normal, view, size, spp, seed), f"{split}/good/{i:03d}.png")
            views[f"{split}/good/{i:03d}.png"] = view
    for d, defect in enumerate(defects):
        rng = np.random.default_rng([seed, 2, d])
        for i in range(n_per_defect):
            image, _, mask, view = defective_view(mi, defect, size, spp, rng, seed)
            save(image, f"test/{defect}/{i:03d}.png")
            save(mask.astype(np.uint8) * 255, f"ground_truth/{defect}/{i:03d}_mask.png")
            views[f"test/{defect}/{i:03d}.png"] = view
    (out / "views.json").write_text(json.dumps({"seed": seed, "size": size, "spp": spp, "views": views}, indent=1))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="output folder (MVTec layout)")
    p.add_argument("--train", type=int, default=120, help="training views (default 120)")
    p.add_argument("--test-good", type=int, default=30, help="good test views (default 30)")
    p.add_argument("--per-defect", type=int, default=15, help="test views per defect type (default 15)")
    p.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    p.add_argument("--spp", type=int, default=16, help="samples per pixel (antialiasing; default 16)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    print(generate(a.out, a.train, a.test_good, a.per_defect, a.size, a.spp, a.seed))


if __name__ == "__main__":
    main()
