"""The streaming MoE writer: plan, shard, write, verify, and swap into place atomically.

Tensors stream from the source checkpoints to the output one at a time: untransformed
ones are read straight into the writer's buffers, the rest (dtype casts, noise, residual
scale, routers) pass through memory one tensor at a time (`workbench.build.writer`).
Everything is written into a staging folder beside the output, hashed, fsynced and
verified, and only then renamed into place (`workbench.staging`), so a crash, a cancel or
a kill -9 never leaves a half-written model under the final name.

Dimensions: L layers, E experts, H hidden.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import safe_open

from workbench.build.card import render_card
from workbench.build.families import output_config, output_plan
from workbench.build.layout import TensorSpec, plan_shards, shard_names
from workbench.build.writer import header_bytes, write_safetensors
from workbench.errors import BuildError
from workbench.gates import (
    GateDiagnostics,
    GateRequest,
    GateWorker,
    HeldOutScore,
    RouterGates,
    from_gates,
    noise_gates,
    start_gates,
)
from workbench.models import (
    DTYPE_NAMES,
    ModelSource,
    TensorInfo,
    WeightIndex,
    make_tokenizer_portable,
    portable_config,
    resolve,
    tensor_nbytes,
    torch_dtype,
)
from workbench.progress import CancelToken, Progress, ProgressFn, ignore_progress
from workbench.recipe import PROMPTLESS_MODES, Expert, Problem, Recipe, dump_recipe, errors, validate
from workbench.staging import (
    WrittenFile,
    check_final,
    check_manifest,
    clean_stale,
    commit,
    copy_file,
    discard,
    hash_file,
    new_staging,
    write_manifest,
    write_text,
)

if TYPE_CHECKING:  # torch loads only for transforms, or on the gates thread (workbench.gates.thread)
    import torch

    from workbench.gates import Gates

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json")
FLOAT_CODES = ("F16", "BF16", "F32", "F64")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:([kmgt])(i)?)?b?\s*$", re.IGNORECASE)
MAX_NAME = 96


@dataclass
class BuildResult:
    path: Path
    files: list[tuple[str, int]]  # (file name, bytes), as in the manifest
    total_bytes: int
    seconds: float
    diagnostics: GateDiagnostics
    gates: Gates | None  # the gate tensors, where this process computed or was given them; None
    # where a child process computed them (workbench.gates.process): the build never held torch
    score: HeldOutScore | None = None  # held-out routing score of the gates (None for noise gates)


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '1.5GiB', '2g' or 1000 -> bytes (GB = 10**9, GiB = 2**30)."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        match = _SIZE.match(str(text))
        if match is None:
            raise BuildError(f"shard size {text!r} is not a size; write it like 5GB, 500MB or 1.5GiB")
        number, prefix, binary = match.groups()
        scale = (1024 if binary else 1000) ** ("kmgt".index(prefix.lower()) + 1) if prefix else 1
        value = int(float(number) * scale)
    if value < 1:
        raise BuildError(f"shard size {text!r} must be at least one byte; e.g. 5GB")
    return value


def output_path(root: Path, name: str) -> Path:
    """root/name for a user-chosen output name, refusing anything that could escape root."""
    bad = [c for c in name if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp")]
    if not name or not name.strip():
        raise BuildError("output name is empty; choose a name such as my-moe-4x135m")
    if bad:
        raise BuildError(f"output name {name!r} contains control or direction characters "
                         f"({', '.join(f'U+{ord(c):04X}' for c in bad)}); use letters, digits, - _ .")
    # File names are capped at 255 bytes; the staging name adds about 30 to the output's.
    if len(name) > MAX_NAME or len(name.encode("utf-8")) > 2 * MAX_NAME:
        raise BuildError(f"output name is {len(name)} characters; keep it under {MAX_NAME}")
    if "/" in name or "\\" in name or name in (".", "..") or name.startswith(".") or ":" in name:
        raise BuildError(f"output name {name!r} must be a plain folder name (no / \\ : or leading dot)")
    root = Path(root).resolve()
    path = (root / name).resolve()
    if path.parent != root:
        raise BuildError(f"output name {name!r} resolves outside {root}; choose a plain name")
    return path


def output_dtype(dtype: str | None, recipe: Recipe, base_cfg: dict) -> str:
    """The `dtype` argument, else the recipe's, else the base config's, else float32."""
    for given, where in ((dtype, "dtype argument"), (recipe.dtype, "recipe dtype")):
        if given:
            name = str(given).removeprefix("torch.")
            if name not in DTYPE_NAMES:
                raise BuildError(f"{where} {given!r} is not one of {', '.join(DTYPE_NAMES)}")
            return name
    found = str(base_cfg.get("dtype") or base_cfg.get("torch_dtype") or "").removeprefix("torch.")
    if found in DTYPE_NAMES:
        return found
    log.info("base config dtype %r is not one of %s; writing float32", found, ", ".join(DTYPE_NAMES))
    return "float32"


def build(recipe: Recipe, out: Path, *, device: str = "auto", dtype: str | None = None,
          shard_size: int = 5 * 10**9, seed: int = 0, force: bool = False, token: str | None = None,
          on_progress: ProgressFn = ignore_progress, cancel: CancelToken | None = None,
          gates: Gates | None = None, sources: dict[str, ModelSource] | None = None,
          allow_remote_code: bool = False) -> BuildResult:
    """Build the recipe's MoE (its output family) into `out` (a folder), atomically; see the
    module doc. `allow_remote_code` allows a family that loads only through remote code
    (DeepSeek-MoE); nothing here ever runs such code."""
    started = time.monotonic()
    cancel = cancel or CancelToken()
    shard_bytes = parse_size(shard_size)
    out = Path(out).absolute()
    if out.parent.is_dir():
        clean_stale(out.parent)  # first: it may put back an output a dead build left aside
    check_final(out, force)
    # Errors only: the check with configs below reports these warnings again, logged once there.
    # before downloading anything
    _refuse_problems(errors(validate(recipe, allow_remote_code=allow_remote_code)), "recipe has errors")
    out.parent.mkdir(parents=True, exist_ok=True)
    srcs = _resolve_all(recipe, sources or {}, token, on_progress, cancel, allow_remote_code)
    job = _Job.plan(recipe, srcs, dtype, seed)
    if gates is not None:
        job.take_gates(from_gates(gates, job.code))  # a mismatch fails now, not after the copy
    elif recipe.gate_mode in PROMPTLESS_MODES:  # numpy noise: no model, no torch, no child
        job.take_gates(noise_gates(recipe.gate_mode, job.gate_shape, seed, job.code,
                                   shared=job.has_shared_gate))
    shards = plan_shards([(s.out_name, job.nbytes(s)) for s in job.specs], shard_bytes)
    folder = new_staging(out, job.needed_bytes(len(shards)))
    worker = None
    try:
        worker = start_gates(GateRequest(recipe, srcs[recipe.base_model].path, device, seed, job.code),
                              job.gates, cancel)
        written = job.write(folder, shards, worker, on_progress, cancel)
        worker.stop()  # the gates are in: a gates process is reaped as it exits
        written += _write_extras(folder, job)
        written.append(write_manifest(folder, written))
        on_progress(Progress("verify", 0.0, "checking shards, index and manifest"))
        _verify(folder, {s.out_name for s in job.specs})
        on_progress(Progress("verify", 1.0, "verified"))
        commit(folder, out, force)
    except BaseException:
        if worker is not None:
            worker.stop()
        discard(folder)
        raise
    seconds = time.monotonic() - started
    files = [(w.path.name, w.size) for w in written]
    total = sum(size for _, size in files)
    on_progress(Progress("done", 1.0, f"{out.name}: {total / 1e9:.2f} GB in {seconds:.1f} s"))
    log.info("built %s: %d files, %d bytes, %.1f s", out, len(files), total, seconds)
    return BuildResult(out, files, total, seconds, job.gates.diagnostics, job.gates.gates, job.gates.score)


def _resolve_all(recipe: Recipe, given: dict[str, ModelSource], token: str | None,
                 on_progress: ProgressFn, cancel: CancelToken,
                 allow_remote_code: bool) -> dict[str, ModelSource]:
    refs = recipe.model_refs()
    out: dict[str, ModelSource] = {}
    for i, ref in enumerate(refs):
        cancel.check()
        on_progress(Progress("resolve", i / len(refs), ref))
        out[ref] = given[ref] if ref in given else resolve(ref, token=token, on_progress=on_progress,
                                                           cancel=cancel)
    on_progress(Progress("resolve", 1.0, f"{len(refs)} model(s) ready"))
    _refuse_problems(validate(recipe, {ref: src.config for ref, src in out.items()},
                              allow_remote_code=allow_remote_code), "recipe does not fit its models")
    return out


def _refuse_problems(problems: list[Problem], what: str) -> None:
    for problem in problems:
        if problem.level != "error":
            log.warning("%s", problem)
    if errors(problems):
        raise BuildError(f"{what}:\n" + "\n".join(map(str, errors(problems))))


@dataclass
class _Job:
    """One build's plan: where each output tensor comes from and what happens to it."""

    recipe: Recipe
    sources: dict[str, ModelSource]
    indexes: dict[str, WeightIndex]
    specs: list[TensorSpec]
    dtype: str  # "bfloat16" | "float16" | "float32" | "float64"
    seed: int
    gates: RouterGates | None = None

    @classmethod
    def plan(cls, recipe: Recipe, srcs: dict[str, ModelSource], dtype: str | None, seed: int) -> _Job:
        base_cfg = srcs[recipe.base_model].config
        indexes = {ref: WeightIndex(src.path) for ref, src in srcs.items()}
        specs = output_plan(recipe, base_cfg, indexes[recipe.base_model].names)
        # Routers last: they wait for the gates thread, and everything before them does not.
        specs.sort(key=lambda spec: spec.role in ("router", "shared_router"))
        job = cls(recipe, srcs, indexes, specs, output_dtype(dtype, recipe, base_cfg), seed)
        job.check_sources()
        return job

    @property
    def code(self) -> str:
        return DTYPE_NAMES[self.dtype]

    def expert(self, spec: TensorSpec) -> Expert | None:
        """The recipe entry a tensor comes from: a routed or the shared expert, else None."""
        if spec.source == "shared":
            return self.recipe.shared_experts[0]
        return self.recipe.experts[spec.source] if isinstance(spec.source, int) else None

    def ref(self, spec: TensorSpec) -> str:
        expert = self.expert(spec)
        return expert.source_model if expert is not None else self.recipe.base_model

    @property
    def has_shared_gate(self) -> bool:
        return any(s.role == "shared_router" for s in self.specs)

    def nbytes(self, spec: TensorSpec) -> int:
        return tensor_nbytes(self.code, spec.shape)

    def check_sources(self) -> None:
        """Every source tensor exists with the planned shape, and every LoRA fits its model,
        before a byte is written."""
        for ref, source in self.sources.items():
            if source.adapter is not None:
                index = self.indexes[ref]
                source.adapter.check_shapes({n: index.info(n).shape for n in source.adapter.pairs
                                             if n in index})
        for ref in {e.source_model for e in self.recipe.experts + (self.recipe.shared_experts or [])}:
            biased = [n for n in self.indexes[ref].names if ".mlp." in n and n.endswith(".bias")]
            if biased:
                raise BuildError(f"'{ref}' has MLP biases ({biased[0]}, ...) that MoE experts cannot "
                                 "hold; use experts without mlp_bias")
        for spec in self.specs:
            if spec.src_name is None:
                continue
            ref = self.ref(spec)
            info = self.indexes[ref].info(spec.src_name)
            if info.shape != spec.shape or info.dtype not in FLOAT_CODES:
                raise BuildError(f"'{ref}': {spec.src_name} is {info.dtype} {info.shape}, the config needs "
                                 f"a float tensor of shape {spec.shape}; the checkpoint does not match "
                                 "its config")

    @property
    def gate_shape(self) -> tuple[int, int, int]:
        """(L, E, H) of the routers this plan writes."""
        routers = [s for s in self.specs if s.role == "router"]
        return len(routers), len(self.recipe.experts), routers[0].shape[1]

    def take_gates(self, gates: RouterGates) -> None:
        if gates.shape != self.gate_shape:
            raise BuildError(f"gates have shape {gates.shape}, the MoE needs (L, E, H) = "
                             f"{self.gate_shape}; recompute them for this recipe")
        if gates.dtype != self.code:
            raise BuildError(f"router rows are {gates.dtype}, the MoE is {self.code}")
        if self.has_shared_gate and (gates.shared_rows is None or len(gates.shared_rows) != gates.shape[0]):
            raise BuildError("the gates lack the shared expert's gate rows (Qwen2-MoE shared_expert_gate); "
                             "compute them for this recipe")
        self.gates = gates

    def needed_bytes(self, shard_count: int) -> int:
        specs = [(s.out_name, self.code, s.shape) for s in self.specs]
        tensors = sum(self.nbytes(s) for s in self.specs) + len(header_bytes(specs)) + 64 * shard_count
        base = self.sources[self.recipe.base_model].path
        extras = sum((base / n).stat().st_size for n in TOKENIZER_FILES if (base / n).is_file())
        return tensors + extras + 1024 * 1024

    def fill(self, spec: TensorSpec) -> torch.Tensor | TensorInfo | bytes:
        """The bytes of one output tensor: a source byte range when unchanged, the router's
        bytes, else a tensor. Only the last imports torch (a plain build never does)."""
        if spec.role == "shared_router":
            return self.gates.shared_rows[spec.layer]  # (1, H), already in the output dtype
        if spec.source == "gate":
            return self.gates.rows[spec.layer]  # (E, H), already in the output dtype
        if spec.source == "zeros":
            return bytes(self.nbytes(spec))
        ref = self.ref(spec)
        index = self.indexes[ref]
        expert = self.expert(spec)
        noise = expert.noise_scale if expert is not None and expert.noise_scale else 0.0
        residual = expert.residual_scale if expert is not None and spec.role == "w2" else None
        adapter = self.sources[ref].adapter
        lora = adapter is not None and adapter.changes(spec.src_name)
        info = index.info(spec.src_name)
        if not noise and residual is None and not lora and info.dtype == self.code:
            return info
        import torch

        out_dtype = torch_dtype(self.code)
        tensor = index.load(spec.src_name)
        if not noise and residual is None and not lora:
            return tensor.to(out_dtype)
        # Transforms in float32 or float64 (never below the output's precision), then one cast;
        # the LoRA first: it is part of what the expert's weight is.
        work = torch.promote_types(torch.float32, out_dtype)
        tensor = adapter.apply(spec.src_name, tensor, work) if lora else tensor.to(work)
        if noise:
            tensor.add_(torch.randn(spec.shape, generator=self._generator(spec)), alpha=noise)
        if residual is not None:
            tensor *= residual
        return tensor.to(out_dtype)

    def _generator(self, spec: TensorSpec) -> torch.Generator:
        """Noise seeded by (seed, expert, tensor): the same build gives the same bytes."""
        import torch

        digest = hashlib.sha256(f"{self.seed}/{spec.source}/{spec.out_name}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))

    def write(self, folder: Path, shards: list[list[str]], worker: GateWorker, on_progress: ProgressFn,
              cancel: CancelToken) -> list[WrittenFile]:
        """The shards and their index; the routers (last) wait for `worker`'s gates."""
        by_name = {s.out_name: s for s in self.specs}
        total = sum(self.nbytes(s) for s in self.specs)
        done = 0

        def after(name: str, nbytes: int) -> None:
            nonlocal done
            done += nbytes
            message = f"{worker.status} · {name}" if worker.status else name
            on_progress(Progress("write", done / total if total else 1.0, message))
            cancel.check()
            worker.check()

        def fill(name: str) -> torch.Tensor | TensorInfo | bytes:
            spec = by_name[name]
            if spec.role in ("router", "shared_router") and self.gates is None:
                self.take_gates(worker.result(on_progress))
            return self.fill(spec)

        cancel.check()
        written = []
        names = shard_names(len(shards))
        for file_name, shard in zip(names, shards, strict=True):
            entries = [(n, self.code, by_name[n].shape) for n in shard]
            written.append(write_safetensors(folder / file_name, entries, fill, after, sync=False))
        if len(shards) > 1:
            index = {"metadata": {"total_size": total},
                     "weight_map": {n: f for f, shard in zip(names, shards, strict=True) for n in shard}}
            text = json.dumps(index, indent=2, sort_keys=True) + "\n"
            written.append(write_text(folder / "model.safetensors.index.json", text))
        return written


def _write_extras(folder: Path, job: _Job) -> list[WrittenFile]:
    """config.json, generation config, tokenizer, recipe copy and model card."""
    recipe, base = job.recipe, job.sources[job.recipe.base_model]
    config = portable_config(output_config(recipe, base.config, job.dtype))
    out = [write_text(folder / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")]
    copied = [n for n in ("generation_config.json", *TOKENIZER_FILES) if (base.path / n).is_file()]
    for name in copied:
        copy_file(base.path / name, folder / name)
    make_tokenizer_portable(folder)  # rewrites tokenizer_config.json: hash the files after it
    out += [hash_file(folder / name) for name in copied]
    out.append(write_text(folder / "mergekit_moe_config.yml", dump_recipe(recipe)))
    card = render_card(recipe, job.gates.diagnostics, job.sources, config, job.seed, job.gates.score)
    out.append(write_text(folder / "README.md", card))
    return out


def _verify(folder: Path, planned: set[str]) -> None:
    """The manifest matches the folder, every shard opens, the shards and the index hold
    every planned tensor exactly once."""
    listed = check_manifest(folder)
    seen: list[str] = []
    shard_files = sorted(n for n in listed if n.endswith(".safetensors"))
    for name in shard_files:
        with safe_open(str(folder / name), framework="numpy") as f:  # "pt" would import torch
            seen += list(f.keys())
    if len(seen) != len(planned) or set(seen) != planned:
        raise BuildError(f"shards hold {len(seen)} tensors, {len(set(seen))} distinct; the plan has "
                         f"{len(planned)}; the build is incomplete")
    index_path = folder / "model.safetensors.index.json"
    if index_path.exists():
        weight_map = json.loads(index_path.read_text())["weight_map"]
        if set(weight_map) != planned or not set(weight_map.values()) <= set(shard_files):
            raise BuildError("model.safetensors.index.json does not cover every tensor exactly once")
