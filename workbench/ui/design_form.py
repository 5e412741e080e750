"""The Design form: base model, settings and one card per expert, rendered from the draft.

The form re-renders only when the recipe's *structure* changes (a preset, a YAML edit, a
card added, removed, duplicated or moved), signalled by the `revision` state; typing in a
field never re-renders, so focus and cursor stay put. Every field edit sends the whole
form, which becomes the new draft and rewrites the YAML.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gradio as gr

from workbench.recipe import GATE_MODES
from workbench.ui import design_logic, form, shared

DTYPE_CHOICES = [("from the base model", ""), ("bfloat16", "bfloat16"), ("float16", "float16"),
                 ("float32", "float32"), ("float64", "float64")]
GATE_INFO = "how router rows come from the prompts; fitted routes best (Preview: Compare gate modes)"
TEMPLATE_INFO = "chat: rendered as a chat sends a user's message"
SHARED_HELP = ("**Shared expert** (optional): always on, beside the routed experts. Qwen2-MoE (output "
               "family) gates it by its prompts; DeepSeek-MoE runs it ungated, without prompts; Mixtral has "
               "none.")
MODEL_HELP = "a Hub id (org/name[@revision]), a local folder, or demo:smollm2-135m-instruct"


@dataclass
class DesignOutputs:
    """Components outside the form that form handlers update."""

    draft: gr.State
    revision: gr.State
    yaml: gr.Code
    yaml_problems: gr.HTML
    summary: gr.HTML
    timer: gr.Timer  # ticks while a Hub config is being fetched (tab_design checks again)


def render_form(out: DesignOutputs, demo: gr.Blocks) -> None:
    """Attach the re-rendering form to the current Blocks context."""

    # One render at a time: two running at once (page load + a first edit) race on the event table.
    @gr.render(inputs=[out.draft, out.revision], triggers=[out.revision.change, demo.load],
               show_progress="hidden", concurrency_limit=1)
    def _form(draft: dict[str, Any], revision: int) -> None:
        data = draft["data"]
        experts = data.get("experts") or []
        always_on = data.get("shared_experts") or []
        problems = [form.problem_from_dict(p) for p in draft["problems"]]
        html = form.slot_html(problems, len(experts), len(always_on))
        slots: dict[str, gr.HTML] = {}

        def slot(key: str) -> None:
            slots[key] = gr.HTML(html[key], elem_classes="wb-slot", **_kept(f"slot:{key}"))

        with gr.Group(elem_classes="wb-section"):
            base = gr.Textbox(data.get("base_model", ""), label="Base model", info="donates attention, "
                              "embeddings and the tokenizer; " + MODEL_HELP, elem_id="wb-base-model",
                              interactive=True, **_kept("base_model"))
        slot("base_model")
        with gr.Row(equal_height=True):
            mode = data.get("gate_mode", "hidden")
            # Plain mode names: "hidden (mergekit default)" did not fit the field.
            gate = gr.Dropdown([(m, m) for m in GATE_MODES], value=mode, scale=3,
                               label="Gate mode", info=GATE_INFO,
                               interactive=True, **_kept("gate_mode"))
            # No `minimum`: Gradio refuses a value under it before any handler runs, which left
            # 0 in the field, the YAML at 2 and every other edit dropped; validation says why.
            k = gr.Number(data.get("experts_per_token", 2), label="Experts per token", precision=0,
                          scale=1, info="top-k", interactive=True, **_kept("experts_per_token"))
            dtype = gr.Dropdown(DTYPE_CHOICES, value=data.get("dtype", ""), label="Output dtype", scale=1,
                                info="of the weights", interactive=True, **_kept("dtype"))
            family_value = data.get("architecture", "")
            family = gr.Dropdown(design_logic.family_choices(family_value), value=family_value,
                                 label="Output family", scale=1, info="with a shared expert: not Mixtral",
                                 interactive=True, **_kept("architecture"))
            template_value = data.get("prompt_template", "")
            template = gr.Dropdown(design_logic.template_choices(template_value), value=template_value,
                                   label="Prompts are", scale=1, info=TEMPLATE_INFO, interactive=True,
                                   elem_id="wb-prompt-template", **_kept("prompt_template"))
        slot("settings")
        top = [base, gate, dtype, k, family, template]  # form.TOP_KEYS order
        labels = design_logic.expert_labels(data)
        cards = [_card(i, expert, labels[i], slot) for i, expert in enumerate(experts)]
        slot("experts")
        add = gr.Button("+ Add expert", size="sm", elem_id="wb-add-expert", **_kept("add"))
        gr.Markdown(SHARED_HELP, elem_classes="wb-muted", **_kept("shared:help"))
        shared_cards = [_card(i, expert, "shared", slot, group="shared_experts")
                        for i, expert in enumerate(always_on)]
        slot("shared_experts")
        # Both families with a shared expert take one: the button goes once there is one.
        add_shared = gr.Button("+ Add shared expert", size="sm", elem_id="wb-add-shared",
                               visible=not always_on, **_kept("add-shared"))
        # Which draft the browser's form was drawn from, sent with every field event.
        drawn = gr.Number(revision, visible=False, **_kept("drawn"))
        _wire(out, top, cards, shared_cards, slots, (add, add_shared), drawn)


@dataclass
class _Card:
    fields: list[Any]  # source, positives, negatives, noise, residual
    buttons: dict[str, gr.Button]


def _card(i: int, expert: dict[str, Any], placeholder: str, slot: Callable[[str], None],
          group: str = "experts") -> _Card:
    """One expert's card: a routed expert's (`experts`), or the shared expert's (`shared_experts`),
    which is always on and so has nothing to reorder or duplicate."""
    source, positive, negative, noise, residual, name = form.expert_fields(expert)
    at = f"{group}[{i}]"
    routed = group == "experts"
    with gr.Column(elem_classes="wb-card", elem_id=f"wb-expert-{i}" if routed else f"wb-shared-{i}"):
        with gr.Row(elem_classes="wb-card-head"):
            title = f"### Expert {i + 1}" if routed else "### Shared expert"
            gr.Markdown(title, elem_classes="wb-card-title", **_kept(f"{at}:title"))
            moves = (("up", "↑", 40), ("down", "↓", 40), ("duplicate", "Duplicate", 96)) if routed else ()
            actions = (*moves, ("remove", "Remove", 84))
            buttons = {action: gr.Button(label, size="sm", min_width=width, scale=0, elem_classes="wb-icon",
                                         **_kept(f"{at}:{action}"))
                       for action, label, width in actions}
        slot(at)
        with gr.Row():
            fields = [gr.Textbox(source, label="Source model", interactive=True, scale=3,
                                 info="its MLPs become this expert; " + MODEL_HELP,
                                 **_kept(f"{at}.source"))]
            named = gr.Textbox(name, label="Name", interactive=True, scale=1, placeholder=placeholder,
                               info="in plots and the card; optional", **_kept(f"{at}.name"))
        slot(f"{at}.source_model")
        with gr.Row():
            with gr.Column():
                fields.append(gr.Textbox(positive, label="Positive prompts", lines=3, max_lines=12,
                                         interactive=True, info='one per line; "" is the empty prompt',
                                         **_kept(f"{at}.positive")))
                slot(f"{at}.positive_prompts")
            with gr.Column():
                fields.append(gr.Textbox(negative, label="Negative prompts", lines=3, max_lines=12,
                                         interactive=True, info="one per line; optional",
                                         **_kept(f"{at}.negative")))
                slot(f"{at}.negative_prompts")
        with gr.Row():
            # Text, not gr.Number: an unset scale must stay unset (a Number shows and returns 0).
            fields.append(gr.Textbox(_number(noise), label="Noise scale", placeholder="none",
                                     interactive=True, info="adds scale·N(0,1) to its MLPs",
                                     **_kept(f"{at}.noise")))
            fields.append(gr.Textbox(_number(residual), label="Residual scale", placeholder="none",
                                     interactive=True, info="multiplies its down projection",
                                     **_kept(f"{at}.residual")))
        fields.append(named)  # form.EXPERT_KEYS order: the name comes last
        slot(f"{at}.scales")
    return _Card(fields, buttons)


def _kept(key: str) -> dict[str, Any]:
    """A component that keeps its id across re-renders (its value still comes from the new
    draft). With its listeners keyed too, events the browser sends while a new form replaces
    the old still find their listener: fresh ids per render made them fail on the server
    (KeyError in gradio's get_fn) and show "Could not parse server response" toasts."""
    return {"key": key, "preserved_by_key": None}


def _number(value: float | None) -> str:
    return "" if value is None else repr(value)


def _wire(out: DesignOutputs, top: list[Any], cards: list[_Card], shared_cards: list[_Card],
          slots: dict[str, gr.HTML], adds: tuple[gr.Button, gr.Button], drawn: gr.Number) -> None:
    fields = top + [f for card in cards + shared_cards for f in card.fields]
    keys = form.slot_keys(len(cards), len(shared_cards))

    @shared.user_errors
    def edited(values: dict, oauth_token: gr.OAuthToken | None = None) -> dict:
        if values[drawn] != values[out.revision]:
            # A form the draft has moved past (a YAML edit re-renders it) reports the values it
            # was drawn with as it is replaced: not an edit, and never written into the YAML
            # the user may be typing in.
            return {component: gr.skip() for component in updates}
        checked = design_logic.from_form(values[out.draft], [values[c] for c in top],
                                         [[values[f] for f in card.fields] for card in cards],
                                         shared.user_token(oauth_token),
                                         [[values[f] for f in card.fields] for card in shared_cards])
        html = checked.slots()
        update = {out.draft: checked.draft, out.yaml_problems: checked.problems_html,
                  out.summary: checked.summary(), **{slots[key]: html[key] for key in keys}}
        # A new form reports its fields as changed too: the YAML is written only for a real
        # edit, and then only where it differs.
        if checked.data != values[out.draft]["data"]:
            update[out.yaml] = checked.yaml_in(values[out.yaml])
        if checked.pending:
            update[out.timer] = gr.Timer(active=True)
        return update

    updates = {out.draft, out.yaml, out.yaml_problems, out.summary, out.timer, *slots.values()}
    # `.change`, not `.input`: Gradio fires `input` on key presses only, so a deletion or a paste
    # would go unvalidated.
    for component in fields:
        component.change(edited, {out.draft, out.revision, drawn, out.yaml, *fields}, updates,
                         show_progress="hidden", trigger_mode="always_last", key=f"edited:{component.key}",
                         concurrency_limit=None)  # light, like the YAML's checks (tab_design)

    def structural(action: str, index: int) -> Callable[..., dict]:
        @shared.user_errors
        def change(current: dict, text: str, oauth_token: gr.OAuthToken | None = None) -> dict:
            checked = design_logic.restructure(current, action, index, shared.user_token(oauth_token))
            return {out.draft: checked.draft, out.revision: design_logic.next_revision(),
                    out.yaml: checked.yaml_in(text), out.yaml_problems: checked.problems_html,
                    out.summary: checked.summary(), out.timer: gr.Timer(active=checked.pending)}

        return change

    changed = {out.draft, out.revision, out.yaml, out.yaml_problems, out.summary, out.timer}
    for suffix, group in (("", cards), ("-shared", shared_cards)):
        for i, card in enumerate(group):
            for action, button in card.buttons.items():
                button.click(structural(action + suffix, i), [out.draft, out.yaml], changed,
                             show_progress="hidden", key=f"{action}{suffix}:{i}")
    for suffix, button in zip(("", "-shared"), adds, strict=True):
        button.click(structural("add" + suffix, -1), [out.draft, out.yaml], changed, show_progress="hidden",
                     key="add" + suffix)
