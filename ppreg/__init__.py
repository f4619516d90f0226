"""ppreg: privacy-preserving medical image registration in JAX."""

from ppreg.batch import register_batch
from ppreg.data import load_sample, sample_path
from ppreg.image import Image, load, load_field, save, save_field
from ppreg.losses import lncc, mind, mind_ssc, mutual_information, ncc, ssd
from ppreg.metrics import dice, displacement_rmse, field_rmse, folding, hd95, mean_dice
from ppreg.register import Result, register
from ppreg.svf import jacobian_determinant
from ppreg.warp import interpolate, interpolate_nearest, warp, warp_displacement

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "Image",
    "Result",
    "dice",
    "displacement_rmse",
    "field_rmse",
    "folding",
    "hd95",
    "interpolate",
    "interpolate_nearest",
    "jacobian_determinant",
    "lncc",
    "load",
    "load_field",
    "load_sample",
    "mean_dice",
    "mind",
    "mind_ssc",
    "mutual_information",
    "ncc",
    "register",
    "register_batch",
    "sample_path",
    "save",
    "save_field",
    "ssd",
    "warp",
    "warp_displacement",
]
