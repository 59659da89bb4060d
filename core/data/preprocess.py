"""The one preprocessing every detector uses, and its inverse geometry.

:class:`Preprocess`: resize to the model frame (Pillow bilinear, antialiased when shrinking), center crop,
ImageNet normalisation. Images, masks and float maps all go through Pillow's bilinear filter (uint8 for
images, mode ``"F"`` for masks and maps), so their geometry agrees exactly; masks are resized as 0/1 floats
and thresholded at 0.5. :meth:`Preprocess.map_to_input` is the inverse geometry, from the model frame back
to the original image size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image


def _resize_float(arr: np.ndarray, size_wh: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a 2-D float map with Pillow mode "F" (same filter as the uint8 image path)."""
    if (arr.shape[1], arr.shape[0]) == tuple(size_wh):
        return arr.astype(np.float32, copy=True)
    img = Image.fromarray(np.ascontiguousarray(arr, dtype=np.float32), mode="F")
    return np.asarray(img.resize(size_wh, Image.Resampling.BILINEAR, reducing_gap=None), dtype=np.float32).copy()


def _pair(value, name: str) -> tuple[int, int]:
    """An int n as (n, n), or a (height, width) pair of positive ints."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        value = (value, value)
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1 for v in value)):
        raise ValueError(f"{name} must be a positive int or a (height, width) pair of positive ints, not {value!r}")
    return int(value[0]), int(value[1])


def fit_frame(sizes_hw: Sequence[tuple[int, int]], long_side: int, multiple: int = 32) -> tuple[int, int]:
    """The model frame (height, width) for images of these sizes: their median aspect ratio kept, the
    longer side ``long_side``, the shorter rounded to a multiple of ``multiple`` (the backbone's stride).

    A camera on a line gives one image shape, so one frame per model keeps every batch rectangular with
    no padding; an image of another aspect is stretched into it (the model card reports by how much).
    """
    if not len(sizes_hw):
        raise ValueError("no image sizes to choose a frame from")
    aspect = float(np.median([w / h for h, w in sizes_hw]))
    short = max(multiple, int(round(long_side / max(aspect, 1 / aspect) / multiple)) * multiple)
    return (long_side, short) if aspect < 1 else (short, long_side)


@dataclass(frozen=True)
class Preprocess:
    """Resize (to ``resize``: an int n for n x n, or a (height, width) frame), centre-crop to ``crop x crop``
    (None: no crop), normalise.

    Images use antialiased bilinear resizing (torch, uint8); masks are resized the same way as 0/1 floats
    (Pillow mode "F") and thresholded at 0.5; float maps use Pillow mode "F" with the same filter.
    """
    resize: int | tuple[int, int] = 256
    crop: int | None = 224
    mean: tuple = (0.485, 0.456, 0.406)
    std: tuple = (0.229, 0.224, 0.225)

    def __post_init__(self):
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        frame = _pair(self.resize, "resize")
        object.__setattr__(self, "resize", frame[0] if frame[0] == frame[1] else frame)
        if self.crop is not None and (not isinstance(self.crop, (int, np.integer)) or not 1 <= self.crop <= min(frame)):
            raise ValueError(f"crop must be None or an int in 1..{min(frame)} (the shorter side of the resized "
                             f"frame), not {self.crop!r}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError("mean and std need 3 values (R, G, B)")
        if min(self.std) <= 0:
            raise ValueError(f"std values must be positive, not {self.std}")

    @property
    def frame(self) -> tuple[int, int]:
        """(height, width) after resizing, before the crop."""
        return _pair(self.resize, "resize")

    @property
    def input_hw(self) -> tuple[int, int]:
        """(height, width) of the model input: the maps' frame."""
        return (self.crop, self.crop) if self.crop is not None else self.frame

    @property
    def input_size(self) -> int:
        """The side of a square model input (networks that need one, e.g. the reconstruction family)."""
        h, w = self.input_hw
        if h != w:
            raise ValueError(f"this preprocessing gives a {h}x{w} (HxW) input, not a square one")
        return h

    @property
    def _offset(self) -> tuple[int, int]:
        (fh, fw), (ih, iw) = self.frame, self.input_hw
        return (fh - ih) // 2, (fw - iw) // 2

    def _crop(self, arr: np.ndarray) -> np.ndarray:
        (oh, ow), (ih, iw) = self._offset, self.input_hw
        return arr[oh:oh + ih, ow:ow + iw]

    @staticmethod
    def _check_image(image) -> np.ndarray:
        a = np.asarray(image)
        if a.ndim == 2:
            a = np.repeat(a[:, :, None], 3, axis=2)
        if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
            raise ValueError(f"expected an HxWx3 uint8 RGB image, got shape {a.shape} dtype {a.dtype}")
        return a

    def image_to_frame(self, image: np.ndarray) -> np.ndarray:
        """HxWx3 uint8 -> input_hw x 3 uint8 (resize + crop, no normalisation), for display and overlays."""
        a = self._check_image(image)
        if a.shape[:2] != self.frame:
            # torch's uint8 antialiased bilinear is several times faster than Pillow's and samples the same
            # half-pixel grid, so masks (resized by Pillow in float) stay aligned with images.
            import torch
            import torch.nn.functional as F
            t = torch.from_numpy(np.array(a)).permute(2, 0, 1)[None]
            a = F.interpolate(t, size=self.frame, mode="bilinear", antialias=True, align_corners=False)[0]
            a = a.permute(1, 2, 0).numpy()
        return np.ascontiguousarray(self._crop(a))

    def mask_to_frame(self, mask: np.ndarray) -> np.ndarray:
        """HxW bool -> input_hw bool: bilinear on 0/1 then > 0.5, the same geometry as :meth:`image_to_frame`."""
        m = np.asarray(mask)
        if m.ndim != 2:
            raise ValueError(f"expected an HxW mask, got shape {m.shape}")
        fh, fw = self.frame
        f = _resize_float(m.astype(np.float32), (fw, fh))
        return np.ascontiguousarray(self._crop(f) > 0.5)

    def images_to_tensor(self, images: Sequence[np.ndarray]):
        """(N, 3, H, W) float32 tensor at :attr:`input_hw`, normalised with mean/std."""
        import torch

        frames = [self.image_to_frame(im) for im in images]
        if not frames:
            return torch.zeros((0, 3, *self.input_hw), dtype=torch.float32)
        return self.frames_to_tensor(np.stack(frames))

    def _mean_std(self):
        import torch
        return (torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1),
                torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1))

    def frames_to_tensor(self, frames: np.ndarray):
        """(N, H, W, 3) uint8 frames already at :attr:`input_hw` -> the normalised (N, 3, H, W) float32 tensor."""
        import torch

        mean, std = self._mean_std()
        x = torch.from_numpy(np.array(frames)).permute(0, 3, 1, 2).to(torch.float32).div_(255.0)  # a copy: views may be read-only
        return x.sub_(mean).div_(std).contiguous()

    def tensor_to_frames(self, x) -> np.ndarray:
        """The inverse of :meth:`frames_to_tensor`: the uint8 frames a normalised batch was made from."""
        import torch

        mean, std = self._mean_std()
        x = x.cpu() * std + mean
        return x.mul(255.0).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()

    def map_to_input(self, amap: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
        """A map in the model frame -> an HxW float32 map at the original image size.

        The crop is put back into the resized frame with the border filled by edge replication, then resized
        bilinearly to ``size_hw``. A map of another shape (e.g. a patch grid) is first resized to the input.
        """
        if hasattr(amap, "detach"):  # a torch tensor
            amap = amap.detach().cpu().numpy()
        a = np.asarray(amap, dtype=np.float32)
        if a.ndim != 2:
            raise ValueError(f"expected a 2-D map, got shape {a.shape}")
        h, w = int(size_hw[0]), int(size_hw[1])
        if h < 1 or w < 1:
            raise ValueError(f"size_hw must be positive, not {size_hw}")
        (ih, iw), (fh, fw), (oh, ow) = self.input_hw, self.frame, self._offset
        if a.shape != (ih, iw):
            a = _resize_float(a, (iw, ih))
        if (ih, iw) != (fh, fw):
            a = np.pad(a, ((oh, fh - ih - oh), (ow, fw - iw - ow)), mode="edge")
        return _resize_float(a, (w, h))

    def to_dict(self) -> dict:
        resize = self.resize if isinstance(self.resize, (int, np.integer)) else list(self.resize)
        return {"resize": resize if isinstance(resize, list) else int(resize),
                "crop": None if self.crop is None else int(self.crop),
                "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        unknown = set(d) - {"resize", "crop", "mean", "std"}
        if unknown:
            raise ValueError(f"unknown Preprocess keys: {sorted(unknown)}")
        d = dict(d)
        if isinstance(d.get("resize"), list):
            d["resize"] = tuple(d["resize"])
        return cls(**d)
