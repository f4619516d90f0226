"""ppreg: privacy-preserving medical image registration in JAX."""

from ppreg.data import load_sample, sample_path
from ppreg.image import Image, load, save
from ppreg.losses import ssd
from ppreg.metrics import displacement_rmse
from ppreg.register import Result, register
from ppreg.warp import interpolate, warp, warp_displacement

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "Image",
    "Result",
    "displacement_rmse",
    "interpolate",
    "load",
    "load_sample",
    "register",
    "sample_path",
    "save",
    "ssd",
    "warp",
    "warp_displacement",
]
