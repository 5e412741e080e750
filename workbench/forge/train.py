"""Fine-tuning only a base's MLP weights on a few examples: the forge's training loop.

A frankenMoE takes each expert's MLPs and everything else from the base, so an expert
trained with attention, embeddings and norms frozen behaves inside the MoE exactly as it
did alone wherever the router sends its tokens. Only `mlp.gate_proj`, `mlp.up_proj` and
`mlp.down_proj` of the chosen layers train; every other tensor stays bit-identical.

Chat examples are rendered with the base's chat template: the prompt (and system) as the
template renders them before the assistant's turn, then the reply and the template's own
end of turn; the loss is on the reply's tokens only. Text examples train on every token.
AdamW, a fixed learning rate, batches drawn in a seeded order: the same seed gives the same
weights on the CPU. A GPU trains under bf16 autocast.

Legend: B examples in a batch, T tokens.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from workbench.errors import ForgeError
from workbench.forge.data import Example
from workbench.forge.settings import ForgeSettings
from workbench.progress import CancelToken, Progress, ProgressFn, ignore_progress

log = logging.getLogger(__name__)

MLP_PARTS = ("gate_proj", "up_proj", "down_proj")
IGNORE = -100  # the label transformers' loss skips


def mlp_parameters(model: nn.Module, layers: tuple[int, int] | None) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of the MLP matrices that train; a base without gate/up/down MLPs is refused."""
    blocks = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(blocks, nn.ModuleList) or not all(
            all(hasattr(getattr(block, "mlp", None), part) for part in MLP_PARTS) for block in blocks):
        raise ForgeError("the base is not a causal LM whose layers have gate/up/down MLPs (Llama, Mistral, "
                         "Qwen2 style); forge from such a base")
    first, last = layers if layers is not None else (0, len(blocks) - 1)
    if not 0 <= first <= last < len(blocks):
        raise ForgeError(f"--layers {first}-{last} is outside the base's layers 0-{len(blocks) - 1}")
    return [(f"model.layers.{i}.mlp.{part}.weight", getattr(blocks[i].mlp, part).weight)
            for i in range(first, last + 1) for part in MLP_PARTS]


def encode(tokenizer: Any, example: Example, max_tokens: int) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one example; labels are IGNORE where no loss is taken."""
    if example.text is not None:
        ids = list(tokenizer(example.text)["input_ids"])
        labels = list(ids)
    else:
        messages = ([{"role": "system", "content": example.system}] if example.system else []) + \
            [{"role": "user", "content": example.prompt}]
        template = getattr(tokenizer, "chat_template", None)
        if not template:
            raise ForgeError("the base has no chat template, so prompt/reply examples cannot be rendered; "
                             'write {"text": ...} examples instead')
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        whole = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": example.reply}],
                                              tokenize=False)
        if not whole.startswith(prompt):
            raise ForgeError("the base's chat template does not write a reply after its prompt; "
                             'write {"text": ...} examples instead')
        head = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        tail = list(tokenizer(whole[len(prompt):], add_special_tokens=False)["input_ids"])
        ids, labels = head + tail, [IGNORE] * len(head) + tail
    if len(ids) > max_tokens:
        raise ForgeError(f"DATA line {example.line} is {len(ids)} tokens long; the limit is {max_tokens}: "
                         "shorten it")
    if all(label == IGNORE for label in labels):
        raise ForgeError(f"DATA line {example.line} has no tokens to learn from; give it a reply")
    return ids, labels


def _batch(rows: Sequence[tuple[list[int], list[int]]], pad: int, device: torch.device) -> dict[str, Tensor]:
    """Right-padded (B, T) input ids, attention mask and labels."""
    width = max(len(ids) for ids, _ in rows)
    ids = [r + [pad] * (width - len(r)) for r, _ in rows]
    labels = [lab + [IGNORE] * (width - len(lab)) for _, lab in rows]
    mask = [[1] * len(r) + [0] * (width - len(r)) for r, _ in rows]
    tensor = lambda rows: torch.tensor(rows, device=device)  # noqa: E731
    return {"input_ids": tensor(ids), "attention_mask": tensor(mask), "labels": tensor(labels)}


def reply_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Mean cross-entropy of each labelled token given the tokens before it, as transformers'
    causal-LM loss, with the output head applied only where there is a label: a 49k-word
    vocabulary over every prompt position was a fifth of each step's work."""
    hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         use_cache=False).last_hidden_state  # (B, T, H)
    targets = batch["labels"][:, 1:]  # token t + 1 is predicted from position t
    wanted = targets != IGNORE
    logits = model.get_output_embeddings()(hidden[:, :-1][wanted])  # (N, V)
    return nn.functional.cross_entropy(logits.float(), targets[wanted])


def train(model: nn.Module, tokenizer: Any, examples: Sequence[Example], settings: ForgeSettings, *,
          on_progress: ProgressFn = ignore_progress, cancel: CancelToken | None = None) -> list[float]:
    """Train `model`'s MLPs in place; the loss of every step. Stops (Cancelled) between steps."""
    cancel = cancel or CancelToken()
    settings.check()
    rows = [encode(tokenizer, example, settings.max_tokens) for example in examples]  # all checked first
    trained = mlp_parameters(model, settings.layers)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for _, parameter in trained:
        parameter.requires_grad_(True)
    device = next(model.parameters()).device
    pad = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)
    generator = torch.Generator().manual_seed(settings.seed)
    torch.manual_seed(settings.seed)
    optimiser = torch.optim.AdamW([p for _, p in trained], lr=settings.lr, weight_decay=0.0)
    model.train()
    order: list[int] = []
    losses: list[float] = []
    started = time.monotonic()
    for step in range(settings.steps):
        cancel.check()
        if len(order) < settings.batch_size:  # a new pass over the examples, in a seeded order
            order += torch.randperm(len(rows), generator=generator).tolist()
        picked, order = order[:settings.batch_size], order[settings.batch_size:]
        batch = _batch([rows[i] for i in picked], pad, device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = reply_loss(model, batch)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
        elapsed = time.monotonic() - started
        left = elapsed / (step + 1) * (settings.steps - step - 1)
        on_progress(Progress("forge", (step + 1) / settings.steps,
                             f"step {step + 1}/{settings.steps}, loss {losses[-1]:.3f}, {left:.0f} s left",
                             {"step": step + 1, "loss": losses[-1]}))
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    log.info("forged %d steps: loss %.3f -> %.3f", settings.steps, losses[0], losses[-1])
    return losses
