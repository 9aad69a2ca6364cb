"""Synthetic data for demos, tests and benchmarks (no downloads)."""

import base64
import codecs
import io
import pickle
import struct

import numpy as np


def make_clustered(n, d=128, n_clusters=64, seed=0, dtype=np.float32):
    """Gaussian-mixture vectors with decaying per-dimension variance, like PCA'd
    embeddings.

    Args:
        n: rows; d: dimension; n_clusters: mixture components; seed: RNG seed.

    Returns:
        (n, d) array of ``dtype``.
    """
    rng = np.random.RandomState(seed)
    scale = np.linspace(2.0, 0.2, d)
    centres = rng.randn(n_clusters, d) * scale * 2.0
    out = np.empty((n, d), dtype=dtype)
    block = 100_000
    for start in range(0, n, block):
        m = min(block, n - start)
        which = rng.randint(n_clusters, size=m)
        out[start:start + m] = centres[which] + rng.randn(m, d) * scale
    return out


class _Python2Pickler(pickle._Pickler):
    """Pickles bytes as Python 2 pickled its ``str``: STRING (protocol 0, a quoted
    literal), SHORT_BINSTRING or BINSTRING (protocols 1-2). Numpy arrays keep their data
    in such a string: what the reference's Python 2 users have on disk."""

    def save_bytes(self, obj):
        if self.proto == 0:
            self.write(b"S'" + codecs.escape_encode(obj)[0] + b"'\n")
        elif len(obj) < 256:
            self.write(b"U" + bytes([len(obj)]) + obj)
        else:
            self.write(b"T" + struct.pack("<I", len(obj)) + obj)
        self.memoize(obj)

    dispatch = dict(pickle._Pickler.dispatch)
    dispatch[bytes] = save_bytes


def python2_vector_line(key, vector, protocol=2):
    """One default-format data line (``id<TAB>base64(pickle)``) as Python 2 wrote it:
    the array's bytes in a Python 2 string opcode. For compatibility tests and
    benchmarks of the readers; Python 3's own pickles are `lopq.formats`' business."""
    buffer = io.BytesIO()
    _Python2Pickler(buffer, protocol).dump(np.asarray(vector))
    return f"{key}\t{base64.b64encode(buffer.getvalue()).decode()}"
