"""CLI commands that look inside models: `preview`, `trace` and `chat` (`add_commands` registers them).

    python -m workbench preview RECIPE (--text T | --texts-file FILE) [--json]
    python -m workbench trace MODEL --text T [--json] [--html FILE] [INTERVENTION]
    python -m workbench chat MODEL [--base BASE] --prompt P [--seed N] [--max-new-tokens N] [--json]
        [INTERVENTION]
    INTERVENTION (on MODEL's routers, for this run only; nothing is written):
        [--force-expert E[@A-B]]... [--ban-expert E]... [--ablate-expert E]... [--router-top-k K]
        [--router-temperature T] [--gates-from RECIPE]

With `--json`, one JSON object is printed to stdout; these keys are stable:

    trace object (key "trace" below; T tokens, L layers, E experts, k experts per token):
      source        "model" (a built MoE's routers) | "preview" (recipe gates on the base, no build)
      model         reference of the model that was run
      layers, experts, k              L, E, k
      expert_names  [E] each expert's source model
      tokens        [T] token strings as decoded one by one;  token_ids [T]
      is_prefill    [T] true for prompt tokens, false for generated ones
      probs         [T][L][E] router probabilities over all experts
      topk_ids      [T][L][k] chosen experts, best first
      topk_weights  [T][L][k] their weights, renormalised to sum to 1
      intervention  (only in a trace routed under one) the intervention object below
    intervention object: {"force": [{"expert": E, "layers": [A, B] | null (every layer)}],
                          "ban": [E], "ablate": [E], "top_k": K | null (the model's),
                          "temperature": T, "routers": "saved" | where the swapped routers came from}
    summary object: {"load": {"prefill", "decode", "overall": [L][E] share of top-k choices,
                      "prefill_tokens", "decode_tokens"},
                     "entropy": {"prefill", "decode", "overall": [L] routing entropy / log E,
                                 null where there are no tokens}}

    preview: {"command": "preview", "recipe", "base_model", "gate_mode", "center_gates", "experts_per_token",
              "trace" (with --texts-file instead "traces": [trace, ...], one per text, in order),
              "summary" (over every text),
              "score": held-out routing score object (below; null when some expert has no prompts),
              "advice": [str] what the score means, in words,
              "gates": {"condition_numbers": [L] (null = singular), "cosine": [L][E][E],
                        "mean_cosine": [E][E], "warnings": [str]}}
    score object (the recipe's gates scored on prompts they were not made from):
              {"mode", "center_gates", "experts": E, "k", "held_out": what was held out, in words,
               "top1", "topk": hit rates, mean over scored experts and layers (null: nothing scored),
               "chance_top1": 1/E, "chance_topk": k/E, "perfect": 1,
               "top1_per_layer", "topk_per_layer": [L], "per_expert_top1", "per_expert_topk": [E]
               (null: nothing of that expert held out), "matrix": [E][E] row i: share of expert i's
               held-out tokens routed first to each expert, "tokens": [E] held-out tokens scored}
    trace:   {"command": "trace", "model", "intervention": object | null, "trace", "summary"}
             (with --gates-from also "routers_notes": [str], what a build would change besides)
    chat:    {"command": "chat", "prompt": rendered prompt text, "settings": {temperature, top_p, top_k,
              max_new_tokens, repetition_penalty, seed},
              "replies": [{"role": "model" | "base", "model", "text", "token_ids",
                           "stats": {prompt_tokens, new_tokens, time_to_first_token_s, tokens_per_s,
                                     total_s, finish_reason: "stop" | "length" | "cancelled"}}],
              with --trace also "trace" (the model's prompt + reply) and, with --base, "divergence":
              {"kl": [R] nats, "top_expert": [R], "tokens": [R], "expert_names": [E]},
              "intervention": object | null (the model's; the base is never steered)}

Errors print one line to stderr and exit 1, as for every command.
"""

from __future__ import annotations

import argparse
import json
import string
import sys
from typing import Any

from workbench.cli.steer import add_intervention_args, intervention_from
from workbench.models import env_token

DEVICES = ["auto", "cpu", "cuda"]
MAX_WARNINGS = 3  # per-layer gate warnings printed before the rest are summed up
_GLYPHS = string.digits + string.ascii_lowercase + string.ascii_uppercase  # expert id -> one character


def seed(text: str) -> int:
    """argparse type of --seed: numpy's and torch's generators both take 0 to 2**63 - 1."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number from 0 to 2**63 - 1")
    return value


def add_commands(subparsers: Any) -> None:
    """Register `preview`, `trace` and `chat` on the CLI's subparsers."""
    cmd = subparsers.add_parser("preview", help="route a text with a recipe's gates over its base, no build")
    cmd.add_argument("recipe", help="recipe YAML file")
    texts = cmd.add_mutually_exclusive_group(required=True)
    texts.add_argument("--text", help="text to route")
    texts.add_argument("--texts-file", metavar="FILE",
                       help='many texts: JSON lines {"text": ...} or plain lines, one text each')
    cmd.add_argument("--device", default="auto", choices=DEVICES)
    cmd.add_argument("--seed", type=seed, default=0, help="seed for random gate modes")
    cmd.add_argument("--json", action="store_true", help="print the routing as JSON")
    cmd.set_defaults(run=cmd_preview)

    cmd = subparsers.add_parser("trace", help="route a text through a built MoE and show each layer's choice")
    cmd.add_argument("model", help="built MoE: folder, hub id or demo:NAME")
    cmd.add_argument("--text", required=True, help="text to route")
    cmd.add_argument("--device", default="auto", choices=DEVICES)
    cmd.add_argument("--json", action="store_true", help="print the trace as JSON")
    cmd.add_argument("--html", metavar="FILE", help="also write the token-by-layer heatmap to FILE (HTML)")
    add_intervention_args(cmd, top_k_alias=True)
    cmd.set_defaults(run=cmd_trace)

    cmd = subparsers.add_parser("chat", help="one reply from MODEL (and from BASE to compare), with stats")
    cmd.add_argument("model", help="model to chat with: folder, hub id or demo:NAME")
    cmd.add_argument("--base", help="a second model answering the same prompt, e.g. the MoE's base")
    cmd.add_argument("--prompt", required=True, help="the user message")
    cmd.add_argument("--system", help="optional system message")
    cmd.add_argument("--seed", type=seed, default=0)
    cmd.add_argument("--max-new-tokens", type=int, default=128)
    cmd.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    cmd.add_argument("--top-p", type=float, default=0.95)
    cmd.add_argument("--top-k", type=int, default=50, help="sampling's top-k, 0 = off (the router's: "
                     "--router-top-k)")
    cmd.add_argument("--repetition-penalty", type=float, default=1.0)
    cmd.add_argument("--device", default="auto", choices=DEVICES)
    cmd.add_argument("--trace", action="store_true", help="also trace the model's routing (a MoE only)")
    cmd.add_argument("--json", action="store_true", help="print replies and stats as JSON")
    add_intervention_args(cmd, top_k_alias=False)
    cmd.set_defaults(run=cmd_chat)


def _emit(data: dict[str, Any]) -> None:
    print(json.dumps(data, ensure_ascii=False))


def _print_grid(trace: Any) -> None:
    """One line per token: its top expert at each layer as a character (0-9, a-z, A-Z)."""
    print(f"top expert per layer (columns: layers 0-{trace.layers - 1}); experts:")
    for e, name in enumerate(trace.expert_names):
        print(f"  {_GLYPHS[e] if e < len(_GLYPHS) else '?'} = {name}")
    top = trace.topk_ids[:, :, 0].tolist()
    for t, token in enumerate(trace.tokens):
        glyphs = "".join(_GLYPHS[e] if e < len(_GLYPHS) else "?" for e in top[t])
        mark = " " if bool(trace.is_prefill[t]) else "+"
        print(f"{t:5d}{mark}{json.dumps(token, ensure_ascii=False)[:18]:<18} {glyphs}")


def _print_summary(summary: dict[str, Any], names: list[str]) -> None:
    load = summary["load"]["overall"]
    layers = len(load)
    print("expert load (share of top-k choices, mean over layers):")
    for e, name in enumerate(names):
        share = sum(row[e] for row in load) / max(layers, 1)
        print(f"  e{e} {share:6.1%}  {name}")
    entropy = [v for v in summary["entropy"]["overall"] if v is not None]
    if entropy:
        print(f"routing entropy (0 decided .. 1 uniform): mean {sum(entropy) / len(entropy):.3f}")


def cmd_preview(args: argparse.Namespace) -> int:
    from workbench.chat import registry
    from workbench.gates import compute_gates, explain, score_recipe
    from workbench.recipe import read_recipe
    from workbench.routing import RouterTrace, preview_routing, routing_summary

    texts = [args.text] if args.texts_file is None else read_texts(args.texts_file)
    recipe, problems = read_recipe(args.recipe)
    for problem in problems:
        print(problem, file=sys.stderr)
    base = registry().get(recipe.base_model, device=args.device, token=env_token())
    gates = compute_gates(recipe, base.path, device=args.device, seed=args.seed, model=base.model,
                          tokenizer=base.tokenizer)
    names = recipe.expert_labels()
    k = recipe.experts_per_token
    traces = [preview_routing(gates, base, text, k, expert_names=names, chat=recipe.chats) for text in texts]
    summary = routing_summary(RouterTrace.joined(traces))
    prompted = all(e.positive_prompts for e in recipe.experts)  # random modes may have none
    score = score_recipe(recipe, base.path, gates, model=base.model, tokenizer=base.tokenizer,
                         seed=args.seed) if prompted else None
    words = explain(score, gates.diagnostics, names) if score else []
    if args.json:
        routed = {"trace": traces[0].to_dict()} if args.texts_file is None else \
            {"traces": [t.to_dict() for t in traces]}
        _emit({"command": "preview", "recipe": args.recipe, "base_model": recipe.base_model,
               "gate_mode": gates.mode, "center_gates": bool(recipe.center_gates),
               "experts_per_token": recipe.experts_per_token, **routed, "summary": summary,
               "score": score.to_dict() if score else None, "advice": words,
               "gates": gates.diagnostics.to_dict()})
        return 0
    exactness = ("exact at every layer: every expert is a copy of the base" if recipe.experts_copy_the_base()
                 else "layer 0 is exact, later layers assume the experts behave like the base")
    print(f"preview of {args.recipe} (gate_mode {gates.mode}, top-{recipe.experts_per_token}); {exactness}")
    for i, trace in enumerate(traces):
        if len(traces) > 1:
            print(f"== text {i + 1} of {len(traces)}")
        _print_grid(trace)
    _print_summary(summary, names)
    if score is not None:
        print_score(score, names)
    for line in words:
        print(f"note: {line}")
    print_gate_warnings(gates.diagnostics.warnings)
    return 0


MAX_TEXTS = 1000
MAX_TEXTS_BYTES = 16 * 2**20


def read_texts(path: str) -> list[str]:
    """--texts-file: JSON lines {"text": ...} or plain lines (blank lines skipped), in order."""
    from workbench.errors import WorkbenchError

    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_TEXTS_BYTES + 1)
    except OSError as exc:
        raise WorkbenchError(f"--texts-file: cannot read {path}: {exc.strerror or exc}") from exc
    if len(raw) > MAX_TEXTS_BYTES:
        raise WorkbenchError(f"--texts-file: {path} is over {MAX_TEXTS_BYTES // 2**20} MB; split it")
    try:
        lines = raw.decode("utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise WorkbenchError(f"--texts-file: {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8") \
            from exc
    texts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise WorkbenchError(f"--texts-file: line {number} starts like JSON but is not ({exc.msg}); "
                                     'write {"text": "..."} or the plain text') from exc
            if not isinstance(item, dict) or not isinstance(item.get("text"), str):
                raise WorkbenchError(f'--texts-file: line {number} has no string "text" key; '
                                     'write {"text": "..."}')
            line = item["text"]
        texts.append(line)
    if not texts:
        raise WorkbenchError(f"--texts-file: {path} holds no text; write one text per line")
    if len(texts) > MAX_TEXTS:
        raise WorkbenchError(f"--texts-file: {len(texts)} texts; the limit is {MAX_TEXTS}: split the file")
    return texts


def print_score(score: Any, names: list[str]) -> None:
    """The held-out score: top-1 and top-k next to chance, and each expert's own hit rate."""
    if score.top1 is None:
        print("held-out routing: nothing to hold out (every expert has one positive prompt)")
        return
    print(f"held-out routing ({score.held_out}): {score.rates()}; perfect 1")
    for e, name in enumerate(names):
        rate = score.per_expert_top1[e]
        print(f"  e{e} {'   -  ' if rate is None else f'{rate:6.1%}'}  {name}")


def print_gate_warnings(warnings: list[str]) -> None:
    """The gates' per-layer warnings on stderr, the first few in full (the UI shows the same)."""
    for warning in warnings[:MAX_WARNINGS]:
        print(f"warning: {warning}", file=sys.stderr)
    if len(warnings) > MAX_WARNINGS:
        more = len(warnings) - MAX_WARNINGS
        print(f"warning: ... and {more} more layers like these (`gates --json` lists them all)",
              file=sys.stderr)


def cmd_trace(args: argparse.Namespace) -> int:
    from workbench.chat import registry
    from workbench.routing import routing_summary, trace_text

    entry = registry().get(args.model, device=args.device, token=env_token())
    intervention, notes = intervention_from(args, entry)
    trace = trace_text(entry, args.text, intervention=intervention)
    summary = routing_summary(trace)
    if args.html:
        from workbench.routing import routing_heatmap

        routing_heatmap(trace).write_html(args.html, include_plotlyjs=True, full_html=True)
    if args.json:
        extra = {"routers_notes": notes} if args.gates_from else {}
        _emit({"command": "trace", "model": args.model,
               "intervention": intervention.to_dict() if intervention else None, "trace": trace.to_dict(),
               "summary": summary, **extra})
        return 0
    if intervention is not None:
        print(f"under: {intervention.describe(trace.expert_names)}")
    _print_grid(trace)
    _print_summary(summary, trace.expert_names)
    if args.html:
        print(f"heatmap written to {args.html}")
    return 0


def _messages(args: argparse.Namespace) -> list[dict[str, str]]:
    system = [{"role": "system", "content": args.system}] if args.system else []
    return system + [{"role": "user", "content": args.prompt}]


def _stats_line(stats: Any) -> str:
    return (f"[{stats.new_tokens} tokens, first token {stats.time_to_first_token_s:.2f} s, "
            f"{stats.tokens_per_s:.1f} tokens/s, {stats.finish_reason}]")


def cmd_chat(args: argparse.Namespace) -> int:
    from workbench.chat import SamplingSettings, chat_streams, registry

    settings = SamplingSettings(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                max_new_tokens=args.max_new_tokens,
                                repetition_penalty=args.repetition_penalty, seed=args.seed)
    settings.check()
    entries = [registry().get(args.model, device=args.device, token=env_token())]
    if args.base:
        entries.append(registry().get(args.base, device=args.device, token=env_token()))
    intervention, notes = intervention_from(args, entries[0])
    streams = chat_streams(entries[0], _messages(args), settings, base=entries[1] if args.base else None,
                           trace=args.trace, intervention=intervention)
    for i, (entry, stream) in enumerate(zip(entries, streams, strict=True)):
        if args.json:
            "".join(stream)  # run the reply to its end; the JSON below carries its text
            continue
        under = f" (under: {intervention.describe(entry.expert_names)})" if i == 0 and intervention else ""
        print(f"== {'model' if i == 0 else 'base'}: {entry.ref}{under}")
        for delta in stream:
            print(delta, end="", flush=True)
        print(f"\n{_stats_line(stream.result.stats)}")
    replies = [stream.result for stream in streams]
    if args.json:
        out = _chat_json(settings, streams[0].prompt.text, entries, replies, intervention)
        _emit(out | ({"routers_notes": notes} if args.gates_from else {}))
    elif replies[0].trace is not None:  # --trace: what the routers did over prompt and reply
        from workbench.routing import routing_summary

        print(f"== routing of the model's reply ({replies[0].trace.num_tokens} tokens)")
        _print_summary(routing_summary(replies[0].trace), replies[0].trace.expert_names)
    return 0


def _chat_json(settings: Any, prompt: str, entries: list[Any], replies: list[Any],
               intervention: Any = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "command": "chat", "prompt": prompt, "settings": settings.to_dict(),
        "intervention": intervention.to_dict() if intervention is not None else None,
        "replies": [{"role": "model" if i == 0 else "base", "model": r.model, "text": r.text,
                     "token_ids": r.token_ids, "stats": r.stats.to_dict()} for i, r in enumerate(replies)],
    }
    trace = replies[0].trace
    if trace is not None:
        out["trace"] = trace.to_dict()
        vocabs = {e.model.config.vocab_size for e in entries}
        same_vocab = len(entries) > 1 and len(vocabs) == 1
        if same_vocab and replies[0].token_ids:
            from workbench.chat import reply_logits
            from workbench.routing import divergence

            prompt_ids = trace.token_ids[: int(trace.is_prefill.sum())]
            logits = [reply_logits(e, prompt_ids, replies[0].token_ids, intervention=intervention if i == 0
                                   else None) for i, e in enumerate(entries)]
            out["divergence"] = divergence(trace, logits[0], logits[1]).to_dict()
    return out
