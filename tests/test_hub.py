"""Push to the Hub against a fake HfApi: manifest files only, consent, one commit, retries, no token leaks."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import httpx2
import pytest
from huggingface_hub import CommitOperationAdd, CommitOperationDelete
from huggingface_hub.errors import HfHubHTTPError

from workbench.build import model_card, push
from workbench.build.upload import HubError, read_manifest

TOKEN = "hf_TestTokenThatMustNeverShow123"


def make_build(folder: Path) -> Path:
    folder.mkdir()
    files = {"model.safetensors": b"\0" * 64, "config.json": b"{}\n", "README.md": b"# card\n"}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    (folder / "stray.txt").write_text("not in the manifest")
    manifest = [{"path": n, "size": len(d), "sha256": hashlib.sha256(d).hexdigest()}
                for n, d in files.items()]
    (folder / "workbench_manifest.json").write_text(json.dumps({"files": manifest}))
    return folder


def http_error(status: int) -> HfHubHTTPError:
    response = httpx2.Response(status, request=httpx2.Request("POST", "https://huggingface.co/api/x",
                                                              headers={"authorization": f"Bearer {TOKEN}"}))
    return HfHubHTTPError(f"HTTP {status} for token {TOKEN}", response=response)


class FakeApi:
    """Records calls; stores committed files like the Hub (LFS sha256 for weights, git sha1 else)."""

    def __init__(self, exists=False, remote=(), fail=None):
        self.exists, self.remote, self.fail = exists, list(remote), list(fail or [])
        self.calls, self.files = [], {}

    def _maybe_fail(self, name):
        self.calls.append(name)
        if self.fail and self.fail[0][0] == name:
            raise http_error(self.fail.pop(0)[1])

    def repo_exists(self, repo_id, token):
        assert token == TOKEN
        self._maybe_fail("repo_exists")
        return self.exists

    def create_repo(self, repo_id, token, private, exist_ok):
        self._maybe_fail("create_repo")
        self.private = private

    def list_repo_files(self, repo_id, token):
        return [".gitattributes", *self.remote]

    def create_commit(self, repo_id, operations, commit_message, token):
        self._maybe_fail("create_commit")
        self.operations = operations
        for op in operations:
            if isinstance(op, CommitOperationAdd):
                self.files[op.path_in_repo] = Path(op.path_or_fileobj).read_bytes()
        return SimpleNamespace(oid="abc123")

    def get_paths_info(self, repo_id, paths, revision, token):
        out = []
        for path in paths:
            data = self.files[path]
            lfs = {"sha256": hashlib.sha256(data).hexdigest()} if path.endswith(".safetensors") else None
            blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
            out.append(SimpleNamespace(path=path, size=len(data), lfs=lfs, blob_id=blob))
        return out


def test_push_uploads_only_manifest_files_to_a_new_private_repo(tmp_path):
    build, api = make_build(tmp_path / "moe"), FakeApi()
    result = push(build, "me/moe", token=TOKEN, api=api, sleep=lambda s: None)
    assert api.private is True and result.created
    assert set(api.files) == {"model.safetensors", "config.json", "README.md"}
    assert result.commit == "abc123" and result.url == "https://huggingface.co/me/moe"
    assert api.calls.count("create_commit") == 1  # one commit: complete or unchanged


def test_existing_repo_needs_consent(tmp_path):
    build = make_build(tmp_path / "moe")
    api = FakeApi(exists=True, remote=["model-00001-of-00002.safetensors"])
    with pytest.raises(HubError, match="already exists"):
        push(build, "me/moe", token=TOKEN, api=api)
    assert "create_commit" not in api.calls
    push(build, "me/moe", token=TOKEN, api=api, overwrite=True)
    deleted = [op.path_in_repo for op in api.operations if isinstance(op, CommitOperationDelete)]
    assert deleted == ["model-00001-of-00002.safetensors"]  # stale shard of the old build goes


def test_busy_hub_is_retried_then_explained(tmp_path):
    build = make_build(tmp_path / "moe")
    api = FakeApi(fail=[("create_commit", 429), ("create_commit", 503)])
    waits = []
    push(build, "me/moe", token=TOKEN, api=api, sleep=waits.append)
    assert api.calls.count("create_commit") == 3 and len(waits) == 2
    api = FakeApi(fail=[("repo_exists", 503)] * 4)
    with pytest.raises(HubError, match="busy"):
        push(build, "me/other", token=TOKEN, api=api, sleep=lambda s: None)


def test_an_offline_push_says_no_network(tmp_path):
    """It said "Something went wrong (ConnectError)": httpx's errors are not OSErrors."""
    build = make_build(tmp_path / "moe")
    api = FakeApi()

    def offline(repo_id, token):
        raise httpx2.ConnectError("[Errno -3] Temporary failure in name resolution")

    api.repo_exists = offline
    with pytest.raises(HubError, match="no network: cannot reach the Hugging Face Hub.*build is intact"):
        push(build, "me/moe", token=TOKEN, api=api, sleep=lambda s: None)


@pytest.mark.parametrize("status, words", [(401, "rejected the token"), (403, "may not write to 'me'")])
def test_auth_errors_are_specific_and_never_show_the_token(tmp_path, caplog, status, words):
    build = make_build(tmp_path / "moe")
    caplog.set_level(logging.DEBUG)
    with pytest.raises(HubError, match=words) as info:
        push(build, "me/moe", token=TOKEN, api=FakeApi(fail=[("create_repo", status)]))
    assert TOKEN not in str(info.value) and info.value.__context__ is None
    assert TOKEN not in caplog.text


def test_refuses_without_token_bad_id_or_changed_files(tmp_path):
    build = make_build(tmp_path / "moe")
    with pytest.raises(HubError, match="sign in"):
        push(build, "me/moe", token="", api=FakeApi())
    with pytest.raises(HubError, match="not a repo id"):
        push(build, "../etc", token=TOKEN, api=FakeApi())
    (build / "config.json").write_bytes(b"[]\n")  # same size, other bytes
    api = FakeApi()
    with pytest.raises(HubError, match="changed since the build"):
        push(build, "me/moe", token=TOKEN, api=api)
    assert "create_commit" not in api.calls


def test_corrupted_upload_is_detected(tmp_path):
    build, api = make_build(tmp_path / "moe"), FakeApi()
    real_commit = api.create_commit

    def corrupting_commit(*args, **kwargs):
        info = real_commit(*args, **kwargs)
        api.files["model.safetensors"] = b"\1" * 64
        return info

    api.create_commit = corrupting_commit
    with pytest.raises(HubError, match="different checksum"):
        push(build, "me/moe", token=TOKEN, api=api)


def test_manifest_and_card(tmp_path):
    build = make_build(tmp_path / "moe")
    assert [f["path"] for f in read_manifest(build)] == ["model.safetensors", "config.json", "README.md"]
    assert model_card(build) == "# card\n"
    (build / "workbench_manifest.json").write_text(json.dumps({"files": [{"path": "../x", "size": 1}]}))
    with pytest.raises(HubError, match="not a plain file name"):
        read_manifest(build)
    with pytest.raises(HubError, match="build it first"):
        read_manifest(tmp_path)
