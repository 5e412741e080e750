"""The streaming safetensors writer: header first, then each tensor's bytes in order.

It holds at most one tensor in memory, copies untransformed tensors from file to file
inside the kernel (copy_file_range), and hashes the output on a second thread that trails
the writer, starting each hashed range's writeback as it goes. `workbench.tensors` reads.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import logging
import mmap
import os
import struct
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from workbench.errors import BuildError
from workbench.tensors import TensorFileError, TensorInfo, dtype_code, tensor_nbytes

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

COPY_CHUNK = 64 * 1024 * 1024
HASH_CHUNK = 64 * 1024 * 1024  # per GIL handoff: the hasher competes with the torch import for it


@dataclass(frozen=True)
class WrittenFile:
    path: Path
    size: int
    sha256: str


Entry = tuple[str, str, tuple[int, ...]]  # (name, safetensors dtype code, shape)
Fill = Callable[[str], "torch.Tensor | TensorInfo | bytes"]


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

    `fill(name)` returns a tensor (written from memory), the TensorInfo of a source byte
    range with the same dtype and size (copied file to file), or the tensor's raw bytes. `after(name,
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
            elif isinstance(source, bytes):
                if len(source) != nbytes:
                    raise BuildError(f"tensor '{name}': {len(source)} bytes given, {dtype} {tuple(shape)} "
                                     f"takes {nbytes}")
                _pwrite_all(fd, source, pos)
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


@functools.cache
def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
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


SYNC_FILE_RANGE_WRITE = 2  # start writeback of the range's dirty pages; do not wait


def _start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Start writing hashed bytes to disk now, so the final fsync only waits for the tail
    instead of the whole file (the kernel would otherwise hold them dirty for up to 30 s).
    Best effort: without sync_file_range the fsync does all the work, as before."""
    function = _sync_file_range()
    if function is not None:
        function(fd, offset, nbytes, SYNC_FILE_RANGE_WRITE)
