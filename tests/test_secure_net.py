"""Network channel (ZeroMQ + CURVE), keys, and the role drivers, in one process (threads on loopback)."""

import json
import math
import os
import stat
import time

import numpy as np
import pytest
import zmq
from secure_helpers import in_thread

from ppreg.party_cli import free_port
from ppreg.secure.net import keys, transport as net
from ppreg.secure.net.channel import ProtocolError, decode_message, encode_message

KEYS = {r: keys.generate() for r in ("party1", "party2", "dealer", "stranger")}
T = 3.0  # seconds: every fault below must surface well within this


def addr():
    return f"127.0.0.1:{free_port()}"


def listener(address, accept=("party2",), timeout=T, **kw):
    return net.NetworkChannel("party1", KEYS["party1"], listen=address,
                              accept={r: KEYS[r].public for r in accept}, timeout=timeout, **kw)


def connector(address, role="party2", key=None, server="party1", timeout=T, **kw):
    return net.NetworkChannel(role, key or KEYS[role], connect={server: (address, KEYS[server].public)},
                              timeout=timeout, **kw)


def test_keygen_files_and_loading(tmp_path):
    secret, public = keys.write_keypair(tmp_path / "moving")
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
    pair = keys.load_keypair(secret)
    assert keys.load_public(public) == pair.public and zmq.curve_public(pair.secret) == pair.public
    assert pair.secret.decode() not in public.read_text() and pair.secret.decode() not in repr(pair)
    with pytest.raises(FileExistsError):
        keys.write_keypair(tmp_path / "moving")
    with pytest.raises(ValueError, match="no secret key"):
        keys.load_keypair(public)
    os.chmod(secret, 0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        keys.load_keypair(secret)
    (tmp_path / "junk.pub").write_text("not a key")
    with pytest.raises(ValueError, match="not a CURVE certificate"):
        keys.load_public(tmp_path / "junk.pub")


def test_three_endpoints_exchange_frames_and_count_bytes_on_both_sides():
    a_dealer, a_p1 = addr(), addr()
    accept = {"party1": KEYS["party1"].public, "party2": KEYS["party2"].public}

    def dealer():
        with net.NetworkChannel("dealer", KEYS["dealer"], listen=a_dealer, accept=accept, timeout=T) as ch:
            ch.send("dealer", "party2", "corr", np.arange(5, dtype=np.uint64), phase="offline")
            return ch.recv("dealer", "party1", "idx"), ch.traffic.snapshot()

    def party2():
        connect = {"party1": (a_p1, KEYS["party1"].public), "dealer": (a_dealer, KEYS["dealer"].public)}
        with net.NetworkChannel("party2", KEYS["party2"], connect=connect, timeout=T) as ch:
            got = ch.recv("party2", "dealer", "corr")
            ch.send("party2", "party1", "share", got.astype(np.float64) * 2)
            return ch.traffic.snapshot()

    threads = [in_thread(dealer), in_thread(party2)]
    with net.NetworkChannel("party1", KEYS["party1"], listen=a_p1, accept={"party2": KEYS["party2"].public},
                            connect={"dealer": (a_dealer, KEYS["dealer"].public)}, timeout=T) as ch:
        ch.send("party1", "dealer", "idx", np.array([1, 2], np.int32))
        np.testing.assert_array_equal(ch.recv("party1", "party2", "share"), np.arange(5) * 2.0)
        mine = ch.traffic.snapshot()
        bound = ch.session_tag
    for t, _ in threads:
        t.join(10)
    (_, d), (_, p2) = threads
    assert "error" not in d and "error" not in p2, (d, p2)
    idx, dealer_view = d["value"]
    np.testing.assert_array_equal(idx, [1, 2])
    # every tag on the wire carries the session binding (the same for all three endpoints)
    assert len(bound) == 17 and bound.startswith("@")
    share_bytes = len(encode_message("share" + bound, np.zeros(5)))
    corr_bytes = len(encode_message("corr" + bound, np.zeros(5, np.uint64)))
    # the sender and the receiver count the same frame; dealer frames are offline
    assert mine["received"]["party1"]["online"] == p2["value"]["sent"]["party2"]["online"] == share_bytes
    assert mine["sent"]["party1"]["online"] == dealer_view["received"]["dealer"]["online"] > 0
    assert p2["value"]["received"]["party2"]["offline"] == dealer_view["sent"]["dealer"]["offline"] == corr_bytes


def test_unknown_key_is_refused():
    a = addr()
    t, out = in_thread(lambda: listener(a, timeout=2.0))
    start = time.monotonic()
    with pytest.raises(net.AuthenticationError, match="refused our key"):
        connector(a, key=KEYS["stranger"])
    assert time.monotonic() - start < T
    t.join(5)
    assert isinstance(out["error"], TimeoutError)
    assert "unknown key were refused" in str(out["error"])


def test_impostor_server_is_detected():
    a = addr()
    # a CURVE server holding another key than the one party2 pinned for party1
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.curve_server, sock.curve_secretkey = True, KEYS["stranger"].secret
    sock.bind(net.tcp_address(a))
    try:
        with pytest.raises(net.AuthenticationError, match="failed"):
            connector(a)
    finally:
        sock.close(0)
        ctx.term()


def hello_frame(doc):
    return encode_message("hello", np.frombuffer(json.dumps(doc).encode(), np.uint8))


def raw_party2(address, payloads=(), *, hello=None, key=None):
    """A party2 that speaks raw ZeroMQ with a valid key: hello (``hello``: its JSON), the listener's
    welcome, then arbitrary frames (``payloads``: bytes, or ``f(session_tag) -> bytes``).

    Returns ``(ctx, sock, session_tag)`` (``None`` when the listener sent no welcome)."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    key = key or KEYS["party2"]
    sock.curve_secretkey, sock.curve_publickey = key.secret, key.public
    sock.curve_serverkey = KEYS["party1"].public
    sock.connect(net.tcp_address(address))
    sock.send(hello_frame(hello or {"role": "party2", "session": None}))
    tag = None
    if sock.poll(int(T * 1000)):
        _, payload = decode_message(sock.recv())
        tag = "@" + json.loads(payload.tobytes())["session"][:16]
    for p in payloads:
        sock.send(p(tag) if callable(p) else p)
    return ctx, sock, tag


@pytest.mark.parametrize("payload, match", [
    (b"PPRG\x01\x09\x00\x00junk", "dtype code"),
    (lambda tag: encode_message("share" + tag, np.zeros(4))[:-3], "payload of"),
    (lambda tag: encode_message("other" + tag, np.zeros(4)), "expected message 'share'"),
    (lambda tag: encode_message("share", np.zeros(4)), "not bound to this session"),
    (lambda tag: encode_message("share@0123456789abcdef", np.zeros(4)), "not bound to this session"),
])
def test_malformed_frame_raises_protocol_error(payload, match):
    a = addr()
    t, out = in_thread(lambda: listener(a))
    ctx, sock, _ = raw_party2(a, [payload])
    t.join(5)
    try:
        ch = out["value"]
        with pytest.raises(ProtocolError, match=match):
            ch.recv("party1", "party2", "share")
        ch.close(linger=0)
    finally:
        sock.close(0)
        ctx.term()


def test_oversized_frames_are_refused_both_ways():
    a = addr()
    t, out = in_thread(lambda: listener(a, max_message_bytes=4096))
    ctx, sock, _ = raw_party2(a)
    t.join(5)
    ch = out["value"]
    try:
        with pytest.raises(ProtocolError, match="refusing to send"):
            ch.send("party1", "party2", "big", np.zeros(1000))
        sock.send(encode_message("share", np.zeros(10_000)))  # 80 kB > 4 kB: libzmq drops the connection
        start = time.monotonic()
        with pytest.raises(net.PeerLostError, match="limit"):
            ch.recv("party1", "party2", "share")
        assert time.monotonic() - start < T
    finally:
        ch.close(linger=0)
        sock.close(0)
        ctx.term()


def test_stalled_peer_times_out_and_killed_peer_is_detected():
    a = addr()
    t, out = in_thread(lambda: listener(a, timeout=1.0))
    peer = connector(a, timeout=1.0)
    t.join(5)
    ch = out["value"]
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="no message from the fixed party"):
        ch.recv("party1", "party2", "share")
    assert 1.0 <= time.monotonic() - start < T
    # unbounded patience (the dealer's, for party1): a silent live peer is waited for past the timeout,
    # a peer that goes away is detected from the dropped connection, not the timeout
    ch.patience["party2"] = math.inf
    t, _ = in_thread(lambda: (time.sleep(2.5), peer.close(linger=0)))
    start = time.monotonic()
    with pytest.raises(net.PeerLostError, match="lost the connection to the fixed party"):
        ch.recv("party1", "party2", "share")
    assert 2.5 <= time.monotonic() - start < 2.5 + T
    t.join(5)
    ch.close(linger=0)


def test_commands_and_reports_reject_garbage():
    from ppreg.secure.roles import decode_json, encode_json

    assert decode_json(encode_json({"op": "query", "it": 3})) == {"op": "query", "it": 3}
    for bad in (np.frombuffer(b"[1, 2]", np.uint8), np.frombuffer(b"\xff\xfe", np.uint8), np.zeros(3, np.int32),
                np.frombuffer(b'{"it": 3}', np.uint8)):
        with pytest.raises(ProtocolError, match="malformed command"):
            decode_json(bad)


def test_point_clouds_over_the_network_match_one_process():
    """Rigid point clouds with the three roles on their own network endpoints (threads): party2 holds
    its points itself (FixedRole.points) and the result equals the in-process session's."""
    from ppreg.secure.parties import run_dealer
    from ppreg.secure.protocols.points import register_points
    from ppreg.secure.roles import FixedRole, RemotePeers
    from ppreg.secure.session import SecureSession

    rng = np.random.default_rng(4)
    p = rng.uniform(0, 40, (50, 2))
    a = np.deg2rad(9.0)
    q = p @ np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]).T + [2.5, -1.0]
    a_dealer, a_p1 = addr(), addr()

    def fixed():
        connect = {"party1": (a_p1, KEYS["party1"].public), "dealer": (a_dealer, KEYS["dealer"].public)}
        with net.NetworkChannel("party2", KEYS["party2"], connect=connect, timeout=T) as ch:
            role = FixedRole(ch, points=q)
            role.serve()
            return role.final_report

    threads = [in_thread(lambda: run_dealer(KEYS["dealer"], listen=a_dealer, moving_key=KEYS["party1"].public,
                                            fixed_key=KEYS["party2"].public, timeout=T)), in_thread(fixed)]
    with net.NetworkChannel("party1", KEYS["party1"], listen=a_p1, accept={"party2": KEYS["party2"].public},
                            connect={"dealer": (a_dealer, KEYS["dealer"].public)}, timeout=T) as ch:
        session = SecureSession(16, channel=ch, peers=RemotePeers(ch))
        mat, cov = register_points(p, None, session, extent=64.0)
        session.end()
        report = session.bytes_report()
    for t, _ in threads:
        t.join(10)
    assert all("error" not in out for _, out in threads), threads
    ref_mat, ref_cov = register_points(p, q, SecureSession(16), extent=64.0)
    np.testing.assert_allclose(cov, ref_cov, rtol=0, atol=1e-9 * np.abs(ref_cov).max())
    np.testing.assert_allclose(mat, ref_mat, atol=1e-6)
    np.testing.assert_allclose(np.asarray(mat)[:2, :2], [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]], atol=1e-4)
    fixed_report = threads[1][1]["value"]
    assert report["party2"] == {"online": fixed_report["online"], "offline": fixed_report["offline"]}
    assert fixed_report["online"] > 8 * q.size  # F = Q' - v, its share and the centroid went over the wire
