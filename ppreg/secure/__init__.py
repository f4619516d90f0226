"""Secure two-party computation for PPIR: fixed-point ring, shares, dealer, channels, protocols.

Modules: :mod:`ring` (fixed point in Z_2^64), :mod:`prg` (CSPRNG and seeded SHAKE-256
streams), :mod:`channel` (framed messages, measured traffic), :mod:`dealer` (trusted
third party), :mod:`shares` (additive sharing, Beaver products), :mod:`ppir` (the SSD
term protocol) and :mod:`session` (in-process two-party driver).
"""

from .channel import Channel, InProcessChannel, ProtocolError
from .shares import Shared, TwoPartySession, reveal, share

__all__ = ["Channel", "InProcessChannel", "ProtocolError", "Shared", "TwoPartySession", "reveal", "share"]
