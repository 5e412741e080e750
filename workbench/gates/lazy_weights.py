"""Leaf-streamed models: a transformers skeleton whose weights stay in the safetensors files.

`stream_leaves` builds the model without weights (parameters on the meta device, buffers
such as rotary `inv_freq` real) and hooks every leaf, a module that owns parameters itself
(Linear, RMSNorm, Embedding): just before the leaf runs, its own parameters are read from
their byte ranges at the compute dtype; just after, they go back to the meta device. A
forward therefore holds one leaf's weights at a time (plus one read chunk); a Linear too
big for that (past BLOCK_BYTES) reads and applies its weight a block of rows at a time, so
the bound does not grow with the model. Reads are plain preads, never mmap, so file pages
stay in the page cache and out of the process's RSS.

The input embedding is never read whole (a 152k x 3584 vocabulary is 2.2 GB in float32):
its hook reads only the rows of the token ids in the batch and renumbers the ids into that
compact table, so any nn.Embedding subclass (one that scales its output, say) runs unchanged.

Legend: V vocabulary, H hidden size, U distinct token ids in a batch.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from workbench.models import TensorFileError, TensorInfo, WeightIndex, torch_dtype

CHUNK_BYTES = 16 * 1024 * 1024  # read buffer: a cast costs this much extra, not a second copy of the tensor
# A Linear weight larger than this (at the compute dtype) is never held whole: its forward
# reads and applies it a block of output rows at a time, so a 70B or 405B MLP matrix
# (0.9 or 3.5 GB in float32) costs one block of memory.
BLOCK_BYTES = 128 * 1024 * 1024


class CheckpointMismatch(ValueError):
    """The checkpoint's tensor names or shapes do not match the model transformers builds from
    its config (a renamed or converted architecture), so its parameters cannot be streamed."""


def stream_leaves(folder: Path, dtype: torch.dtype) -> nn.Module:
    """The causal LM in `folder` with every leaf's parameters read from disk as it runs, at `dtype`
    on the CPU. Raises CheckpointMismatch when some parameter has no tensor of its shape."""
    from accelerate import init_empty_weights  # lazy: importing this module stays cheap
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
    # dtype sets torch's default while the modules are built, as from_pretrained(dtype=...) does,
    # so the real buffers (rotary inv_freq, embedding scales) come out the same.
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    # init_empty_weights re-creates each parameter it moves to meta, which unties tied ones.
    model.tie_weights()
    return stream_into(model, folder, dtype)


def stream_into(model: nn.Module, folder: Path, dtype: torch.dtype) -> nn.Module:
    """Hook every leaf of `model`, a skeleton with its parameters on the meta device and names equal
    to the checkpoint's keys in `folder`, to read its weights at `dtype` as it runs; `model` back.
    Raises CheckpointMismatch when some parameter has no tensor of its shape."""
    index = WeightIndex(folder)
    sources = _sources(model, index)
    reader = _Reader(dtype)
    _load_persistent_buffers(model, index, reader)
    embed = model.get_input_embeddings()
    for prefix, module in model.named_modules():
        own = {name: sources[f"{prefix}.{name}".lstrip(".")]
               for name, _ in module.named_parameters(recurse=False)}
        if not own:
            continue
        if module is embed and isinstance(module, nn.Embedding):
            _hook_rows(module, own["weight"], reader)
        elif _in_blocks(module, own, dtype):
            _stream_row_blocks(module, own, reader)
        else:
            _hook_leaf(module, own, reader)
    return model


def _sources(model: nn.Module, index: WeightIndex) -> dict[str, TensorInfo]:
    """Parameter name -> checkpoint tensor; a tied parameter is found under any of its names."""
    names_of: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(name)
    sources = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        found = [index.info(n) for n in names_of[id(param)] if n in index]
        matching = [info for info in found if info.shape == tuple(param.shape)]
        if not matching:
            got = f"has shape {found[0].shape}" if found else "is missing"
            raise CheckpointMismatch(f"parameter '{name}' {tuple(param.shape)}: its checkpoint tensor {got}")
        sources[name] = matching[0]
    return sources


def _load_persistent_buffers(model: nn.Module, index: WeightIndex, reader: _Reader) -> None:
    """Buffers saved in the checkpoint (rare in causal LMs) are read once; they are small."""
    buffers = dict(model.named_buffers())
    for name in model.state_dict().keys() & buffers.keys():
        if name in index:
            reader.read_into(index.info(name), buffers[name])


def _hook_leaf(module: nn.Module, sources: dict[str, TensorInfo], reader: _Reader) -> None:
    empty = dict(module._parameters)  # the meta parameters, put back after each forward

    def materialise(mod: nn.Module, args: Any) -> None:
        for name, tensor in reader.leaf(mod, sources).items():
            mod._parameters[name] = nn.Parameter(tensor, requires_grad=False)

    def release(mod: nn.Module, args: Any, output: Any) -> None:
        mod._parameters.update(empty)
        reader.release(mod, output)

    module.register_forward_pre_hook(materialise)
    # always_call: an exception inside the forward (or the read) still drops the weights.
    module.register_forward_hook(release, always_call=True)


def _in_blocks(module: nn.Module, sources: dict[str, TensorInfo], dtype: torch.dtype) -> bool:
    weight = sources.get("weight")
    return (type(module) is nn.Linear and weight is not None and len(weight.shape) == 2
            and math.prod(weight.shape) * dtype.itemsize > BLOCK_BYTES)


def _stream_row_blocks(module: nn.Linear, sources: dict[str, TensorInfo], reader: _Reader) -> None:
    """y = x W^T + b computed a block of W's rows (output features) at a time: (..., in) ->
    (..., out), each block read from the file just before its matmul. Rows are contiguous in
    the file, so a block is one byte range."""
    weight, bias = sources["weight"], sources.get("bias")
    rows, columns = weight.shape
    per_block = max(1, BLOCK_BYTES // (columns * reader.dtype.itemsize))

    def forward(x: Tensor) -> Tensor:
        out = x.new_empty((*x.shape[:-1], rows))
        block = reader.block(min(per_block, rows), columns)
        for first in range(0, rows, per_block):
            count = min(per_block, rows - first)
            reader.read_into(weight, block[:count], first_element=first * columns)
            out[..., first:first + count] = x @ block[:count].T
        if bias is not None:
            values = torch.empty(rows, dtype=reader.dtype)
            reader.read_into(bias, values)
            out += values
        return out

    module.forward = forward  # the instance's own forward: hooks still run around it


def _hook_rows(module: nn.Embedding, info: TensorInfo, reader: _Reader) -> None:
    empty, padding_idx = module._parameters["weight"], module.padding_idx

    def rows_only(mod: nn.Embedding, args: Any) -> tuple:
        ids = args[0]
        unique, compact = torch.unique(ids, return_inverse=True)  # (U,) sorted, ids renumbered into it
        if unique.numel() and (unique[0] < 0 or unique[-1] >= info.shape[0]):
            raise IndexError(f"token ids {unique[0].item()}..{unique[-1].item()} are outside the "
                             f"vocabulary of {info.shape[0]} rows")
        mod._parameters["weight"] = nn.Parameter(reader.rows(info, unique.tolist()), requires_grad=False)
        # padding_idx only shapes gradients, but F.embedding checks it against the compact table's size.
        mod.padding_idx = None
        return (compact, *args[1:])

    def release(mod: nn.Embedding, args: Any, output: Any) -> None:
        mod._parameters["weight"], mod.padding_idx = empty, padding_idx

    module.register_forward_pre_hook(rows_only)
    module.register_forward_hook(release, always_call=True)


class _Reader:
    """Reads leaves and embedding rows from safetensors byte ranges at the compute dtype.

    A leaf's parameters go into one arena reused from leaf to leaf: fresh memory for every
    leaf would be fresh pages from the kernel, and faulting them in costs several times the
    read and cast themselves (19 ms against 2.4 ms for a 5632 x 2048 float32 matrix here).
    """

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self._buffer = bytearray()  # one read chunk, cast from
        self._block = torch.empty(0, dtype=dtype)  # the row block of a Linear applied in blocks
        self._arena = torch.empty(0, dtype=torch.uint8)
        self._owner: nn.Module | None = None  # the leaf whose parameters are in the arena

    def leaf(self, module: nn.Module, sources: dict[str, TensorInfo]) -> dict[str, Tensor]:
        """`module`'s parameters, read into the arena, or into memory of their own while another
        leaf holds the arena (a module that owns parameters and has children that do too)."""
        spans, total = {}, 0
        for name, info in sources.items():
            nbytes = math.prod(info.shape) * self.dtype.itemsize
            spans[name] = (total, nbytes)
            total += -(-nbytes // 64) * 64  # 64-byte aligned starts
        if self._owner is None:
            if self._arena.numel() < total:
                self._arena = torch.empty(total, dtype=torch.uint8)
            storage, self._owner = self._arena, module
        else:
            storage = torch.empty(total, dtype=torch.uint8)
        out = {}
        for name, info in sources.items():
            start, nbytes = spans[name]
            out[name] = storage[start:start + nbytes].view(self.dtype).view(info.shape)
            self.read_into(info, out[name])
        return out

    def release(self, module: nn.Module, output: Any) -> None:
        if self._owner is not module:
            return
        self._owner = None
        outputs = output if isinstance(output, (tuple, list)) else (output,)
        arena = self._arena.untyped_storage().data_ptr()
        if any(isinstance(t, Tensor) and t.untyped_storage().data_ptr() == arena for t in outputs):
            self._arena = torch.empty(0, dtype=torch.uint8)  # the output is a view of the weights: keep them

    def read_into(self, info: TensorInfo, out: Tensor, first_element: int = 0) -> None:
        """out.numel() elements of the tensor from `first_element` on (flat order), cast into
        `out` chunk by chunk."""
        flat, source = out.view(-1), torch_dtype(info.dtype)
        item = info.nbytes // max(math.prod(info.shape), 1)
        step = max(1, CHUNK_BYTES // max(item, 1))
        with open(info.file, "rb", buffering=0) as f:
            for begin in range(0, flat.numel(), step):
                count = min(step, flat.numel() - begin)
                chunk = self._chunk(count * item)
                _pread_exact(f.fileno(), chunk, info.start + (first_element + begin) * item, info)
                flat[begin:begin + count].copy_(torch.frombuffer(chunk, dtype=source))

    def rows(self, info: TensorInfo, rows: list[int]) -> Tensor:
        """Rows `rows` of a (V, ...) tensor: (len(rows), ...)."""
        out = torch.empty((len(rows), *info.shape[1:]), dtype=self.dtype)
        row_bytes, source = info.nbytes // info.shape[0], torch_dtype(info.dtype)
        chunk = self._chunk(row_bytes)
        with open(info.file, "rb", buffering=0) as f:
            for i, row in enumerate(rows):
                _pread_exact(f.fileno(), chunk, info.start + row * row_bytes, info)
                out[i].copy_(torch.frombuffer(chunk, dtype=source).view(info.shape[1:]))
        return out

    def block(self, rows: int, columns: int) -> Tensor:
        """A (rows, columns) buffer at the compute dtype, the same memory for every blocked
        Linear (fresh pages each time would cost more in faults than the reads)."""
        if self._block.numel() < rows * columns:
            self._block = torch.empty(rows * columns, dtype=self.dtype)
        return self._block[:rows * columns].view(rows, columns)

    def _chunk(self, nbytes: int) -> memoryview:
        if len(self._buffer) < nbytes:
            self._buffer = bytearray(nbytes)
        return memoryview(self._buffer)[:nbytes]


def _pread_exact(fd: int, into: memoryview, offset: int, info: TensorInfo) -> None:
    done = 0
    while done < len(into):
        n = os.preadv(fd, [into[done:]], offset + done)
        if n == 0:
            raise TensorFileError(f"{info.file}: tensor '{info.name}' is cut short; re-download it")
        done += n
