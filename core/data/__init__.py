"""Images in, arrays out: reading, validating and loading datasets, plus the one preprocessing every detector uses.

Design rule: bad input gets a clear message and loses nothing. One bad file never spoils a whole load; it is
reported in the :class:`LoadReport` (``skipped`` or ``warnings``) and the rest loads.

    images.py      read_image / read_mask: any Pillow mode to RGB uint8 / bool, limits checked from the header
    dataset.py     Sample, LoadReport and the lazy ImageSet
    loaders.py     load_mvtec, load_folder, load_zip and the dispatcher load_dataset
    zips.py        safe extraction of uploaded archives
    preprocess.py  Preprocess (frame, crop, normalisation, and back) and fit_frame

Example::

    ds = load_dataset("../shared/datasets/bottle")
    print(ds.report.summary())                  # "292 images loaded, 0 skipped, 0 warnings"
    train = ds.subset(split="train")
    x = Preprocess().images_to_tensor([train[0], train[1]])   # (2, 3, 224, 224) float32
"""
from .dataset import MARKED_DEFECTIVE, EmptyDatasetError, ImageSet, LoadReport, Sample, image_batches
from .images import (IMAGE_SUFFIXES, MAX_PIXELS, ImageError, ImageTooLargeError, image_size, png_bytes, read_image,
                     read_mask)
from .loaders import load_dataset, load_folder, load_mvtec, load_zip
from .preprocess import Preprocess, fit_frame
from .zips import extract_zip

__all__ = [
    "IMAGE_SUFFIXES", "MAX_PIXELS", "ImageError", "ImageTooLargeError", "EmptyDatasetError", "read_image", "read_mask", "image_size",
    "png_bytes", "Sample", "LoadReport", "ImageSet", "MARKED_DEFECTIVE", "image_batches", "load_mvtec", "load_folder", "load_zip", "load_dataset",
    "extract_zip", "Preprocess", "fit_frame",
]
