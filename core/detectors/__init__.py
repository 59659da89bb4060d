"""Detectors, one per module, found by name through the registry."""
from .base import (Detector, ModelFolderError, NotFittedError, Prediction, create_detector, get_detector_class,
                   list_detectors, load_detector, register_detector)
from . import patchcore  # noqa: F401  (registers itself)
from . import ae  # noqa: F401
from . import dae  # noqa: F401
from . import vae  # noqa: F401
from . import ganomaly  # noqa: F401
from . import padim  # noqa: F401
from . import fastflow  # noqa: F401
from . import efficientad  # noqa: F401
from . import cpr  # noqa: F401
from . import regad  # noqa: F401
from . import pad  # noqa: F401

__all__ = ["Detector", "ModelFolderError", "NotFittedError", "Prediction", "create_detector", "get_detector_class",
           "list_detectors", "load_detector", "register_detector"]
