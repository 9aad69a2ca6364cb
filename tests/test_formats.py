"""Batch decoding of the default data format (`VectorLineDecoder`) against the per-line
decoder it stands in for: the same ids and values for every pickle flavour, the same
error for every bad line, and no code run by any line."""

import base64
import os
import pickle

import numpy as np
import pytest

from lopq.datasets import python2_vector_line
from lopq.formats import VectorLineDecoder, decode_vector_line, encode_vector_line


def python2_line(key, vector, protocol):
    return python2_vector_line(key, vector, protocol)


def line(key, vector, protocol):
    return f"{key}\t{base64.b64encode(pickle.dumps(vector, protocol=protocol)).decode()}"


def per_line(lines):
    """What `decode_vector_line` says of each line: (key, vector) or the error text."""
    out = []
    for text in lines:
        try:
            out.append(decode_vector_line(text))
        except ValueError as err:
            out.append(str(err))
    return out


def flattened(items):
    """The decoder's runs and single lines as one result per line, in order."""
    out = []
    for item in items:
        if item[0] == "rows":
            _, first, keys, X = item
            assert first == len(out)
            out.extend(zip(keys, X))
        else:
            _, index, key, vector, error = item
            assert index == len(out)
            out.append(error if error is not None else (key, vector))
    return out


def assert_same(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        if isinstance(w, str):
            assert g == w
        else:
            assert g[0] == w[0]
            assert g[1].dtype == w[1].dtype
            np.testing.assert_array_equal(g[1], w[1])


FLAVOURS = [(f"protocol {p}", lambda k, v, p=p: line(k, v, p)) for p in range(6)] + [
    (f"Python 2 protocol {p}", lambda k, v, p=p: python2_line(k, v, p)) for p in range(3)]


@pytest.mark.parametrize("name,make", FLAVOURS, ids=[n for n, _ in FLAVOURS])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, ">f4", np.int32])
def test_batch_decoding_equals_the_per_line_decoder(name, make, dtype):
    rng = np.random.RandomState(0)
    X = (rng.randn(300, 128) * 1000).astype(dtype)
    X[3] = 0.0  # zeros, and every byte value: quotes, backslashes, newlines in the data
    X[4] = np.frombuffer(bytes(range(256)) * (X.itemsize * 128 // 256), dtype=X.dtype)
    lines = [make(f"id{i}", x) for i, x in enumerate(X)]
    decoder = VectorLineDecoder()
    items = decoder.decode(lines)
    assert_same(flattened(items), per_line(lines))
    if not np.dtype(dtype).isnative:
        return  # numpy pickles these with their byte order apart: the per-line path reads
    assert len(decoder.layouts) == 1  # learned once ...
    assert sum(len(item[2]) for item in items if item[0] == "rows") == len(lines) - 1
    assert_same(flattened(decoder.decode(lines)), per_line(lines))  # ... then every line


def test_mixed_layouts_and_bad_lines_keep_their_order_and_messages():
    rng = np.random.RandomState(1)
    good32 = [encode_vector_line(f"a{i}", rng.randn(16).astype(np.float32)) for i in range(5)]
    good64 = [line(f"b{i}", rng.randn(16), 2) for i in range(5)]
    bad = ["no tab here", "x\tnot base64!!", "y\t" + base64.b64encode(b"garbage").decode(),
           line("z", "a string", 2), line("w", np.zeros((2, 3)), 2), "\t", "v\t",
           good32[0] + "  ", good32[1].replace("\t", "\t "), line("u", np.zeros(0), 2)]
    lines = good32[:3] + bad[:4] + good64 + bad[4:] + good32[3:] + [good32[0] + "\r\n"]
    assert_same(flattened(VectorLineDecoder().decode(lines)), per_line(lines))


def test_a_line_that_frames_its_bytes_otherwise_is_read_the_safe_way():
    """Lines sharing a learned frame but with a length field that does not match, extra
    opcodes where the bytes should be, or another dimension, are not read by the fast
    path: the per-line decoder decides (and gives the same result or error)."""
    good = [line(f"g{i}", np.full(8, i, dtype=np.float32), 3) for i in range(3)]
    raw = pickle.dumps(np.full(8, 9, dtype=np.float32), protocol=3)
    data = np.full(8, 9, dtype=np.float32).tobytes()
    at = raw.index(data)
    longer = raw[:at - 1] + bytes([33]) + data + b"X" + raw[at + len(data):]
    tampered = [f"t\t{base64.b64encode(longer).decode()}",
                line("d", np.full(9, 1, dtype=np.float32), 3)]
    lines = good + tampered
    assert_same(flattened(VectorLineDecoder().decode(lines)), per_line(lines))


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_that_runs_code_runs_nothing_in_a_large_batch(tmp_path):
    rng = np.random.RandomState(2)
    marker = tmp_path / "ran"
    lines = [encode_vector_line(i, rng.randn(32).astype(np.float32)) for i in range(2000)]
    evil = f"evil\t{base64.b64encode(pickle.dumps(RunsCode(marker), protocol=2)).decode()}"
    for position in (0, 1, 999, 1999):
        lines.insert(position, evil)
    got = flattened(VectorLineDecoder().decode(lines))
    assert not marker.exists()
    errors = [g for g in got if isinstance(g, str)]
    assert len(errors) == 4 and all("posix.system" in e or "os.system" in e for e in errors)
    assert_same(got, per_line(lines))
    assert not marker.exists()


def test_code_lines_of_a_block_are_the_per_row_lines_byte_for_byte():
    from lopq.formats import format_code_line, format_code_lines
    rng = np.random.RandomState(3)
    for n, M, dtype in ((1, 2, np.uint8), (500, 16, np.uint8), (40, 8, np.uint16)):
        keys = [f"id{i}" for i in range(n - 1)] + [("tuple", 1)]
        coarse = rng.randint(0, 1000, (n, 2)).astype(np.int32)
        fine = rng.randint(0, np.iinfo(dtype).max, (n, M)).astype(dtype)
        want = "\n".join(format_code_line(k, c, f) for k, c, f in zip(keys, coarse, fine))
        assert format_code_lines(keys, coarse, fine) == want
    assert format_code_lines([], np.zeros((0, 2), int), np.zeros((0, 4), int)) == ""


def _neighbour_blocks():
    """Blocks as spark/search.py gets them: int and str ids (quotes, non-ASCII), rows
    cut short by inf, a row with nothing found, denormal and tiny distances, one row."""
    rng = np.random.RandomState(5)
    for r, k in ((1, 1), (30, 10), (7, 4)):
        dists = np.sort(rng.rand(r, k).astype(np.float32) * 10.0 ** rng.randint(-40, 4),
                        axis=1)
        dists[rng.rand(r, k) < 0.3] = np.inf
        dists.sort(axis=1)
        if r > 1:
            dists[r // 2] = np.inf
        ids = np.empty((r, k), dtype=object)
        for (i, j) in np.ndindex(r, k):
            ids[i, j] = int(rng.randint(-5, 10**12)) if (i + j) % 2 else f'n"{i}\\é{j}\t'
        ids[~np.isfinite(dists)] = None  # what an unfilled slot holds
        keys = np.array([f"q{i}" if i % 3 else i for i in range(r)], dtype=object)
        yield keys, dists, ids


def test_neighbour_and_pair_lines_of_a_block_are_the_per_query_lines_byte_for_byte():
    """The block writers of spark/search.py against its former per-record formatting
    (``f"{key}\t" + json.dumps([ids, [float(d), ...]])`` and ``f"{a}\t{b}\t{d!r}"``)."""
    import json

    from lopq.formats import format_neighbour_lines, format_pair_lines
    for keys, dists, ids in _neighbour_blocks():
        per_query = [(key, d[np.isfinite(d)], list(i[np.isfinite(d)]))
                     for key, d, i in zip(keys, dists, ids) if np.isfinite(d).any()]
        want = "\n".join(f"{key}\t" + json.dumps([list(i), [float(x) for x in d]])
                         for key, d, i in per_query)
        assert format_neighbour_lines(keys, dists, ids) == want
        pairs = "\n".join(f"{key}\t{other}\t{float(x)!r}"
                          for key, d, i in per_query for other, x in zip(i, d))
        assert format_pair_lines(keys, dists, ids) == pairs
    nothing = np.full((2, 3), np.inf, dtype=np.float32)
    assert format_neighbour_lines(["a", "b"], nothing, np.empty((2, 3), object)) == ""
    assert format_pair_lines(["a", "b"], nothing, np.empty((2, 3), object)) == ""
    assert format_neighbour_lines([], np.zeros((0, 3), np.float32), np.empty((0, 3))) == ""


# ------------------------------------------- the compiled line reader (lopq._kernels._lines)
INTERESTING = b"\\'\"\nux0123456789abcdefU\xc3\xc2\x80\xbf\x00\r\t=S"


def mutated(text, rng):
    """``text`` with one byte of its pickle changed, inserted or dropped (often a byte
    that means something to one of the framings: quotes, backslashes, u, x, hex digits,
    UTF-8 lead and continuation bytes, newlines)."""
    key, payload = text.split("\t")
    raw = bytearray(base64.b64decode(payload))
    at = rng.randint(len(raw))
    value = INTERESTING[rng.randint(len(INTERESTING))] if rng.rand() < 0.8 \
        else rng.randint(256)
    action = rng.randint(3)
    if action == 0:
        raw[at] = value
    elif action == 1:
        raw.insert(at, value)
    else:
        del raw[at]
    return f"{key}\t{base64.b64encode(bytes(raw)).decode()}"


@pytest.mark.parametrize("name,make", FLAVOURS, ids=[n for n, _ in FLAVOURS])
def test_compiled_reader_equals_python_on_mutated_pickles(name, make, monkeypatch):
    """Every line, mutated or not, gets from the compiled reader exactly what the
    per-line decoder says of it; and the decoder without the compiled reader agrees."""
    from lopq import formats
    if formats._compiled_lines() is None:
        pytest.skip("the compiled line reader is not built")
    rng = np.random.RandomState(7)
    X = rng.randn(40, 24).astype(np.float32)
    # data bytes that are escapes to one framing or another
    X[1] = np.frombuffer((b"\\u00e9\\\\u0041\\\\\\u0042\\x41'\"\n\r\\U0001" * 6)[:96],
                         dtype=np.float32)
    X[2] = np.frombuffer(bytes(range(160, 256)), dtype=np.float32)
    good = [make(f"k{i}", x) for i, x in enumerate(X)]
    lines = good[:5] + [mutated(good[5 + i % 35], rng) for i in range(1500)] + good[5:]
    lines += [make("clé ünïcode", X[0]), make("", X[3]), good[0] + "\r\n", good[1] + "\n\n"]
    want = per_line(lines)
    assert_same(flattened(VectorLineDecoder().decode(lines)), want)
    monkeypatch.setenv("LOPQ_PURE_PYTHON_LINES", "1")
    assert formats._compiled_lines() is None
    assert_same(flattened(VectorLineDecoder().decode(lines)), want)


def test_compiled_reader_reads_runs_and_stops_at_the_first_other_line():
    from lopq import formats
    compiled = formats._compiled_lines()
    if compiled is None:
        pytest.skip("the compiled line reader is not built")
    X = np.arange(5 * 4, dtype=np.float32).reshape(5, 4)
    lines = [line(f"r{i}", x, 3) for i, x in enumerate(X)]
    decoder = VectorLineDecoder()
    decoder.decode(lines[:1])
    layout = decoder.layouts[0]
    lines[3] = "r3\tnot base64"
    out = np.zeros((5, layout.nbytes), dtype=np.uint8)
    count, keys = compiled.decode_run(lines, 1, 5, layout.prefix, layout.suffix,
                                      formats._KIND_CODES[layout.kind], layout.length_bytes,
                                      out)
    assert (count, keys) == (2, ["r1", "r2"])
    np.testing.assert_array_equal(out[:2].view(np.float32), X[1:3])
    with pytest.raises(ValueError, match="fewer rows"):
        compiled.decode_run(lines, 0, 5, layout.prefix, layout.suffix, 0,
                            layout.length_bytes, out[:2])


@pytest.mark.parametrize("stated", [b"r\x00\x00\x00\x01",
                                    b"\x96\x00\x00\x00\x66\x00\x00\x00\x00"])
def test_a_stated_size_beyond_the_pickle_allocates_nothing_large(stated):
    """A pickle of a few hundred bytes naming memo slot 2**24 (LONG_BINPUT) or a
    BYTEARRAY8 of 400 GB is read (the first) or refused (the second) without the
    unpickler allocating for it (the C unpickler sized its memo by the index:
    gigabytes and seconds per such line)."""
    import tracemalloc
    good = base64.b64decode(line("k", np.zeros(24, np.float32), 5).split("\t")[1])
    at = good.index(b"\x94(") + 1  # after the first memo put, before the tuple's MARK
    bad = good[:at] + stated + good[at:]
    text = f"k\t{base64.b64encode(bad).decode()}"
    tracemalloc.start()
    try:
        got = per_line([text])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    if stated[:1] == b"r":  # a legal memo slot, however far: the vector reads
        assert got[0][0] == "k"
        np.testing.assert_array_equal(got[0][1], np.zeros(24, np.float32))
    else:
        assert got[0].startswith("the data is base64 but not a pickle")
    assert peak < 10 * 2 ** 20


class _Reduces:
    """Pickles as ``callable(*args)`` then BUILD ``state``: states numpy never writes."""

    def __init__(self, callable_, args, state):
        self.reduced = (callable_, args, state)

    def __reduce__(self):
        return self.reduced


@pytest.mark.parametrize("case", ["dtype state of 7 items", "dtype of fields",
                                  "array bytes short of its shape", "array of 2**41 items"])
def test_malformed_numpy_states_are_refused_before_numpy_sees_them(case):
    """Numpy rebuilds dtypes and arrays from whatever state a pickle hands it, and a
    7-item dtype state crashed the process; the checked stand-ins refuse each such state
    by name. Run in a child process, so a crash fails the test instead of the suite."""
    import subprocess
    import sys

    from numpy.core.multiarray import _reconstruct
    f4 = np.dtype("f4")
    obj = {
        "dtype state of 7 items": _Reduces(np.dtype, ("f4", False, True),
                                           (3, "<", None, None, None, -1, -1)),
        "dtype of fields": _Reduces(np.dtype, ("V8", False, True),
                                    (3, "|", None, ("a",), {"a": (f4, 0)}, 8, 1, 0)),
        "array bytes short of its shape": _Reduces(
            _reconstruct, (np.ndarray, (0,), b"b"), (1, (4,), f4, False, b"\0" * 12)),
        "array of 2**41 items": _Reduces(
            _reconstruct, (np.ndarray, (0,), b"b"), (1, (2 ** 41,), f4, False, b"")),
    }[case]
    raw = pickle.dumps(obj, protocol=2)
    child = ("import sys; from lopq.formats import safe_load_pickle\n"
             "try:\n    safe_load_pickle(sys.stdin.buffer.read())\n"
             "except Exception as err:\n    print(type(err).__name__, err)\n"
             "else:\n    print('loaded')\n")
    done = subprocess.run([sys.executable, "-c", child], input=raw, capture_output=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert done.stdout.decode().startswith("UnpicklingError the pickle's "), done.stdout
    assert "is not one numpy writes" in done.stdout.decode()
