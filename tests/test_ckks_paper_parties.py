"""The paper's CKKS v1/v2 (ppreg.secure.ckks.paper) split into party1's and party2's halves: what party2
checks on its own (the query cap, the count, size and level of every ciphertext, contexts without a
secret key), the policy key that admits the variants, and the frame bound derived from the parameters.
Over three processes: tests/test_party_schemes.py."""

import numpy as np
import pytest

pytest.importorskip("tenseal")

from ppreg.secure.ckks import paper, remote  # noqa: E402
from ppreg.secure.net.channel import InProcessChannel, ProtocolError  # noqa: E402
from ppreg.secure.policy import DEFAULT, Guard, Policy, PolicyError, load_policy  # noqa: E402

M, P = 40, 2


def _pair(variant, **kw):
    channel = InProcessChannel()
    two = paper.PaperParty2(variant, channel, partition=16, **kw)
    one = paper.PaperParty1(variant, channel, partition=16)
    two.send_context()
    one.receive_context()
    if variant == "v2":
        one.send_context()
        two.receive_context()
    return channel, one, two


def _data():
    rng = np.random.default_rng(2)  # test data, not a mask
    return rng.normal(0.0, 5.0, (M, P)), rng.uniform(-1.0, 1.0, M)


def _image(one, two, variant, fixed, p=P):
    two.prepare_image("J", fixed)
    if variant == "v1":
        return one.receive_image("J", fixed.size)
    two.send_replicated("J", "J", p)
    return one.receive_replicated("J", fixed.size, p)


@pytest.fixture(scope="module")
def v2_pair():
    return _pair("v2", max_queries=2)


def test_v2_halves_compute_r_and_cap_queries(v2_pair):
    """The split halves give ``R = S^T J`` to CKKS precision; party2 answers at most ``max_queries``
    queries (then ProtocolError, before it reads the query) and draws one key pair per session (a second
    context, its own or party1's, is refused)."""
    channel, one, two = v2_pair
    weights, fixed = _data()
    image = _image(one, two, "v2", fixed)
    for label in ("q0", "q1"):
        one.query(label, image, weights)
        two.respond(label, "J", P)
        r = one.finish(label)
        np.testing.assert_allclose(r, weights.T @ fixed, atol=1e-4 * np.max(np.abs(weights.T @ fixed)))
    one.query("q2", image, weights)
    with pytest.raises(ProtocolError, match="at most 2 CKKS queries"):
        two.respond("q2", "J", P)
    with pytest.raises(ProtocolError, match="already drew"):  # one key per session: no second context
        two.send_context()
    with pytest.raises(ProtocolError, match="one public context"):
        two.receive_context()


@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_party2_refuses_malformed_ciphertexts(variant):
    """Party2 refuses a ciphertext it would decrypt (v1: the query; v2: ``R_1``) or evaluate (v2: party1's
    ``S_2``) of the wrong size or level, bytes that are no CKKS vector and frames over the size bound, with a
    ProtocolError naming the query (never a TenSEAL traceback), and a missing ciphertext (wrong count)."""
    channel, one, two = _pair(variant)
    _, fixed = _data()
    _image(one, two, variant, fixed)
    _, rows, _, chunks2 = paper.v2_layout(M, P)
    honest_s2 = None if variant == "v1" else paper._to_wire(one.ts.ckks_vector(one.ctx, [0.1] * (rows * P)))
    level1 = paper._to_wire(two.ts.ckks_vector(two.ctx, [0.5] * 3) * ([1.0] * 3))  # a product: level 1, 3 values
    forgeries = {"level 0": paper._to_wire(two.ts.ckks_vector(two.ctx, [0.5] * (P if variant == "v1" else rows * P))),
                 "wrong size": level1,
                 "not a vector": np.frombuffer(b"\x0a\x01\x02" + bytes(100), np.uint8),
                 "oversized": np.zeros(paper.vector_bytes() + 1, np.uint8)}
    targets = ["query"] if variant == "v1" else ["S2", "R1"]
    for n, (target, (name, data)) in enumerate((t, f) for t in targets for f in forgeries.items()):
        label = f"q{n}"
        if target == "S2" and name == "level 0":  # S_2 is fresh (level 0): a product is the wrong level there
            full = two.ts.ckks_vector(two.ctx, [0.5] * (rows * P))
            data = paper._to_wire(full * ([1.0] * (rows * P)))
        if variant == "v1":
            channel.send("party1", "party2", label, data)
        else:
            channel.send("party1", "party2", f"{label}/exponent", np.asarray([0], np.int32))
            channel.send("party1", "party2", f"{label}/S2/0", data if target == "S2" else honest_s2)
            if target == "R1":
                channel.send("party1", "party2", f"{label}/R1", data)
        with pytest.raises(ProtocolError, match=f"CKKS query {label}"):
            two.respond(label, "J", P)
        channel._queues.clear()  # what party2 sent back before refusing
    if variant == "v2":  # one S_2 ciphertext too few: party2 waits for the missing one, then refuses
        assert chunks2 == 1
        channel.send("party1", "party2", "short/exponent", np.asarray([0], np.int32))
        channel.send("party1", "party2", "short/R1", level1)
        with pytest.raises(ProtocolError):
            two.respond("short", "J", P)


def test_context_checks():
    """A context with its secret key, a truncated one, or one over the bound is refused; a v1 context
    without Galois keys too."""
    import tenseal as ts

    ctx = paper._new_context(ts, galois=False)
    full = np.frombuffer(ctx.serialize(save_secret_key=True, save_galois_keys=False, save_relin_keys=False),
                         np.uint8)
    public = paper._public_bytes(ctx)
    with pytest.raises(ProtocolError, match="at most"):  # the secret key does not fit a v2 context's bound
        paper._context_from_wire(ts, full, galois=False, what="ctx")
    with pytest.raises(ProtocolError, match="without a secret key"):  # it fits v1's (Galois keys)
        paper._context_from_wire(ts, full, galois=True, what="ctx")
    with pytest.raises(ProtocolError, match="Galois"):
        paper._context_from_wire(ts, public, galois=True, what="ctx")
    with pytest.raises(ProtocolError, match="cannot load"):
        paper._context_from_wire(ts, public[: public.size // 2], galois=False, what="ctx")
    with pytest.raises(ProtocolError, match="at most"):
        paper._context_from_wire(ts, np.zeros(paper.context_bytes(False) + 1, np.uint8), galois=False, what="ctx")
    assert not paper._context_from_wire(ts, public, galois=False, what="ctx").is_private()


def test_paper_frame_bound_is_derived_from_the_parameters():
    """The v1 context (public and Galois keys, ~34 MB) and a ciphertext fit the bound, which is computed from
    N and the moduli (SEAL's Galois key count checked against TenSEAL's), far below 1 GiB, and only counted
    when the policy admits a paper variant."""
    import tenseal as ts

    ctx = paper._new_context(ts, galois=True)
    assert ctx.galois_keys().data.size() == paper.GALOIS_KEYS
    context, vector = paper._public_bytes(ctx).size, paper._to_wire(ts.ckks_vector(ctx, [0.1] * 4096)).size
    assert vector <= paper.vector_bytes() and context <= paper.context_bytes(True) < 1.2 * context
    # decompressed too (what SEAL allocates), an honest context stays within the bound
    paper._check_inflated(paper._public_bytes(ctx).tobytes(), paper.context_bytes(True), "v1 context")
    v1 = Policy(ckks_variants=("packed", "v1"))
    v2 = Policy(ckks_variants=("packed", "v2"))
    assert remote.paper_frame_bound(DEFAULT) == 0 and remote.paper_frame_bound(v2) == paper.context_bytes(False)
    assert remote.paper_frame_bound(v1) == paper.context_bytes(True) < 1 << 26
    assert remote.frame_bound(256, 2, v1) > context > remote.frame_bound(256, 2, DEFAULT)


def test_guard_admits_paper_variants_by_policy(tmp_path):
    """``ckks_variants`` (default ``["packed"]``) decides which CKKS variant party2 runs; v2's
    ``ckks_sample`` is refused under another variant; the odd column and the final error's second number
    are counted for packed only; a v2 query also counts ``ceil(k / 2)``, the half ``J_2`` of its ``k`` values
    that a deviating party1 reads by inflating ``S_2``."""
    from ppreg.secure.roles import key_to_json
    import jax

    (tmp_path / "p.json").write_text('{"ckks_variants": ["packed", "v2"]}')
    assert load_policy(tmp_path / "p.json").ckks_variants == ("packed", "v2")
    (tmp_path / "bad.json").write_text('{"ckks_variants": ["v3"]}')
    with pytest.raises(ValueError, match="ckks_variants"):
        load_policy(tmp_path / "bad.json")
    level = {"op": "ckks_level", "label": "L0/mask", "n": 64, "factor": 1, "kind": "rigid", "method": "urs",
             "k": 32, "ndim": 2, "key": key_to_json(jax.random.key(0))}
    for variant, policy, revealed in (("v1", DEFAULT, None), ("v2", load_policy(tmp_path / "p.json"), 3 + 16 + 1),
                                      ("packed", DEFAULT, 4 + 2)):
        guard = Guard("party2", policy, voxels=64)
        guard.check({"op": "setup", "frac_bits": 16})
        setup = {"op": "ckks_setup", "label": "ckks/setup", "variant": variant}
        if revealed is None:
            with pytest.raises(PolicyError, match="ckks_variants"):
                guard.check(setup)
            continue
        guard.check(setup)
        guard.check(level)
        sample = {"op": "ckks_sample", "label": "L0/it0/J", "mask": "L0/mask", "it": 0, "columns": 3}
        if variant == "packed":
            with pytest.raises(ProtocolError, match="no 'ckks_sample'"):
                guard.check(sample)
        else:
            with pytest.raises(ProtocolError, match="2 columns"):
                guard.check(dict(sample, label="x", columns=2))
            guard.check(sample)
        guard.check({"op": "ckks_query", "label": "L0/it0", "mask": "L0/mask", "it": 0})
        guard.check({"op": "ckks_ssd", "label": "final/ssd", "mask": "L0/mask", "n": 64})
        assert guard.revealed == revealed


def test_moving_party_runs_paper_variants_for_linear_ssd_only():
    """``ppreg party --ckks-variant v1|v2`` is for ``--secure ckks`` with ssd and a linear transform; the
    B-spline term, point clouds and MPC are refused up front (exit status 2), naming the variant."""
    from ppreg.secure.parties import check_scheme

    check_scheme("ckks", "ssd", "affine", "v1")
    for secure, loss, transform in (("ckks", "ssd", "bspline"), ("ckks", "points", "rigid"), ("mpc", "ssd", "rigid")):
        with pytest.raises(ValueError, match="ckks_variant='v2'"):
            check_scheme(secure, loss, transform, "v2")
    with pytest.raises(ValueError, match="ckks_variant must be one of"):
        check_scheme("ckks", "ssd", "affine", "v3")


def _zero_key_context():
    """A v2-sized public context (with its public key) whose Galois keys are two entries of three all-zero
    keys: 40 kB on the wire, 3 MB once decompressed (a zero key compresses about 30000 to 1)."""
    import struct

    import tenseal as ts
    import zstandard

    data = paper._public_bytes(paper._new_context(ts, galois=False)).tobytes()
    fields = paper._proto_fields(data)
    public = paper._proto_fields(next(v for f, w, v in fields if f == 2))
    pk = next(v for f, w, v in public if f == 1)
    key = bytearray(pk[:16] + zstandard.ZstdDecompressor().stream_reader(pk[16:]).read())
    key[5], key[113:] = 0, bytes(len(key) - 113)  # uncompressed, every data word zero (still a valid key)
    struct.pack_into("<Q", key, 8, len(key))
    members = bytearray(key[16:48]) + struct.pack("<Q", 8)  # the keys' parms_id, 8 Galois elements
    for i in range(8):
        members += struct.pack("<Q", 3) + bytes(key) * 3 if i in (1, 3) else struct.pack("<Q", 0)
    body = zstandard.ZstdCompressor(level=19).compress(bytes(members))
    header = bytearray(pk[:16])
    struct.pack_into("<Q", header, 8, 16 + len(body))
    galois = bytes(header) + body
    public = [(f, w, v) for f, w, v in public if f != 5] + [(5, 2, galois)]
    return np.frombuffer(paper._proto_bytes([(f, w, paper._proto_bytes(public) if f == 2 else v)
                                             for f, w, v in fields]), np.uint8), len(members)


def test_context_that_decompresses_past_its_bound_is_refused_before_loading():
    """TenSEAL hands a context's keys to SEAL, which inflates them and allocates every key they declare before
    any check (measured: a 72 kB context of zero Galois keys, under v2's 0.53 MB bound, allocated 1.5 GB; the
    bound allows ~10 GB). The receiver counts what the context's SEAL objects decompress to first, without
    keeping it, and refuses past :func:`~ppreg.secure.ckks.paper.context_bytes`."""
    import tenseal as ts

    bomb, inflated = _zero_key_context()
    assert bomb.size <= paper.context_bytes(False) < inflated
    with pytest.raises(ProtocolError, match="decompress to more than"):
        paper._context_from_wire(ts, bomb, galois=False, what="party1's CKKS context")
    garbage = np.frombuffer(b"\x0a\x04\x5e\xa1\x10\x04" + bytes(10), np.uint8)  # a SEAL header cut short
    with pytest.raises(ProtocolError, match="cannot load"):
        paper._context_from_wire(ts, garbage, galois=False, what="ctx")


def test_v1_query_weights_fit_the_encrypted_values():
    """Party1's v1 query refuses more weight rows than the image has values (the last sub-array is shorter
    than the partition: 40 values in 16 + 16 + 8), naming both counts, not a NumPy broadcasting error."""
    channel, one, two = _pair("v1")
    _, fixed = _data()
    image = _image(one, two, "v1", fixed)
    with pytest.raises(ValueError, match="48 weight rows but 40 encrypted values"):
        one.query("q", image, np.ones((48, P)))


def test_party2_keeps_one_pending_v2_sample_per_level(v2_pair):
    """A ``ckks_sample`` that no query consumed is dropped when the next one arrives: a deviating party1
    cannot make party2 hold one image per command."""
    import jax

    channel, one, two = v2_pair
    _, fixed = _data()

    class Role:
        ckks, levels = two, {"L9/mask": {"prepared": False, "values": fixed, "key": jax.random.key(0), "n": M,
                                         "k": 20}}

        def level(self, label):
            return self.levels[label]

    for it in range(3):
        remote._sample_fixed(Role(), {"op": "ckks_sample", "label": f"L9/it{it}/J", "mask": "L9/mask", "columns": P,
                                      "it": it})
    assert [k for k in two._values if k.startswith("L9/")] == ["L9/it2/J"]
    assert [k for k in two._replicated if k[0].startswith("L9/")] == [("L9/it2/J", P)]
    assert Role.levels["L9/mask"]["sample"] == (2, "L9/it2/J")
    channel._queues.clear()
