"""ppreg: privacy-preserving medical image registration in JAX."""

from ppreg.data import load_sample, sample_path
from ppreg.image import Image, load, save

__version__ = "0.1.0"

__all__ = ["__version__", "Image", "load", "save", "load_sample", "sample_path"]
