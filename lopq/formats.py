"""File formats: the `.lopq` protobuf, `.mat`, fvecs/ivecs/bvecs, and the Spark text formats.

`.lopq` is wire-compatible with the reference schema (proto2, package
``com.flickr.vision.lopq``)::

    message Vector { repeated float values = 1 [packed = true]; }
    message Matrix { repeated float values = 1 [packed = true]; repeated uint32 shape = 2; }
    message LOPQModelParams {
      optional uint32 D = 1; optional uint32 V = 2; optional uint32 M = 3;
      optional uint32 num_subquantizers = 4;
      repeated Matrix Cs = 5;     // 2 matrices (V, D/2)
      repeated Matrix Rs = 6;     // 2V matrices (D/2, D/2): split 0 clusters, then split 1
      repeated Vector mus = 7;    // 2V vectors (D/2)
      repeated Matrix subs = 8;   // M matrices (S, D/M): split 0 subquantizers, then split 1
    }

The descriptor is built at import time, so no generated ``_pb2`` module can go stale
against the installed protobuf runtime.
"""

import base64
import binascii
import json
import os
import pickle
import re
import struct
import warnings

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

# ---------------------------------------------------------------------------- protobuf


def _build_messages():
    fdp = descriptor_pb2.FileDescriptorProto(
        name="lopq_model.proto", package="com.flickr.vision.lopq", syntax="proto2")
    F = descriptor_pb2.FieldDescriptorProto
    opt, rep = F.LABEL_OPTIONAL, F.LABEL_REPEATED

    def message(name, fields):
        msg = fdp.message_type.add(name=name)
        for number, (fname, label, ftype, type_name, packed) in enumerate(fields, start=1):
            field = msg.field.add(name=fname, number=number, label=label, type=ftype)
            if type_name:
                field.type_name = ".com.flickr.vision.lopq." + type_name
            if packed:
                field.options.packed = True

    message("Vector", [("values", rep, F.TYPE_FLOAT, None, True)])
    message("Matrix", [("values", rep, F.TYPE_FLOAT, None, True),
                       ("shape", rep, F.TYPE_UINT32, None, False)])
    message("LOPQModelParams", [
        ("D", opt, F.TYPE_UINT32, None, False), ("V", opt, F.TYPE_UINT32, None, False),
        ("M", opt, F.TYPE_UINT32, None, False),
        ("num_subquantizers", opt, F.TYPE_UINT32, None, False),
        ("Cs", rep, F.TYPE_MESSAGE, "Matrix", False),
        ("Rs", rep, F.TYPE_MESSAGE, "Matrix", False),
        ("mus", rep, F.TYPE_MESSAGE, "Vector", False),
        ("subs", rep, F.TYPE_MESSAGE, "Matrix", False),
        # Additions (fields 9-11, absent for L2 models): readers of the reference's
        # schema skip unknown fields, so they read the model as L2 of dimension D.
        ("metric", opt, F.TYPE_STRING, None, False),
        ("input_dim", opt, F.TYPE_UINT32, None, False),
        ("max_norm", opt, F.TYPE_DOUBLE, None, False)])
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(
        pool.FindMessageTypeByName("com.flickr.vision.lopq.LOPQModelParams"))


LOPQModelParams = _build_messages()


def _matrix(msg, array):
    msg.values.extend(np.asarray(array, dtype=np.float32).ravel().tolist())
    msg.shape.extend(array.shape)


def params_to_proto_bytes(D, V, M, S, Cs, Rs, mus, subs, metric="l2", dim=None,
                          max_norm=None):
    """Serialise stacked parameters (any may be None) to `.lopq` bytes.

    Args: Cs (2, V, D/2), Rs (2, V, D/2, D/2), mus (2, V, D/2), subs (M, S, D/M);
    ``metric``, ``dim`` (input dimension) and ``max_norm`` are written only for a
    metric other than L2 (an L2 model's bytes are the reference's).
    """
    params = LOPQModelParams(D=D, V=V, M=M, num_subquantizers=S)
    if metric != "l2":
        params.metric = metric
        if dim is not None:
            params.input_dim = dim
        if max_norm is not None:
            params.max_norm = max_norm
    if Cs is not None:
        for C in Cs:
            _matrix(params.Cs.add(), C)
    if Rs is not None:
        for R in Rs.reshape(-1, *Rs.shape[2:]):
            _matrix(params.Rs.add(), R)
    if mus is not None:
        for mu in mus.reshape(-1, mus.shape[-1]):
            params.mus.add().values.extend(np.asarray(mu, dtype=np.float32).tolist())
    if subs is not None:
        for sub in subs:
            _matrix(params.subs.add(), sub)
    return params.SerializeToString()


def _from_matrix(msg, what, source):
    values = np.asarray(msg.values, dtype=np.float32)
    shape = tuple(msg.shape)
    if not shape or int(np.prod(shape)) != values.size:
        raise ValueError(f"{source}: a {what} matrix has {values.size} values but shape "
                         f"{shape}; the file is corrupt")
    return values.reshape(shape)


def params_from_proto_bytes(data, source="<bytes>", with_metric=False):
    """Parse `.lopq` bytes into ``(D, V, M, S, Cs, Rs, mus, subs)`` stacked float32 arrays
    (a missing parameter kind is None); with ``with_metric`` a ninth item, the dict
    ``{"metric", "dim", "max_norm"}`` ("l2", None, None for a reference file). Raises
    ValueError naming what is wrong."""
    from google.protobuf.message import DecodeError
    params = LOPQModelParams()
    try:
        params.ParseFromString(bytes(data))
    except DecodeError as err:
        raise ValueError(f"{source} is not a .lopq model file "
                         f"(protobuf decode failed: {err})") from None
    D, V, M, S = params.D, params.V, params.M, params.num_subquantizers
    if not (D and V and M) or D % 2 or (len(params.Cs) not in (0, 2)):
        raise ValueError(f"{source} is not a valid .lopq model file (D={D}, V={V}, M={M}, "
                         f"{len(params.Cs)} coarse quantizers): expected D even, V and M "
                         "positive and 2 coarse quantizers")
    h = D // 2
    Cs = Rs = mus = subs = None
    if params.Cs:
        Cs = np.stack([_from_matrix(m, "coarse", source) for m in params.Cs])
        if Cs.shape != (2, V, h):
            raise ValueError(f"{source}: coarse quantizers have shape {Cs.shape[1:]}, "
                             f"expected {(V, h)} for D={D}, V={V}")
    if params.Rs:
        if len(params.Rs) != 2 * V:
            raise ValueError(f"{source}: {len(params.Rs)} rotations, expected 2V = {2 * V}")
        Rs = np.stack([_from_matrix(m, "rotation", source) for m in params.Rs])
        if Rs.shape[1:] != (h, h):
            raise ValueError(f"{source}: rotations have shape {Rs.shape[1:]}, expected "
                             f"{(h, h)}")
        Rs = Rs.reshape(2, V, h, h)
    if params.mus:
        if len(params.mus) != 2 * V or any(len(m.values) != h for m in params.mus):
            raise ValueError(f"{source}: expected 2V = {2 * V} mean residuals of {h} values")
        mus = np.asarray([list(m.values) for m in params.mus], dtype=np.float32)
        mus = mus.reshape(2, V, h)
    if params.subs:
        if M % 2 or D % M or len(params.subs) != M:
            raise ValueError(f"{source}: {len(params.subs)} subquantizers for M={M}, D={D}")
        subs = np.stack([_from_matrix(m, "subquantizer", source) for m in params.subs])
        if subs.shape[2] != D // M:
            raise ValueError(f"{source}: subquantizers of {subs.shape[2]} dims, expected "
                             f"D/M = {D // M}")
        S = subs.shape[1]
    if not with_metric:
        return D, V, M, S, Cs, Rs, mus, subs
    metric = {"metric": params.metric if params.HasField("metric") else "l2",
              "dim": params.input_dim if params.HasField("input_dim") else None,
              "max_norm": params.max_norm if params.HasField("max_norm") else None}
    return D, V, M, S, Cs, Rs, mus, subs, metric


# ---------------------------------------------------------------------------- xvecs

_XVECS = {"fvecs": np.float32, "ivecs": np.int32, "bvecs": np.uint8}


def _xvecs_kind(path, kind):
    kind = kind or str(path).rsplit(".", 1)[-1]
    if kind not in _XVECS:
        raise ValueError(f"cannot tell the vecs type of {path!r}: name it .fvecs, .ivecs or "
                         ".bvecs, or pass kind=")
    return kind


def load_xvecs(path, kind=None):
    """Read an fvecs/ivecs/bvecs file (each record: int32 d, then d values).

    Returns:
        (n, d) float32 / int32 / uint8 array.
    """
    kind = _xvecs_kind(path, kind)
    dtype = np.dtype(_XVECS[kind])
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0:
        return np.empty((0, 0), dtype=dtype)
    d = int(raw[:4].view("<i4")[0])
    record = 4 + d * dtype.itemsize
    if d <= 0 or raw.size % record:
        raise ValueError(f"{path}: {raw.size} bytes is not a whole number of {kind} records "
                         f"of dimension {d}; the file is truncated or not {kind}")
    records = raw.reshape(-1, record)
    dims = records[:, :4].copy().view("<i4").ravel()
    if np.any(dims != d):
        bad = int(np.flatnonzero(dims != d)[0])
        raise ValueError(f"{path}: record {bad} has dimension {dims[bad]}, expected {d}")
    return records[:, 4:].copy().view(dtype.newbyteorder("<")).astype(dtype, copy=False)


def save_xvecs(path, X, kind=None):
    """Write (n, d) rows as fvecs/ivecs/bvecs (type from ``kind`` or the file name)."""
    kind = _xvecs_kind(path, kind)
    dtype = np.dtype(_XVECS[kind]).newbyteorder("<")
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"save_xvecs needs a 2-D array, got shape {X.shape}")
    n, d = X.shape
    out = np.empty((n, 4 + d * dtype.itemsize), dtype=np.uint8)
    out[:, :4] = np.full((n, 1), d, dtype="<i4").view(np.uint8)
    out[:, 4:] = np.ascontiguousarray(X, dtype=dtype).view(np.uint8).reshape(n, -1)
    out.tofile(path)


# ---------------------------------------------------------------------------- text formats


def encode_vector_line(key, vector):
    """One line of the default data format: ``id<TAB>base64(pickle(ndarray))``."""
    payload = base64.b64encode(pickle.dumps(np.asarray(vector), protocol=2)).decode("ascii")
    return f"{key}\t{payload}"


#: The only globals a vector pickle may name: what numpy arrays are rebuilt from (numpy
#: 1.x and 2.x module names, Python 2 and 3 pickles). Anything else is refused, so
#: reading a data file never runs code.
ARRAY_PICKLE_GLOBALS = frozenset(
    (module, name)
    for module in ("numpy.core.multiarray", "numpy._core.multiarray")
    for name in ("_reconstruct", "scalar")
) | frozenset(
    (module, "_frombuffer") for module in ("numpy.core.numeric", "numpy._core.numeric")
) | frozenset(
    (module, name) for module in ("builtins", "__builtin__") for name in ("bytes", "bytearray")
) | {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"), ("codecs", "encode")}


#: Also allowed in model and parameter pickles: our model class (the reference's pickles
#: name the same path), plain containers, and what protocol 0-1 pickles rebuild objects with.
OBJECT_PICKLE_GLOBALS = ARRAY_PICKLE_GLOBALS | frozenset(
    (module, name) for module in ("builtins", "__builtin__")
    for name in ("object", "set", "frozenset", "complex", "slice", "range")
) | {("copy_reg", "_reconstructor"), ("copyreg", "_reconstructor"),
     ("collections", "OrderedDict"), ("lopq.model", "LOPQModel")}


# Numpy rebuilds arrays and dtypes from the state a pickle hands it, and some malformed
# states crash the process (found by fuzzing the data format: a dtype state of 7 items
# segfaults). So a pickle never reaches numpy's own __setstate__: the globals below stand
# in for numpy's, check every argument and state against what numpy itself writes, and
# only then build the array from its bytes.
_DTYPE_SPEC = re.compile(r"[<>|=]?[bBhHiIlLqQefdgFDG?][0-9]{0,2}\Z|[<>|=]?[biufcO][0-9]{1,2}\Z")
_MAX_ITEMS = 1 << 40


def _bad_state(what, detail):
    raise pickle.UnpicklingError(f"the pickle's {what} is not one numpy writes ({detail})")


def _shown(value):
    """A short, stable description of an unpickled value for messages (no addresses)."""
    if isinstance(value, tuple):
        return "(" + ", ".join(_shown(v) for v in value[:10]) + (", ...)" if len(value) > 10
                                                                   else ")")
    if value is None or type(value) in (bool, int, float) or \
            (isinstance(value, (str, bytes)) and len(value) <= 16):
        return repr(value)
    return type(value).__name__.lstrip("_")


class _PickledDtype:
    """``numpy.dtype(spec, align, copy)`` then its state: numeric and boolean dtypes, and
    object arrays only so far as to say what they hold (their items are plain values)."""

    def __init__(self, spec, align=False, copy=True):
        if isinstance(spec, bytes):
            spec = spec.decode("latin-1")
        if not isinstance(spec, str) or not _DTYPE_SPEC.match(spec):
            _bad_state("dtype", f"type {_shown(spec)}")
        self.dtype = np.dtype(spec)
        if self.dtype.kind not in "biufcO" or self.dtype.fields or self.dtype.subdtype:
            _bad_state("dtype", f"type {_shown(spec)}")

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) not in (8, 9) or state[0] not in (3, 4) \
                or state[1] not in ("<", ">", "|", "=") or state[2:5] != (None, None, None) \
                or state[5:7] != (-1, -1) or state[7] != (63 if self.dtype.kind == "O" else 0) \
                or (len(state) == 9 and state[8] is not None):
            _bad_state("dtype state", _shown(state))
        if state[1] in "<>" and self.dtype.itemsize > 1 and self.dtype.kind != "O":
            self.dtype = self.dtype.newbyteorder(state[1])


def _checked_dtype(value):
    if isinstance(value, _PickledDtype):
        return value.dtype
    _bad_state("array", f"dtype {type(value).__name__}")


def _checked_shape(shape):
    if not isinstance(shape, tuple) or len(shape) > 32 or not all(
            type(n) is int and 0 <= n <= _MAX_ITEMS for n in shape):
        _bad_state("array", f"shape {_shown(shape)}")
    items = 1
    for n in shape:
        items *= n
    if items > _MAX_ITEMS:
        _bad_state("array", f"shape {_shown(shape)}")
    return items


def _array_from_bytes(data, dtype, shape, fortran):
    if dtype.kind == "O":
        # An object array pickles its items as a list; the unpickler has built them from
        # allowed globals only, and the caller refuses the array by its dtype.
        if not isinstance(data, list) or len(data) != _checked_shape(shape):
            _bad_state("array", f"object data for shape {_shown(shape)}")
        array = np.empty(len(data), dtype=object)
        array[:] = data
        return array.reshape(shape, order="F" if fortran else "C")
    if isinstance(data, str):  # Python 2 pickles read with encoding="latin1"
        data = data.encode("latin-1")
    if not isinstance(data, (bytes, bytearray)):
        _bad_state("array", f"data of type {type(data).__name__}")
    if len(data) != _checked_shape(shape) * dtype.itemsize:
        _bad_state("array", f"{len(data)} bytes for shape {shape} of {dtype}")
    return np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C").copy(
        order="K")


class _PickledArray:
    """``numpy.core.multiarray._reconstruct(ndarray, (0,), b'b')`` then its state
    ``(version, shape, dtype, is_fortran, data)``."""

    def __init__(self, subtype, shape, typecode):
        if subtype is not _PickledNdarrayType or shape != (0,) or typecode not in (b"b", "b"):
            _bad_state("array", "a _reconstruct call")
        self.array = None

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            _bad_state("array state", _shown(state))
        if len(state) == 5:
            if state[0] != 1:
                _bad_state("array state", f"version {_shown(state[0])}")
            state = state[1:]
        shape, dtype, fortran, data = state
        if type(fortran) not in (bool, int):
            _bad_state("array state", f"order {_shown(fortran)}")
        self.array = _array_from_bytes(data, _checked_dtype(dtype), shape, bool(fortran))


class _PickledNdarrayType:
    """Stands for ``numpy.ndarray`` in a pickle: only `_PickledArray` takes it."""

    def __init__(self, *args):
        _bad_state("array", "a direct numpy.ndarray call")


def _pickled_scalar(dtype, data):
    dtype = _checked_dtype(dtype)
    if dtype.kind == "O":
        _bad_state("scalar", "of object type")
    return _array_from_bytes(data, dtype, (), False)[()]


def _pickled_frombuffer(buffer, dtype, shape, order):
    if isinstance(buffer, memoryview):
        buffer = buffer.tobytes()
    if order not in ("C", "F"):
        _bad_state("array", f"order {_shown(order)}")
    if _checked_dtype(dtype).kind == "O":
        _bad_state("array", "an object buffer")
    return _array_from_bytes(buffer, _checked_dtype(dtype), shape, order == "F")


class _PickledModel:
    """Stands for ``lopq.model.LOPQModel`` while unpickling: keeps its state until the
    arrays in it are built (see `_built`)."""

    def __setstate__(self, state):
        self.state = state


#: What the checked stand-ins replace.
_STAND_INS = {("numpy", "dtype"): _PickledDtype, ("numpy", "ndarray"): _PickledNdarrayType}
for _module in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _STAND_INS[(_module, "_reconstruct")] = _PickledArray
    _STAND_INS[(_module, "scalar")] = _pickled_scalar
for _module in ("numpy.core.numeric", "numpy._core.numeric"):
    _STAND_INS[(_module, "_frombuffer")] = _pickled_frombuffer


def _built(value, what):
    """The unpickled value with every stand-in replaced by what it stands for."""
    if isinstance(value, _PickledArray):
        if value.array is None:
            _bad_state("array", "no state")
        return value.array
    if isinstance(value, _PickledDtype):
        return value.dtype
    if isinstance(value, _PickledModel):
        from .model import LOPQModel
        model = LOPQModel.__new__(LOPQModel)
        model.__setstate__(_built(getattr(value, "state", None), what))
        return model
    if type(value) is list:
        return [_built(v, what) for v in value]
    if type(value) is tuple:
        return tuple(_built(v, what) for v in value)
    if type(value) is dict:
        return {_built(k, what): _built(v, what) for k, v in value.items()}
    return value


class RestrictedUnpickler(pickle._Unpickler):
    """An unpickler that builds only the globals in ``allowed`` (numpy arrays, plain
    containers, ...) and refuses the rest, so loading a file never runs its code. Numpy's
    arrays, dtypes and our model are built by checked stand-ins (see `load`).

    It is Python's own unpickler, not the C one: the C unpickler sizes its memo by the
    largest index a PUT names, so a 300-byte line whose one byte was changed made it
    allocate gigabytes for seconds (found by fuzzing); here the memo is a dict, and no
    length a pickle states is allocated beyond the bytes it really has."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, allowed, what):
        super().__init__(file, encoding="latin1")
        self.allowed = allowed
        self.what = what
        self._size = len(file.getbuffer()) if hasattr(file, "getbuffer") else None

    def _load_bytearray8(self):
        (size,) = struct.unpack("<Q", self.read(8))
        if self._size is not None and size > self._size:
            raise pickle.UnpicklingError(f"BYTEARRAY8 of {size} bytes in a pickle of "
                                         f"{self._size}")
        self.append(bytearray(self.read(size)) if size else bytearray())
        if len(self.stack[-1]) != size:
            raise pickle.UnpicklingError("pickle data was truncated")

    def _load_string(self):
        # Python 2 STRING: pickle reads it leniently, as Python 2 did; a stray backslash
        # in a bad record is no reason for a warning per line
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            pickle._Unpickler.load_string(self)

    dispatch[pickle.BYTEARRAY8[0]] = _load_bytearray8
    dispatch[pickle.STRING[0]] = _load_string

    def find_class(self, module, name):
        if (module, name) in self.allowed:
            if (module, name) == ("lopq.model", "LOPQModel"):
                return _PickledModel
            return _STAND_INS.get((module, name)) or super().find_class(module, name)
        raise pickle.UnpicklingError(f"the pickle asks for {module}.{name}, which is not "
                                     f"allowed in {self.what}")

    def load(self):
        return _built(super().load(), self.what)


def load_array_pickle(raw):
    """Unpickle bytes that must hold a numpy array (or numbers), never running code."""
    import io
    return RestrictedUnpickler(io.BytesIO(raw), ARRAY_PICKLE_GLOBALS,
                               "a vector record (only numpy arrays are)").load()


def safe_load_pickle(raw, what="a pickle"):
    """Unpickle a model, a PCA or an id pickle: LOPQModel objects, numpy arrays and
    builtin containers only (Python 2 pickles included). Raises pickle.UnpicklingError
    naming any other class the file asks for."""
    import io
    return RestrictedUnpickler(io.BytesIO(raw), OBJECT_PICKLE_GLOBALS, what).load()


def decode_vector_line(line):
    """Parse one default-format line into ``(id, ndarray)``.

    Arrays pickled by Python 2 are read with ``encoding="latin1"``; the pickle may only
    rebuild numpy arrays (`RestrictedUnpickler`). Raises ValueError saying what is wrong with
    the line.
    """
    key, sep, payload = line.rstrip("\r\n").partition("\t")
    if not sep:
        if line.startswith("PAR1"):  # Parquet's magic number
            raise ValueError("this is a Parquet file, not text lines: pass "
                             "--data_format parquet")
        raise ValueError("no TAB between id and data")
    try:
        raw = base64.b64decode(payload.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the data after the TAB is not base64") from None
    try:
        vector = load_array_pickle(raw)
    except pickle.UnpicklingError as err:
        if "which is not allowed" in str(err):
            raise ValueError(str(err)) from None
        raise ValueError(f"the data is base64 but not a pickle ({err})") from None
    except Exception as err:  # noqa: BLE001 - any decode failure is a bad record
        raise ValueError(f"the data is base64 but not a pickle ({type(err).__name__}: "
                         f"{err})") from None
    if not isinstance(vector, (np.ndarray, list, tuple)):
        raise ValueError(f"the pickle holds a {type(vector).__name__}, expected a 1-D "
                         "float array")
    vector = np.asarray(vector)
    if vector.ndim != 1 or vector.dtype.kind not in "fiu":
        raise ValueError(f"the pickle holds a {vector.dtype} array of shape {vector.shape}, "
                         "expected a 1-D float array")
    return key, vector


# ------------------------------------------------------- batch decoding of vector lines
# Every line that one program wrote for vectors of one dtype and dimension pickles them
# the same way: the same opcodes before the array's bytes, one string opcode holding
# them, the same opcodes after. `VectorPickleLayout` learns that frame once from a line
# the restricted unpickler has read, then reads the array bytes of matching lines
# directly. A line that does not match byte for byte goes through `decode_vector_line`.

#: Pickle opcodes that can hold an array's bytes: how their argument is framed.
_STRING_OPCODES = {
    b"T": ("bytes", 4), b"U": ("bytes", 1),  # BINSTRING, SHORT_BINSTRING (Python 2)
    b"B": ("bytes", 4), b"C": ("bytes", 1),  # BINBYTES, SHORT_BINBYTES (protocol 3+)
    b"\x8e": ("bytes", 8), b"\x96": ("bytes", 8),  # BINBYTES8, BYTEARRAY8
    b"X": ("utf8", 4), b"\x8c": ("utf8", 1), b"\x8d": ("utf8", 8),  # BINUNICODE (Python 3
    # protocols 1-2: numpy stores the bytes as latin-1 text), SHORT_BINUNICODE, BINUNICODE8
    b"V": ("unicode_line", 0),  # UNICODE (protocol 0): raw-unicode-escape up to a newline
    b"S": ("string_line", 0),  # STRING (Python 2 protocol 0): a quoted literal, a newline
}

try:
    binascii.a2b_base64(b"", strict_mode=True)

    def _b64decode(payload):
        return binascii.a2b_base64(payload, strict_mode=True)
except TypeError:  # Python < 3.11: the validating decoder of the per-line path
    def _b64decode(payload):
        return base64.b64decode(payload, validate=True)


def _opcode_spans(raw):
    """(start, end) byte offsets of the opcodes of pickle ``raw``, as far as pickletools
    can take it apart; a STRING opcode it cannot show (a Python 2 string of non-ASCII
    bytes) is taken as the newline-terminated line it is, and the walk stops there."""
    import io
    import pickletools
    stream = io.BytesIO(raw)
    ops = pickletools.genops(stream)
    spans = []
    while True:
        start = stream.tell()
        try:
            next(ops)
        except StopIteration:
            break
        except Exception:  # noqa: BLE001 - pickletools refuses it: our own reading
            end = raw.find(b"\n", start) + 1
            if raw[start:start + 1] == b"S" and end:
                spans.append((start, end))
            break
        spans.append((start, stream.tell()))
    return spans


class VectorPickleLayout:
    """The fixed frame of one kind of vector pickle: ``prefix`` (up to and including the
    opcode that holds the array's bytes), that opcode's argument, ``suffix``.

    Built by `learn` from a pickle the restricted unpickler has read, and checked once
    more by unpickling a pickle with other bytes in the same frame. A pickle that starts
    with ``prefix``, ends with ``suffix`` and holds exactly one well-formed argument of
    the right size between them is, opcode for opcode, the learned pickle with other
    array bytes: the unpickler would build the same array from them, and run nothing.
    """

    def __init__(self, prefix, suffix, kind, length_bytes, dtype, dim):
        self.prefix, self.suffix = prefix, suffix
        self.kind, self.length_bytes = kind, length_bytes
        self.dtype, self.dim = np.dtype(dtype), int(dim)
        self.nbytes = self.dtype.itemsize * self.dim

    @classmethod
    def learn(cls, raw, vector):
        """The layout of ``raw``, the pickle of ``vector`` (an array the restricted
        unpickler built from it), or None when it holds the bytes some other way."""
        if not isinstance(vector, np.ndarray) or vector.ndim != 1 or not vector.size \
                or vector.dtype.kind not in "fiu":
            return None
        target = np.ascontiguousarray(vector).tobytes()
        for start, end in _opcode_spans(raw):
            framing = _STRING_OPCODES.get(raw[start:start + 1])
            if framing is None:
                continue
            layout = cls(raw[:start + 1], raw[end:], *framing, vector.dtype, len(vector))
            if layout.array_bytes(raw) == target and layout._reads_other_bytes():
                return layout
        return None

    def _reads_other_bytes(self):
        """The restricted unpickler, given this frame around other bytes (all 256 byte
        values, quotes and newlines among them), builds the array of those bytes."""
        other = bytes((7 * i + 10) % 256 for i in range(self.nbytes))
        try:
            rebuilt = load_array_pickle(self.prefix + self._argument(other) + self.suffix)
        except Exception:  # noqa: BLE001
            return False
        return isinstance(rebuilt, np.ndarray) and rebuilt.dtype == self.dtype \
            and rebuilt.shape == (self.dim,) and rebuilt.tobytes() == other

    def _argument(self, data):
        """The string opcode's argument holding ``data``, framed as the kind says."""
        if self.kind == "bytes":
            return len(data).to_bytes(self.length_bytes, "little") + data
        if self.kind == "utf8":
            text = data.decode("latin-1").encode("utf-8")
            return len(text).to_bytes(self.length_bytes, "little") + text
        if self.kind == "unicode_line":
            text = data.decode("latin-1")
            for char in "\\\0\n\r\x1a":
                text = text.replace(char, f"\\u{ord(char):04x}")
            return text.encode("raw-unicode-escape") + b"\n"
        import codecs
        return b"'" + codecs.escape_encode(data)[0] + b"'\n"

    def array_bytes(self, raw):
        """The array's bytes if ``raw`` is a pickle of this layout, else None."""
        head, tail = len(self.prefix), len(self.suffix)
        if len(raw) < head + tail or not raw.startswith(self.prefix) \
                or not raw.endswith(self.suffix):
            return None
        body = raw[head:len(raw) - tail]
        try:
            if self.kind in ("bytes", "utf8"):
                size = self.length_bytes
                if int.from_bytes(body[:size], "little") != len(body) - size:
                    return None
                data = body[size:]
                if self.kind == "utf8":
                    data = data.decode("utf-8").encode("latin-1")
            else:  # newline-terminated: the opcode reads up to its first newline
                if not body.endswith(b"\n") or b"\n" in body[:-1]:
                    return None
                if self.kind == "unicode_line":
                    data = body[:-1].decode("raw-unicode-escape").encode("latin-1")
                else:
                    import codecs
                    quoted = body[:-1]
                    if len(quoted) < 2 or quoted[:1] not in (b"'", b'"') \
                            or quoted[-1:] != quoted[:1]:
                        return None
                    with warnings.catch_warnings():  # as pickle's own STRING reading:
                        warnings.simplefilter("ignore", DeprecationWarning)  # lenient
                        data = codecs.escape_decode(quoted[1:-1])[0]
        except (UnicodeError, ValueError):
            return None
        return data if len(data) == self.nbytes else None


#: Layouts one decoder learns at most (a file of that many kinds of pickle is odd).
MAX_LAYOUTS = 8


class VectorLineDecoder:
    """Decodes many default-format lines at once (`decode_vector_line`'s results, in
    order), reading the array bytes of lines that match a learned `VectorPickleLayout`
    directly; every other line goes through `decode_vector_line` itself, so a bad line
    gets exactly its error. Keep one decoder per partition: layouts are learned once."""

    def __init__(self):
        self.layouts = []

    def decode(self, lines):
        """Decode ``lines`` (strings).

        Returns:
            a list, in line order, of ``("rows", first, keys, X)`` runs of lines that
            matched one layout (``X`` (k, D) in the pickled dtype, lines
            ``first .. first + k - 1``) and ``("line", index, key, vector, error)`` for
            the others (``vector`` None and ``error`` the message when the line is bad).
        """
        compiled = _compiled_lines()
        if compiled is None:
            return self._decode_in_python(lines)
        lines = lines if isinstance(lines, list) else list(lines)
        out, index, last = [], 0, None
        while index < len(lines):
            # the previous run's layout first: files hold one kind of pickle
            for layout in ([last] if last is not None else []) + \
                    [x for x in self.layouts if x is not last]:
                rows = np.empty((len(lines) - index, layout.nbytes), dtype=np.uint8)
                count, keys = compiled.decode_run(lines, index, len(lines), layout.prefix,
                                                  layout.suffix, _KIND_CODES[layout.kind],
                                                  layout.length_bytes, rows)
                if count:
                    rows = rows[:count] if 2 * count > len(rows) else rows[:count].copy()
                    out.append(("rows", index, keys,
                                rows.view(layout.dtype).reshape(count, layout.dim)))
                    index, last = index + count, layout
                    break
            else:
                # no layout reads it: the Python path (which may learn a new layout)
                for item in self._decode_in_python(lines[index:index + 1]):
                    out.append(item[:1] + (index,) + item[2:])
                index += 1
        return out

    def _decode_in_python(self, lines):
        out = []
        run_layout, run_keys, run_data, run_first = None, [], [], 0

        def close_run():
            if run_keys:
                X = np.frombuffer(b"".join(run_data), dtype=run_layout.dtype)
                out.append(("rows", run_first, list(run_keys),
                            X.reshape(len(run_keys), run_layout.dim)))
                run_keys.clear()
                run_data.clear()

        for index, line in enumerate(lines):
            key, sep, payload = line.rstrip("\r\n").partition("\t")
            data = layout = raw = None
            if sep:
                try:  # strict: what it accepts, the per-line path reads the same way
                    raw = _b64decode(payload)
                except (binascii.Error, ValueError):
                    pass
            if raw is not None:
                for layout in self.layouts:
                    data = layout.array_bytes(raw)
                    if data is not None:
                        break
            if data is None:  # the full, safe path, with its exact messages
                close_run()
                run_layout = None
                try:
                    key, vector = decode_vector_line(line)
                except ValueError as err:
                    out.append(("line", index, key if sep else None, None, str(err)))
                    continue
                out.append(("line", index, key, vector, None))
                if sep and len(self.layouts) < MAX_LAYOUTS and raw is not None:
                    learned = VectorPickleLayout.learn(raw, vector)
                    if learned is not None:
                        self.layouts.append(learned)
                continue
            if layout is not run_layout:
                close_run()
                run_layout, run_first = layout, index
            run_keys.append(key)
            run_data.append(data)
        close_run()
        return out


#: `lopq._kernels._lines` codes of the layout kinds.
_KIND_CODES = {"bytes": 0, "utf8": 1, "unicode_line": 2, "string_line": 3}


def _compiled_lines():
    """The compiled line reader, or None (running from a --py-files zip, or
    LOPQ_PURE_PYTHON_LINES=1 to compare): then `VectorLineDecoder` reads in Python."""
    if os.environ.get("LOPQ_PURE_PYTHON_LINES") == "1":
        return None
    try:
        from ._kernels import _lines
    except ImportError:
        return None
    return _lines


def format_code_line(key, coarse, fine):
    """One line of `compute_codes` output: ``id<TAB>[[c0, c1], [f0, ..., fM-1]]``."""
    return f"{key}\t{json.dumps([[int(c) for c in coarse], [int(f) for f in fine]])}"


def format_code_lines(keys, coarse, fine):
    """`format_code_line` of many rows at once, joined by newlines (no newline at the
    end): one C-level formatting of the whole block instead of a call per row.

    Args:
        keys: n ids; coarse: (n, 2) int; fine: (n, M) int.

    Returns:
        str, byte for byte the lines `format_code_line` gives, joined by newlines.
    """
    coarse, fine = np.asarray(coarse), np.asarray(fine)
    n, M = fine.shape
    if n == 0:
        return ""
    row = "%s\t[[%d, %d], [" + ", ".join(["%d"] * M) + "]]"
    values = np.empty((n, 3 + M), dtype=object)
    values[:, 0] = list(keys)
    values[:, 1:3] = coarse.tolist()
    values[:, 3:] = fine.tolist()
    return "\n".join([row] * n) % tuple(values.ravel().tolist())


def format_neighbour_lines(keys, dists, ids):
    """`spark/search.py` text output of a block of queries, joined by newlines (no
    newline at the end): ``query_id<TAB>[[id, ...], [distance, ...]]`` (JSON) per query
    that found a neighbour, byte for byte ``f"{key}\t" + json.dumps([ids, dists])``.

    Args:
        keys: r query ids; dists: (r, k) float32, nearest first, inf where nothing was
            found; ids: (r, k) object, the neighbours' ids (int or str).

    Returns:
        str; empty when no query found a neighbour.
    """
    dists = np.asarray(dists, dtype=np.float32)
    if len(dists) == 0:
        return ""
    finite = np.isfinite(dists)
    d_rows, i_rows, keys = dists.tolist(), np.asarray(ids, dtype=object).tolist(), list(keys)
    if not finite.all():  # rare: short rows are trimmed one by one, empty ones dropped
        for r in np.flatnonzero(~finite.all(axis=1)).tolist():
            keep = finite[r]
            d_rows[r] = [d for d, f in zip(d_rows[r], keep) if f]
            i_rows[r] = [i for i, f in zip(i_rows[r], keep) if f]
        kept = finite.any(axis=1).tolist()
        keys = [key for key, f in zip(keys, kept) if f]
        d_rows = [d for d, f in zip(d_rows, kept) if f]
        i_rows = [i for i, f in zip(i_rows, kept) if f]
    # One C-level JSON encoding per query (json has no batch call for many documents);
    # map keeps the Python interpreter out of the loop itself.
    return "\n".join(map("{}\t{}".format, keys, map(json.dumps, zip(i_rows, d_rows))))


def format_pair_lines(keys, dists, ids):
    """`spark/search.py --self_join` text output of a block of items: one line
    ``id<TAB>neighbour_id<TAB>distance`` per neighbour found (the distance as Python's
    ``repr`` of the float32 value), joined by newlines, no newline at the end.

    Args:
        keys: r item ids; dists: (r, k) float32, inf where nothing was found;
            ids: (r, k) object.

    Returns:
        str; empty when nothing was found.
    """
    dists = np.asarray(dists, dtype=np.float32)
    if dists.size == 0:
        return ""
    rows, cols = np.nonzero(np.isfinite(dists))  # row-major: each item's neighbours in order
    if len(rows) == 0:
        return ""
    repeated = np.asarray(list(keys), dtype=object)[rows].tolist()
    found = np.asarray(ids, dtype=object)[rows, cols].tolist()
    return "\n".join(map("{}\t{}\t{!r}".format, repeated, found,
                          dists[rows, cols].tolist()))


def parse_code_line(line):
    """Inverse of `format_code_line`: ``(id, (c0, c1), (f0, ...))``."""
    key, sep, payload = line.rstrip("\r\n").partition("\t")
    if not sep:
        raise ValueError("no TAB between id and code")
    coarse, fine = json.loads(payload)
    return key, tuple(coarse), tuple(fine)


_BRACKETS = str.maketrans("[]", "  ")


def code_id(key):
    """A code line's id as the searchers give it: an int where the text is a decimal
    integer (``"7"``, ``"-7"``, ``"007"``), else the text itself (other objects as they
    are)."""
    if isinstance(key, str):
        digits = key[1:] if key.startswith("-") else key
        if digits.isdecimal():  # what int() reads: "--5" or "²" stay texts
            return int(key)
    return key


def merge_code_parts(parts, source="codes"):
    """One index's worth of codes from `parse_code_lines` results (one per part file).

    Returns:
        ids (list: ints where the text is an integer, else str), coarse (n, 2) and fine
        (n, M) int64. Raises ValueError when there are no codes, or parts of different M.
    """
    parts = [part for part in parts if part[0]]
    if not parts:
        raise ValueError(f"{source} holds no code lines")
    widths = sorted({part[2].shape[1] for part in parts})
    if len(widths) > 1:
        raise ValueError(f"{source}: the part files hold codes of {widths} fine codes "
                         "each; they come from different models")
    ids = [code_id(key) for part in parts for key in part[0]]
    return (ids, np.concatenate([part[1] for part in parts]),
            np.concatenate([part[2] for part in parts]))


def parse_code_lines(lines, source="codes"):
    """Parse many `compute_codes` lines at once (blank lines skipped).

    All numbers go through one numpy text parse instead of a JSON parse per line (about
    4x faster on 1M lines); any line that does not fit the common shape is re-read with
    `parse_code_line` to name it in the error.

    Args:
        lines: iterable of ``id<TAB>[[c0, c1], [f0, ..., fM-1]]`` strings.
        source: the file or folder named in errors.

    Returns:
        keys (list of str), coarse (n, 2) int64, fine (n, M) int64.
    """
    keys, payloads, raw = [], [], []
    # Per line only the split at the tab (the ids are free text); the numbers of every
    # line go through one parse below.
    for line in lines:
        key, sep, payload = line.rstrip("\r\n").partition("\t")
        if not sep and not key.strip():
            continue
        keys.append(key)
        payloads.append(payload.strip())
        raw.append(line)
    if not keys:
        return [], np.empty((0, 2), dtype=np.int64), np.empty((0, 0), dtype=np.int64)
    text = ",".join(payloads).translate(_BRACKETS)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # numpy warns, then stops, at a bad number
            numbers = np.fromstring(text, dtype=np.int64, sep=",")
    except ValueError:
        numbers = np.empty(0, dtype=np.int64)
    width = numbers.size // len(keys)
    # Same count of numbers on every line, two of them in the first list.
    fits = width > 2 and numbers.size == width * len(keys) and all(
        p.startswith("[[") and p.endswith("]]") and p.count(",") == width - 1
        and p.count(",", 0, p.find("]")) == 1 for p in payloads)
    if not fits:  # name the first line that breaks the common shape
        first_fine = None
        for number, line in enumerate(raw, 1):
            try:
                _, coarse, fine = parse_code_line(line)
            except ValueError as err:
                raise ValueError(f"{source}: code line {number} is not "
                                 f"id<TAB>[[c0, c1], [f0, ...]] ({err}): {line[:80]!r}") \
                    from None
            if not all(isinstance(v, int) for v in coarse + fine):
                raise ValueError(f"{source}: code line {number} holds a code that is not "
                                 "an integer")
            if len(coarse) != 2:
                raise ValueError(f"{source}: code line {number} has {len(coarse)} coarse "
                                 "codes, not 2")
            first_fine = len(fine) if first_fine is None else first_fine
            if len(fine) != first_fine:
                raise ValueError(f"{source}: code line {number} has {len(fine)} fine codes, "
                                 f"the first line {first_fine}")
        raise ValueError(f"{source}: the code lines could not be read as integers")
    table = numbers.reshape(len(keys), width)
    return keys, table[:, :2], table[:, 2:]


def write_vector_file(path, X, ids=None):
    """Write rows of X in the default data format, one ``id<TAB>base64(pickle)`` line each
    (ids default to the row numbers)."""
    X = np.asarray(X)
    with open(path, "w") as f:
        # Per row: the format is one pickle per line (a local test and demo writer)
        for i, row in enumerate(X):
            f.write(encode_vector_line(i if ids is None else ids[i], row) + "\n")
