"""Security properties of every MPC protocol (linear SSD, B-spline SSD, point clouds), run end to end.

* a party's view (every ring element it receives) is independent of the other party's data:
  two different secret images give views that a chi-square two-sample test cannot tell apart;
* no encoding of the other party's data (nor its negation) appears in what a party receives;
* no correlated-randomness label is derived twice by a party or issued twice by the dealer;
* seeds come from the OS CSPRNG (``secrets``) and no ``numpy.random`` call is made.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import chi2_contingency

from ppreg.data import load_sample
from ppreg.grid import downsample
from ppreg.options import scale_exponent
from ppreg.register import register
from ppreg.secure.mpc import prg
from ppreg.secure import session as session_mod
from ppreg.secure.protocols.points import register_points
from ppreg.secure.mpc.ring import encode
from secure_helpers import Recorder

F = 16
LINEAR = dict(transform="rigid", levels=(1,), max_iterations=3)
SPLINE = dict(transform="bspline", spacing=4, levels=(1,), max_iterations=2)


def _slice(name):
    return np.asarray(downsample(jnp.asarray(load_sample(name).data, jnp.float32), 3))


@pytest.fixture(scope="module")
def images():
    """Real 2D slices shrunk 3x (86 x 74): two different fixed and two different moving images."""
    return {"fixed_a": _slice("BrainProtonDensitySliceBorder20"), "fixed_b": _slice("BrainT1SliceBorder20"),
            "moving_a": _slice("BrainProtonDensitySliceR10X13Y17"), "moving_b": _slice("BrainT1SliceBorder20")[::-1].copy()}


def _run(monkeypatch, protocol, images, fixed, moving):
    rec = Recorder(monkeypatch)
    if protocol == "points":
        p = np.argwhere(images[moving] > np.percentile(images[moving], 90)).astype(np.float64)
        q = np.argwhere(images[fixed] > np.percentile(images[fixed], 90)).astype(np.float64)[: len(p)]
        p = p[: len(q)]
        register_points(p, q, session_mod.SecureSession(F), extent=100.0)
        secret1, secret2 = p - p.mean(0), q - q.mean(0)
    else:
        opts = LINEAR if protocol == "linear" else SPLINE
        register(images[fixed], images[moving], secure="mpc", **opts)
        scale = 2.0 ** max(scale_exponent(jnp.asarray(images[fixed])), scale_exponent(jnp.asarray(images[moving])))
        secret1, secret2 = images[moving] / scale, images[fixed] / scale
    monkeypatch.undo()
    return rec, secret1, secret2


def _same_distribution(x, y, shift):
    """Chi-square two-sample test on one byte of two arrays of ring elements."""
    table = np.stack([np.bincount(((v >> np.uint64(shift)) & np.uint64(255)).astype(np.int64), minlength=256)
                      for v in (x, y)])
    return chi2_contingency(table[:, table.sum(0) > 0]).pvalue


def _encodings(secret):
    enc = np.asarray(encode(np.asarray(secret, np.float64).ravel(), F))
    enc = enc[enc != 0]  # a zero voxel encodes to 0, which a uniform element hits with probability 2^-64
    return np.concatenate([enc, np.uint64(0) - enc])


@pytest.mark.parametrize("protocol", ["linear", "bspline", "points"])
def test_views_are_independent_of_the_other_party(monkeypatch, images, protocol):
    runs = {}
    for case, fixed, moving in (("a", "fixed_a", "moving_a"), ("b_fixed", "fixed_b", "moving_a"),
                                ("b_moving", "fixed_a", "moving_b")):
        runs[case] = _run(monkeypatch, protocol, images, fixed, moving)
    rec_a, secret1_a, secret2_a = runs["a"]
    # party1's view when only party2's secret changes; party2's view when only party1's changes
    for party, other in (("party1", "b_fixed"), ("party2", "b_moving")):
        x, y = rec_a.view(party), runs[other][0].view(party)
        assert min(x.size, y.size) > 500
        for shift in (56, 0):
            assert _same_distribution(x, y, shift) > 1e-4, (party, shift)
    # no plaintext of the other party's secret in what a party receives
    for rec, secret1, secret2 in runs.values():
        assert not np.isin(rec.view("party1"), _encodings(secret2)).any()
        assert not np.isin(rec.view("party2"), _encodings(secret1)).any()


@pytest.mark.parametrize("protocol", ["linear", "bspline", "points"])
def test_no_label_is_used_twice_and_seeds_come_from_the_csprng(monkeypatch, images, protocol):
    drawn = []
    token_bytes = prg.secrets.token_bytes

    def counted(n):
        drawn.append(n)
        return token_bytes(n)

    def forbidden(*args, **kwargs):
        raise AssertionError("numpy.random must not be used by the secure code")

    monkeypatch.setattr(prg.secrets, "token_bytes", counted)
    for name in ("default_rng", "randint", "random", "rand", "randn", "bytes", "choice", "uniform", "normal"):
        monkeypatch.setattr(np.random, name, forbidden)
    rec, _, _ = _run(monkeypatch, protocol, images, "fixed_a", "moving_a")
    assert drawn.count(prg.SEED_BYTES) >= 2  # the dealer's two seeds
    assert len(rec.claims) == len(set(rec.claims)) > 0
    for party in ("party1", "party2"):
        labels = [lab for p, lab in rec.stream_labels if p == party]
        assert len(labels) == len(set(labels)) > 0, party
