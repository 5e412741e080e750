"""A model's chat template: messages rendered as the text the model reads.

Chat renders conversations with it; the gates render router prompts with it when a recipe
says `prompt_template: chat`, so a router is made from the very tokens a chat sends. A
tokenizer without a template gets `FALLBACK_TEMPLATE` ("role: content" lines).
"""

from __future__ import annotations

from typing import Any

from workbench.errors import WorkbenchError

FALLBACK_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


class TemplateFailure(WorkbenchError):
    """The model's chat template raised on these messages."""


def render_chat(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The prompt text for `messages`, ending with the template's opening of the assistant's turn."""
    from jinja2 import TemplateError  # lazy: a transformers dependency, needed only here

    template = getattr(tokenizer, "chat_template", None) or FALLBACK_TEMPLATE
    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=True)
    except (TemplateError, ValueError, TypeError) as exc:
        raise TemplateFailure(f"the chat template of this model failed on the conversation: {exc}") from exc


def user_turn(tokenizer: Any, text: str) -> str:
    """`text` as a user's one message, rendered as a chat sends it (the template's own system
    prompt, if it adds one, included)."""
    return render_chat(tokenizer, [{"role": "user", "content": text}])
