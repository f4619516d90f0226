"""Bundled sample images (NIfTI); see README.md here and :mod:`ppreg.data`."""
