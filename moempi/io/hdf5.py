"""HDF5 files: the model checkpoint, tokens and run output (docs/design.md §2); the BF16 codec."""

from __future__ import annotations

import contextlib
import json
import os

import h5py
import ml_dtypes
import numpy as np

from moempi.errors import MoempiError
from moempi.io import files
from moempi.model.shapes import MLP_MATRICES, ModelMeta

MODEL_FORMAT = "moempi-model"
MODEL_VERSION = 1
BF16 = "bfloat16"
INT_ATTRS = ("hidden_size", "moe_ffn_size", "dense_ffn_size", "num_layers", "num_dense_layers",
             "num_experts", "top_k")                 # a model's integer root attributes
# optional root attributes (docs/design.md §2.1): name -> type; absent, the ModelMeta default
FAMILY_ATTRS = {"expert_kind": str, "dense_kind": str, "router": str, "n_group": int,
                "topk_group": int, "routed_scaling_factor": float, "shared_ffn_size": int,
                "shared_expert_gate": bool}
SCORE_BIAS = "e_score_correction_bias"


# -- the BF16 codec: uint16 bit patterns with attribute encoding = "bfloat16" -------------
def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float array -> uint16 BF16 bit patterns (round to nearest even)."""
    return np.asarray(x, dtype=np.float32).astype(ml_dtypes.bfloat16).view(np.uint16)


def bf16_decode(bits: np.ndarray) -> np.ndarray:
    """uint16 BF16 bit patterns -> float32, exactly.

    One shift into the float32 result (no uint32 temporary): a 7168 x 2048 matrix in 17
    against 114 ms here, which made reading an H 7168 model's weights 3x slower than the
    file's reads."""
    bits = np.asarray(bits, dtype=np.uint16)
    out = np.empty(bits.shape, np.float32)
    np.left_shift(bits, 16, out=out.view(np.uint32), dtype=np.uint32)
    return out


def _encoding(ds: h5py.Dataset) -> str:
    enc = ds.attrs.get("encoding", "")
    return enc.decode() if isinstance(enc, bytes) else str(enc)


def check_dtype(ds: h5py.Dataset, where: str) -> str:
    """The logical dtype name of a dataset, or an error for a dtype moempi cannot read."""
    if ds.dtype == np.uint16:
        if _encoding(ds) != BF16:
            raise MoempiError(f"{where}: uint16 dataset without encoding = \"bfloat16\"")
        return BF16
    if ds.dtype in (np.float16, np.float32, np.float64):
        return ds.dtype.name
    raise MoempiError(f"{where}: unsupported dtype {ds.dtype} (expected bfloat16 as uint16, "
                      "float16, float32 or float64)")


def read_f32(ds: h5py.Dataset, sel=()) -> np.ndarray:
    """Read ``ds[sel]`` as float32, decoding BF16 bit patterns."""
    data = ds[sel]
    if ds.dtype == np.uint16:
        return bf16_decode(data)
    return np.asarray(data, dtype=np.float32)


def open_h5(path: str, what: str) -> h5py.File:
    """Open an HDF5 file for reading; each way it can fail is a one-line error saying which:
    missing, a directory, unreadable, another format, locked by a writer, truncated."""
    if not os.path.exists(path):
        raise MoempiError(f"{path}: {what} file not found")
    if os.path.isdir(path):
        raise MoempiError(f"{path}: is a directory, not a {what} file")
    if not os.access(path, os.R_OK):
        raise MoempiError(f"{path}: permission denied reading the {what} file")
    if not h5py.is_hdf5(path):                   # HDF5's own signature check
        raise MoempiError(f"{path}: not an HDF5 file (no HDF5 signature; a {what} file must "
                          "be HDF5)")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        first = str(exc).splitlines()[0]
        if "lock" in first.lower():
            raise MoempiError(f"{path}: the {what} file is locked by another process (still "
                              f"being written?): {first}") from None
        raise MoempiError(f"{path}: cannot open the {what} file (truncated or damaged HDF5): "
                          f"{first}") from None


# -- model -----------------------------------------------------------------------------
def _attr(f: h5py.File, name: str, kind, path: str):
    if name not in f.attrs:
        raise MoempiError(f"{path}: missing root attribute {name!r}")
    value = f.attrs[name]
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, np.generic):
        value = value.item()
    try:
        if kind is bool:
            return bool(value)
        if kind is int and int(value) != value:
            raise ValueError
        return kind(value)
    except (TypeError, ValueError):
        raise MoempiError(f"{path}: root attribute {name!r} = {value!r} is not "
                          f"{kind.__name__}") from None


def meta_from_file(f: h5py.File, path: str) -> ModelMeta:
    fmt = f.attrs.get("format", b"")
    fmt = fmt.decode() if isinstance(fmt, bytes) else str(fmt)
    if fmt != MODEL_FORMAT:
        raise MoempiError(f"{path}: not a moempi model (root attribute format = {fmt!r}, "
                          f"expected {MODEL_FORMAT!r})")
    version = _attr(f, "version", int, path)
    if version != MODEL_VERSION:
        raise MoempiError(f"{path}: model version {version} is not supported "
                          f"(this moempi reads version {MODEL_VERSION})")
    values = {name: _attr(f, name, int, path) for name in INT_ATTRS}
    values["activation"] = _attr(f, "activation", str, path)
    values["norm_eps"] = _attr(f, "norm_eps", float, path)
    values["norm_topk_prob"] = _attr(f, "norm_topk_prob", bool, path)
    values["has_final_norm"] = "final_norm" in f
    values.update({name: _attr(f, name, kind, path) for name, kind in FAMILY_ATTRS.items()
                   if name in f.attrs})
    first_moe = values["num_dense_layers"]
    values["has_score_bias"] = f"layers/{first_moe:03d}/{SCORE_BIAS}" in f
    meta = ModelMeta(**values).validate(source=path)
    # the weight dtype: the first expert matrix's, else the first dense one's
    if meta.num_layers > meta.num_dense_layers:
        first = f"layers/{meta.num_dense_layers:03d}/experts/w_in"
    elif meta.num_layers:
        first = "layers/000/mlp/w_in"
    else:
        return meta.replace(weight_dtype=BF16)
    ds = _dataset(f, first, path)
    return meta.replace(weight_dtype=check_dtype(ds, f"{path}:/{ds.name.lstrip('/')}"))


def read_model_meta(path: str) -> ModelMeta:
    """Read and validate a model file's metadata (root attributes, no weights)."""
    with open_h5(path, "model") as f:
        return meta_from_file(f, path)


def _dataset(f: h5py.File, name: str, path: str) -> h5py.Dataset:
    obj = f.get(name)
    if not isinstance(obj, h5py.Dataset):
        raise MoempiError(f"{path}: missing dataset /{name}")
    return obj


def model_shapes(meta: ModelMeta) -> dict[str, tuple]:
    """Every dataset of a model file and its shape (docs/design.md §2.1)."""
    H, F, Fd, E = meta.hidden_size, meta.moe_ffn_size, meta.dense_ffn_size, meta.num_experts
    Fs = meta.shared_ffn_size
    shapes = {}
    for l in range(meta.num_layers):
        g = f"layers/{l:03d}"
        shapes[f"{g}/norm"] = (H,)
        if meta.is_moe(l):
            shapes[f"{g}/gate"] = (H, E)
            if meta.expert_kind == "gated":
                shapes[f"{g}/experts/w_gate"] = (E, H, F)
            shapes[f"{g}/experts/w_in"] = (E, H, F)
            shapes[f"{g}/experts/w_out"] = (E, F, H)
            if meta.has_score_bias:
                shapes[f"{g}/{SCORE_BIAS}"] = (E,)
            if Fs:
                if meta.expert_kind == "gated":
                    shapes[f"{g}/shared/w_gate"] = (H, Fs)
                shapes[f"{g}/shared/w_in"] = (H, Fs)
                shapes[f"{g}/shared/w_out"] = (Fs, H)
            if meta.shared_expert_gate:
                shapes[f"{g}/shared_gate"] = (H, 1)
        else:
            if meta.dense_kind == "gated":
                shapes[f"{g}/mlp/w_gate"] = (H, Fd)
            shapes[f"{g}/mlp/w_in"] = (H, Fd)
            shapes[f"{g}/mlp/w_out"] = (Fd, H)
    if meta.has_final_norm:
        shapes["final_norm"] = (H,)
    return shapes


# datasets that would change the math if present: refused where the metadata does not say so
_MEANINGFUL = ("experts/w_gate", "mlp/w_gate", "shared/w_in", "shared_gate", SCORE_BIAS)


def check_datasets(f: h5py.File, meta: ModelMeta, path: str) -> None:
    """Every dataset present with the right shape and a readable dtype (metadata only), and
    no dataset the metadata does not account for that would change the math (a ``w_gate``
    in a file whose ``expert_kind`` is plain, say)."""
    shapes = model_shapes(meta)
    for name, shape in shapes.items():
        ds = _dataset(f, name, path)
        if ds.shape != shape:
            raise MoempiError(f"{path}: dataset /{name} has shape {ds.shape}, expected {shape}")
        check_dtype(ds, f"{path}:/{name}")
    for l in range(meta.num_layers):
        for tail in _MEANINGFUL:
            name = f"layers/{l:03d}/{tail}"
            if name in f and name not in shapes:
                raise MoempiError(f"{path}: dataset /{name} is not used by this model's root "
                                  "attributes (docs/design.md §2.1): is an attribute missing?")


def check_model_datasets(f: h5py.File, meta: ModelMeta, path: str) -> None:
    """The run's start-up check of the model (rank 0, ``runner.prepare``): the datasets as
    :func:`check_datasets`."""
    check_datasets(f, meta, path)


class ModelReader:
    """Reads weights as float32, checking each array for NaN/Inf; slabs read one expert at a time."""

    def __init__(self, path: str):
        self.path = path
        self.file = open_h5(path, "model")

    def close(self) -> None:
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def read(self, name: str, sel=()) -> np.ndarray:
        ds = _dataset(self.file, name, self.path)
        try:
            data = read_f32(ds, sel)
        except OSError as exc:
            raise MoempiError(f"{self.path}: cannot read /{name} (truncated file?): "
                              f"{str(exc).splitlines()[0]}") from None
        if not np.isfinite(data).all():
            where = f"[{sel}]" if isinstance(sel, int) else f"[{sel[0]}]" if sel != () else ""
            raise MoempiError(f"{self.path}: /{name}{where} contains NaN or Inf")
        return data

    def expert(self, layer: int, e: int, cols: slice = slice(None),
               names=("w_in", "w_out")) -> tuple:
        """One expert's matrices ``names`` (:data:`moempi.model.shapes.MLP_MATRICES`):
        ``w_in[:, cols]`` `[H, F']`, ``w_out[cols, :]`` `[F', H]`, ``w_gate[:, cols]`` `[H, F']`,
        float32: the whole expert, or (tensor parallelism) one shard of its hidden dimension
        F, read alone."""
        base = f"layers/{layer:03d}/experts"
        if cols == slice(None):
            return tuple(self.read(f"{base}/{n}", e) for n in names)
        return tuple(self.read(f"{base}/{n}", (e, cols) if n == "w_out" else
                               (e, slice(None), cols)) for n in names)

    def layer(self, meta: ModelMeta, l: int) -> dict:
        """Layer ``l``'s arrays as :func:`moempi.model.forward.forward` takes them, float32;
        the experts read one at a time when indexed (``layer["experts"]["w_in"][e]``)."""
        g = f"layers/{l:03d}"
        out = {"norm": self.read(f"{g}/norm")}
        if not meta.is_moe(l):
            names = MLP_MATRICES[meta.dense_kind]
            out["mlp"] = {n: self.read(f"{g}/mlp/{n}") for n in names}
            return out
        names = MLP_MATRICES[meta.expert_kind]
        out["gate"] = self.read(f"{g}/gate")
        out["experts"] = {n: _Slabs(self, f"{g}/experts/{n}") for n in names}
        if meta.shared_ffn_size:
            out["shared"] = {n: self.read(f"{g}/shared/{n}") for n in names}
        if meta.shared_expert_gate:
            out["shared_gate"] = self.read(f"{g}/shared_gate")
        if meta.has_score_bias:
            out[SCORE_BIAS] = self.read(f"{g}/{SCORE_BIAS}")
        return out


class _Slabs:
    """``slabs[e]``: expert ``e``'s slab of a `[E, ...]` dataset, read when asked, float32."""

    def __init__(self, reader: ModelReader, name: str):
        self.reader, self.name = reader, name

    def __getitem__(self, e) -> np.ndarray:
        return self.reader.read(self.name, int(e))


# -- writing a model file ----------------------------------------------------------------
def write_model_attrs(f: h5py.File, meta: ModelMeta) -> None:
    """The root attributes of §2.1; the family's only where they differ from the defaults,
    so a model of moempi's original kind is written exactly as before."""
    f.attrs["format"] = MODEL_FORMAT
    f.attrs["version"] = MODEL_VERSION
    for name in INT_ATTRS:
        f.attrs[name] = int(getattr(meta, name))
    f.attrs["activation"] = meta.activation
    f.attrs["norm_eps"] = float(meta.norm_eps)
    f.attrs["norm_topk_prob"] = bool(meta.norm_topk_prob)
    default = ModelMeta()
    for name, kind in FAMILY_ATTRS.items():
        if getattr(meta, name) != getattr(default, name):
            f.attrs[name] = kind(getattr(meta, name))


def create_weight(f: h5py.File, name: str, shape, dtype: str) -> h5py.Dataset:
    """An empty weight dataset in storage ``dtype`` (BF16 as uint16 + encoding)."""
    ds = f.create_dataset(name, shape=shape, dtype=np.uint16 if dtype == BF16 else np.dtype(dtype))
    if dtype == BF16:
        ds.attrs["encoding"] = BF16
    return ds


def encode_weight(data: np.ndarray, dtype: str) -> np.ndarray:
    """Values as stored in a dataset of ``dtype`` (BF16: bit patterns, round to nearest even)."""
    return bf16_bits(data) if dtype == BF16 else np.asarray(data).astype(dtype)


# -- synthetic model -------------------------------------------------------------------
def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng([seed, *key])


def write_model(path: str, meta: ModelMeta, seed: int = 0, progress=None,
                overwrite: bool = False) -> None:
    """Write a random model, one slab at a time, so a full-size model never sits in memory.

    Matrices are N(0, 1/fan_in) so every layer adds an O(1) update to the residual stream;
    the gate is scaled so routing scores are well separated; norms are 1 + N(0, 0.1).
    Written to a temporary name and published (never replacing a file that appeared
    meanwhile, unless ``overwrite``): complete or absent.
    """
    meta.validate(source=path)
    H, F, Fd, E = meta.hidden_size, meta.moe_ffn_size, meta.dense_ffn_size, meta.num_experts

    def put(f, name, shape, gen):
        """Create ``name`` and fill it slab by slab along axis 0 (or whole, for vectors)."""
        ds = create_weight(f, name, shape, meta.weight_dtype)
        slabs = range(shape[0]) if len(shape) == 3 else [None]
        for i in slabs:
            data = encode_weight(gen(i), meta.weight_dtype)
            if i is None:
                ds[...] = data
            else:
                ds[i] = data

    def matrix(f, name, shape, l, stream):
        """A matrix `[in, out]` (or per-expert slabs `[E, in, out]`) of N(0, 1/in) values,
        from its own random stream (per expert: ``(seed, l, stream, e)``)."""
        fan_in = shape[-2]
        if len(shape) == 3:
            put(f, name, shape,
                lambda e: _rng(seed, l, stream, e).standard_normal(shape[1:]) / fan_in**0.5)
        else:
            put(f, name, shape, lambda _: _rng(seed, l, stream).standard_normal(shape) / fan_in**0.5)

    Fs = meta.shared_ffn_size
    with _write_atomically(path, overwrite) as f:
        write_model_attrs(f, meta)
        for l in range(meta.num_layers):
            g = f"layers/{l:03d}"
            put(f, f"{g}/norm", (H,),
                lambda _, l=l: 1 + 0.1 * _rng(seed, l, 0).standard_normal(H))
            if meta.is_moe(l):
                put(f, f"{g}/gate", (H, E),
                    lambda _, l=l: _rng(seed, l, 1).standard_normal((H, E)) * (2 / H**0.5))
                matrix(f, f"{g}/experts/w_in", (E, H, F), l, 2)
                matrix(f, f"{g}/experts/w_out", (E, F, H), l, 3)
                # the family's parts (new random streams: the original ones stay as they were)
                if meta.expert_kind == "gated":
                    matrix(f, f"{g}/experts/w_gate", (E, H, F), l, 6)
                if meta.has_score_bias:     # float32 whatever the weights, as DeepSeek-V3's
                    f.create_dataset(f"{g}/{SCORE_BIAS}", data=(
                        0.01 * _rng(seed, l, 7).standard_normal(E)).astype(np.float32))
                if Fs:
                    if meta.expert_kind == "gated":
                        matrix(f, f"{g}/shared/w_gate", (H, Fs), l, 8)
                    matrix(f, f"{g}/shared/w_in", (H, Fs), l, 9)
                    matrix(f, f"{g}/shared/w_out", (Fs, H), l, 10)
                if meta.shared_expert_gate:
                    matrix(f, f"{g}/shared_gate", (H, 1), l, 11)
            else:
                if meta.dense_kind == "gated":
                    matrix(f, f"{g}/mlp/w_gate", (H, Fd), l, 12)
                matrix(f, f"{g}/mlp/w_in", (H, Fd), l, 4)
                matrix(f, f"{g}/mlp/w_out", (Fd, H), l, 5)
            if progress:
                progress(l + 1, meta.num_layers)
        if meta.has_final_norm:
            put(f, "final_norm", (H,),
                lambda _: 1 + 0.1 * _rng(seed, meta.num_layers, 0).standard_normal(H))


# -- tokens ----------------------------------------------------------------------------
TOKEN_CHUNK = 4096
TOKENS_FORMAT = "moempi-tokens"
TOKENS_VERSION = 1


def write_tokens(path: str, num_tokens: int, hidden: int, seed: int = 0,
                 dtype: str = "float32", overwrite: bool = False, progress=None) -> None:
    """Write ``/tokens`` `[N, H]` of N(0, 1) values, chunk by chunk (seeded per chunk);
    ``progress(rows_done)`` after each chunk."""
    if num_tokens < 1 or hidden < 1:
        raise MoempiError("make-tokens: --num-tokens and the hidden size must be >= 1")
    np_dtype = np.uint16 if dtype == BF16 else np.dtype(dtype)
    with _write_atomically(path, overwrite) as f:
        f.attrs.update(format=TOKENS_FORMAT, version=TOKENS_VERSION, seed=seed,
                       generator=f"numpy.random.default_rng([seed, 2**20, chunk]).standard_normal"
                                 f", chunks of {TOKEN_CHUNK} rows", num_tokens=num_tokens,
                       hidden_size=hidden)
        ds = f.create_dataset("tokens", shape=(num_tokens, hidden), dtype=np_dtype,
                              chunks=(min(num_tokens, max(1, 2**20 // hidden)), hidden))
        ds.attrs.update(dims="token, hidden", description="synthetic hidden states, N(0, 1)")
        if dtype == BF16:
            ds.attrs["encoding"] = BF16
        for i, start in enumerate(range(0, num_tokens, TOKEN_CHUNK)):
            stop = min(start + TOKEN_CHUNK, num_tokens)
            x = _rng(seed, 1 << 20, i).standard_normal((stop - start, hidden))
            ds[start:stop] = bf16_bits(x) if dtype == BF16 else x.astype(np_dtype)
            if progress:
                progress(stop)


def tokens_shape(path: str) -> tuple[int, int]:
    """``(num_tokens, hidden)`` of a tokens file, validating its dataset and dtype."""
    with open_h5(path, "tokens") as f:
        ds = _dataset(f, "tokens", path)
        if ds.ndim != 2:
            raise MoempiError(f"{path}: /tokens must be 2-D [N, H], has shape {ds.shape}")
        check_dtype(ds, f"{path}:/tokens")
        return int(ds.shape[0]), int(ds.shape[1])


def read_tokens(path: str, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of ``/tokens`` as float32 `[stop - start, H]`, checked finite."""
    with open_h5(path, "tokens") as f:
        ds = _dataset(f, "tokens", path)
        try:
            x = read_f32(ds, np.s_[start:stop])
        except OSError as exc:
            raise MoempiError(f"{path}: cannot read /tokens rows {start}:{stop} "
                              f"(truncated file?): {str(exc).splitlines()[0]}") from None
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise MoempiError(f"{path}: /tokens row {start + int(np.argmax(bad))} contains NaN or Inf")
    return x


def check_tokens(path: str, start: int, stop: int, rows: int) -> None:
    """Rows ``start:stop`` of ``/tokens`` finite, read ``rows`` at a time (never all at once)."""
    for a in range(start, stop, max(1, rows)):
        read_tokens(path, a, min(a + rows, stop))


# -- output ----------------------------------------------------------------------------
@contextlib.contextmanager
def _write_atomically(path: str, overwrite: bool = False):
    """A new HDF5 file written under a temporary name and published as ``path`` when the
    block ends without error (:func:`moempi.io.files.publish`): complete or absent."""
    with files.temporary(path) as tmp:
        with h5py.File(tmp, "w") as f:
            yield f
        files.publish(tmp, path, overwrite)


write_atomically = _write_atomically     # for the model writers outside this module (convert)


def check_output_path(path: str, overwrite: bool, inputs: dict[str, str] | None = None) -> None:
    """Fail early, before any work, where the output could not be written at the end or
    would destroy an input (``inputs``: what -> path)."""
    if os.path.isdir(path):
        raise MoempiError(f"{path}: output is a directory (name a file)")
    files.check_not_input(path, inputs or {})
    if os.path.exists(path) and not overwrite:
        raise MoempiError(f"{path}: output exists (pass --overwrite to replace it)")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise MoempiError(f"{path}: output folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise MoempiError(f"{path}: output folder {folder} is not writable")


class OutputWriter:
    """The run's output, written under a temporary name and renamed by :meth:`commit`.

    An output file is complete or absent: :meth:`discard` (or leaving the ``with`` block by
    an exception) removes the partial file.
    """

    def __init__(self, path: str, overwrite: bool = False):
        check_output_path(path, overwrite)
        self.path, self.overwrite = path, overwrite
        self.tmp = files.register(path)
        self.file = h5py.File(self.tmp, "w")

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is not None:
            self.discard()

    def attrs(self, **values) -> None:
        for key, value in values.items():
            if isinstance(value, (dict, list, tuple)):
                value = json.dumps(value)
            self.file.attrs[key] = value

    def dataset(self, name: str, shape, dtype, **attrs) -> h5py.Dataset:
        ds = self.file.create_dataset(name, shape=shape, dtype=dtype)
        for key, value in attrs.items():
            ds.attrs[key] = value
        return ds

    def array(self, name: str, data, scale: str = "", **attrs) -> h5py.Dataset:
        """A dataset from ``data``; ``scale``: make it the dimension scale of that axis name."""
        ds = self.file.create_dataset(name, data=np.asarray(data))
        for key, value in attrs.items():
            ds.attrs[key] = value
        if scale:
            ds.make_scale(scale)
        return ds

    def _attach_scales(self) -> None:
        """Label every axis a dataset's ``dims`` attribute names ("rank, layer") and attach
        the dimension scale of that name ("source rank" takes the "rank" scale)."""
        scales, dims = {}, []

        def visit(_, obj):
            if isinstance(obj, h5py.Dataset):
                if obj.is_scale:
                    scales[h5py.h5ds.get_scale_name(obj.id).decode()] = obj
                elif "dims" in obj.attrs:
                    dims.append(obj)
        self.file.visititems(visit)
        for ds in dims:
            labels = [label.strip() for label in str(ds.attrs["dims"]).split(",")]
            if len(labels) != ds.ndim:
                continue
            for axis, label in enumerate(labels):
                ds.dims[axis].label = label
                scale = scales.get(label) or scales.get(label.split()[-1])
                if scale is not None and scale.shape[0] == ds.shape[axis]:
                    ds.dims[axis].attach_scale(scale)

    def commit(self) -> None:
        self._attach_scales()
        self.file.close()
        try:
            files.publish(self.tmp, self.path, self.overwrite)
        finally:
            files.release(self.tmp)

    def discard(self) -> None:
        try:
            self.file.close()
        finally:
            files.release(self.tmp)
