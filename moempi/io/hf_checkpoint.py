"""A model folder as published on the Hugging Face hub: ``config.json`` and safetensors
shards, read tensor by tensor (never the whole model), FP8 block scales applied."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass

import ml_dtypes
import numpy as np
from safetensors import safe_open

from moempi.errors import MoempiError
from moempi.io.readers import read_json

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# safetensors dtype -> numpy dtype of the stored values
DTYPES = {"F64": np.dtype(np.float64), "F32": np.dtype(np.float32),
          "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16),
          "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn)}
FP8 = "F8_E4M3"
SCALE_SUFFIX = "_scale_inv"          # DeepSeek-V3: "X.weight" is scaled by "X.weight_scale_inv"


@dataclass(frozen=True)
class Entry:
    """One tensor's header entry: its shard file, safetensors dtype, shape, byte offset."""

    shard: str
    dtype: str
    shape: tuple
    offset: int                      # of its first byte in the shard file


def _read_header(path: str) -> tuple[bytes, dict]:
    """A shard's raw JSON header and its parsed form; a missing, cut or foreign file is a
    one-line error."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            (length,) = struct.unpack("<Q", head) if len(head) == 8 else (size,)
            if 8 + length > size:
                raise MoempiError(f"{path}: truncated safetensors file (header of {length} B, "
                                  f"file of {size} B)")
            raw = f.read(length)
    except FileNotFoundError:
        raise MoempiError(f"{path}: shard file not found") from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise MoempiError(f"{path}: not a safetensors file (its header is not JSON)") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + length + end > size:
        raise MoempiError(f"{path}: truncated safetensors file ({size} B, its header "
                          f"needs {8 + length + end} B)")
    return raw, header


class Checkpoint:
    """The tensors of a model folder by name, read one at a time as float32.

    ``config`` is ``config.json``; ``entries`` maps each tensor name to its :class:`Entry`;
    ``identity`` names the files, their sizes and a SHA-256 of the index and every header
    (the checkpoint's identity without hashing hundreds of GB).
    """

    def __init__(self, folder: str):
        if not os.path.isdir(folder):
            raise MoempiError(f"{folder}: not a folder (convert reads a model folder: "
                              "config.json + *.safetensors)")
        config_path = os.path.join(folder, "config.json")
        if not os.path.isfile(config_path):
            raise MoempiError(f"{folder}: no config.json (not a Hugging Face model folder)")
        self.folder = folder
        self.config = read_json(config_path, "config")
        if not isinstance(self.config, dict):
            raise MoempiError(f"{config_path}: not a JSON object")
        digest = hashlib.sha256()
        index_path = os.path.join(folder, INDEX)
        if os.path.isfile(index_path):
            with open(index_path, "rb") as f:
                digest.update(f.read())
            weight_map = read_json(index_path, "safetensors index").get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise MoempiError(f"{index_path}: no \"weight_map\"")
            shards = sorted(set(weight_map.values()))
        elif os.path.isfile(os.path.join(folder, SINGLE)):
            weight_map, shards = None, [SINGLE]
        else:
            raise MoempiError(f"{folder}: neither {SINGLE} nor {INDEX}")
        self.entries: dict[str, Entry] = {}
        files = []
        for shard in shards:
            path = os.path.join(folder, shard)
            raw, header = _read_header(path)
            digest.update(raw)
            files.append({"name": shard, "bytes": os.path.getsize(path)})
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                if weight_map is not None and weight_map.get(name) != shard:
                    continue                     # the index says it lives elsewhere
                self.entries[name] = Entry(shard, info["dtype"], tuple(info["shape"]),
                                           8 + len(raw) + info["data_offsets"][0])
        if weight_map is not None:
            missing = sorted(set(weight_map) - set(self.entries))
            if missing:
                raise MoempiError(f"{folder}: {len(missing)} tensor(s) of the index are not in "
                                  f"their shard, e.g. {missing[0]} in {weight_map[missing[0]]}")
        self.identity = {"files": files, "sha256_index_and_headers": digest.hexdigest()}

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def entry(self, name: str) -> Entry:
        if name not in self.entries:
            raise MoempiError(f"{self.folder}: missing tensor {name}")
        return self.entries[name]

    def check(self, name: str, shape: tuple) -> None:
        """``name`` exists with ``shape`` and a dtype moempi reads (an FP8 one with its scale)."""
        entry = self.entry(name)
        if entry.shape != tuple(shape):
            raise MoempiError(f"{self.folder}: tensor {name} has shape {list(entry.shape)}, "
                              f"expected {list(shape)}")
        if entry.dtype not in DTYPES:
            raise MoempiError(f"{self.folder}: tensor {name} has dtype {entry.dtype} (moempi "
                              f"reads {', '.join(DTYPES)})")
        if entry.dtype == FP8:
            if len(shape) != 2:
                raise MoempiError(f"{self.folder}: FP8 tensor {name} is not a matrix")
            scale = self.entry_or_none(name + SCALE_SUFFIX)
            if scale is None:
                raise MoempiError(f"{self.folder}: FP8 tensor {name} has no scale "
                                  f"{name + SCALE_SUFFIX}")
            blocks = tuple(-(-n // b) for n, b in zip(shape, self.block_size))
            if scale.shape != blocks:
                raise MoempiError(f"{self.folder}: scale {name + SCALE_SUFFIX} has shape "
                                  f"{list(scale.shape)}, expected {list(blocks)} for blocks of "
                                  f"{self.block_size[0]} x {self.block_size[1]}")

    def entry_or_none(self, name: str) -> Entry | None:
        return self.entries.get(name)

    @property
    def block_size(self) -> tuple[int, int]:
        """FP8 scale blocks (rows, columns): the config's ``weight_block_size``, else 128 x 128."""
        quant = self.config.get("quantization_config") or {}
        return tuple(quant.get("weight_block_size") or (128, 128))

    def read(self, name: str) -> np.ndarray:
        """Tensor ``name`` as float32, as stored (``[out, in]`` for a linear layer's weight),
        an FP8 one dequantised by its block scales; NaN or Inf is an error."""
        entry = self.entry(name)
        if entry.dtype == FP8:
            data = self._raw(entry).astype(np.float32)
            scale = self.read(name + SCALE_SUFFIX)
            rows, cols = self.block_size
            # scale_inv [ceil(out/128), ceil(in/128)] multiplies each 128 x 128 block
            full = np.repeat(np.repeat(scale, rows, axis=0), cols, axis=1)
            data *= full[:data.shape[0], :data.shape[1]]
        else:
            with safe_open(os.path.join(self.folder, entry.shard), framework="numpy") as f:
                data = np.asarray(f.get_tensor(name)).astype(np.float32)
        if not np.isfinite(data).all():
            raise MoempiError(f"{self.folder}: tensor {name} contains NaN or Inf")
        return data

    def _raw(self, entry: Entry) -> np.ndarray:
        """The stored values read from the shard at the header's offset: safetensors'
        numpy framework has no float8 (it asks numpy for ``float8_e4m3fn``), ml_dtypes has."""
        dtype = DTYPES[entry.dtype]
        count = int(np.prod(entry.shape))
        data = np.fromfile(os.path.join(self.folder, entry.shard), dtype=dtype, count=count,
                           offset=entry.offset)
        return data.reshape(entry.shape)
