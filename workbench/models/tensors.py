"""Safetensors reading without loading whole models: the format's tables, a checked header
reader and a lazy index over a model folder (`workbench.build.writer` writes).

The format: 8-byte little-endian header length N, N bytes of JSON (padded with spaces to a
multiple of 8) mapping each tensor name to dtype, shape and data_offsets relative to the
end of the header, then the raw little-endian tensor bytes. Reading one tensor reads only
its byte range.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from workbench.errors import SourceError

if TYPE_CHECKING:
    import torch

# A real header is a few hundred KB even for 1000-tensor shards; anything near this cap is
# a corrupt or hostile file, and json.loads on it would eat the machine's memory.
MAX_HEADER_BYTES = 100 * 1024 * 1024
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
    "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}
# safetensors code -> torch dtype attribute. Names, not dtypes: torch is imported only when
# a tensor passes through memory, so a build that only copies can start before torch loads.
TORCH_DTYPE_NAMES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "I32": "int32", "I64": "int64",
    "F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}
# Recipe/config dtype names -> safetensors codes.
DTYPE_NAMES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32", "float64": "F64"}


def torch_dtype(code: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype code ("BF16" -> torch.bfloat16)."""
    import torch

    return getattr(torch, TORCH_DTYPE_NAMES[code])


def dtype_code(dtype: torch.dtype) -> str:
    """The safetensors code of a torch dtype (torch.bfloat16 -> "BF16"); str(dtype) if none."""
    name = str(dtype).removeprefix("torch.")
    return next((code for code, n in TORCH_DTYPE_NAMES.items() if n == name), str(dtype))


class TensorFileError(SourceError):
    """A safetensors file is corrupt, truncated or not a safetensors file at all."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors code: "BF16", "F16", "F32", ...
    shape: tuple[int, ...]
    file: Path
    start: int  # absolute byte offset of the data in `file`
    nbytes: int


def tensor_nbytes(dtype: str, shape: Sequence[int]) -> int:
    return DTYPE_SIZES[dtype] * math.prod(shape)


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Every tensor in a safetensors file, with its checked byte range; reads only the header."""
    path = Path(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise TensorFileError(f"{path}: {size} bytes is too short for a safetensors file; "
                                  "re-download it")
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER_BYTES:
            raise TensorFileError(f"{path}: header length {n} exceeds the {MAX_HEADER_BYTES}-byte cap; "
                                  "the file is corrupt, re-download it")
        if 8 + n > size:
            raise TensorFileError(f"{path}: header of {n} bytes runs past the end of the "
                                  f"{size}-byte file (truncated?); re-download it")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TensorFileError(f"{path}: header is not valid JSON ({exc}); re-download it") from exc
    if not isinstance(header, dict):
        raise TensorFileError(f"{path}: header is not a JSON object; re-download it")
    header.pop("__metadata__", None)
    infos = {name: _entry(path, name, entry, 8 + n, size) for name, entry in header.items()}
    _check_no_overlap(path, infos)
    return infos


def _entry(path: Path, name: str, entry: object, data_start: int, size: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise TensorFileError(f"{path}: entry for tensor '{name}' is not an object; re-download it")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_SIZES:
        raise TensorFileError(f"{path}: tensor '{name}' has unknown dtype {dtype!r}")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise TensorFileError(f"{path}: tensor '{name}' has invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise TensorFileError(f"{path}: tensor '{name}' has invalid data_offsets {offsets!r}")
    begin, end = offsets
    if data_start + end > size:
        raise TensorFileError(f"{path}: tensor '{name}' ends at byte {data_start + end} but the file has "
                              f"{size} bytes (truncated?); re-download it")
    expected = tensor_nbytes(dtype, shape)
    if end - begin != expected:
        raise TensorFileError(f"{path}: tensor '{name}' is {dtype} {tuple(shape)} = {expected} bytes "
                              f"but its data_offsets span {end - begin}; the header is corrupt")
    return TensorInfo(name, dtype, tuple(shape), path, data_start + begin, expected)


def _check_no_overlap(path: Path, infos: dict[str, TensorInfo]) -> None:
    previous_end, previous = 0, ""
    for info in sorted(infos.values(), key=lambda i: i.start):
        if info.nbytes and info.start < previous_end:
            raise TensorFileError(f"{path}: tensors '{previous}' and '{info.name}' overlap; "
                                  "the header is corrupt")
        if info.nbytes:
            previous_end, previous = info.start + info.nbytes, info.name


class WeightIndex:
    """Every tensor of a model folder (single file or index + shards), read one at a time."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._infos: dict[str, TensorInfo] = {}
        index = self.folder / "model.safetensors.index.json"
        single = self.folder / "model.safetensors"
        if index.is_file():
            self._read_index(index)
        elif single.is_file():
            self._infos = read_header(single)
        else:
            raise SourceError(f"{self.folder}: no model.safetensors or model.safetensors.index.json; "
                              "the folder must hold a safetensors checkpoint")

    def _read_index(self, index: Path) -> None:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise TensorFileError(f"{index}: not a valid index ({exc}); re-download it") from exc
        for shard in sorted(set(weight_map.values())):
            if not isinstance(shard, str) or Path(shard).name != shard or shard in ("", ".", ".."):
                raise TensorFileError(f"{index}: shard name {shard!r} is not a plain file name")
            for name, info in read_header(self.folder / shard).items():
                if name in self._infos:
                    raise TensorFileError(f"{index}: tensor '{name}' appears in two shards")
                self._infos[name] = info
        missing = [n for n, shard in weight_map.items() if self._infos.get(n, None) is None
                   or self._infos[n].file.name != shard]
        if missing:
            raise TensorFileError(f"{index}: {len(missing)} tensors are not in the shard the index names "
                                  f"(first: '{missing[0]}'); re-download the model")

    @property
    def names(self) -> list[str]:
        return list(self._infos)

    def __contains__(self, name: str) -> bool:
        return name in self._infos

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise SourceError(f"{self.folder}: tensor '{name}' is missing from the checkpoint") from None

    def load(self, name: str) -> torch.Tensor:
        """One tensor, read from its byte range only."""
        return load_tensor(self.info(name))


def load_tensor(info: TensorInfo) -> torch.Tensor:
    """The tensor `info` describes, read from its byte range only."""
    buffer = bytearray(info.nbytes)
    with open(info.file, "rb") as f:
        f.seek(info.start)
        if f.readinto(buffer) != info.nbytes:
            raise TensorFileError(f"{info.file}: tensor '{info.name}' is cut short; re-download it")
    import torch

    if not info.nbytes:
        return torch.empty(info.shape, dtype=torch_dtype(info.dtype))
    return torch.frombuffer(buffer, dtype=torch_dtype(info.dtype)).reshape(info.shape)
