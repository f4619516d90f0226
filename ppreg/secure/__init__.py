"""Secure two-party computation for PPIR, in layers:

- :mod:`ppreg.secure.mpc`: the ring Z_2^64 and fixed point (``ring``), CSPRNG and seeded streams
  (``prg``), the dealer's correlated randomness (``dealer``), additive shares and Beaver products
  (``shares``), products with one party's private values (``private``);
- :mod:`ppreg.secure.net`: framed messages with measured traffic (``channel``), the CurveZMQ
  channel between processes (``transport``), key files (``keys``);
- :mod:`ppreg.secure.protocols`: linear SSD (``linear``), B-spline (``bspline``), mutual information
  (``mi``), local NCC for svf (``lcc``), point clouds (``points``), FLASH (``flash``);
- :mod:`ppreg.secure.ckks`: the homomorphic-encryption variants (``packed``, ``paper``, ``bspline``,
  ``points``) and their ``session``;
- here: party2's and the dealer's ``policy``, the parties' ``roles`` (dispatch of announced
  operations), the in-process ``session`` and the process drivers ``parties``.
"""

from .net.channel import Channel, InProcessChannel, ProtocolError
from .mpc.shares import Shared, TwoPartySession, reveal, share

__all__ = ["Channel", "InProcessChannel", "ProtocolError", "Shared", "TwoPartySession", "reveal", "share"]
