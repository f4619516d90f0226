"""Homomorphic-encryption (CKKS, TenSEAL/SEAL) variants of PPIR: packed, the paper's, B-spline and points,
and the session that drives them."""
