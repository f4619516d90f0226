"""Shared helpers for the secure-layer tests: frame sizes and a channel that records frames."""

import numpy as np

from ppreg.secure.channel import InProcessChannel, decode_message

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
