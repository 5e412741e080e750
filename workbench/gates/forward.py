"""Running the base model on router prompts (tokenised by `workbench.gates.prompts`): loading
the base (streamed from disk leaf by leaf when large, `workbench.gates.lazy_weights`), and
capturing the states the gates need with hooks, each forward stopped as soon as they are all
captured.
`workbench.gates.compute` turns these states into gate rows; this module holds no gate math.

Legend: L layers, B prompts in a set, T tokens, H hidden size, V vocabulary.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from itertools import chain
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from workbench.device import pick_device
from workbench.errors import GateError
from workbench.gates.lazy_weights import CheckpointMismatch, stream_into, stream_leaves
from workbench.gates.llama import gate_llama
from workbench.gates.plain_tokenizer import plain_tokenizer
from workbench.gates.prompts import MAX_PROMPT_TOKENS
from workbench.progress import CancelToken

log = logging.getLogger(__name__)


class StopForward(Exception):
    """Raised from a hook once a forward has given every state the gates need; caught in
    `run_forward`."""


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's decoder layers: the one ModuleList named `layers` with num_hidden_layers entries."""
    count = int(model.config.num_hidden_layers)
    found = [module for name, module in model.named_modules() if name.rsplit(".", 1)[-1] == "layers"
             and isinstance(module, nn.ModuleList) and len(module) == count]
    if len(found) != 1:
        raise GateError(f"cannot find the base model's {count} decoder layers (a ModuleList named 'layers'); "
                        "Llama/Mistral-style bases are supported")
    return found[0]


def run_forward(model: nn.Module, batch: dict[str, Tensor]) -> None:
    """One forward over `batch`, until a hook raises StopForward; a forward that ends without
    one missed a state and is an error."""
    device = input_device(model)
    inputs = {k: v.to(device) for k, v in batch.items()}
    try:
        with torch.no_grad():
            # logits_to_keep=1: should a stop be missed, the lm_head makes one position, not (B, T, V).
            model(**inputs, use_cache=False, logits_to_keep=1)
    except StopForward:
        return
    raise GateError("the base model's forward never reached its last decoder layer; the gates need its input")


def input_device(model: nn.Module) -> torch.device:
    """Where a model's inputs go: its first real parameter's or buffer's device."""
    # A streamed base keeps its parameters on the meta device between leaves; its buffers are real.
    real = (t for t in chain(model.parameters(), model.buffers()) if t.device.type != "meta")
    return next((t.device for t in real), torch.device("cpu"))


def layer_inputs(model: nn.Module, batch: dict[str, Tensor], reduce: Callable[[Tensor], Tensor]) -> Tensor:
    """(L, ...) float32 CPU stack of reduce(residual stream entering layer l), each (B, T, H) -> (...).

    The states are transformers' hidden_states[l] for l < L, captured by pre-hooks on the
    decoder layers; the forward stops at the last layer's input, so that layer, the final norm
    and the lm_head never run, and only the reduced states are kept.
    """
    layers = decoder_layers(model)
    captured: list[Tensor] = []

    def capture(module: nn.Module, args: tuple, kwargs: dict) -> None:
        states = args[0] if args else kwargs["hidden_states"]  # (B, T, H)
        captured.append(reduce(states).float().cpu())
        if module is layers[-1]:
            raise StopForward

    handles = [layer.register_forward_pre_hook(capture, with_kwargs=True) for layer in layers]
    try:
        run_forward(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack(captured)


class NoRouterInput(GateError):
    """The base has no post_attention_layernorm to hook, so its router input cannot be seen."""


_POST_ATTN_NORM = re.compile(r"(?:^|\.)layers\.(\d+)\.post_attention_layernorm$")


@contextmanager
def router_inputs(model: nn.Module, *, last_only: bool = False,
                  select: Callable[[Tensor], Any] | None = None) -> Iterator[list[Any]]:
    """Capture what each layer's router sees, the post_attention_layernorm output (B, T, H)
    (or (B, 1, H) with `last_only`, or select(output) with `select`), in layer order, for
    forwards run inside the block; hooks always come off. Used by the preview, by
    `router_input` gates and by the prompt bank."""
    found = sorted(((int(m.group(1)), mod) for name, mod in model.named_modules()
                    if (m := _POST_ATTN_NORM.search(name))), key=lambda item: item[0])
    if not found:
        raise NoRouterInput("the base model's layers have no post_attention_layernorm, so the router "
                            "input cannot be captured; Llama/Mistral-style bases are supported")
    captured: list[Any] = []

    def keep(module: nn.Module, args: Any, output: Tensor) -> None:
        output = output.detach()
        captured.append(select(output) if select else output[:, -1:, :] if last_only else output)

    handles = [mod.register_forward_hook(keep) for _, mod in found]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def router_input_states(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """(L, B, H) float32 CPU: what each layer's router sees (its post_attention_layernorm output)
    at the last position; the forward stops once the last layer's norm has run."""
    last = decoder_layers(model)[-1]

    def stop(module: nn.Module, args: Any, output: Tensor) -> None:
        raise StopForward

    try:
        with router_inputs(model, last_only=True) as captured:  # NoRouterInput when there are no such norms
            # Registered after router_inputs' own hook: hooks run in order, so the capture comes first.
            handle = last.post_attention_layernorm.register_forward_hook(stop)
            try:
                run_forward(model, batch)
            finally:
                handle.remove()
    except NoRouterInput as exc:
        raise GateError(f"gate_mode router_input: {exc}; use gate_mode hidden") from exc
    return torch.stack(captured)[:, :, -1, :].float().cpu()


LAST_POSITION_MODES = ("hidden", "router_input")
TOKENS_PER_FORWARD = 8192  # rows x width of one merged forward at most
ACTIVATION_BYTES = 256 * 2**20  # what one merged forward's largest activations may take


def tokens_per_forward(config: Any) -> int:
    """Tokens one merged forward may hold: TOKENS_PER_FORWARD, fewer for wide models, so
    that the forward's activations stay near ACTIVATION_BYTES whatever the model size.

    Per token, in float32: the MLP's three (T, I) tensors and one layer's attention scores
    against up to MAX_PROMPT_TOKENS keys per head. A 70B Llama (I 28672, 64 heads) gets
    about 550 tokens, a 7B about 1100; a streamed base reads its weights once per forward,
    so fewer forwards are cheaper and this only binds for large prompt sets.
    """
    intermediate = int(getattr(config, "intermediate_size", 0) or 4 * int(config.hidden_size))
    heads = int(getattr(config, "num_attention_heads", 1) or 1)
    per_token = 4 * (3 * intermediate + heads * MAX_PROMPT_TOKENS)
    return max(1, min(TOKENS_PER_FORWARD, ACTIVATION_BYTES // per_token))  # a forward takes one row at least


def merged_forwards(model: nn.Module, sets: Sequence[dict[str, Tensor]],
                    cancel: CancelToken) -> Iterator[tuple[list[tuple[int, int]], dict[str, Tensor]]]:
    """The rows of every set, re-padded into as few batches as `tokens_per_forward` allows:
    yields ([(set index, row index)], merged batch), rows in order, a cancel check before each.
    Left padding makes each row's states independent of its batch, so sets can share
    forwards and a streamed base reads its weights once per batch."""
    rows = [(k, r) for k, batch in enumerate(sets) for r in range(batch["input_ids"].shape[0])]
    budget, start = tokens_per_forward(model.config), 0
    while start < len(rows):
        width, stop = 0, start
        while stop < len(rows):
            grown = max(width, sets[rows[stop][0]]["input_ids"].shape[1])
            if stop > start and grown * (stop - start + 1) > budget:
                break
            width, stop = grown, stop + 1
        cancel.check()
        chunk = rows[start:stop]
        yield chunk, _left_pad([sets[k] for k, _ in chunk], [r for _, r in chunk], width)
        start = stop


def last_states_by_set(model: nn.Module, mode: str, batches: list[tuple[dict, dict | None]],
                       cancel: CancelToken) -> dict[int, Tensor]:
    """(L, B, H) last-position states of every prompt set, keyed by id(batch), from as few
    forwards as fit (`merged_forwards`)."""
    sets = [batch for pair in batches for batch in pair if batch is not None]
    per_row: list[Tensor] = []  # (L, H) last-position state of each row, in order
    for _, merged in merged_forwards(model, sets, cancel):
        if mode == "router_input":
            states = router_input_states(model, merged)
        else:
            states = layer_inputs(model, merged, lambda h: h[:, -1, :])  # (L, B, H)
        per_row += [states[:, b] for b in range(states.shape[1])]
    out, cursor = {}, 0
    for batch in sets:
        count = batch["input_ids"].shape[0]
        out[id(batch)] = torch.stack(per_row[cursor:cursor + count], 1)
        cursor += count
    return out


def _left_pad(batches: list[dict[str, Tensor]], rows: list[int], width: int) -> dict[str, Tensor]:
    """Row r of each batch, re-padded on the left to `width` with that batch's own pad id."""
    ids, masks = [], []
    for batch, r in zip(batches, rows, strict=True):
        row, mask = batch["input_ids"][r], batch["attention_mask"][r]
        extra = width - row.shape[0]
        pad = row[0] if mask[0] == 0 else row.new_tensor(_pad_id(batch))
        ids.append(torch.cat([pad.expand(extra), row]))
        masks.append(torch.cat([mask.new_zeros(extra), mask]))
    return {"input_ids": torch.stack(ids), "attention_mask": torch.stack(masks)}


def _pad_id(batch: dict[str, Tensor]) -> int:
    """The pad id a set was padded with, or its first token (BOS) when no row needed padding."""
    pads = batch["input_ids"][batch["attention_mask"] == 0]
    return int(pads[0]) if pads.numel() else int(batch["input_ids"][0, 0])


def load_tokenizer(base_path: Path, *, chat: bool = False) -> Any:
    """The base's tokenizer: read from tokenizer.json where transformers would use that file as it
    is (`workbench.gates.plain_tokenizer`; no transformers import), else transformers' own, which
    `chat` also needs (it renders the chat template)."""
    plain = None if chat else plain_tokenizer(base_path)
    if plain is not None:
        return plain
    from transformers import AutoTokenizer  # lazy: importing this module stays cheap

    try:
        return AutoTokenizer.from_pretrained(str(base_path), trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise GateError(f"cannot load the base tokenizer from {base_path}: {exc}; check the folder") from exc


# Above this many bytes of weights on the CPU, the base is streamed from its safetensors
# files one leaf module at a time during each forward (workbench.gates.lazy_weights), so gates
# cost one leaf of memory whatever the model size. Loading whole peaks near 1.5x the float32
# weights plus 0.35 GB of libraries (1.8 GB for a 0.5 GB bf16 base), so only small bases do.
STREAM_ABOVE_BYTES = 256 * 2**20


def load_base(base_path: Path, device: str) -> nn.Module:
    """The base model in eval mode: whole on a GPU (bf16) or a small one on the CPU (float32),
    leaf-streamed from disk on the CPU above STREAM_ABOVE_BYTES: into `workbench.gates.llama`'s
    forward for a plain Llama/Mistral base (no transformers import), else into transformers' model."""
    where, dtype = pick_device(device)
    try:
        streamed = where.type == "cpu" and _resident_bytes(base_path, dtype) > STREAM_ABOVE_BYTES
    except (OSError, ValueError) as exc:
        raise GateError(f"cannot load the base model from {base_path}: {exc}; check the folder") from exc
    if streamed and (plain := _plain_base(base_path, dtype)) is not None:
        return plain
    from transformers import AutoModelForCausalLM  # lazy: importing this module stays cheap

    try:
        if streamed:
            try:
                model = stream_leaves(base_path, dtype)
            except CheckpointMismatch as exc:
                log.info("cannot stream %s leaf by leaf (%s); loading it whole", base_path, exc)
            else:
                log.info("loading %s on cpu (%s) for gates, streaming each leaf module from disk", base_path,
                         dtype)
                return model.eval()
        log.info("loading %s on %s (%s) for gates", base_path, where, dtype)
        with _no_loading_bar():
            model = AutoModelForCausalLM.from_pretrained(
                str(base_path), dtype=dtype, use_safetensors=True, trust_remote_code=False,
                device_map=str(where),
            )
    except (OSError, ValueError) as exc:
        raise GateError(f"cannot load the base model from {base_path}: {exc}; check the folder") from exc
    return model.eval()


def _plain_base(base_path: Path, dtype: torch.dtype) -> nn.Module | None:
    """A plain Llama/Mistral base streamed into workbench.gates.llama's forward, or None."""
    try:
        skeleton = gate_llama(base_path)
        if skeleton is None:
            return None
        model = stream_into(skeleton, base_path, dtype)
    except CheckpointMismatch as exc:
        log.info("cannot stream %s into the plain Llama forward (%s); loading it with transformers",
                 base_path, exc)
        return None
    except (OSError, ValueError, KeyError) as exc:
        raise GateError(f"cannot load the base model from {base_path}: {exc}; check the folder") from exc
    log.info("loading %s on cpu (%s) for gates, plain Llama forward, each leaf streamed from disk", base_path,
             dtype)
    return model


@contextmanager
def _no_loading_bar() -> Iterator[None]:
    """No "Loading weights" bar from transformers: gates load while the build draws its own
    progress (on a terminal, a second bar would break its line); local files, so nothing is
    lost."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _resident_bytes(base_path: Path, dtype: torch.dtype) -> int:
    """Bytes the weights would take in memory at `dtype` (from the safetensors file sizes)."""
    on_disk = sum(p.stat().st_size for p in base_path.glob("*.safetensors"))
    config = json.loads((base_path / "config.json").read_text())
    stored = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    stored_size = {"bfloat16": 2, "float16": 2, "float64": 8}.get(stored.removeprefix("torch."), 4)
    return on_disk * torch.finfo(dtype).bits // 8 // stored_size


def read_embedding(base_path: Path) -> Tensor:
    """The (V, H) input embedding straight from safetensors, without loading the model."""
    from safetensors import safe_open

    for path in sorted(base_path.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            name = next((n for n in f.keys() if n.endswith("embed_tokens.weight")), None)
            if name is not None:
                return f.get_tensor(name)
    raise GateError(f"no embed_tokens.weight in the safetensors files of {base_path}; cheap_embed needs it")
