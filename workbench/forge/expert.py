"""An expert forged from examples, written as a model folder like a build: staged, manifested,
verified and renamed into place, so a crash or a cancel never leaves a finished-looking folder.

The folder is a whole causal LM (the base with trained MLPs) that loads in transformers 4
and 5 and serves as any recipe's `source_model`. Its README.md records the base, the data's
sha256 and size, the settings, the loss curve and the command that forges it again.
"""

from __future__ import annotations

import errno
import json
import logging
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

from workbench.errors import ForgeError
from workbench.forge.data import Examples, read_examples
from workbench.forge.settings import ForgeSettings
from workbench.forge.train import train
from workbench.progress import CancelToken, Progress, ProgressFn, ignore_progress
from workbench.staging import (
    MANIFEST,
    check_final,
    check_free_space,
    check_manifest,
    clean_stale,
    commit,
    discard,
    hash_file,
    make_durable,
    new_staging,
    write_manifest,
    write_text,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ForgeResult:
    path: Path
    losses: list[float]
    seconds: float
    examples: int


def forge_expert(base_ref: str, data: Path | Examples, out: Path, settings: ForgeSettings | None = None, *,
                 device: str = "auto", force: bool = False, token: str | None = None,
                 on_progress: ProgressFn = ignore_progress, cancel: CancelToken | None = None) -> ForgeResult:
    """Fine-tune the MLPs of `base_ref` on the examples in `data` (a JSON-lines file, or examples
    already read) and write the model to `out`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workbench.device import pick_device
    from workbench.models import make_tokenizer_portable, portable_config, resolve

    settings = settings or ForgeSettings()
    settings.check()
    cancel = cancel or CancelToken()
    started = time.monotonic()
    # Bad data fails before any model loads.
    examples = data if isinstance(data, Examples) else read_examples(Path(data))
    out = Path(out)
    check_final(out, force)  # a name that cannot be made, or a replace without --force, before any work
    base = resolve(base_ref, token=token, on_progress=on_progress, cancel=cancel)
    where, _ = pick_device(device)
    on_progress(Progress("forge", 0.0, f"loading {base_ref}"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(base.path), trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(str(base.path), dtype="float32", use_safetensors=True,
                                                     trust_remote_code=False).to(where)
    except (OSError, ValueError) as exc:
        raise ForgeError(f"cannot load the base {base_ref} as a causal LM: {exc}") from exc
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out.parent)
    # The weights as saved, and room for the tokenizer and the manifest's pass; checked before
    # minutes of training, and again when the folder is made (other writers may have filled it).
    needed = 2 * sum(p.numel() * p.element_size() for p in model.parameters())
    check_free_space(out.parent, needed, "the forged expert")
    losses = train(model, tokenizer, examples.items, settings, on_progress=on_progress, cancel=cancel)
    cancel.check()
    on_progress(Progress("write", 0.0, f"writing {out.name}"))
    folder = new_staging(out, needed, "the forged expert")
    try:
        model.save_pretrained(str(folder), safe_serialization=True)
        tokenizer.save_pretrained(str(folder))
        config_path = folder / "config.json"
        config = portable_config(json.loads(config_path.read_text()))
        config_path.write_text(json.dumps(config, indent=2) + "\n")
        make_tokenizer_portable(folder)
        write_text(folder / "README.md", forge_card(base_ref, examples, settings, losses))
        make_durable(folder)
        written = [hash_file(p) for p in sorted(folder.iterdir()) if p.name != MANIFEST]
        write_manifest(folder, written)
        check_manifest(folder)
        cancel.check()
        commit(folder, out, force)
    except OSError as exc:
        discard(folder)
        if exc.errno == errno.ENOSPC:
            raise ForgeError(f"the disk holding {out.parent} filled up while the expert was written; nothing "
                             "was kept. Free space (the forged expert needs about "
                             f"{needed / 1e9:.2f} GB) and forge again") from exc
        raise
    except BaseException:
        discard(folder)
        raise
    on_progress(Progress("write", 1.0, f"forged {out}"))
    return ForgeResult(out, losses, time.monotonic() - started, len(examples.items))


def forge_card(base_ref: str, examples: Examples, settings: ForgeSettings, losses: list[float]) -> str:
    """README.md of a forged expert: where it came from, how, and the loss curve."""
    layers = "all" if settings.layers is None else f"{settings.layers[0]}-{settings.layers[1]}"
    command = ["python", "-m", "workbench", "forge", base_ref, "DATA", "OUT", "--steps", str(settings.steps),
               "--lr", f"{settings.lr:g}", "--batch-size", str(settings.batch_size),
               "--seed", str(settings.seed)]
    if settings.layers is not None:
        command += ["--layers", layers]
    every = max(1, len(losses) // 20)
    curve = "\n".join(f"| {i + 1} | {loss:.4f} |" for i, loss in enumerate(losses)
                      if i % every == 0 or i == len(losses) - 1)
    return f"""---
tags: [moe-workbench, forged-expert]
library_name: transformers
pipeline_tag: text-generation
---
# Expert forged from `{base_ref}`

Only the MLP weights (`gate_proj`, `up_proj`, `down_proj`; layers: {layers}) were trained;
attention, embeddings and norms are the base's, bit for bit, so inside a frankenMoE on this
base the expert behaves as it does alone wherever the router sends its tokens.

| | |
|---|---|
| base | `{base_ref}` |
| data | {len(examples.items)} examples, {examples.size} bytes, sha256 `{examples.sha256}` |
| steps, batch size | {settings.steps}, {settings.batch_size} |
| learning rate | {settings.lr:g} (AdamW) |
| seed | {settings.seed} |
| loss | {losses[0]:.4f} -> {losses[-1]:.4f} |

Forge it again (DATA: the file with the sha256 above):

```bash
{shlex.join(command)}
```

## Loss per step

| step | loss |
|---|---|
{curve}
"""
