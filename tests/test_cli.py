"""The CLI as a user runs it: exit codes, readable errors, JSON output, a real build."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from workbench.cli import ProgressBar, main
from workbench.progress import Progress

ROOT = Path(__file__).parent.parent


def write_recipe(tmp_path: Path, base: Path, experts: list[Path], **extra) -> Path:
    prompts = [["def f(x): return x"], ["Solve 2x + 3 = 7"], ["Once upon a time"], ["Hello there!"]]
    lines = [f"base_model: {base}"] + [f"{k}: {v}" for k, v in extra.items()] + ["experts:"]
    for i, expert in enumerate(experts):
        lines += [f"  - source_model: {expert}", f"    positive_prompts: {json.dumps(prompts[i % 4])}"]
    path = tmp_path / "recipe.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_validate_preset_ok_with_warnings(capsys):
    assert main(["validate", str(ROOT / "presets/demo.yaml")]) == 0
    out, err = capsys.readouterr()
    assert "ok:" in out and "same model" in err


def test_validate_json_lists_problems_and_exits_1(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base_model: demo:smollm2-135m-instruct\ngate_mode: hiden\n"
                   "experts:\n  - source_model: x\n")
    assert main(["validate", str(bad), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False
    paths = {p["path"] for p in report["problems"] if p["level"] == "error"}
    assert "gate_mode" in paths


def test_hub_presets_validate_offline_with_warning(capsys):
    # No network here: hub configs are "not reachable" warnings, never a crash.
    assert main(["validate", str(ROOT / "presets/cognito-2x7b.yaml"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert any("not reachable" in p["message"] and p["level"] == "warning" for p in report["problems"])


def test_incompatible_expert_is_an_error(tmp_path, pico_factory, capsys):
    base = pico_factory("llama")
    wide = pico_factory("wide", hidden=128)
    recipe = write_recipe(tmp_path, base, [base, wide])
    assert main(["validate", str(recipe)]) == 1
    assert "hidden_size is 128" in capsys.readouterr().err


def test_missing_recipe_file_is_one_line(tmp_path, capsys):
    assert main(["build", str(tmp_path / "nope.yaml"), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "cannot read" in err and "Traceback" not in err


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "workbench", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_build_end_to_end_in_a_subprocess(tmp_path, pico_factory):
    base = pico_factory("llama")
    recipe = write_recipe(tmp_path, base, [base, base, base, base], dtype="float32")
    out = tmp_path / "moe"
    done = run_cli("build", str(recipe), str(out), "--device", "cpu", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "built" in done.stdout and "4 experts" in done.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["num_local_experts"] == 4 and config["model_type"] == "mixtral"

    again = run_cli("build", str(recipe), str(out), "--device", "cpu", cwd=tmp_path)
    assert again.returncode == 1 and "--force" in again.stderr and "Traceback" not in again.stderr
    forced = run_cli("build", str(recipe), str(out), "--device", "cpu", "--force", cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr


def test_force_never_deletes_a_folder_that_is_not_a_build(tmp_path, pico_factory, capsys, monkeypatch):
    """`build ... userdir --force` (or `.`) once deleted the user's files to make room."""
    base = pico_factory("llama")
    recipe = write_recipe(tmp_path, base, [base, base], gate_mode="random")
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "notes.txt").write_text("mine")
    monkeypatch.chdir(project)
    for out in (str(project), "."):
        assert main(["build", str(recipe), out, "--device", "cpu", "--force"]) == 1
        err = capsys.readouterr().err
        assert "not an earlier workbench build" in err and "notes.txt" in err and "Traceback" not in err
    assert sorted(p.name for p in project.iterdir()) == ["notes.txt", "src"]
    assert (project / "notes.txt").read_text() == "mine"


def test_an_empty_out_is_refused_not_taken_for_the_current_folder(tmp_path, pico_factory, capsys,
                                                                  monkeypatch):
    base = pico_factory("llama")
    recipe = write_recipe(tmp_path, base, [base, base], gate_mode="random")
    monkeypatch.chdir(tmp_path)
    assert main(["build", str(recipe), "", "--device", "cpu", "--force"]) == 1
    assert "OUT is empty" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]


def test_a_config_that_build_would_refuse_fails_validate_first(tmp_path, pico_factory, capsys):
    """`num_hidden_layers: -3` passed validate and crashed build with an AttributeError."""
    base = shutil.copytree(pico_factory("llama"), tmp_path / "base")
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "num_hidden_layers": -3}))
    recipe = write_recipe(tmp_path, base, [base, base])
    assert main(["validate", str(recipe)]) == 1
    err = capsys.readouterr().err
    assert "base_model" in err and "num_hidden_layers is -3" in err and "Traceback" not in err
    assert main(["build", str(recipe), str(tmp_path / "out"), "--device", "cpu"]) == 1
    assert "num_hidden_layers is -3" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_gates_json(tmp_path, pico_factory, capsys):
    base = pico_factory("llama")
    recipe = write_recipe(tmp_path, base, [base, base])
    assert main(["gates", str(recipe), "--device", "cpu", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["mode"] == "hidden" and report["shape"][1] == 2
    assert len(report["condition_numbers"]) == report["shape"][0]
    assert report["score"]["chance_top1"] == 0.5 and report["score"]["top1"] is None  # one prompt each


def themed_recipe(tmp_path: Path, base: Path, mode: str = "hidden") -> Path:
    sets = [["def f(x): return x", "import os", "for i in range(3): pass"],
            ["Solve 2x + 3 = 7", "What is 17% of 240?", "Prove that 2 is prime"],
            ["Once upon a time", "The dragon slept", "A poem about the sea"]]
    lines = [f"base_model: {base}", f"gate_mode: {mode}", "experts:"]
    for prompts in sets:
        lines += [f"  - source_model: {base}", f"    positive_prompts: {json.dumps(prompts)}"]
    path = tmp_path / "themed.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_gates_compare_scores_every_mode_and_names_the_best(tmp_path, pico_factory, capsys):
    recipe = themed_recipe(tmp_path, pico_factory("llama"))
    assert main(["gates", str(recipe), "--device", "cpu", "--compare", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    labels = [row["label"] for row in report["compare"]]
    assert labels[-1] == "random" and {"hidden", "hidden centred", "fitted", "router_input"} <= set(labels)
    assert len(labels) == 10
    first = report["compare"][0]
    assert report["best"] == {"gate_mode": first["mode"], "center_gates": first["center_gates"]}
    assert all(row["score"]["chance_top1"] == pytest.approx(1 / 3) and row["seconds"] >= 0
               for row in report["compare"])
    assert report["recipe_mode"] == {"gate_mode": "hidden", "center_gates": False}
    assert main(["gates", str(recipe), "--device", "cpu", "--compare"]) == 0
    table = capsys.readouterr().out
    assert "hidden centred" in table and "<- recipe" in table and "chance: top-1 0.333" in table


@pytest.mark.parametrize("size", ["lots", "-1GB"])
def test_bad_shard_size_is_a_clear_error(tmp_path, pico_factory, capsys, size):
    base = pico_factory("llama")
    recipe = write_recipe(tmp_path, base, [base, base])
    assert main(["build", str(recipe), str(tmp_path / "o"), f"--shard-size={size}"]) == 1
    assert "shard" in capsys.readouterr().err.lower()


@pytest.mark.parametrize("command", ["build", "gates", "preview"])
def test_a_negative_seed_is_refused_before_anything_runs(capsys, command):
    args = {"build": ["r.yaml", "out"], "gates": ["r.yaml"], "preview": ["r.yaml", "--text", "hi"]}[command]
    with pytest.raises(SystemExit) as exit_:
        main([command, *args, "--seed", "-1"])
    assert exit_.value.code == 2
    assert "argument --seed: '-1' is not a whole number from 0 to 2**63 - 1" in capsys.readouterr().err


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_line_during_the_progress_bar_gets_a_line_of_its_own():
    screen = Terminal()
    handler = logging.StreamHandler(screen)
    logging.getLogger().addHandler(handler)
    try:
        with ProgressBar(screen) as bar:
            bar(Progress("write", 0.5, "model.embed_tokens.weight"))
            logging.getLogger("workbench.build").warning("every expert is the same model")
            bar(Progress("write", 1.0, "lm_head.weight"))
    finally:
        logging.getLogger().removeHandler(handler)
    lines = screen.getvalue().split("\n")
    assert "every expert is the same model" in lines  # not glued to the end of the bar's line
    assert "lm_head.weight" in lines[lines.index("every expert is the same model") + 1]
    assert not handler.filters  # the bar's filter comes off with the bar


def test_off_a_terminal_a_long_stage_still_says_how_it_goes(monkeypatch):
    """A forge printed "[forge] loading" and then nothing for minutes until "[write]"."""
    clock = iter(range(0, 1000, 4))  # a training step every 4 s
    monkeypatch.setattr("workbench.cli.commands.time.monotonic", lambda: next(clock))
    log = io.StringIO()  # a pipe or a file: no bar to redraw
    with ProgressBar(log) as bar:
        bar(Progress("forge", 0.0, "loading demo:smollm2-135m-instruct"))
        for step in range(1, 21):
            bar(Progress("forge", step / 20, f"step {step}/20, loss 2.0"))
        bar(Progress("write", 0.0, "writing hero-expert"))
    lines = log.getvalue().splitlines()
    assert lines[0] == "[forge] loading demo:smollm2-135m-instruct"
    assert lines[-1] == "[write] writing hero-expert"
    assert lines[1:-1] == [f"[forge] step {n}/20, loss 2.0" for n in (3, 6, 9, 12, 15, 18)]  # every 12 s


def test_gates_refuse_a_lora_on_the_base_instead_of_ignoring_it(tmp_path, pico_llama, capsys):
    from tests.test_lora import write_adapter

    adapter = write_adapter(tmp_path / "lora", pico_llama, modules=("up_proj",))
    recipe = write_recipe(tmp_path, f"{pico_llama}+{adapter}", [pico_llama, pico_llama])
    assert main(["validate", str(recipe)]) == 1
    assert "applies a LoRA to the base" in capsys.readouterr().err
    assert main(["gates", str(recipe)]) == 1
    assert "merge it into the base first" in capsys.readouterr().err
