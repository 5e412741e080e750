"""Sample replies of a base and the expert forged from it, side by side: the proof a forge took.

Greedy (temperature 0), so the same forge gives the same samples; both models answer the
same prompt rendered with the base's chat template.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from workbench.progress import CancelToken, Progress, ProgressFn, ignore_progress

SAMPLE_TOKENS = 48  # enough for a style to show in a sentence or two
MAX_SAMPLES = 5


def sample_replies(base_ref: str, forged: Path, prompts: Sequence[str], *, device: str = "auto",
                   token: str | None = None, cancel: CancelToken | None = None,
                   on_progress: ProgressFn = ignore_progress) -> list[dict[str, str]]:
    """[{"prompt", "base", "forged"}] for each of `prompts` (at most MAX_SAMPLES)."""
    from workbench.chat import SamplingSettings, chat_streams, load_model

    prompts = [p.strip() for p in prompts if p.strip()][:MAX_SAMPLES]
    if not prompts:
        return []
    cancel = cancel or CancelToken()
    base = load_model(base_ref, device=device, token=token)
    expert = load_model(str(forged), device=device)
    settings = SamplingSettings(temperature=0.0, max_new_tokens=SAMPLE_TOKENS)
    found = []
    for number, prompt in enumerate(prompts):
        cancel.check()
        on_progress(Progress("samples", number / len(prompts), f"prompt {number + 1} of {len(prompts)}: "
                                                               f"both models answer"))
        streams = chat_streams(expert, [{"role": "user", "content": prompt}], settings, base=base,
                               cancel=cancel)
        forged_reply, base_reply = ("".join(stream).strip() for stream in streams)
        found.append({"prompt": prompt, "base": base_reply, "forged": forged_reply})
    return found
