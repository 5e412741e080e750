"""Model sources: reference parsing, local folders, trust checks, and the Hub (faked, never reached)."""

from __future__ import annotations

import json
import logging
import shutil
import traceback
from pathlib import Path
from types import SimpleNamespace

import httpx2
import huggingface_hub
import pytest
from huggingface_hub import errors as hf_errors

from workbench.errors import SourceError
from workbench.models import parse_ref, read_configs, resolve
from workbench.models.sources import ModelRef, read_config
from workbench.recipe import ConfigUnavailable

SECRET = "hf_SECRETabcdefghijklmnop1234"
SHA = "0123456789abcdef0123456789abcdef01234567"


# ---------------------------------------------------------------- references

@pytest.mark.parametrize("ref, expected", [
    ("demo:smollm2-135m-instruct", ModelRef("demo", "smollm2-135m-instruct")),
    ("org/name", ModelRef("hub", "org/name", None)),
    ("  org/name  ", ModelRef("hub", "org/name", None)),
    ("mistralai/Mistral-7B-v0.1@main", ModelRef("hub", "mistralai/Mistral-7B-v0.1", "main")),
    (f"org/name@{SHA}", ModelRef("hub", "org/name", SHA)),
    ("org/name@refs/pr/3", ModelRef("hub", "org/name", "refs/pr/3")),
])
def test_parse_good_refs(ref, expected):
    assert parse_ref(ref) == expected


@pytest.mark.parametrize("ref", ["", "   ", "org/name@", "org//name", "a b/c", "org/na..me",
                                 "org--x/name", "org/name/extra", "justaname", "org/näme"])
def test_parse_bad_refs(ref):
    with pytest.raises(SourceError, match="not a folder|empty model reference"):
        parse_ref(ref)


def test_unknown_demo_name_lists_the_available_ones():
    with pytest.raises(SourceError, match="demo:smollm2-135m-instruct"):
        parse_ref("demo:llama-70b")


def test_existing_folder_and_explicit_paths_are_local(tmp_path, monkeypatch):
    assert parse_ref(str(tmp_path)) == ModelRef("local", str(tmp_path))
    assert parse_ref("./not-there").kind == "local"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert parse_ref("org/name").kind == "local"  # a folder that exists wins locally...
    # ...but never on a public Space, where it must mean the Hub repo.
    assert parse_ref("org/name", allow_local=False) == ModelRef("hub", "org/name", None)


# ---------------------------------------------------------------- local folders

def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_local_folder_resolves(pico_llama):
    source = resolve(str(pico_llama))
    assert source.path == pico_llama.resolve()
    assert source.revision is None
    assert source.config["hidden_size"] == 64 and source.config["model_type"] == "llama"
    assert read_config(str(pico_llama)) == source.config


def test_sharded_local_folder_resolves(tmp_path, pico_llama):
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(pico_llama).save_pretrained(folder, max_shard_size="100KB")
    assert (folder / "model.safetensors.index.json").exists()
    assert resolve(str(folder)).config["num_hidden_layers"] == 3


def test_missing_shard_is_named(tmp_path, pico_llama):
    folder = _copy_model(pico_llama, tmp_path / "m")
    (folder / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                            "b": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "model-00001-of-00002.safetensors").write_bytes(b"")
    with pytest.raises(SourceError, match="model-00002-of-00002.safetensors"):
        resolve(str(folder))


def test_index_pointing_outside_the_folder_is_refused(tmp_path, pico_llama):
    folder = _copy_model(pico_llama, tmp_path / "m")
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "../../etc/passwd.safetensors"}}))
    (folder / "x.safetensors").write_bytes(b"")
    with pytest.raises(SourceError, match="not plain file names"):
        resolve(str(folder))


def test_pickle_only_folder_is_refused(tmp_path, pico_llama):
    folder = _copy_model(pico_llama, tmp_path / "m")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(SourceError, match="pickle") as info:
        resolve(str(folder))
    assert "arbitrary code" in str(info.value) and "safetensors" in str(info.value)


def test_folder_without_config_or_weights(tmp_path, pico_llama):
    with pytest.raises(SourceError, match="no model folder"):
        resolve(str(tmp_path / "missing"))
    with pytest.raises(SourceError, match="config.json is missing"):
        resolve(str(tmp_path))
    folder = _copy_model(pico_llama, tmp_path / "m")
    (folder / "model.safetensors").unlink()
    with pytest.raises(SourceError, match="no weights"):
        resolve(str(folder))


def test_auto_map_is_refused_before_weights_are_looked_at(tmp_path, pico_llama):
    folder = _copy_model(pico_llama, tmp_path / "m")
    _edit_config(folder, auto_map={"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})
    (folder / "model.safetensors").unlink()  # the trust error must come first
    with pytest.raises(SourceError, match="auto_map.*trust_remote_code"):
        resolve(str(folder))


def test_unknown_model_type_is_refused(tmp_path, pico_llama):
    folder = _copy_model(pico_llama, tmp_path / "m")
    _edit_config(folder, model_type="evilnet")
    with pytest.raises(SourceError, match="'evilnet'"):
        read_config(str(folder))


def test_invalid_config_json_names_the_file(tmp_path, pico_llama):
    folder = _copy_model(pico_llama, tmp_path / "m")
    (folder / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(SourceError, match=r"config\.json is not valid JSON"):
        resolve(str(folder))


@pytest.mark.parametrize("key, value", [("hidden_size", "576x"), ("num_attention_heads", "9"),
                                        ("num_hidden_layers", -3), ("intermediate_size", 0),
                                        ("num_key_value_heads", 1.5), ("vocab_size", True)])
def test_config_facts_that_are_not_positive_whole_numbers_are_named(tmp_path, pico_llama, key, value):
    """A merge computes with these; a string or a negative count once crashed validate or build."""
    folder = _copy_model(pico_llama, tmp_path / "m")
    _edit_config(folder, **{key: value})
    with pytest.raises(SourceError, match=rf"config\.json: {key} is {value!r}; it must be a positive whole"):
        read_config(str(folder))


def test_deep_or_huge_config_json_is_a_message(tmp_path, pico_llama):
    folder = _copy_model(pico_llama, tmp_path / "m")
    (folder / "config.json").write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(SourceError, match="nested too deeply"):
        read_config(str(folder))
    (folder / "config.json").write_text('{"model_type": "llama", "pad": "' + "x" * (2 << 20) + '"}')
    with pytest.raises(SourceError, match="a config.json is a few KB"):
        read_config(str(folder))


def test_a_reference_with_a_nul_or_control_character_is_a_message(tmp_path):
    for ref in (f"{tmp_path}/a\0b", "org/na\nme"):
        with pytest.raises(SourceError, match="control character U\\+00(00|0A)"):
            parse_ref(ref)
    assert isinstance(read_configs([f"{tmp_path}/a\0b"])[f"{tmp_path}/a\0b"], ConfigUnavailable)


def test_local_paths_refused_on_a_public_space(pico_llama):
    with pytest.raises(SourceError, match="local model folders are not allowed"):
        resolve(str(pico_llama), allow_local=False)


def test_read_configs_reports_each_failure_without_stopping(tmp_path, pico_llama):
    result = read_configs([str(pico_llama), str(tmp_path / "nope"), str(pico_llama)])
    assert list(result) == [str(pico_llama), str(tmp_path / "nope")]
    assert result[str(pico_llama)]["hidden_size"] == 64
    bad = result[str(tmp_path / "nope")]
    assert isinstance(bad, ConfigUnavailable) and "no model folder" in bad.reason


# ---------------------------------------------------------------- the Hub (faked)

class FakeHub:
    """Stands in for huggingface_hub: repos are dicts of file name -> bytes; every call is recorded."""

    def __init__(self, root: Path):
        self.root = root
        self.repos: dict[str, dict[str, bytes]] = {}
        self.calls: list[tuple[str, dict]] = []
        self.fail: Exception | None = None

    def add(self, name: str, files: dict[str, bytes]) -> None:
        self.repos[name] = files

    def HfApi(self):  # noqa: N802 - mirrors huggingface_hub.HfApi
        return SimpleNamespace(model_info=self.model_info)

    def model_info(self, name, **kwargs):
        self.calls.append(("model_info", {"name": name, **kwargs}))
        if self.fail:
            raise self.fail
        files = self.repos[name]
        return SimpleNamespace(sha=SHA, siblings=[SimpleNamespace(rfilename=f, size=len(b))
                                                  for f, b in files.items()])

    def hf_hub_download(self, name, filename, **kwargs):
        self.calls.append(("hf_hub_download", {"name": name, "filename": filename, **kwargs}))
        if self.fail:
            raise self.fail
        path = self.root / "files" / name / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.repos[name][filename])
        return str(path)

    def snapshot_download(self, name, **kwargs):
        self.calls.append(("snapshot_download", {"name": name, **kwargs}))
        folder = self.root / "snapshots" / name / kwargs["revision"]
        folder.mkdir(parents=True, exist_ok=True)
        for filename in kwargs["allow_patterns"]:
            (folder / filename).write_bytes(self.repos[name][filename])
        return str(folder)

    def downloads(self) -> list[tuple[str, dict]]:
        return [c for c in self.calls if c[0] != "model_info"]


@pytest.fixture
def hub(tmp_path, monkeypatch) -> FakeHub:
    fake = FakeHub(tmp_path / "hub")
    # Anything not faked fails fast instead of reaching the network.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for name in ("HfApi", "hf_hub_download", "snapshot_download"):
        monkeypatch.setattr(huggingface_hub, name, getattr(fake, name))
    return fake


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_hub_model_is_pinned_to_the_commit_it_resolved(hub, pico_llama):
    hub.add("org/good", {**_files(pico_llama), "modeling_evil.py": b"import os", "pytorch_model.bin": b"x"})
    source = resolve("org/good@main", token=SECRET)
    assert source.revision == SHA
    assert (source.path / "model.safetensors").exists() and source.config["hidden_size"] == 64
    info = hub.calls[0][1]
    assert info["revision"] == "main" and info["token"] == SECRET
    downloads = hub.downloads()
    assert downloads and all(kw["revision"] == SHA for _, kw in downloads)  # never "main" again
    wanted = [kw for c, kw in downloads if c == "snapshot_download"][0]["allow_patterns"]
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= set(wanted)
    assert not [f for f in wanted if f.endswith((".py", ".bin"))]


def test_explicit_revision_overrides_the_ref(hub, pico_llama):
    hub.add("org/good", _files(pico_llama))
    resolve("org/good@main", revision=SHA)
    assert hub.calls[0][1]["revision"] == SHA


def test_no_token_means_no_token_at_all(hub, pico_llama):
    hub.add("org/good", _files(pico_llama))
    resolve("org/good")
    # False stops huggingface_hub from using a token it finds on the machine (the Space owner's).
    assert all(kw["token"] is False for _, kw in hub.calls)


def test_pickle_only_repo_is_refused_before_any_download(hub, pico_llama):
    files = _files(pico_llama)
    files["pytorch_model.bin"] = files.pop("model.safetensors")
    hub.add("org/pickled", files)
    with pytest.raises(SourceError, match="only pickle weights"):
        resolve("org/pickled")
    assert hub.downloads() == []


def test_auto_map_repo_is_refused_before_the_weights_download(hub, pico_llama):
    files = _files(pico_llama)
    cfg = json.loads(files["config.json"])
    files["config.json"] = json.dumps({**cfg, "auto_map": {"AutoConfig": "x.Y"}}).encode()
    hub.add("org/remote-code", files)
    with pytest.raises(SourceError, match="auto_map"):
        resolve("org/remote-code")
    assert [c for c, _ in hub.calls] == ["model_info", "hf_hub_download"]


def test_hub_index_with_missing_shard_is_refused_before_download(hub, pico_llama):
    files = _files(pico_llama)
    del files["model.safetensors"]
    files["model.safetensors.index.json"] = json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    ).encode()
    files["model-00001-of-00002.safetensors"] = b""
    hub.add("org/broken", files)
    with pytest.raises(SourceError, match="model-00002-of-00002"):
        resolve("org/broken")
    assert "snapshot_download" not in [c for c, _ in hub.calls]


def test_read_config_from_the_hub_downloads_only_config_json(hub, pico_llama):
    hub.add("org/good", {**_files(pico_llama)})
    assert read_config("org/good@v2")["hidden_size"] == 64
    assert [(c, kw["filename"], kw["revision"]) for c, kw in hub.calls] == [
        ("hf_hub_download", "config.json", "v2")]


def _http_error(cls, status: int, message: str):
    request = httpx2.Request("GET", "https://huggingface.co/api/models/org/x",
                             headers={"authorization": f"Bearer {SECRET}"})
    return cls(message, response=httpx2.Response(status, request=request))


@pytest.mark.parametrize("error, expected", [
    (_http_error(hf_errors.GatedRepoError, 403, f"gated, token {SECRET}"), "accept its licence.*HF_TOKEN"),
    (_http_error(hf_errors.RepositoryNotFoundError, 404, "not found"), "no model org/x on the Hugging Face"),
    (_http_error(hf_errors.RevisionNotFoundError, 404, "bad rev"), "revision 'nope' does not exist"),
    (_http_error(hf_errors.HfHubHTTPError, 503, "down"), "try again later"),
    (httpx2.ConnectError("[Errno -2] Name or service not known"), "no network: use a local folder"),
])
def test_hub_errors_say_what_to_do_and_never_leak_the_token(hub, caplog, error, expected):
    hub.fail = error
    with caplog.at_level(logging.DEBUG), pytest.raises(SourceError, match=expected) as info:
        resolve("org/x@nope", token=SECRET)
    shown = "".join(traceback.format_exception(info.value))
    assert SECRET not in shown and SECRET not in caplog.text
    assert info.value.__cause__ is None and info.value.__context__ is None


def test_offline_hub_with_the_real_client(caplog, monkeypatch):
    # huggingface_hub reads HF_HUB_OFFLINE once, at import (before conftest sets it): set the
    # constant itself, so the real client refuses before touching the network.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with caplog.at_level(logging.DEBUG), pytest.raises(SourceError) as info:
        resolve("org/model", token=SECRET)
    assert "no network: use a local folder or the demo model" in str(info.value)
    assert SECRET not in "".join(traceback.format_exception(info.value)) and SECRET not in caplog.text
    with pytest.raises(SourceError, match="no network"):
        read_config("org/model", token=SECRET)


@pytest.fixture
def online_mode(monkeypatch):
    """huggingface_hub as on a user's machine (tests run it offline), with a fresh reachability."""
    from workbench.models import hub as hub_source

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_source, "reachability", hub_source._Reachability())
    for name in _PROXIES:
        monkeypatch.delenv(name, raising=False)
    return hub_source


_PROXIES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def test_offline_is_found_once_and_answered_at_once(online_mode, monkeypatch):
    """Offline, huggingface_hub retried every request for ~24 s: three Hub ids kept validation
    (and every other session behind it) waiting for over a minute."""
    probes, downloads = [], []
    monkeypatch.setattr(online_mode, "_probe", lambda endpoint: probes.append(endpoint) or False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: downloads.append(a))
    found = read_configs(["org/a", "org/b", "mistralai/Mistral-7B-v0.1"])
    assert all(isinstance(v, ConfigUnavailable) and v.level == "warning" and "no network" in v.reason
               for v in found.values())
    assert len(probes) == 1 and downloads == []  # one probe; no request ever made
    with pytest.raises(SourceError, match="no network"):
        resolve("org/c")
    assert len(probes) == 1


def test_the_probe_is_a_short_tcp_connection_to_the_endpoint(online_mode):
    import socket

    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen()
    port = listening.getsockname()[1]
    assert online_mode._probe(f"http://127.0.0.1:{port}") is True
    listening.close()
    assert online_mode._probe(f"http://127.0.0.1:{port}") is False  # refused: nobody listens


def test_a_network_failure_mid_call_marks_the_hub_unreachable(online_mode, monkeypatch):
    calls = []

    def no_route(*args, **kwargs):
        calls.append(args)
        raise httpx2.ConnectError("[Errno 101] Network is unreachable")

    monkeypatch.setattr(online_mode, "_probe", lambda endpoint: True)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_route)
    found = read_configs(["org/a", "org/b"])
    assert all("no network" in v.reason for v in found.values()) and len(calls) == 1



def test_a_hub_lora_is_pinned_and_only_its_two_files_are_fetched(hub, pico_llama, tmp_path):
    from tests.test_lora import write_adapter

    hub.add("org/model", _files(pico_llama))
    hub.add("org/lora", {**_files(write_adapter(tmp_path / "a", pico_llama)), "README.md": b"card"})
    assert read_config("org/model+org/lora@main") == json.loads(_files(pico_llama)["config.json"])
    source = resolve("org/model+org/lora@main")
    assert source.adapter.revision == SHA and source.adapter.rank == 4 and source.revision == SHA
    lora = [(call, kw) for call, kw in hub.downloads() if kw["name"] == "org/lora"]
    assert all(kw["revision"] in ("main", SHA) for _, kw in lora)  # validation's look, then the commit
    snapshots = [kw for call, kw in lora if call == "snapshot_download"]
    assert [(kw["revision"], kw["allow_patterns"]) for kw in snapshots] == [
        (SHA, ["adapter_config.json", "adapter_model.safetensors"])]


def test_a_pickle_only_hub_lora_is_refused_before_any_of_it_downloads(hub, pico_llama, tmp_path):
    from tests.test_lora import write_adapter

    files = _files(write_adapter(tmp_path / "a", pico_llama))
    files["adapter_model.bin"] = files.pop("adapter_model.safetensors")
    hub.add("org/model", _files(pico_llama))
    hub.add("org/pickled-lora", files)
    with pytest.raises(SourceError, match="pickle runs arbitrary code"):
        resolve("org/model+org/pickled-lora")
    assert [kw for _, kw in hub.downloads() if kw["name"] == "org/pickled-lora"] == []
