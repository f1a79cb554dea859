"""A GGUF file's key/value metadata and where each of its tensors lies, read with struct over a
memory map. gguf.GGUFReader makes a numpy view per string and per array item: on the default
model's 49k-token vocabulary and merges it took ~4.7 s of a 6 s model load here, parsing
everything twice (the tokenizer and the model loader each opened the file); this takes ~0.1 s.
Dequantizing stays with gguf's own kernels (parley/models/loader.py)."""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

_SCALAR_FORMATS = {
    GGUFValueType.UINT8: "B",
    GGUFValueType.INT8: "b",
    GGUFValueType.UINT16: "H",
    GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I",
    GGUFValueType.INT32: "i",
    GGUFValueType.FLOAT32: "f",
    GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "Q",
    GGUFValueType.INT64: "q",
    GGUFValueType.FLOAT64: "d",
}
_DEFAULT_ALIGNMENT = 32


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # innermost dimension first, as GGUF lists them
    tensor_type: GGMLQuantizationType
    data: np.ndarray  # uint8 [rows, bytes of a row]: a read-only view of the file, as gguf.quants takes it


def read_gguf(path: str) -> tuple[dict, list[GGUFTensor]]:
    """(metadata, tensors) of a little-endian GGUF v2/v3 file; ValueError (or struct.error) if the
    file is not one or is cut short."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        magic, version, tensor_count, kv_count = struct.unpack_from("<4sIQQ", buf, 0)
        if magic != b"GGUF" or version not in (2, 3):
            raise ValueError(f"{path!r} is not a little-endian GGUF v2/v3 file")
        meta, pos = {}, 24
        for _ in range(kv_count):
            key, pos = _string(buf, pos)
            (value_type,) = struct.unpack_from("<I", buf, pos)
            meta[key], pos = _value(buf, pos + 4, value_type)
        infos = []
        for _ in range(tensor_count):
            name, pos = _string(buf, pos)
            (dims,) = struct.unpack_from("<I", buf, pos)
            shape = struct.unpack_from(f"<{dims}Q", buf, pos + 4)
            tensor_type, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * dims)
            infos.append((name, shape, GGMLQuantizationType(tensor_type), offset))
            pos += 4 + 8 * dims + 12
        size = len(buf)
    alignment = meta.get("general.alignment", _DEFAULT_ALIGNMENT)
    data_start = -(-pos // alignment) * alignment
    file = np.memmap(path, dtype=np.uint8, mode="r") if infos else None
    tensors = []
    for name, shape, tensor_type, offset in infos:
        block, block_bytes = GGML_QUANT_SIZES[tensor_type]
        row_bytes = shape[0] // block * block_bytes
        rows = int(np.prod(shape[1:], dtype=np.int64))
        start = data_start + offset
        if start + rows * row_bytes > size:
            raise ValueError(f"tensor {name!r} runs past the end of the file")
        tensors.append(GGUFTensor(name, shape, tensor_type, file[start : start + rows * row_bytes].reshape(rows, row_bytes)))
    return meta, tensors


def _string(buf: mmap.mmap, pos: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<Q", buf, pos)
    end = pos + 8 + length
    return buf[pos + 8 : end].decode("utf-8"), end


def _value(buf: mmap.mmap, pos: int, value_type: int):
    if value_type == GGUFValueType.STRING:
        return _string(buf, pos)
    if value_type == GGUFValueType.ARRAY:
        item_type, count = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        if item_type in _SCALAR_FORMATS:
            fmt = f"<{count}{_SCALAR_FORMATS[item_type]}"
            return list(struct.unpack_from(fmt, buf, pos)), pos + struct.calcsize(fmt)
        items = []
        for _ in range(count):
            item, pos = _value(buf, pos, item_type)
            items.append(item)
        return items, pos
    fmt = "<" + _SCALAR_FORMATS[value_type]
    return struct.unpack_from(fmt, buf, pos)[0], pos + struct.calcsize(fmt)
