"""Two-party registration protocols over additive shares: linear SSD (PPIR), cubic B-spline, mutual
information, local NCC (svf), point clouds and FLASH."""
