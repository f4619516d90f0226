"""Shared helpers for the secure-layer tests: frame sizes, a channel that records frames, and a
recorder of every frame and dealer label of an in-process secure session."""

import threading

import numpy as np

from ppreg.secure.mpc import dealer as dealer_mod
from ppreg.secure import session as session_mod
from ppreg.secure.net.channel import InProcessChannel, decode_message

HEAD = 8  # fixed frame header: magic (4) + version, dtype code, ndim, tag length (1 each)


def frame_size(tag, shape, itemsize=8):
    """Bytes of one frame: header, 8 bytes per axis, the UTF-8 tag, the payload."""
    return HEAD + 8 * len(shape) + len(tag.encode()) + itemsize * int(np.prod(shape, dtype=np.int64))


class RecordingChannel(InProcessChannel):
    """Keeps a copy of every frame sent: ``(src, dst, tag, array)``."""

    def __init__(self):
        super().__init__()
        self.log = []

    def _deliver(self, src, dst, frame):
        tag, arr = decode_message(frame)
        self.log.append((src, dst, tag, np.array(arr)))
        super()._deliver(src, dst, frame)

    def received(self, dst, src, tag):
        return [arr for s, d, t, arr in self.log if (s, d, t) == (src, dst, tag)]


class Recorder:
    """Patches the session's channel to record frames, and records every label a party derives."""

    def __init__(self, monkeypatch):
        self.channels, self.stream_labels, self.claims = [], [], []
        rec = self

        class Channel(RecordingChannel):
            def __init__(self, *args, **kwargs):
                super().__init__()
                rec.channels.append(self)

        original_stream, original_claim = dealer_mod.PartyRandomness.stream, dealer_mod.Dealer._claim

        def stream(party_rand, label, shape):
            rec.stream_labels.append((party_rand.party, label))
            return original_stream(party_rand, label, shape)

        def claim(dealer, label):
            rec.claims.append(label)
            return original_claim(dealer, label)

        monkeypatch.setattr(session_mod, "InProcessChannel", Channel)
        monkeypatch.setattr(dealer_mod.PartyRandomness, "stream", stream)
        monkeypatch.setattr(dealer_mod.Dealer, "_claim", claim)

    def view(self, party):
        """All uint64 ring elements ``party`` received (from the other party and the dealer)."""
        (channel,) = self.channels
        arrays = [arr.ravel() for src, dst, tag, arr in channel.log if dst == party and arr.dtype == np.uint64]
        return np.concatenate(arrays)


def in_thread(fn):
    """Run ``fn`` in a daemon thread; returns the thread and a dict that gets ``value`` or ``error``."""
    out = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as exc:  # reported to the test
            out["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out
