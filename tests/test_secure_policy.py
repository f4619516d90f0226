"""Issue 13, findings 3, 5 and 8: party2's (and the dealer's) policy, session binding, frame limits.

Each test reproduces what a deviating party1 (or a stray connection) could do before the fix and
checks that it is now refused: a command outside party2's policy (refused with the rule's name, in
one process and over the network, where party1 is told why), a label reused to make party2 mask
twice with one stream, a second connection with a known key, a hello of another session, a frame
over the protocol's bound, garbage commands and inputs (ProtocolError, never another exception).
"""

import json

import numpy as np
import pytest
import zmq
from secure_helpers import in_thread

from ppreg.party_cli import free_port
from ppreg.secure.net import keys, transport as net
from ppreg.secure import policy
from ppreg.secure.mpc import prg
from ppreg.secure.net.channel import InProcessChannel, PeerRefusedError, ProtocolError, encode_message
from ppreg.secure.mpc.dealer import PartyRandomness, bitmask_to_indices
from ppreg.secure.policy import DEFAULT, Guard, Policy, PolicyError, load_policy
from ppreg.secure.roles import DealerRole, FixedRole, LocalPeers, decode_json, encode_json, key_to_json

KEYS = {r: keys.generate() for r in ("party1", "party2", "dealer")}
T = 3.0
KEY = key_to_json(__import__("jax").random.key(0))


def addr():
    return f"127.0.0.1:{free_port()}"


def linear_mask(label="L0/mask", n=256, k=256, kind="rigid", method=None, factor=1):
    return {"op": "mask", "label": label, "n": n, "factor": factor, "kind": kind, "method": method, "k": k,
            "ndim": 2, "key": KEY}


def guard(pol=DEFAULT, voxels=256):
    g = Guard("party2", pol, voxels=voxels)
    g.check({"op": "setup", "frac_bits": 16})
    return g


# --- finding 3: the policy ----------------------------------------------------------------------------


def test_policy_files_json_and_toml(tmp_path):
    (tmp_path / "p.json").write_text(json.dumps({"losses": ["ssd"], "max_iterations": 50, "gms": False,
                                                 "max_revealed": None, "frac_bits": [12, 20]}))
    (tmp_path / "p.toml").write_text('losses = ["ssd"]\nmax_iterations = 50\ngms = false\nfrac_bits = [12, 20]\n'
                                     'max_revealed_per_voxel = inf\n')
    for name in ("p.json", "p.toml"):
        pol = load_policy(tmp_path / name)
        assert pol.losses == ("ssd",) and pol.max_iterations == 50 and not pol.gms and pol.frac_bits == (12, 20)
        assert pol.max_revealed is None and pol.min_samples == DEFAULT.min_samples  # a key left out keeps its default
    assert load_policy(tmp_path / "p.toml").max_revealed_per_voxel is None
    (tmp_path / "lncc.toml").write_text('lncc_open = "force"\nmin_fluid_sigma = 2\n')
    assert (load_policy(tmp_path / "lncc.toml").lncc_open, load_policy(tmp_path / "lncc.toml").min_fluid_sigma) == (
        "force", 2.0)
    for doc, match in [({"max_iteration": 5}, "unknown policy key"), ({"max_iterations": 0}, "'max_iterations'"),
                       ({"losses": ["ssd", "ncc"]}, "'losses'"), ({"gms": "no"}, "'gms'"),
                       ({"frac_bits": [4, 30]}, "'frac_bits'"), ([1, 2], "a table"),
                       ({"lncc_open": "raw"}, "'lncc_open'"), ({"min_fluid_sigma": -1}, "'min_fluid_sigma'")]:
        (tmp_path / "bad.json").write_text(json.dumps(doc))
        with pytest.raises(ValueError, match=match):
            load_policy(tmp_path / "bad.json")
    (tmp_path / "bad.toml").write_text("losses = [ssd")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_policy(tmp_path / "bad.toml")


@pytest.mark.parametrize("pol, commands, rule", [
    (Policy(frac_bits=(12, 20)), [{"op": "setup", "frac_bits": 22}], "frac_bits"),
    (Policy(losses=("ssd",)), [{"op": "mi_level", "label": "mi/L0", "factor": 1, "n": 256, "k": 256, "bins": 32,
                                "kind": "rigid", "params": 3, "shape": [16, 16], "key": KEY}], "losses"),
    (Policy(transforms=("translation",)), [linear_mask(kind="affine")], "transforms"),
    (Policy(gms=False), [linear_mask(method="gms", k=64)], "gms"),
    (DEFAULT, [linear_mask(method="urs", k=4)], "min_samples"),
    (Policy(max_iterations=2), [linear_mask()] + [{"op": "query", "label": f"L0/it{i}", "mask": "L0/mask", "it": i}
                                                  for i in range(3)], "max_iterations"),
    (Policy(max_revealed=7), [linear_mask()] + [{"op": "query", "label": f"L0/it{i}", "mask": "L0/mask", "it": i}
                                                for i in range(3)], "max_revealed"),
    (Policy(max_revealed_per_voxel=0.02), [linear_mask()] + [{"op": "query", "label": f"L0/it{i}", "mask": "L0/mask",
                                                              "it": i} for i in range(2)], "max_revealed_per_voxel"),
    (DEFAULT, [linear_mask(label="final/mask", kind=None)] + [{"op": "ssd", "label": f"final/ssd{i}",
                                                               "mask": "final/mask", "n": 256} for i in range(2)],
     "max_final_errors"),
    (Policy(max_levels=2), [linear_mask(label=f"L{i}/mask") for i in range(3)], "max_levels"),
    (Policy(max_bins=16), [{"op": "mi_level", "label": "mi/L0", "factor": 1, "n": 256, "k": 256, "bins": 32,
                            "kind": "rigid", "params": 3, "shape": [16, 16], "key": KEY}], "max_bins"),
    (Policy(symmetric=False), [{"op": "lcc_level", "label": "L0", "factor": 1, "shape": [16, 16], "eps": 1e-5,
                                "symmetric": True, "first": True, "step": 0.5, "sigma_fluid": 1.0, "sigma_diff": 0.5,
                                "steps": 7, "window": 5, "floor": 1e-3, "frac_bits": 18}], "symmetric"),
    (Policy(operations=("mask", "query")), [{"op": "points", "label": "pts", "n": 50, "d": 2, "extent": 64.0}],
     "operations"),
    # finding 6: the default policy opens only the smoothed lncc force, smoothed by at least min_fluid_sigma
    (DEFAULT, [{"op": "lcc_level", "label": "L0", "factor": 1, "shape": [16, 16], "eps": 1e-5, "sigma_fluid": 3.0,
                "window": 5, "floor": 0.1, "frac_bits": 18, "open": "force"}], "lncc_open"),
    (DEFAULT, [{"op": "lcc_level", "label": "L0", "factor": 1, "shape": [16, 16], "eps": 1e-5, "window": 5,
                "floor": 0.1, "frac_bits": 18}], "lncc_open"),  # a party1 that does not say: the raw force
    (Policy(min_fluid_sigma=2.0), [{"op": "lcc_level", "label": "L0", "factor": 1, "shape": [16, 16], "eps": 1e-5,
                                    "sigma_fluid": 1.5, "window": 5, "floor": 0.1, "frac_bits": 18,
                                    "open": "smoothed"}], "min_fluid_sigma"),
])
def test_commands_outside_the_policy_are_refused_with_the_rules_name(pol, commands, rule):
    """A party1 announcing what party2's policy does not allow is refused before party2 runs it."""
    g = Guard("party2", pol, voxels=256)
    *allowed, last = ([] if commands[0]["op"] == "setup" else [{"op": "setup", "frac_bits": 16}]) + commands
    for cmd in allowed:
        g.check(cmd)
    with pytest.raises(PolicyError, match=f"party2: refused by policy rule '{rule}'") as err:
        g.check(last)
    assert err.value.rule == rule
    # without a policy (one process: one user) the same commands are well-formed and pass
    g = Guard("party2", None, voxels=256)
    for cmd in allowed + [last]:
        g.check(cmd)


def test_default_policy_admits_the_documented_defaults():
    """The default policy admits each loss at its default schedule (counted as party2 would): rigid
    SSD at 100 iterations on levels 4,2,1 with URS 10 % (the demo), B-spline at 15, MI at 200, and
    symmetric lncc at 60, 60, 40 iterations (more than its default finest count, 30; this reveals about 150
    numbers per voxel in 3D)."""
    shape = (182, 218, 182)
    n = int(np.prod(shape))
    g = guard(voxels=n)
    for li, f in enumerate((4, 2, 1)):
        nl = int(np.prod([-(-s // f) for s in shape]))
        g.check(linear_mask(f"L{li}/mask", n=nl, k=max(nl // 10, 1), method="urs", factor=f) | {"ndim": 3})
        for it in range(100):
            g.check({"op": "query", "label": f"L{li}/it{it}", "mask": f"L{li}/mask", "it": it})
    g.check({"op": "ssd", "label": "final/ssd", "mask": "L2/mask", "n": n})
    for li, (f, its) in enumerate(zip((4, 2, 1), (60, 60, 40))):
        level_shape = [-(-s // f) for s in shape]
        g.check({"op": "lcc_level", "label": f"lcc/L{li}", "factor": f, "shape": level_shape, "eps": 1e-5,
                 "symmetric": True, "first": li == 0, "step": 0.5, "sigma_fluid": 1.0, "sigma_diff": 0.5, "steps": 7,
                 "window": 5, "floor": 1e-3, "frac_bits": 14, "open": "smoothed"})
        for it in range(its):
            for rnd in ("cov", "da", "dab", "he", "hf", "hh", "r2", "r1", "grad", "gradb", "out"):
                g.check({"op": "lcc_round", "round": rnd, "label": f"lcc/L{li}/it{it}/{rnd}", "level": f"lcc/L{li}"})
    g.check({"op": "lcc_halves"})
    assert 140 * n < g.revealed < DEFAULT.max_revealed_per_voxel * n
    # B-spline: the default refuses it (what it reveals rebuilds the image, issue 13 finding 1:
    # tests/test_secure_bspline_leakage.py); a policy with 3 functionals per voxel admits 15 iterations
    spline_level = {"op": "spline_level", "label": "L0/mask", "n": 4096, "k": 2048, "method": "gms",
                    "shape": [64, 64], "spacing": 4, "sigma": 0.0, "key": KEY}
    with pytest.raises(PolicyError, match="max_spline_functionals_per_voxel"):
        guard(voxels=64 * 64).check(spline_level)
    g = guard(Policy(max_spline_functionals_per_voxel=3.0), voxels=64 * 64)
    g.check(spline_level)
    for it in range(15):
        g.check({"op": "spline_query", "label": f"L0/it{it}", "mask": "L0/mask", "it": it})
    assert g.spline_functionals == 15 * 2 * 19**2
    g = guard(voxels=64 * 64)
    g.check({"op": "mi_level", "label": "mi/L0", "factor": 1, "n": 4096, "k": 409, "bins": 32, "kind": "affine",
             "params": 6, "shape": [64, 64], "key": KEY})
    for it in range(200):
        g.check({"op": "mi_joint", "label": f"mi/L0/it{it}/p", "level": "mi/L0", "it": it})
        g.check({"op": "mi_grad", "label": f"mi/L0/it{it}/g", "joint": f"mi/L0/it{it}/p", "level": "mi/L0", "it": it})


def _fixed_role(pol=None, *, image=None):
    """Party2 in its own role object over an in-process channel, after ``setup`` and ``describe``
    (the dealer's seed queued by hand): party1's commands are then given to ``role.handle`` directly,
    as a deviating party1 could send them over the network (leaving the dealer out)."""
    ch = InProcessChannel()
    image = np.linspace(-1, 1, 256, dtype=np.float32).reshape(16, 16) if image is None else image
    role = FixedRole(ch, image, np.eye(4), 0, policy=pol)
    ch.send("dealer", "party2", "seed", np.frombuffer(bytes(range(32)), np.uint8), phase="offline")
    role.handle({"op": "setup", "frac_bits": 16})
    role.handle({"op": "describe", "exponent": 0})
    ch.recv("party1", "party2", "describe")
    return ch, role


def test_party2_refuses_an_iteration_past_its_policy_in_a_real_session():
    """End to end in one process: the dealer serves anything (no policy), party2's policy allows two
    iterations; party1's third query is refused by party2 before it answers."""
    from ppreg.secure.session import SecureSession

    image = np.linspace(-1, 1, 256, dtype=np.float32).reshape(16, 16)
    ch = InProcessChannel()
    peers = LocalPeers(DealerRole(ch), FixedRole(ch, image, np.eye(4), 0, policy=Policy(max_iterations=2)))
    session = SecureSession(16, channel=ch, peers=peers)
    session.step({"op": "describe", "exponent": 0}, after=lambda _: ch.recv("party1", "party2", "describe"))
    from ppreg import optim
    from ppreg.grid import level_coordinates

    coords = level_coordinates((16, 16), 1).reshape(-1, 2)
    level = optim.Level(optim.moving_level(np.roll(image, 1, 0), 1), None, coords, np.full(2, 7.5, np.float32))
    with pytest.raises(PolicyError, match="rule 'max_iterations'"):
        session.run_level(np.eye(3, dtype=np.float32), level, None, __import__("jax").random.key(0), level_index=0,
                          kind="translation", factor=1, method=None, k=256, max_iterations=5, tol=0.0, damping=1e-3)
    answered = [t for (src, dst), q in ch._queues.items() if src == "party2" for t in q]
    assert peers.roles["party2"].guard.iterations == 2 and not answered  # nothing of the third query


def test_the_dealer_enforces_its_own_policy():
    """The dealer refuses too (with its own policy file): it never issues randomness for a refused operation."""
    ch = InProcessChannel()
    dealer = DealerRole(ch, policy=Policy(gms=False, transforms=("rigid",)))
    dealer.handle({"op": "setup", "frac_bits": 16})
    with pytest.raises(PolicyError, match="dealer: refused by policy rule 'gms'"):
        dealer.handle(linear_mask(method="gms", k=64))
    with pytest.raises(PolicyError, match="dealer: refused by policy rule 'transforms'"):
        dealer.handle({"op": "spline_level", "label": "L1/mask", "n": 256, "k": 256, "method": None,
                       "shape": [16, 16], "spacing": 4, "sigma": 0.0, "key": KEY})
    assert dealer.dealer._issued == set() and not dealer.levels


def test_policy_refusal_reaches_party1_over_the_network():
    """Three endpoints on loopback (threads): party2's policy allows 2 iterations, party1 asks for 4.
    Party2 stops with the rule's name, and party1's error says why (party2's error frame), not just
    that the connection dropped."""
    from ppreg.image import Image
    from ppreg.secure.parties import register_moving, run_dealer, run_fixed
    from ppreg.secure.roles import RemotePeers
    from ppreg.secure.session import SecureSession

    rng = np.random.default_rng(0)
    fixed = np.asarray(rng.uniform(0, 1, (16, 16)), np.float32)
    a_dealer, a_p1 = addr(), addr()
    dealer = in_thread(lambda: run_dealer(KEYS["dealer"], listen=a_dealer, moving_key=KEYS["party1"].public,
                                          fixed_key=KEYS["party2"].public, timeout=30))
    fixed_t = in_thread(lambda: run_fixed(Image(fixed, np.eye(4)), KEYS["party2"], connect=a_p1, dealer=a_dealer,
                                          peer_key=KEYS["party1"].public, dealer_key=KEYS["dealer"].public,
                                          timeout=30, policy=Policy(max_iterations=2)))
    with net.NetworkChannel("party1", KEYS["party1"], listen=a_p1, accept={"party2": KEYS["party2"].public},
                            connect={"dealer": (a_dealer, KEYS["dealer"].public)}, timeout=30) as ch:
        assert ch.announced == {"party2": {"voxels": 256, "ndim": 2, "shape": [16, 16]}}  # relayed by the dealer
        session = SecureSession(16, channel=ch, peers=RemotePeers(ch))
        with pytest.raises(PeerRefusedError, match=r"fixed party \(party2\) stopped the session: party2: refused by "
                                                    r"policy rule 'max_iterations'"):
            register_moving(np.roll(fixed, 1, 0), session, transform="translation", levels=(1,), max_iterations=4,
                            tol=0.0)
    for t, _ in (dealer, fixed_t):
        t.join(10)
    assert isinstance(fixed_t[1]["error"], PolicyError) and fixed_t[1]["error"].rule == "max_iterations"
    assert isinstance(dealer[1].get("error"), (ProtocolError, ConnectionError))  # the dealer stops too


def test_cli_policy_option(tmp_path, capsys):
    from ppreg.cli import main

    (tmp_path / "bad.json").write_text('{"max_iterations": -1}')
    base = ["party", "--key", str(tmp_path / "none.key"), "--policy"]
    assert main(base + [str(tmp_path / "bad.json"), "--role", "fixed"]) == 2
    assert "'max_iterations' must be an integer >= 1" in capsys.readouterr().err
    assert main(base + [str(tmp_path / "bad.json"), "--role", "moving"]) == 2
    assert "--policy is for the fixed party and the dealer" in capsys.readouterr().err
    assert main(base + [str(tmp_path / "missing.toml"), "--role", "dealer"]) == 2
    assert "cannot read policy file" in capsys.readouterr().err


# --- finding 5: session binding -----------------------------------------------------------------------


def test_party2_refuses_a_reused_label_even_without_the_dealer():
    """The attack: party1 opens a level, then opens another under the same label (here a smoothed
    B-spline level), leaving the dealer out; party2 would mask both with one stream ``v`` and party1
    would learn ``J - blur(J)``. Party2's own record refuses the second before anything is sent."""
    ch, role = _fixed_role()
    role.handle(linear_mask("L0/mask", factor=1))
    first = ch.recv("party1", "party2", "L0/mask")
    assert first.shape == (256,)
    with pytest.raises(ProtocolError, match="'L0/mask' was already used"):
        role.handle({"op": "spline_level", "label": "L0/mask", "n": 256, "k": 256, "method": None, "shape": [16, 16],
                     "spacing": 4, "sigma": 2.0, "key": KEY})
    with pytest.raises(ProtocolError, match="never sent"):  # no second masked image
        ch.recv("party1", "party2", "L0/mask")
    # the stream record itself: a second derivation of one label is refused
    rand = PartyRandomness("party2", ch, unique=True)
    rand._seed = bytes(32)
    rand.stream("x/v", (3,))
    with pytest.raises(ProtocolError, match="already used"):
        rand.stream("x/v", (3,))


def test_second_connection_with_a_known_key_is_refused():
    a = addr()
    t, out = in_thread(lambda: net.NetworkChannel("party1", KEYS["party1"], listen=a,
                                                  accept={"party2": KEYS["party2"].public}, timeout=T))
    first = net.NetworkChannel("party2", KEYS["party2"], connect={"party1": (a, KEYS["party1"].public)}, timeout=T)
    t.join(5)
    listener = out["value"]
    try:
        assert first.session_id == listener.session_id and len(first.session_id) == 16
        with pytest.raises(net.AuthenticationError, match="refused our key"):  # a replay, or a stale process
            net.NetworkChannel("party2", KEYS["party2"], connect={"party1": (a, KEYS["party1"].public)}, timeout=T)
        assert listener._registry.duplicates >= 1
        first.send("party2", "party1", "share", np.arange(3.0))  # the first connection is unaffected
        np.testing.assert_array_equal(listener.recv("party1", "party2", "share"), np.arange(3.0))
    finally:
        first.close(linger=0)
        listener.close(linger=0)


def test_hello_of_another_session_is_refused():
    """A connection that names another session id in its hello (replayed from another session) is refused."""
    from test_secure_net import KEYS as NET_KEYS
    from test_secure_net import raw_party2

    a = addr()
    t, out = in_thread(lambda: net.NetworkChannel("party1", NET_KEYS["party1"], listen=a,
                                                  accept={"party2": NET_KEYS["party2"].public}, timeout=T))
    ctx, sock, tag = raw_party2(a, hello={"role": "party2", "session": "ab" * 16})
    t.join(5)
    try:
        assert tag is None and isinstance(out.get("error"), ProtocolError)
        assert "another session" in str(out["error"])
    finally:
        sock.close(0)
        ctx.term()


def test_prf_streams_are_bound_to_the_session():
    seed = bytes(range(32))
    plain = prg.prf_uint64(seed, "L0/mask/v", (4,))
    a, b = (prg.prf_uint64(seed, "L0/mask/v", (4,), context=c) for c in (b"A" * 16, b"B" * 16))
    assert not np.array_equal(plain, a) and not np.array_equal(a, b)

    class Bound(InProcessChannel):
        session_id = b"A" * 16

    rand = PartyRandomness("party2", Bound())
    rand._seed = seed
    np.testing.assert_array_equal(rand.stream("L0/mask/v", (4,)), a)


# --- finding 8: frame limits from the protocol, decode errors ---------------------------------------------


def test_frames_over_the_protocols_bound_are_refused_at_the_socket():
    """Party2 with a 16x16 image accepts frames up to frame_limit(256 voxels), not 1 GiB: a 1 MB
    frame from party1 is dropped by libzmq (ZMQ_MAXMSGSIZE, checked before the message is
    allocated) and party2 stops, naming its limit."""
    from ppreg.image import Image
    from ppreg.secure.parties import run_dealer, run_fixed

    limit = policy.frame_limit(256, 2, DEFAULT, shape=(16, 16))
    assert limit < 1 << 22
    a_dealer, a_p1 = addr(), addr()
    dealer = in_thread(lambda: run_dealer(KEYS["dealer"], listen=a_dealer, moving_key=KEYS["party1"].public,
                                          fixed_key=KEYS["party2"].public, timeout=T))
    fixed_t = in_thread(lambda: run_fixed(Image(np.ones((16, 16), np.float32), np.eye(4)), KEYS["party2"],
                                          connect=a_p1, dealer=a_dealer, peer_key=KEYS["party1"].public,
                                          dealer_key=KEYS["dealer"].public, timeout=T * 2))
    with net.NetworkChannel("party1", KEYS["party1"], listen=a_p1, accept={"party2": KEYS["party2"].public},
                            connect={"dealer": (a_dealer, KEYS["dealer"].public)}, timeout=T) as ch:
        ch.send("party1", "party2", "cmd", np.zeros(1 << 20, np.uint8))
        fixed_t[0].join(10)
    dealer[0].join(10)
    err = fixed_t[1]["error"]
    assert isinstance(err, net.PeerLostError) and f"{limit}-byte limit" in str(err)
    # the dealer's own bound: commands and party1's GMS bitmasks over at most max_voxels voxels
    assert policy.dealer_frame_limit(DEFAULT) == policy.MAX_HEADER_BYTES + (DEFAULT.max_voxels + 7) // 8


def test_receive_limits_set_the_socket_option_and_decode_check():
    a = addr()
    t, out = in_thread(lambda: net.NetworkChannel("party1", KEYS["party1"], listen=a,
                                                  accept={"party2": KEYS["party2"].public}, timeout=T))
    peer = net.NetworkChannel("party2", KEYS["party2"], connect={"party1": (a, KEYS["party1"].public)}, timeout=T,
                              receive_limits={"party1": 5000})
    t.join(5)
    ch = out["value"]
    try:
        assert peer._links["party1"].sock.getsockopt(zmq.MAXMSGSIZE) == 5000 and peer.receive_limit("party1") == 5000
        ch.send("party1", "party2", "big", np.zeros(2000))  # 16 kB > 5000 bytes
        with pytest.raises(net.PeerLostError, match="5000-byte limit"):
            peer.recv("party2", "party1", "big")
    finally:
        ch.close(linger=0)
        peer.close(linger=0)


@pytest.mark.parametrize("cmd, match", [
    ({"op": "mask", "label": 5, "n": 256}, "'label' must be a str"),
    ({"op": "mask", "label": "L5/mask"}, "no 'n'"),
    ({"op": "mask", "label": "L5/mask", "n": -3}, "outside"),
    ({"op": "query", "label": "L0/it0", "mask": "L9/mask", "it": 0}, "not an open 'mask' level"),
    ({"op": "query", "label": "L0/it0", "mask": "L0/mask", "it": "zero"}, "'it' must be an int"),
    ({"op": "setup", "frac_bits": 16}, "second 'setup'"),
    ({"op": "mask", "label": "L1/mask", "n": 256, "factor": 1, "kind": "rigid", "method": None, "k": 256, "ndim": 2,
      "key": {"impl": "threefry2x32", "data": "junk"}}, "malformed sampling key"),
    ({"op": "nonsense"}, "unknown operation"),
])
def test_garbage_commands_are_protocol_errors(cmd, match):
    """Malformed commands from party1 are ProtocolErrors naming the problem (before: KeyError, TypeError
    or a jax error from inside a handler, a traceback in `ppreg party`)."""
    ch, role = _fixed_role()
    role.handle(linear_mask("L0/mask"))
    ch.recv("party1", "party2", "L0/mask")
    ch.send("party1", "party2", "cmd", encode_json(cmd))
    with pytest.raises(ProtocolError, match=match):
        role.serve()
    with pytest.raises(PeerRefusedError, match=match):  # and party2 told party1 why
        ch.recv("party1", "party2", "anything")


def test_garbage_inputs_are_protocol_errors():
    """Inputs of the wrong shape inside an operation (party1's masked query, a GMS bitmask, a hello, a
    command payload) are ProtocolErrors."""
    ch, role = _fixed_role()
    role.handle(linear_mask("L0/mask"))
    ch.send("party1", "party2", "cmd", encode_json({"op": "query", "label": "L0/it0", "mask": "L0/mask", "it": 0}))
    ch.send("party1", "party2", "L0/it0", np.zeros((7, 5), np.uint64))  # expects (256, 2)
    ch.send("dealer", "party2", "L0/it0", np.zeros((256, 2), np.uint64), phase="offline")
    with pytest.raises(ProtocolError, match="failed on party1's input"):
        role.serve()
    for mask, n, k in [(np.zeros(3, np.uint8), 16, None), (np.full(2, 255, np.uint8), 10, None),
                       (np.array([255, 0], np.uint8), 16, 4), (np.zeros(2, np.float64), 16, None)]:
        with pytest.raises(ProtocolError):
            bitmask_to_indices(mask, n, k)
    for payload in (b"\xff\xfe", b"[1]", b'{"it": 1}'):
        with pytest.raises(ProtocolError):
            decode_json(np.frombuffer(payload, np.uint8))
    with pytest.raises(ProtocolError, match="malformed hello"):
        net._parse_handshake(encode_message("hello", np.frombuffer(b"\xff not json", np.uint8)), "hello", "peer")
