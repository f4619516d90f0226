"""Network :class:`~ppreg.secure.net.channel.Channel`: each endpoint in its own process (ZeroMQ + CURVE).

One process runs one endpoint (``party1``, ``party2`` or ``dealer``). The messages are the
same length-checked binary frames as in-process (:func:`~ppreg.secure.net.channel.encode_message`,
no Python object serialisation), carried by ZeroMQ (pyzmq) over TCP with CurveZMQ
(Curve25519 key exchange, authenticated encryption of every message, forward secrecy).

Topology: an endpoint that *listens* binds one ROUTER socket for all its expected peers and
admits only their public keys (a ZAP authenticator refuses any other key during the
handshake); the sender of each message is identified by the key it authenticated with,
never by what it claims. An endpoint that *connects* opens one DEALER socket per peer
and pins that peer's public key (a server with another key fails the handshake).

Session binding. A listener admits each key once: a second connection with a key that has
already connected (a replay, a stale process, a second session run with the same key) is
refused during the handshake, and a frame from another connection than the first one of its key
is a :class:`~ppreg.secure.net.channel.ProtocolError`. The dealer draws a 128-bit session id per
session and gives it to each party in its ``welcome``; each party then opens its other
connections with a ``hello`` naming that id, and the listener refuses a hello with another id
(or none). The id is then bound into every tag on the wire (``Channel.session_tag``) and into
every PRF stream (:func:`~ppreg.secure.mpc.prg.prf_uint64`'s ``context``). Without a dealer (two
endpoints, as in tests) the listener draws the id. Hello and welcome frames are part of the
handshake and are not counted as traffic.

Robustness:

- receive timeout (``timeout`` seconds, :class:`TimeoutError` naming the peer);
- ZMTP heartbeats, and a socket monitor that turns a dropped connection (peer killed,
  host gone, or an oversized message, which libzmq answers by closing the connection)
  into :class:`PeerLostError` at once instead of a hang;
- frames over a peer's receive limit (``receive_limits``, derived from the protocol by the
  caller: :func:`ppreg.secure.policy.frame_limit`; ``max_message_bytes`` otherwise) are refused
  by libzmq before any allocation (``ZMQ_MAXMSGSIZE``, which drops the connection) and again
  when decoded; frames over ``max_message_bytes`` are refused on send;
- a malformed frame, an unexpected tag or a frame of another session raises
  :class:`~ppreg.secure.net.channel.ProtocolError`; a peer's ``error`` frame raises
  :class:`~ppreg.secure.net.channel.PeerRefusedError` with its reason.

Traffic: each process records every frame it sends and receives (frame bytes, headers
included; CurveZMQ adds about 40 bytes per message on the wire, not counted). Frames from
the dealer are ``offline``, all others ``online``, as in-process.
"""

from __future__ import annotations

import json
import secrets
import time
from collections import defaultdict, deque

import numpy as np
import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

from .channel import (DEFAULT_MAX_MESSAGE_BYTES, ENDPOINTS, ERROR_TAG, MAX_ERROR_BYTES, MAX_HEADER_BYTES, Channel,
                      PeerRefusedError, ProtocolError, decode_message, encode_message, error_text, peek_tag)
from .keys import KeyPair

ROLE_NAMES = {"party1": "moving party (party1)", "party2": "fixed party (party2)", "dealer": "dealer"}
ZAP_DOMAIN = "ppreg"
DEFAULT_TIMEOUT = 120.0
HEARTBEAT_S = 1.0
HEARTBEAT_TIMEOUT_S = 10.0
_LOST_GRACE_S = 0.5  # after a disconnect, frames already queued are still read
SESSION_ID_BYTES = 16
SESSION_TAG_BYTES = 8  # of the id, in hex, appended to every tag on the wire
HANDSHAKE_BYTES = 1024  # largest hello or welcome
SMALL_FRAME_BYTES = MAX_HEADER_BYTES + max(HANDSHAKE_BYTES, MAX_ERROR_BYTES)
_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
           zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


class AuthenticationError(ConnectionError):
    """The CURVE handshake failed: a key was refused or the peer's key is not the expected one."""


class PeerLostError(ConnectionError):
    """A peer's connection dropped before the protocol ended."""


def tcp_address(hostport: str) -> str:
    """``"HOST:PORT"`` -> ``"tcp://HOST:PORT"`` (IPv6 hosts in brackets).

    Raises:
        ValueError: no port, or a port outside 1..65535.
    """
    host, sep, port = hostport.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, got {hostport!r}")
    return f"tcp://{host}:{int(port)}"


class _KeyRegistry:
    """ZAP credentials provider: admits each listed public key once, counts refusals (unknown keys
    and second connections of a key already admitted)."""

    def __init__(self, keys: dict[bytes, str]):
        self.keys, self.refused, self.duplicates = keys, 0, 0
        self.admitted: set[bytes] = set()

    def callback(self, domain, key) -> bool:
        key = bytes(key)
        if key not in self.keys:
            self.refused += 1
            return False
        if key in self.admitted:
            self.duplicates += 1
            return False
        self.admitted.add(key)
        return True


class _Link:
    """One socket with its monitor: a ROUTER (listener) or a DEALER (connector to one peer)."""

    def __init__(self, sock, monitor, roles: tuple[str, ...], address: str):
        self.sock, self.monitor, self.roles, self.address = sock, monitor, roles, address
        self.handshakes = self.failed = self.disconnects = 0

    @property
    def lost(self) -> bool:
        """A connection that completed its handshake has dropped."""
        return self.disconnects - self.failed > 0 and self.handshakes > 0

    def read_events(self) -> list[int]:
        events = []
        while self.monitor.poll(0):
            event = recv_monitor_message(self.monitor)["event"]
            events.append(event)
            self.handshakes += event == zmq.EVENT_HANDSHAKE_SUCCEEDED
            self.failed += event in _FAILED
            self.disconnects += event == zmq.EVENT_DISCONNECTED
        return events


class NetworkChannel(Channel):
    """The channel seen by one endpoint in its own process.

    Args:
        role: this process's endpoint, one of ``party1``, ``party2``, ``dealer``.
        keypair: this endpoint's CURVE key pair (:func:`ppreg.secure.net.keys.load_keypair`).
        listen: ``"HOST:PORT"`` to bind (with ``accept``).
        accept: ``{peer role: public key}`` admitted on ``listen``; any other key is refused.
        connect: ``{peer role: ("HOST:PORT", public key of that peer)}``.
        timeout: seconds to wait for a peer to connect and for each message.
        max_message_bytes: largest frame sent, and accepted from a peer without a receive limit.
        receive_limits: ``{peer role: bytes}``, the largest frame accepted from that peer (the
            protocol's bound, :func:`ppreg.secure.policy.frame_limit`), or a callable
            ``f(announced) -> bytes`` of what the peers announced through the dealer
            (:attr:`announced`; evaluated when that peer's socket is opened, after the dealer's
            welcome). A listener's socket takes the largest limit of the peers it accepts.
        announce: public facts for the dealer to pass on to the other party in its welcome (party2:
            its grid, ``{"voxels", "ndim", "shape"}``, so that party1 can bound its frames before
            they arrive).
        heartbeat_timeout: seconds without ZMTP heartbeat replies before a connection is dropped.

    The constructor returns once every peer is connected, authenticated and bound to the session
    (:attr:`session_id`). A party connects to the dealer first (it gets the session id there), then
    listens and opens its other connections.

    Raises:
        ValueError: bad role or address. TimeoutError: a peer did not connect in time.
        AuthenticationError: a peer refused this key, or presented another key than expected.
        ProtocolError: a malformed handshake, or a peer of another session.
        zmq.ZMQError: the address cannot be bound.
    """

    def __init__(self, role: str, keypair: KeyPair, *, listen: str | None = None,
                 accept: dict[str, bytes] | None = None, connect: dict[str, tuple[str, bytes]] | None = None,
                 timeout: float = DEFAULT_TIMEOUT, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 receive_limits: dict | None = None, announce: dict | None = None,
                 heartbeat_timeout: float = HEARTBEAT_TIMEOUT_S):
        super().__init__(max_message_bytes)
        accept, connect = dict(accept or {}), dict(connect or {})
        if role not in ENDPOINTS:
            raise ValueError(f"role must be one of {ENDPOINTS}, got {role!r}")
        peers = list(accept) + list(connect)
        if len(set(peers)) != len(peers) or role in peers or any(p not in ENDPOINTS for p in peers):
            raise ValueError(f"{role}: peers must be distinct other endpoints of {ENDPOINTS}, got {peers}")
        if bool(listen) != bool(accept):
            raise ValueError("listen and accept go together")
        self.role, self.timeout = role, float(timeout)
        self.wait_s = 0.0  # time spent blocked in receive
        self._hb = float(heartbeat_timeout)
        self._limit_rules = dict(receive_limits or {})
        self._limits: dict[str, int] = {}
        self._announce = announce
        self.announced: dict[str, dict] = {}  # what the other endpoints announced, as the dealer relayed it
        self.session_id: bytes | None = None
        if role == "dealer" or ("dealer" not in peers and accept):  # the session's authority draws its id
            self.session_id = secrets.token_bytes(SESSION_ID_BYTES)
        self._ctx = zmq.Context()
        self._auth = None
        self._registry = _KeyRegistry({})
        self._links: dict[str, _Link] = {}
        self._routing: dict[str, bytes] = {}
        self._hellos: dict[str, dict] = {}
        self._inbox: dict[str, deque] = defaultdict(deque)
        self._refusals: list[tuple[str, bytes]] = []
        self._closed = False
        try:
            if "dealer" in connect:
                self._open(keypair, "dealer", *connect["dealer"])
            if accept:
                self._listen(keypair, listen, accept)
            for peer, (hostport, server_key) in connect.items():
                if peer != "dealer":
                    self._open(keypair, peer, hostport, server_key)
            self._await_hellos(list(accept))
            self.session_tag = "@" + self.session_id[:SESSION_TAG_BYTES].hex()
        except BaseException:
            self.close(linger=0)
            raise

    def receive_limit(self, src: str) -> int:
        """The largest frame accepted from ``src`` (its receive limit)."""
        return self._limits.get(src, self.max_message_bytes)

    def _limit(self, peer) -> int:
        rule = self._limit_rules.get(peer, self.max_message_bytes)
        limit = int(rule(self.announced) if callable(rule) else rule)
        if limit <= 0:
            raise ValueError(f"{self.role}: the receive limit for the {ROLE_NAMES[peer]} must be positive, got {limit}")
        self._limits[peer] = limit
        return limit

    # --- setup ---------------------------------------------------------------------------

    def _socket(self, kind, keypair, limit):
        sock = self._ctx.socket(kind)
        sock.curve_secretkey, sock.curve_publickey = keypair.secret, keypair.public
        sock.setsockopt(zmq.MAXMSGSIZE, int(limit))
        sock.setsockopt(zmq.SNDTIMEO, int(self.timeout * 1000))
        sock.setsockopt(zmq.LINGER, int(self.timeout * 1000))
        sock.setsockopt(zmq.HEARTBEAT_IVL, int(HEARTBEAT_S * 1000))
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(self._hb * 1000))
        sock.setsockopt(zmq.HEARTBEAT_TTL, int(self._hb * 1000))
        monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | _mask(_FAILED))
        return sock, monitor

    def _listen(self, keypair, hostport, accept):
        self._registry = _KeyRegistry({bytes(k): r for r, k in accept.items()})
        self._auth = ThreadAuthenticator(self._ctx)
        self._auth.start()
        self._auth.configure_curve_callback(ZAP_DOMAIN, credentials_provider=self._registry)
        sock, monitor = self._socket(zmq.ROUTER, keypair, max(self._limit(p) for p in accept))
        sock.curve_server = True
        sock.zap_domain = ZAP_DOMAIN.encode()
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        link = _Link(sock, monitor, tuple(accept), tcp_address(hostport))
        for peer in accept:
            self._links[peer] = link
        sock.bind(link.address)

    def _connect(self, keypair, peer, address, server_key):
        sock, monitor = self._socket(zmq.DEALER, keypair, self._limit(peer))
        sock.curve_serverkey = bytes(server_key)
        link = _Link(sock, monitor, (peer,), address)
        self._links[peer] = link
        sock.connect(address)
        deadline = time.monotonic() + self.timeout
        while not link.handshakes:
            events = link.read_events() if link.monitor.poll(_poll_ms(deadline)) else []
            if zmq.EVENT_HANDSHAKE_FAILED_AUTH in events:
                raise AuthenticationError(f"{self.role}: the {ROLE_NAMES[peer]} at {address} refused our key")
            if link.failed or (link.disconnects and not link.handshakes):
                raise AuthenticationError(f"{self.role}: handshake with the {ROLE_NAMES[peer]} at {address} failed: "
                                          "its key is not the one given for it (or it is not a ppreg endpoint)")
            if time.monotonic() >= deadline and not link.handshakes:
                raise TimeoutError(f"{self.role}: could not reach the {ROLE_NAMES[peer]} at {address} "
                                   f"within {self.timeout:g} s")

    # --- session binding -----------------------------------------------------------------

    def _open(self, keypair, peer, hostport, server_key):
        """Connect to ``peer``, say hello (with the session id once known) and adopt its welcome's id."""
        self._connect(keypair, peer, tcp_address(hostport), server_key)
        hello = {"role": self.role, "session": _hex(self.session_id)}
        if peer == "dealer" and self._announce is not None:
            hello["announce"] = self._announce
        self._links[peer].sock.send(_handshake_frame("hello", **hello))
        sid, doc = self._await_welcome(peer)
        if self.session_id is None:
            self.session_id = sid
        elif sid != self.session_id:
            raise ProtocolError(f"{self.role}: the {ROLE_NAMES[peer]} is in another session")
        if peer == "dealer":
            relayed = doc.get("peers", {})
            if not isinstance(relayed, dict) or not all(isinstance(v, dict) for v in relayed.values()):
                raise ProtocolError(f"{self.role}: the dealer's welcome is malformed")
            self.announced = {r: v for r, v in relayed.items() if r in ENDPOINTS and r != self.role}

    def _await_welcome(self, peer) -> tuple[bytes, dict]:
        deadline = time.monotonic() + self.timeout
        while not self._inbox[peer]:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{self.role}: the {ROLE_NAMES[peer]} did not welcome us within {self.timeout:g} s")
            if self._links[peer].lost:
                # libzmq drops a connection whose frame is over the limit; the welcome queued before
                # that frame can be lost with it, so the limit may be why even at this stage
                raise PeerLostError(f"{self.role}: the {ROLE_NAMES[peer]} disconnected during the handshake (it "
                                    f"exited, or sent a message over the {self.receive_limit(peer)}-byte limit)")
            self._pump(min(deadline, time.monotonic() + 0.1))
        doc = _parse_handshake(self._inbox[peer].popleft(), "welcome", f"{self.role}: the {ROLE_NAMES[peer]}")
        sid = _unhex(doc.get("session"))
        if sid is None:
            raise ProtocolError(f"{self.role}: the {ROLE_NAMES[peer]}'s welcome names no session")
        return sid, doc

    def _await_hellos(self, peers):
        """Wait for every accepted peer's hello, check it, then welcome them all (the dealer relays
        each one's announcement to the others)."""
        deadline = time.monotonic() + self.timeout
        while True:
            for peer in [p for p in peers if p in self._hellos and "checked" not in self._hellos[p]]:
                self._check_hello(peer, self._hellos[peer])
                self._hellos[peer]["checked"] = True
            if all(p in self._hellos for p in peers):
                break
            if time.monotonic() >= deadline:
                missing = [p for p in peers if p not in self._hellos]
                reg = self._registry
                note = f"; {reg.refused} connection(s) with an unknown key were refused" if reg.refused else ""
                note += (f"; {reg.duplicates} second connection(s) with an admitted key were refused"
                         if reg.duplicates else "")
                raise TimeoutError(f"{self.role}: {', '.join(ROLE_NAMES[p] for p in missing)} did not connect "
                                   f"within {self.timeout:g} s{note}")
            if any(link.lost for link in self._links.values()):
                raise PeerLostError(f"{self.role}: a peer disconnected while waiting for "
                                    f"{', '.join(ROLE_NAMES[p] for p in peers if p not in self._hellos)}")
            self._pump(min(deadline, time.monotonic() + 0.1))
        for peer in peers:
            relayed = {p: self._hellos[p]["announce"] for p in peers if p != peer and
                       isinstance(self._hellos[p].get("announce"), dict)}
            self._links[peer].sock.send_multipart(
                [self._routing[peer], _handshake_frame("welcome", role=self.role, session=_hex(self.session_id),
                                                       peers=relayed)])

    def _check_hello(self, peer, doc) -> None:
        if doc.get("role") != peer:
            raise ProtocolError(f"{self.role}: the {ROLE_NAMES[peer]} did not open with its hello")
        sid = _unhex(doc.get("session"))
        own = self.role == "dealer" or "dealer" not in self._links
        if sid != self.session_id and not (sid is None and own):
            raise ProtocolError(f"{self.role}: the {ROLE_NAMES[peer]} opened a connection for another session "
                                f"(a replayed or stale connection?)")

    # --- transport -----------------------------------------------------------------------

    def _pump(self, deadline: float) -> None:
        """Wait until ``deadline`` for traffic; queue every frame by its authenticated sender."""
        poller = zmq.Poller()
        links = {id(link): link for link in self._links.values()}.values()
        for link in links:
            poller.register(link.sock, zmq.POLLIN)
            poller.register(link.monitor, zmq.POLLIN)
        ready = dict(poller.poll(_poll_ms(deadline)))
        for link in links:
            if link.monitor in ready:
                link.read_events()
            while link.sock.poll(0):
                self._accept_frame(link, link.sock.recv_multipart(copy=False))

    def _accept_frame(self, link: _Link, parts) -> None:
        if link.sock.type == zmq.ROUTER:
            routing, frame = parts[0].bytes, parts[-1]
            user = frame.get("User-Id")
            src = self._registry.keys.get(user.encode()) if user else None
            if src is None or len(parts) != 2:
                raise ProtocolError(f"{self.role}: a frame from an unauthenticated connection")
            if src not in self._routing:  # the first frame of the first connection of this key
                self._hellos[src] = _parse_handshake(frame.bytes, "hello", f"{self.role}: the {ROLE_NAMES[src]}")
                self._routing[src] = routing
                return
            if routing != self._routing[src]:
                raise ProtocolError(f"{self.role}: a second connection with the {ROLE_NAMES[src]}'s key")
        else:
            src, frame = link.roles[0], parts[-1]
            if len(parts) != 1:
                raise ProtocolError(f"{self.role}: a multi-part frame from the {ROLE_NAMES[src]}")
        data = frame.bytes
        if self.session_tag and peek_tag(data) == self.wire_tag(ERROR_TAG):
            self._refusals.append((src, data))
            return
        self._inbox[src].append(data)

    def _deliver(self, src, dst, frame):
        if src != self.role:
            raise ValueError(f"this process is {self.role}; it cannot send as {src}")
        link = self._links.get(dst)
        if link is None:
            raise ValueError(f"{self.role} has no connection to {dst}")
        try:
            if link.sock.type == zmq.ROUTER:
                link.sock.send_multipart([self._routing[dst], frame])
            else:
                link.sock.send(frame)
        except zmq.Again:
            raise TimeoutError(f"{self.role}: the {ROLE_NAMES[dst]} did not accept a message within "
                               f"{self.timeout:g} s") from None
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                self._pump(time.monotonic() + _LOST_GRACE_S / 5)  # did it say why before it left?
                self._raise_refusal()
                raise PeerLostError(f"{self.role}: the {ROLE_NAMES[dst]} is no longer connected") from None
            raise

    def send_error(self, src, dst, text) -> None:
        """As :meth:`Channel.send_error`, never blocking (the peer may be gone)."""
        link = self._links.get(dst)
        if link is None or src != self.role:
            return
        data = text.encode("utf-8", "replace")[:MAX_ERROR_BYTES]
        frame = encode_message(self.wire_tag(ERROR_TAG), np.frombuffer(data, np.uint8))
        try:
            if link.sock.type == zmq.ROUTER:
                link.sock.send_multipart([self._routing[dst], frame], flags=zmq.NOBLOCK)
            else:
                link.sock.send(frame, flags=zmq.NOBLOCK)
        except (zmq.ZMQError, KeyError):
            pass

    def _fetch(self, dst, src):
        if dst != self.role:
            raise ValueError(f"this process is {self.role}; it cannot receive as {dst}")
        if src not in self._links:
            raise ValueError(f"{self.role} has no connection to {src}")
        start = time.monotonic()
        wait = self.patience.get(src, self.timeout)
        deadline, lost_at = start + wait, None
        try:
            while not self._inbox[src]:
                self._raise_refusal()
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"{self.role}: no message from the {ROLE_NAMES[src]} within "
                                       f"{wait:g} s (peer stalled?)")
                gone = [lk for lk in {id(v): v for v in self._links.values()}.values() if lk.lost]
                if gone:  # any lost peer ends the protocol, not only the one awaited
                    lost_at = lost_at or time.monotonic()
                    if time.monotonic() - lost_at > _LOST_GRACE_S:
                        who = " or ".join(ROLE_NAMES[r] for r in gone[0].roles)
                        limit = max(self.receive_limit(r) for r in gone[0].roles)
                        raise PeerLostError(f"{self.role}: lost the connection to the {who} (it exited or "
                                            f"stopped responding, or sent a message over the "
                                            f"{limit}-byte limit)")
                    self._pump(min(deadline, time.monotonic() + 0.05))
                else:  # in slices, so that an unbounded wait still notices a lost peer
                    self._pump(min(deadline, time.monotonic() + HEARTBEAT_TIMEOUT_S))
        finally:
            self.wait_s += time.monotonic() - start
        self._raise_refusal()
        frame = self._inbox[src].popleft()
        self.traffic.record(src, dst, "offline" if src == "dealer" else "online", len(frame))
        return frame

    def _raise_refusal(self) -> None:
        """A peer's ``error`` frame (whichever peer is awaited): it stopped the session."""
        if self._refusals:
            src, frame = self._refusals[0]
            try:
                _, payload = decode_message(frame, max_bytes=SMALL_FRAME_BYTES)
                text = error_text(payload)
            except ProtocolError:
                text = "(malformed error frame)"
            raise PeerRefusedError(f"{self.role}: the {ROLE_NAMES[src]} stopped the session: {text}")

    def close(self, linger: float | None = None) -> None:
        """Flush (up to ``linger`` s, default ``timeout``) and close every socket."""
        if self._closed:
            return
        self._closed = True
        ms = int((self.timeout if linger is None else linger) * 1000)
        for link in {id(v): v for v in self._links.values()}.values():
            link.sock.disable_monitor()
            link.monitor.close(linger=0)
            link.sock.close(linger=ms)
        if self._auth is not None:
            self._auth.stop()
        self._ctx.term()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        # after a failure, a short linger still delivers an error frame already queued to the peers
        self.close(linger=None if exc[0] is None else min(self.timeout, 1.0))


def _hex(sid: bytes | None) -> str | None:
    return None if sid is None else sid.hex()


def _unhex(value) -> bytes | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) != 2 * SESSION_ID_BYTES:
        raise ProtocolError(f"malformed session id in the handshake: {str(value)[:80]!r}")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise ProtocolError(f"malformed session id in the handshake: {value[:80]!r}") from None


def _handshake_frame(tag: str, **doc) -> bytes:
    return encode_message(tag, np.frombuffer(json.dumps(doc).encode(), np.uint8))


def _parse_handshake(frame: bytes, tag: str, who: str) -> dict:
    """A hello or welcome: ``{"role", "session"}`` JSON (ProtocolError for anything else)."""
    got, payload = decode_message(frame, max_bytes=MAX_HEADER_BYTES + HANDSHAKE_BYTES)
    if got != tag:
        raise ProtocolError(f"{who} did not open with its {tag} (got {got[:40]!r})")
    try:
        if payload.dtype != np.uint8 or payload.ndim != 1:
            raise ValueError
        doc = json.loads(payload.tobytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError(f"{who} sent a malformed {tag}") from None
    if not isinstance(doc, dict):
        raise ProtocolError(f"{who} sent a malformed {tag}")
    return doc


def _mask(events) -> int:
    out = 0
    for e in events:
        out |= e
    return out


def _poll_ms(deadline: float) -> int:
    return max(0, int((deadline - time.monotonic()) * 1000))
