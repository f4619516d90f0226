"""Message channels between the parties and the dealer, with measured traffic.

Every message is a length-checked binary frame (no Python object serialisation):

    magic "PPRG" | version u8 | dtype code u8 | ndim u8 | tag length u8 | shape (ndim x u64 LE) | tag | payload

A :class:`Channel` moves these frames between the endpoints ``party1``, ``party2`` and
``dealer`` and counts, for every endpoint and phase (``offline`` = dealer material,
``online`` = protocol messages), the bytes it sent and received and the number of
messages it sent (its rounds). Counts are of the frames actually sent, headers included.

Over the network (:mod:`ppreg.secure.net.transport`) every tag on the wire carries the session's binding
suffix (``@`` and 16 hex digits of the dealer's session id, :attr:`Channel.session_tag`), so a
frame of another session is refused; in one process the suffix is empty. A follower that stops
the session sends its reason to the others in an ``error`` frame (:meth:`Channel.send_error`),
which their next receive raises as :class:`PeerRefusedError`.
"""

from __future__ import annotations

import abc
import math
import struct
from collections import defaultdict, deque

import numpy as np

ENDPOINTS = ("party1", "party2", "dealer")
PHASES = ("offline", "online")
MAGIC = b"PPRG"
VERSION = 1
DEFAULT_MAX_MESSAGE_BYTES = 1 << 30
ERROR_TAG = "error"
MAX_ERROR_BYTES = 1024  # an error frame's text, truncated
_DTYPES = {1: np.dtype("<u8"), 2: np.dtype("<i4"), 3: np.dtype("<f4"), 4: np.dtype("<f8"), 5: np.dtype("u1")}
_CODES = {(dt.kind, dt.itemsize): code for code, dt in _DTYPES.items()}
_HEAD = struct.Struct("<4sBBBB")
MAX_HEADER_BYTES = _HEAD.size + 8 * 8 + 255  # fixed header, eight axes, the longest tag


class ProtocolError(RuntimeError):
    """A malformed, unexpected or oversized message."""


class PeerRefusedError(ProtocolError):
    """A peer stopped the session and said why (its ``error`` frame)."""


def peek_tag(frame: bytes) -> str | None:
    """The tag of a well-formed frame header, or ``None`` (never raises; the payload is not checked)."""
    try:
        magic, version, _, ndim, tag_len = _HEAD.unpack_from(frame)
        if magic != MAGIC or version != VERSION or ndim > 8:
            return None
        pos = _HEAD.size + 8 * ndim
        return bytes(frame[pos : pos + tag_len]).decode("utf-8")
    except (struct.error, UnicodeDecodeError, TypeError):
        return None


def encode_message(tag: str, array: np.ndarray) -> bytes:
    """Frame one array (uint64, int32, float32, float64 or uint8) with its tag.

    Raises:
        TypeError: unsupported dtype. ValueError: tag longer than 255 bytes or > 8 axes.
    """
    arr = np.asarray(array)
    code = _CODES.get((arr.dtype.kind, arr.dtype.itemsize))
    if code is None:
        raise TypeError(f"cannot send dtype {arr.dtype}")
    tag_bytes = tag.encode("utf-8")
    if len(tag_bytes) > 255 or arr.ndim > 8:
        raise ValueError("message tag must be <= 255 bytes and arrays <= 8 axes")
    shape = struct.pack(f"<{arr.ndim}Q", *arr.shape)
    payload = arr.astype(_DTYPES[code], copy=False).tobytes()
    return _HEAD.pack(MAGIC, VERSION, code, arr.ndim, len(tag_bytes)) + shape + tag_bytes + payload


def decode_message(frame: bytes, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> tuple[str, np.ndarray]:
    """Parse and validate a frame.

    Raises:
        ProtocolError: oversized, truncated, wrong magic/version/dtype, or payload length
            not matching the declared shape.
    """
    if len(frame) > max_bytes:
        raise ProtocolError(f"message of {len(frame)} bytes exceeds the limit of {max_bytes}")
    if len(frame) < _HEAD.size:
        raise ProtocolError("malformed message: shorter than its header")
    magic, version, code, ndim, tag_len = _HEAD.unpack_from(frame)
    if magic != MAGIC or version != VERSION:
        raise ProtocolError("malformed message: bad magic or version")
    if code not in _DTYPES or ndim > 8:
        raise ProtocolError(f"malformed message: dtype code {code}, ndim {ndim}")
    pos = _HEAD.size
    if len(frame) < pos + 8 * ndim + tag_len:
        raise ProtocolError("malformed message: truncated header")
    shape = struct.unpack_from(f"<{ndim}Q", frame, pos)
    pos += 8 * ndim
    try:
        tag = frame[pos : pos + tag_len].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError("malformed message: tag is not UTF-8") from exc
    pos += tag_len
    dtype = _DTYPES[code]
    expected = math.prod(shape) * dtype.itemsize
    if len(frame) - pos != expected:
        raise ProtocolError(f"malformed message: payload of {len(frame) - pos} bytes, shape {shape} needs {expected}")
    return tag, np.frombuffer(frame, dtype=dtype, offset=pos).reshape(shape)


def error_text(array) -> str:
    """The printable text of an ``error`` frame's payload (control characters dropped, length capped)."""
    arr = np.asarray(array)
    if arr.dtype != np.uint8 or arr.ndim != 1:
        return "(malformed error frame)"
    text = arr[:MAX_ERROR_BYTES].tobytes().decode("utf-8", "replace")
    return "".join(c for c in text if c.isprintable())


class Traffic:
    """Byte and message counters per endpoint and phase."""

    def __init__(self):
        self.sent = {e: dict.fromkeys(PHASES, 0) for e in ENDPOINTS}
        self.received = {e: dict.fromkeys(PHASES, 0) for e in ENDPOINTS}
        self.messages = {e: dict.fromkeys(PHASES, 0) for e in ENDPOINTS}

    def record(self, src: str, dst: str, phase: str, nbytes: int) -> None:
        self.sent[src][phase] += nbytes
        self.received[dst][phase] += nbytes
        self.messages[src][phase] += 1

    def snapshot(self) -> dict:
        """A deep copy: ``{"sent": {endpoint: {phase: bytes}}, "received": ..., "messages": ...}``."""
        return {name: {e: dict(v) for e, v in getattr(self, name).items()} for name in ("sent", "received", "messages")}


class Channel(abc.ABC):
    """Interface: ``send`` a tagged array from one endpoint to another, ``recv`` it there."""

    def __init__(self, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        self.traffic = Traffic()
        self.max_message_bytes = int(max_message_bytes)
        self.session_tag = ""  # the session binding appended to every tag on the wire (network only)
        # per-sender receive timeout overrides, seconds (network only; math.inf: wait as long as the
        # connection is alive, a dead peer is still detected by the transport's heartbeats)
        self.patience: dict[str, float] = {}

    def receive_limit(self, src: str) -> int:
        """Largest frame accepted from ``src`` (:attr:`max_message_bytes`; the network channel has
        per-peer limits derived from the protocol)."""
        return self.max_message_bytes

    def wire_tag(self, tag: str) -> str:
        """``tag`` as sent: with this session's binding suffix."""
        return tag + self.session_tag

    def _check(self, src, dst, phase):
        if src not in ENDPOINTS or dst not in ENDPOINTS or src == dst:
            raise ValueError(f"bad endpoints {src!r} -> {dst!r}; expected two of {ENDPOINTS}")
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")

    def send(self, src: str, dst: str, tag: str, array, *, phase: str = "online") -> None:
        self._check(src, dst, phase)
        frame = encode_message(self.wire_tag(tag), np.asarray(array))
        if len(frame) > self.max_message_bytes:
            raise ProtocolError(f"refusing to send {len(frame)} bytes (limit {self.max_message_bytes})")
        self._deliver(src, dst, frame)
        self.traffic.record(src, dst, phase, len(frame))

    def recv(self, dst: str, src: str, tag: str) -> np.ndarray:
        """Receive the next message from ``src``; its tag must equal ``tag`` (bound to this session).

        Raises:
            PeerRefusedError: ``src`` stopped the session (its ``error`` frame).
            ProtocolError: another tag, a frame of another session, or a malformed or oversized frame.
        """
        got, array = decode_message(self._fetch(dst, src), max_bytes=self.receive_limit(src))
        if got == self.wire_tag(tag):
            return array
        if got == self.wire_tag(ERROR_TAG):
            raise PeerRefusedError(f"{dst}: {src} stopped the session: {error_text(array)}")
        if self.session_tag and not got.endswith(self.session_tag):
            raise ProtocolError(f"{dst}: a frame from {src} is not bound to this session (tag {got[:80]!r})")
        logical = got[:len(got) - len(self.session_tag)]
        raise ProtocolError(f"{dst} expected message {tag!r} from {src}, got {logical!r}")

    def send_error(self, src: str, dst: str, text: str) -> None:
        """Best effort: tell ``dst`` why ``src`` stops (an ``error`` frame, at most ``MAX_ERROR_BYTES``
        of UTF-8 text). Never raises: the session is ending anyway."""
        data = text.encode("utf-8", "replace")[:MAX_ERROR_BYTES]
        try:
            self._deliver(src, dst, encode_message(self.wire_tag(ERROR_TAG), np.frombuffer(data, np.uint8)))
        except Exception:  # noqa: BLE001 - a dead peer cannot be told
            pass

    @abc.abstractmethod
    def _deliver(self, src: str, dst: str, frame: bytes) -> None:
        """Transport one frame."""

    @abc.abstractmethod
    def _fetch(self, dst: str, src: str) -> bytes:
        """The next frame from ``src`` to ``dst``."""


class InProcessChannel(Channel):
    """Both parties and the dealer in one process: frames queue in memory, in order.

    Used by tests and benchmarks; protocol code is the same as over a network.
    """

    def __init__(self, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        super().__init__(max_message_bytes)
        self._queues = defaultdict(deque)

    def _deliver(self, src, dst, frame):
        self._queues[(src, dst)].append(bytes(frame))

    def _fetch(self, dst, src):
        queue = self._queues[(src, dst)]
        if not queue:
            raise ProtocolError(f"{dst} waits for a message from {src} that was never sent")
        return queue.popleft()
