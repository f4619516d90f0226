"""Secret sharing over the ring Z_2^64: fixed-point encoding, shares, the dealer's correlated randomness
(Beaver triples, masks) and masked products with one party's private values."""
