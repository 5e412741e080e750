"""Safetensors I/O without loading whole models: header reader, lazy index, streaming writer.

The format: 8-byte little-endian header length N, N bytes of JSON (padded with spaces to a
multiple of 8) mapping each tensor name to dtype, shape and data_offsets relative to the
end of the header, then the raw little-endian tensor bytes. Reading one tensor reads only
its byte range; writing holds at most one tensor in memory and copies untransformed tensors
from file to file inside the kernel (copy_file_range), hashing the output on a second thread.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import math
import mmap
import os
import struct
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from workbench.errors import BuildError, SourceError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

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
DTYPE_NAMES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
COPY_CHUNK = 64 * 1024 * 1024
HASH_CHUNK = 64 * 1024 * 1024  # per GIL handoff: the hasher competes with the torch import for it


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


@dataclass(frozen=True)
class WrittenFile:
    path: Path
    size: int
    sha256: str


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
        info = self.info(name)
        buffer = bytearray(info.nbytes)
        with open(info.file, "rb") as f:
            f.seek(info.start)
            if f.readinto(buffer) != info.nbytes:
                raise TensorFileError(f"{info.file}: tensor '{name}' is cut short; re-download it")
        import torch

        if not info.nbytes:
            return torch.empty(info.shape, dtype=torch_dtype(info.dtype))
        return torch.frombuffer(buffer, dtype=torch_dtype(info.dtype)).reshape(info.shape)


Entry = tuple[str, str, tuple[int, ...]]  # (name, safetensors dtype code, shape)
Fill = Callable[[str], "torch.Tensor | TensorInfo"]


def header_bytes(entries: Sequence[Entry], metadata: dict[str, str] | None = None) -> bytes:
    """The 8-byte length plus JSON header exactly as safetensors' own serializer writes it."""
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, dtype, shape in entries:
        if name in header:
            raise BuildError(f"tensor '{name}' is listed twice in one file")
        end = offset + tensor_nbytes(dtype, shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_safetensors(path: Path, entries: Sequence[Entry], fill: Fill,
                      after: Callable[[str, int], None] | None = None, *, sync: bool = True) -> WrittenFile:
    """Stream a safetensors file: the header, then each entry's bytes in order.

    `fill(name)` returns either a tensor (written from memory) or the TensorInfo of a
    source byte range with the same dtype and size (copied file to file). `after(name,
    nbytes)` runs once each tensor is written; it may raise (e.g. Cancelled) to stop.
    `sync=False` leaves the fsync to the caller, who can then flush several shards at
    once instead of waiting for each shard's writeback before starting the next.
    """
    path = Path(path)
    head = header_bytes(entries)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        hasher = _FollowHasher(path)
    except BaseException:
        os.close(fd)
        raise
    try:
        os.fchmod(fd, 0o644)  # world-readable whatever the umask, like a normal checkpoint
        _pwrite_all(fd, head, 0)
        pos = len(head)
        hasher.advance(pos)
        for name, dtype, shape in entries:
            nbytes = tensor_nbytes(dtype, shape)
            source = fill(name)
            if isinstance(source, TensorInfo):
                _check_same(name, dtype, shape, source.dtype, source.shape)
                _copy_range(source, fd, pos)
            else:
                _check_same(name, dtype, shape, dtype_code(source.dtype),
                            tuple(source.shape))
                _pwrite_all(fd, _tensor_bytes(source), pos)
            pos += nbytes
            hasher.advance(pos)
            if after is not None:
                after(name, nbytes)
        if sync:
            os.fsync(fd)
        return WrittenFile(path, pos, hasher.finish())
    finally:
        hasher.close()
        os.close(fd)


def _check_same(name: str, dtype: str, shape: tuple[int, ...], got_dtype: str, got_shape: tuple) -> None:
    if dtype != got_dtype or tuple(shape) != tuple(got_shape):
        raise BuildError(f"tensor '{name}': planned {dtype} {tuple(shape)} but the source gives "
                         f"{got_dtype} {tuple(got_shape)}; the source model does not match its config")


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    import torch

    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _copy_range(info: TensorInfo, out_fd: int, out_pos: int) -> None:
    """Copy a source byte range into the output inside the kernel when the OS allows it.

    copy_file_range first (in-kernel, reflinks on some filesystems), then sendfile (older
    kernels refuse copy_file_range across filesystems), then plain chunked read/write.
    """
    with open(info.file, "rb") as src:
        done = _kernel_copy(src.fileno(), out_fd, info, out_pos)
        src.seek(info.start + done)
        while done < info.nbytes:
            chunk = src.read(min(COPY_CHUNK, info.nbytes - done))
            if not chunk:
                raise TensorFileError(f"{info.file}: tensor '{info.name}' is cut short; re-download it")
            _pwrite_all(out_fd, chunk, out_pos + done)
            done += len(chunk)


def _kernel_copy(src_fd: int, out_fd: int, info: TensorInfo, out_pos: int) -> int:
    """Bytes copied in-kernel; fewer than asked means the caller finishes in user space."""
    done = 0
    try:
        while done < info.nbytes:
            n = os.copy_file_range(src_fd, out_fd, info.nbytes - done, info.start + done, out_pos + done)
            if n == 0:
                raise TensorFileError(f"{info.file}: tensor '{info.name}' is cut short; re-download it")
            done += n
        return done
    except (OSError, AttributeError) as exc:
        log.debug("copy_file_range unavailable (%s) for %s; trying sendfile", exc, info.name)
    try:
        os.lseek(out_fd, out_pos + done, os.SEEK_SET)  # sendfile writes at the file position
        while done < info.nbytes:
            n = os.sendfile(out_fd, src_fd, info.start + done, info.nbytes - done)
            if n == 0:
                raise TensorFileError(f"{info.file}: tensor '{info.name}' is cut short; re-download it")
            done += n
    except OSError as exc:
        log.debug("sendfile unavailable (%s) for %s; copying in chunks", exc, info.name)
    return done


class _FollowHasher:
    """sha256 of a file being written, computed on a second thread that trails the writer.

    hashlib releases the GIL, so hashing the just-written (page-cached) bytes overlaps with
    the kernel copy of the next tensor instead of adding its full time to the build.
    """

    def __init__(self, path: Path):
        self._fd = os.open(path, os.O_RDONLY)
        self._hash = hashlib.sha256()
        self._target = 0
        self._done = False
        self._abort = False
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="sha256-follow", daemon=True)
        self._thread.start()

    def advance(self, end: int) -> None:
        with self._cond:
            self._target = end
            self._cond.notify()

    def _run(self) -> None:
        pos = 0
        try:
            while True:
                with self._cond:
                    while pos >= self._target and not self._done:
                        self._cond.wait()
                    target, done = self._target, self._done
                if self._abort or (pos >= target and done):
                    return
                end = min(pos + HASH_CHUNK, target)
                self._hash_range(pos, end)
                _start_writeback(self._fd, pos, end - pos)
                pos = end
        except BaseException as exc:  # handed to the writer's thread in finish()
            self._error = exc

    def _hash_range(self, start: int, end: int) -> None:
        """Hash bytes start..end straight from the page cache through a read-only mapping:
        a read() would first copy them, and that copy cost a quarter of the hashing speed."""
        aligned = start - start % mmap.ALLOCATIONGRANULARITY
        with mmap.mmap(self._fd, end - aligned, offset=aligned, access=mmap.ACCESS_READ) as mapped:
            with memoryview(mapped) as view:
                self._hash.update(view[start - aligned:])

    def finish(self) -> str:
        self._stop(abort=False)
        if self._error is not None:
            raise BuildError(f"hashing the output failed: {self._error}") from self._error
        return self._hash.hexdigest()

    def _stop(self, abort: bool) -> None:
        with self._cond:
            self._done = True
            self._abort = abort
            self._cond.notify()
        self._thread.join()

    def close(self) -> None:
        if self._thread.is_alive():
            self._stop(abort=True)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """glibc's sync_file_range, where there is one (Linux); None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    return function


_SYNC_FILE_RANGE = _load_sync_file_range()
SYNC_FILE_RANGE_WRITE = 2  # start writeback of the range's dirty pages; do not wait


def _start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Start writing hashed bytes to disk now, so the final fsync only waits for the tail
    instead of the whole file (the kernel would otherwise hold them dirty for up to 30 s).
    Best effort: without sync_file_range the fsync does all the work, as before."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, offset, nbytes, SYNC_FILE_RANGE_WRITE)
