"""A Llama/Mistral forward in plain torch, for gates computed in a process without transformers.

Importing transformers' model code costs about 3.5 s of CPU before the first weight is read
(its config module pulls in torch.distributed, dynamo and every kernel integration), which is
most of a gates process's life and, for a mid-size model, most of a `hidden` build
(BENCHMARKS.md). The gates only need the residual stream entering each decoder layer and
the post-attention norm's output, so for the plain Llama family this module runs the same
operations as transformers' LlamaModel (5.x, sdpa attention), op for op in the same order,
on a skeleton whose parameter names are the checkpoint's keys; `lazy_weights.stream_into`
reads its leaves from disk. Anything else (other architectures, RoPE scaling, biases, a
sliding window the prompts could reach) returns None from `gate_llama` and loads through
transformers as before.

The module has no lm_head and never runs its final norm: the gate hooks stop every forward
at the last layer (`workbench.gates.forward`), and a forward that gets past it raises.

Legend: B prompts, T tokens, H hidden size, N query heads, K key/value heads, D head dim.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FAMILIES = ("LlamaForCausalLM", "MistralForCausalLM")
# Tokens a prompt row may have (prompts.MAX_PROMPT_TOKENS): a sliding window this wide changes nothing.
LONGEST_PROMPT = 512


@dataclass(frozen=True)
class GateConfig:
    """The config.json fields the forward reads; `to_dict` as transformers' configs have it."""

    num_hidden_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    vocab_size: int
    pad_token_id: int | None  # the embedding's padding_idx, as transformers sets it (it shapes no forward)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def gate_config(config: dict[str, Any]) -> GateConfig | None:
    """The forward's config for a plain Llama/Mistral config.json, else None (load with transformers)."""
    if config.get("architectures") not in ([name] for name in FAMILIES):
        return None
    # transformers 5 writes rope_parameters, 4.x wrote rope_scaling (None when plain) and rope_theta
    ropes = [config.get(key) or {} for key in ("rope_parameters", "rope_scaling")]
    types = {rope.get("rope_type", rope.get("type", "default")) for rope in ropes}
    theta = ropes[0].get("rope_theta", config.get("rope_theta", 10000.0))
    window = config.get("sliding_window")
    plain = (types == {"default"} and config.get("hidden_act", "silu") == "silu"
             and not config.get("attention_bias") and not config.get("mlp_bias")
             and int(config.get("pretraining_tp", 1) or 1) == 1
             and (window is None or int(window) >= LONGEST_PROMPT)
             and config.get("quantization_config") is None)
    if not plain:
        return None
    heads, hidden = int(config["num_attention_heads"]), int(config["hidden_size"])
    vocab, pad = int(config["vocab_size"]), config.get("pad_token_id")
    return GateConfig(
        num_hidden_layers=int(config["num_hidden_layers"]), hidden_size=hidden,
        intermediate_size=int(config["intermediate_size"]), num_attention_heads=heads,
        num_key_value_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or hidden // heads), rms_norm_eps=float(config["rms_norm_eps"]),
        rope_theta=float(theta), vocab_size=vocab,
        pad_token_id=pad if isinstance(pad, int) and 0 <= pad < vocab else None)


def read_gate_config(folder: Path) -> GateConfig | None:
    return gate_config(json.loads((folder / "config.json").read_text()))


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, c: GateConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, c.hidden_size, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None) -> Tensor:
        B, T, _ = x.shape
        shape = (B, T, -1, self.head_dim)
        q = self.q_proj(x).view(shape).transpose(1, 2)  # (B, N, T, D)
        k = self.k_proj(x).view(shape).transpose(1, 2)  # (B, K, T, D)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        groups = self.heads // self.kv_heads
        extra = {}
        if groups > 1 and mask is None:
            extra["enable_gqa"] = True  # as transformers' sdpa path: SDPA repeats the kv heads itself
        elif groups > 1:
            k = k[:, :, None].expand(B, self.kv_heads, groups, T, self.head_dim).reshape(B, self.heads, T, -1)
            v = v[:, :, None].expand(B, self.kv_heads, groups, T, self.head_dim).reshape(B, self.heads, T, -1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0,
                                             scale=self.head_dim**-0.5, is_causal=mask is None and T > 1,
                                             **extra)  # (B, N, T, D)
        return self.o_proj(out.transpose(1, 2).contiguous().reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, c: GateConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, c: GateConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    def forward(self, hidden_states: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None) -> Tensor:
        x = hidden_states + self.self_attn(self.input_layernorm(hidden_states), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Body(nn.Module):
    def __init__(self, c: GateConfig):
        super().__init__()
        # _weight skips the random init: normal_ on the meta device imports torch._dynamo (1.5 s of CPU).
        table = torch.empty(c.vocab_size, c.hidden_size)
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size, c.pad_token_id, _weight=table)
        self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(c.num_hidden_layers))
        # Never run (the forwards stop at the last layer); here so that a checkpoint without it is
        # refused as transformers' model would refuse it, not half read.
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class GateLlama(nn.Module):
    """The decoder stack of a Llama/Mistral causal LM, called as transformers' model is by the gate
    forwards: model(input_ids=..., attention_mask=..., use_cache=False, logits_to_keep=1)."""

    def __init__(self, config: GateConfig):
        super().__init__()
        self.config = config
        self.model = Body(config)
        dim = config.head_dim
        # Computed on the CPU in float32 whatever device the parameters are built on (the meta device).
        steps = torch.arange(0, dim, 2, dtype=torch.float, device="cpu")
        inv_freq = 1.0 / (config.rope_theta ** (steps / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **_: Any) -> None:
        x = self.model.embed_tokens(input_ids)  # (B, T, H)
        T = x.shape[1]
        positions = torch.arange(T, device=x.device)[None]  # (1, T): pads count, as transformers counts them
        freqs = positions[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)  # (1, T, D)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        mask = _causal_mask(attention_mask, T, x.device)
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask)
        raise RuntimeError("the gate forward ran past its last layer; its hooks stop it before")


def _causal_mask(attention_mask: Tensor | None, T: int, device: torch.device) -> Tensor | None:
    """(B, 1, T, T) bool, True where query q may see key k (k <= q and k not padding); None when
    nothing is padded, so SDPA runs is_causal (transformers' sdpa mask makes the same choice)."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    arange = torch.arange(T, device=device)
    causal = arange[:, None] >= arange[None, :]  # (T, T)
    return (causal[None, None] & attention_mask.bool()[:, None, None, :]).expand(-1, 1, T, T)


def gate_llama(folder: Path) -> GateLlama | None:
    """The skeleton (parameters on the meta device, the rotary buffer real) for a plain Llama/Mistral
    base, else None."""
    config = read_gate_config(folder)
    if config is None:
        return None
    with torch.device("meta"):
        model = GateLlama(config)
    return model.eval()
