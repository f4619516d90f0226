"""Network :class:`~ppreg.secure.channel.Channel`: each endpoint in its own process (ZeroMQ + CURVE).

One process runs one endpoint (``party1``, ``party2`` or ``dealer``). The messages are the
same length-checked binary frames as in-process (:func:`~ppreg.secure.channel.encode_message`,
no Python object serialisation), carried by ZeroMQ (pyzmq) over TCP with CurveZMQ
(Curve25519 key exchange, authenticated encryption of every message, forward secrecy).

Topology: an endpoint that *listens* binds one ROUTER socket for all its expected peers and
admits only their public keys (a ZAP authenticator refuses any other key during the
handshake); the sender of each message is identified by the key it authenticated with,
never by what it claims. An endpoint that *connects* opens one DEALER socket per peer
and pins that peer's public key (a server with another key fails the handshake).
After the handshake each connector sends a ``hello`` frame so the listener can address it.

Robustness:

- receive timeout (``timeout`` seconds, :class:`TimeoutError` naming the peer);
- ZMTP heartbeats, and a socket monitor that turns a dropped connection (peer killed,
  host gone, or an oversized message, which libzmq answers by closing the connection)
  into :class:`PeerLostError` at once instead of a hang;
- messages over ``max_message_bytes`` are refused (``ZMQ_MAXMSGSIZE`` on receive,
  :class:`~ppreg.secure.channel.ProtocolError` on send and decode);
- a malformed frame or an unexpected tag raises :class:`~ppreg.secure.channel.ProtocolError`.

Traffic: each process records every frame it sends and receives (frame bytes, headers
included; CurveZMQ adds about 40 bytes per message on the wire, not counted). Frames from
the dealer are ``offline``, all others ``online``, as in-process.
"""

from __future__ import annotations

import time
from collections import defaultdict, deque

import numpy as np
import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

from .channel import DEFAULT_MAX_MESSAGE_BYTES, ENDPOINTS, Channel, ProtocolError, decode_message, encode_message
from .keys import KeyPair

ROLE_NAMES = {"party1": "moving party (party1)", "party2": "fixed party (party2)", "dealer": "dealer"}
ZAP_DOMAIN = "ppreg"
DEFAULT_TIMEOUT = 120.0
HEARTBEAT_S = 1.0
HEARTBEAT_TIMEOUT_S = 10.0
_LOST_GRACE_S = 0.5  # after a disconnect, frames already queued are still read
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
    """ZAP credentials provider: admits the listed public keys, counts refusals."""

    def __init__(self, keys: dict[bytes, str]):
        self.keys, self.refused = keys, 0

    def callback(self, domain, key) -> bool:
        ok = bytes(key) in self.keys
        self.refused += not ok
        return ok


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
        keypair: this endpoint's CURVE key pair (:func:`ppreg.secure.keys.load_keypair`).
        listen: ``"HOST:PORT"`` to bind (with ``accept``).
        accept: ``{peer role: public key}`` admitted on ``listen``; any other key is refused.
        connect: ``{peer role: ("HOST:PORT", public key of that peer)}``.
        timeout: seconds to wait for a peer to connect and for each message.
        max_message_bytes: largest frame sent or accepted.
        heartbeat_timeout: seconds without ZMTP heartbeat replies before a connection is dropped.

    The constructor returns once every peer is connected and authenticated.

    Raises:
        ValueError: bad role or address. TimeoutError: a peer did not connect in time.
        AuthenticationError: a peer refused this key, or presented another key than expected.
        zmq.ZMQError: the address cannot be bound.
    """

    def __init__(self, role: str, keypair: KeyPair, *, listen: str | None = None,
                 accept: dict[str, bytes] | None = None, connect: dict[str, tuple[str, bytes]] | None = None,
                 timeout: float = DEFAULT_TIMEOUT, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
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
        self._ctx = zmq.Context()
        self._auth = None
        self._links: dict[str, _Link] = {}
        self._routing: dict[str, bytes] = {}
        self._inbox: dict[str, deque] = defaultdict(deque)
        self._closed = False
        try:
            if accept:
                self._listen(keypair, listen, accept)
            for peer, (hostport, server_key) in connect.items():
                self._connect(keypair, peer, tcp_address(hostport), server_key)
            self._await_hellos(list(accept))
        except BaseException:
            self.close(linger=0)
            raise

    # --- setup ---------------------------------------------------------------------------

    def _socket(self, kind, keypair):
        sock = self._ctx.socket(kind)
        sock.curve_secretkey, sock.curve_publickey = keypair.secret, keypair.public
        sock.setsockopt(zmq.MAXMSGSIZE, self.max_message_bytes)
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
        sock, monitor = self._socket(zmq.ROUTER, keypair)
        sock.curve_server = True
        sock.zap_domain = ZAP_DOMAIN.encode()
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        link = _Link(sock, monitor, tuple(accept), tcp_address(hostport))
        for peer in accept:
            self._links[peer] = link
        sock.bind(link.address)

    def _connect(self, keypair, peer, address, server_key):
        sock, monitor = self._socket(zmq.DEALER, keypair)
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
        sock.send(encode_message("hello", np.frombuffer(self.role.encode(), np.uint8)))

    def _await_hellos(self, peers):
        deadline = time.monotonic() + self.timeout
        while any(p not in self._routing for p in peers):
            if time.monotonic() >= deadline:
                missing = [p for p in peers if p not in self._routing]
                refused = self._registry.refused
                note = f"; {refused} connection(s) with an unknown key were refused" if refused else ""
                raise TimeoutError(f"{self.role}: {', '.join(ROLE_NAMES[p] for p in missing)} did not connect "
                                   f"within {self.timeout:g} s{note}")
            if any(link.lost for link in self._links.values()):
                raise PeerLostError(f"{self.role}: a peer disconnected while waiting for "
                                    f"{', '.join(ROLE_NAMES[p] for p in peers if p not in self._routing)}")
            self._pump(min(deadline, time.monotonic() + 0.1))

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
            src = self._registry.keys.get(frame.get("User-Id").encode())
            if src is None or len(parts) != 2:
                raise ProtocolError(f"{self.role}: a frame from an unauthenticated connection")
            if src not in self._routing:
                tag, payload = decode_message(frame.bytes, max_bytes=self.max_message_bytes)
                if tag != "hello" or payload.tobytes() != src.encode():
                    raise ProtocolError(f"{self.role}: the {ROLE_NAMES[src]} did not open with its hello")
                self._routing[src] = routing
                return
        else:
            src, frame = link.roles[0], parts[-1]
            if len(parts) != 1:
                raise ProtocolError(f"{self.role}: a multi-part frame from the {ROLE_NAMES[src]}")
        self._inbox[src].append(frame.bytes)

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
                raise PeerLostError(f"{self.role}: the {ROLE_NAMES[dst]} is no longer connected") from None
            raise

    def _fetch(self, dst, src):
        if dst != self.role:
            raise ValueError(f"this process is {self.role}; it cannot receive as {dst}")
        if src not in self._links:
            raise ValueError(f"{self.role} has no connection to {src}")
        start = time.monotonic()
        deadline, lost_at = start + self.timeout, None
        try:
            while not self._inbox[src]:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"{self.role}: no message from the {ROLE_NAMES[src]} within "
                                       f"{self.timeout:g} s (peer stalled?)")
                gone = [lk for lk in {id(v): v for v in self._links.values()}.values() if lk.lost]
                if gone:  # any lost peer ends the protocol, not only the one awaited
                    lost_at = lost_at or time.monotonic()
                    if time.monotonic() - lost_at > _LOST_GRACE_S:
                        who = " or ".join(ROLE_NAMES[r] for r in gone[0].roles)
                        raise PeerLostError(f"{self.role}: lost the connection to the {who} (it exited or "
                                            f"stopped responding, or sent a message over the "
                                            f"{self.max_message_bytes}-byte limit)")
                    self._pump(min(deadline, time.monotonic() + 0.05))
                else:
                    self._pump(deadline)
        finally:
            self.wait_s += time.monotonic() - start
        frame = self._inbox[src].popleft()
        self.traffic.record(src, dst, "offline" if src == "dealer" else "online", len(frame))
        return frame

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
        self.close(linger=None if exc[0] is None else 0)


def _mask(events) -> int:
    out = 0
    for e in events:
        out |= e
    return out


def _poll_ms(deadline: float) -> int:
    return max(0, int((deadline - time.monotonic()) * 1000))
