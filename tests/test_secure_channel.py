"""Tests for ppreg.secure.net.channel (binary frames, in-process channel, traffic counters)."""

import struct

import numpy as np
import pytest

from ppreg.secure.net import channel as ch
from ppreg.secure.net.channel import (
    MAGIC,
    VERSION,
    InProcessChannel,
    ProtocolError,
    Traffic,
    decode_message,
    encode_message,
)
from secure_helpers import frame_size


def raw_frame(shape, payload=b"", *, code=1, tag=b"t", magic=MAGIC, version=VERSION):
    """A hand-built frame (possibly inconsistent) in the documented layout."""
    head = struct.pack("<4sBBBB", magic, version, code, len(shape), len(tag))
    return head + struct.pack(f"<{len(shape)}Q", *shape) + tag + payload


DTYPES = [np.uint64, np.int32, np.float32, np.float64, np.uint8]
SHAPES = [(0,), (3, 0), (5,), (2, 3), (1, 2, 1, 3)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip(dtype, shape):
    rng = np.random.default_rng(0)
    size = int(np.prod(shape, dtype=np.int64))
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        arr = rng.integers(info.min, info.max, size, dtype=dtype, endpoint=True).reshape(shape)
    else:
        arr = rng.standard_normal(size).astype(dtype).reshape(shape)
    frame = encode_message("beaver/7/e", arr)
    assert isinstance(frame, bytes)
    assert len(frame) == frame_size("beaver/7/e", shape, np.dtype(dtype).itemsize)
    assert frame[:4] == MAGIC
    tag, out = decode_message(frame)
    assert tag == "beaver/7/e"
    assert out.dtype == np.dtype(dtype) and out.shape == shape
    np.testing.assert_array_equal(out, arr)


def test_round_trip_0d():
    # 0-d arrays must keep their shape (np.ascontiguousarray would promote them to (1,))
    for value in [np.uint64(2**64 - 1), np.int32(-7), np.float32(1.5), np.float64(-0.25), np.uint8(255)]:
        arr = np.asarray(value)
        assert arr.ndim == 0
        frame = encode_message("scalar", arr)
        assert len(frame) == frame_size("scalar", (), arr.itemsize)
        tag, out = decode_message(frame)
        assert tag == "scalar"
        assert out.shape == () and out.dtype == arr.dtype
        assert out[()] == value


def test_round_trip_extremes_and_unicode_tag():
    arr = np.array([0, 1, 2**63, 2**64 - 1], np.uint64)
    tag, out = decode_message(encode_message("L0/it3/µ", arr))
    assert tag == "L0/it3/µ"
    np.testing.assert_array_equal(out, arr)
    # non-contiguous and big-endian inputs are sent as little-endian values
    big = np.arange(12, dtype=">f8").reshape(3, 4)[:, ::2]
    _, out = decode_message(encode_message("x", big))
    assert out.dtype == np.dtype("<f8")
    np.testing.assert_array_equal(out, big)


@pytest.mark.parametrize("dtype", [np.complex128, np.int64, np.bool_, np.float16, np.int8, object])
def test_unsupported_dtype_is_type_error(dtype):
    with pytest.raises(TypeError, match="dtype"):
        encode_message("x", np.zeros(3, dtype))


def test_tag_too_long_or_too_many_axes():
    with pytest.raises(ValueError):
        encode_message("x" * 256, np.zeros(1, np.uint64))
    with pytest.raises(ValueError):
        encode_message("x", np.zeros((1,) * 9, np.uint64))
    assert decode_message(encode_message("x" * 255, np.zeros(1, np.uint64)))[0] == "x" * 255


def good_frame():
    return encode_message("tag", np.arange(6, dtype=np.uint64).reshape(2, 3))


@pytest.mark.parametrize(
    "frame, match",
    [
        (b"", "shorter than its header"),
        (b"PPR", "shorter than its header"),
        (good_frame()[:7], "shorter than its header"),
        (good_frame()[:12], "truncated header"),  # shape cut off
        (good_frame()[:-1], "payload of 47 bytes"),  # last payload byte missing
        (good_frame()[:-8], "payload"),
        (good_frame() + b"\0", "payload of 49 bytes"),  # trailing garbage
        (b"XPRG" + good_frame()[4:], "bad magic"),
        (good_frame()[:4] + bytes([VERSION + 1]) + good_frame()[5:], "version"),
        (good_frame()[:5] + bytes([0]) + good_frame()[6:], "dtype code 0"),
        (good_frame()[:5] + bytes([99]) + good_frame()[6:], "dtype code 99"),
        (raw_frame((1,) * 9, b"\0" * 8), "ndim 9"),
        (raw_frame((2, 3), b"\0" * 40), "shape \\(2, 3\\) needs 48"),
        (raw_frame((3,), b"\0" * 8, code=3), "shape \\(3,\\) needs 12"),  # float32 itemsize
        (raw_frame((2,), b"\0" * 16, tag=b"\xff\xfe"), "UTF-8"),
    ],
)
def test_decode_rejects_malformed(frame, match):
    with pytest.raises(ProtocolError, match=match):
        decode_message(frame)


def test_decode_accepts_hand_built_frame():
    tag, out = decode_message(raw_frame((2,), struct.pack("<2f", 1.5, -2.0), code=3, tag=b"ok"))
    assert tag == "ok" and out.dtype == np.float32 and out.tolist() == [1.5, -2.0]


@pytest.mark.parametrize("shape", [(2**32, 2**32), (2**62 + 1, 4), (2**33, 2**31, 1)])
def test_decode_rejects_shape_whose_size_overflows(shape):
    # The declared element count overflows int64 (wraps to 0 or to a small number);
    # this must be a ProtocolError like any other malformed frame, not a ValueError
    # escaping from numpy's reshape.
    count = 1
    for s in shape:
        count *= s
    wrapped = (count % 2**64) * 8 % 2**64
    with pytest.raises(ProtocolError, match="malformed"):
        decode_message(raw_frame(shape, b"\0" * min(wrapped, 64)))


def test_decode_max_bytes():
    frame = good_frame()
    assert decode_message(frame, max_bytes=len(frame))[0] == "tag"
    with pytest.raises(ProtocolError, match=f"{len(frame)} bytes exceeds the limit of {len(frame) - 1}"):
        decode_message(frame, max_bytes=len(frame) - 1)


def test_send_recv_in_order_and_traffic():
    chan = InProcessChannel()
    a = np.arange(4, dtype=np.uint64)
    b = np.ones((2, 2), np.float32)
    chan.send("party1", "party2", "first", a)
    chan.send("party1", "party2", "second", b)
    chan.send("dealer", "party2", "seed", np.zeros(32, np.uint8), phase="offline")
    np.testing.assert_array_equal(chan.recv("party2", "party1", "first"), a)
    np.testing.assert_array_equal(chan.recv("party2", "party1", "second"), b)
    np.testing.assert_array_equal(chan.recv("party2", "dealer", "seed"), np.zeros(32, np.uint8))

    n_a, n_b, n_seed = frame_size("first", (4,), 8), frame_size("second", (2, 2), 4), frame_size("seed", (32,), 1)
    snap = chan.traffic.snapshot()
    assert snap["sent"]["party1"] == {"offline": 0, "online": n_a + n_b}
    assert snap["received"]["party2"] == {"offline": n_seed, "online": n_a + n_b}
    assert snap["sent"]["dealer"] == {"offline": n_seed, "online": 0}
    assert snap["messages"]["party1"] == {"offline": 0, "online": 2}
    assert snap["messages"]["dealer"] == {"offline": 1, "online": 0}
    assert snap["messages"]["party2"] == {"offline": 0, "online": 0}
    assert snap["sent"]["party2"] == {"offline": 0, "online": 0}
    assert snap["received"]["party1"] == {"offline": 0, "online": 0}
    # receiving does not change the counters; snapshots are independent copies
    snap["sent"]["party1"]["online"] = -1
    assert chan.traffic.snapshot()["sent"]["party1"]["online"] == n_a + n_b


def test_queues_are_per_direction():
    chan = InProcessChannel()
    chan.send("party1", "party2", "x", np.zeros(1, np.uint64))
    with pytest.raises(ProtocolError, match="never sent"):
        chan.recv("party1", "party2", "x")  # opposite direction is empty
    with pytest.raises(ProtocolError, match="never sent"):
        chan.recv("party2", "dealer", "x")
    assert chan.recv("party2", "party1", "x").tolist() == [0]


def test_recv_with_nothing_pending_raises_not_hangs():
    chan = InProcessChannel()
    with pytest.raises(ProtocolError, match="party2 waits for a message from party1"):
        chan.recv("party2", "party1", "anything")


def test_recv_wrong_tag():
    chan = InProcessChannel()
    chan.send("party1", "party2", "beaver/0/e", np.zeros(2, np.uint64))
    with pytest.raises(ProtocolError, match="expected message 'beaver/0/d'.*got 'beaver/0/e'"):
        chan.recv("party2", "party1", "beaver/0/d")


def test_send_refuses_oversized_frame():
    arr = np.zeros(10, np.uint64)
    size = frame_size("big", (10,), 8)
    chan = InProcessChannel(max_message_bytes=size - 1)
    with pytest.raises(ProtocolError, match=f"refusing to send {size} bytes"):
        chan.send("party1", "party2", "big", arr)
    # nothing delivered, nothing counted
    assert chan.traffic.snapshot()["sent"]["party1"]["online"] == 0
    assert chan.traffic.snapshot()["messages"]["party1"]["online"] == 0
    with pytest.raises(ProtocolError, match="never sent"):
        chan.recv("party2", "party1", "big")
    # exactly at the limit is allowed
    ok = InProcessChannel(max_message_bytes=size)
    ok.send("party1", "party2", "big", arr)
    assert ok.recv("party2", "party1", "big").shape == (10,)


def test_recv_enforces_max_bytes_on_incoming_frames():
    chan = InProcessChannel(max_message_bytes=1000)
    chan._deliver("party1", "party2", encode_message("x", np.zeros(200, np.uint64)))  # peer ignored the limit
    with pytest.raises(ProtocolError, match="exceeds the limit of 1000"):
        chan.recv("party2", "party1", "x")


def test_send_validates_endpoints_and_phase():
    chan = InProcessChannel()
    with pytest.raises(ValueError, match="endpoints"):
        chan.send("party1", "party1", "x", np.zeros(1, np.uint64))
    with pytest.raises(ValueError, match="endpoints"):
        chan.send("party1", "mallory", "x", np.zeros(1, np.uint64))
    with pytest.raises(ValueError, match="phase"):
        chan.send("party1", "party2", "x", np.zeros(1, np.uint64), phase="setup")
    assert chan.traffic.snapshot()["messages"]["party1"]["online"] == 0


def test_send_unsupported_dtype_is_type_error():
    chan = InProcessChannel()
    with pytest.raises(TypeError):
        chan.send("party1", "party2", "x", np.zeros(2, np.complex64))


def test_traffic_record():
    t = Traffic()
    t.record("party1", "dealer", "online", 100)
    t.record("party1", "party2", "online", 10)
    t.record("dealer", "party1", "offline", 7)
    s = t.snapshot()
    assert s["sent"]["party1"]["online"] == 110 and s["messages"]["party1"]["online"] == 2
    assert s["received"]["dealer"]["online"] == 100 and s["received"]["party2"]["online"] == 10
    assert s["received"]["party1"]["offline"] == 7 and s["sent"]["dealer"]["offline"] == 7
    assert set(s) == {"sent", "received", "messages"}
    assert set(s["sent"]) == set(ch.ENDPOINTS) and set(s["sent"]["party1"]) == set(ch.PHASES)
