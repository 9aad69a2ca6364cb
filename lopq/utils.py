"""Reference-compatible helpers: xvecs I/O, split iteration, parallel code computation."""

from .formats import load_xvecs, save_xvecs  # noqa: F401 (reference API)


def iterate_splits(x, splits):
    """Yield ``(chunk, index)`` for ``splits`` equal chunks of vector x (reference API)."""
    split_size = len(x) // splits
    for split in range(splits):
        yield x[split * split_size:(split + 1) * split_size], split


def compute_codes_parallel(data, model, num_procs=4):
    """Codes of every row of ``data`` (n, D) as a list of `LOPQCode` (reference API).

    The batched compiled `LOPQModel.encode` replaces the reference's process pool;
    ``num_procs`` is accepted for compatibility (threads: ``NUMBA_NUM_THREADS``).
    """
    from .model import LOPQCode
    coarse, fine = model.encode(data)
    return [LOPQCode(tuple(c), tuple(f)) for c, f in zip(coarse.tolist(), fine.tolist())]
