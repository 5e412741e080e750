"""Push a built MoE to the Hugging Face Hub: the manifest's files, in one checked commit.

The token always comes from the caller (the signed-in user on a Space, HF_TOKEN
locally); this module never looks one up, so huggingface_hub's own fallbacks (a saved
login, the server's HF_TOKEN) are never used, and it never logs or repeats it.
Promises (docs/reliability.md): only the files listed in `workbench_manifest.json`, checked
against their sha256 before upload; a new repo is private unless asked otherwise; an
existing repo is replaced only with `overwrite=True`; everything lands in a single commit,
so the remote is either complete or unchanged, and the commit is verified file by file
afterwards; HTTP 429/5xx are retried; other Hub errors become messages that say what to do.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from workbench.errors import WorkbenchError
from workbench.models import network_errors, scrub
from workbench.progress import Progress, ProgressFn, ignore_progress
from workbench.staging import MANIFEST

log = logging.getLogger(__name__)

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
RETRY_STATUS = (429, 500, 502, 503, 504)
KEEP_REMOTE = (".gitattributes",)
T = TypeVar("T")


class HubError(WorkbenchError):
    """A push could not start or finish; the local build is untouched."""


@dataclass(frozen=True)
class PushResult:
    repo_id: str
    url: str
    commit: str
    files: list[str]
    created: bool  # False when an existing repo was replaced


def read_manifest(folder: Path) -> list[dict[str, Any]]:
    """The build's file list [{path, size, sha256}], refusing anything outside the folder."""
    path = Path(folder) / MANIFEST
    try:
        files = json.loads(path.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise HubError(f"{path} is missing or unreadable ({type(exc).__name__}); only a finished "
                       "workbench build can be pushed: build it first") from exc
    for entry in files:
        name = entry.get("path", "") if isinstance(entry, dict) else ""
        if not name or "/" in name or "\\" in name or name.startswith("."):
            raise HubError(f"the manifest of {folder} lists {name!r}, which is not a plain file name; "
                           "rebuild the model")
    return files


def model_card(folder: Path) -> str:
    """The README.md the push will upload, for the user to read first."""
    card = Path(folder) / "README.md"
    return card.read_text(encoding="utf-8") if card.is_file() else ""


def check_local(folder: Path, files: list[dict[str, Any]], on_progress: ProgressFn = ignore_progress) -> None:
    """Every manifest file exists with its size and sha256: what is uploaded is what was built."""
    total = sum(int(f["size"]) for f in files) or 1
    done = 0
    for entry in files:
        path = Path(folder) / entry["path"]
        if not path.is_file() or path.stat().st_size != int(entry["size"]):
            raise HubError(f"{path} is missing or has changed size since the build; rebuild the model")
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while chunk := handle.read(8 << 20):
                digest.update(chunk)
                done += len(chunk)
                on_progress(Progress("check", done / total, entry["path"]))
        if digest.hexdigest() != entry["sha256"]:
            raise HubError(f"{path} changed since the build (sha256 differs); rebuild the model")


def push(folder: Path, repo_id: str, *, token: str, private: bool = True, overwrite: bool = False,
         on_progress: ProgressFn = ignore_progress, api: Any = None,
         sleep: Callable[[float], None] = time.sleep) -> PushResult:
    """Upload the build in `folder` to the model repo `repo_id`; see the module doc."""
    if not isinstance(token, str) or not token.strip():
        raise HubError("no Hugging Face token: sign in with the Hugging Face button (on a Space) or set "
                       "HF_TOKEN to a token with write access (locally)")
    if not REPO_ID.match(repo_id or ""):
        raise HubError(f"{repo_id!r} is not a repo id; write it as your-name/model-name")
    files = read_manifest(folder)
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    call = _Caller(token, repo_id, sleep)
    exists = call("checking", lambda: api.repo_exists(repo_id, token=token))
    if exists and not overwrite:
        raise HubError(f"{repo_id} already exists on the Hub; tick 'replace the existing repo' to "
                       "overwrite its files, or choose another name")
    check_local(folder, files, on_progress)
    if not exists:
        on_progress(Progress("push", 0.0, f"creating {'private' if private else 'public'} repo {repo_id}"))
        call("creating", lambda: api.create_repo(repo_id, token=token, private=private, exist_ok=False))
    operations = _operations(api, call, folder, files, exists)
    on_progress(Progress("push", 0.05, f"uploading {len(files)} files in one commit"))
    info = call("uploading to", lambda: api.create_commit(
        repo_id, operations, commit_message=f"Upload {Path(folder).name} (built with MoE Workbench)",
        token=token))
    commit = getattr(info, "oid", None) or ""
    on_progress(Progress("push", 0.95, "verifying the uploaded files"))
    _verify_remote(api, call, repo_id, commit, folder, files)
    on_progress(Progress("push", 1.0, f"pushed to https://huggingface.co/{repo_id}"))
    log.info("pushed %s to %s at %s", Path(folder).name, repo_id, commit)
    return PushResult(repo_id, f"https://huggingface.co/{repo_id}", commit, [f["path"] for f in files],
                      created=not exists)


def _operations(api: Any, call: _Caller, folder: Path, files: list[dict[str, Any]], exists: bool) -> list:
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    ops: list = [CommitOperationAdd(path_in_repo=f["path"], path_or_fileobj=str(Path(folder) / f["path"]))
                 for f in files]
    if exists:
        # A replaced repo must not keep files of the old build (e.g. its extra shards), which
        # would make the index and the shards disagree.
        remote = call("listing", lambda: api.list_repo_files(call.repo_id, token=call.token))
        keep = {f["path"] for f in files} | set(KEEP_REMOTE)
        ops += [CommitOperationDelete(path_in_repo=name) for name in remote if name not in keep]
    return ops


def _verify_remote(api: Any, call: _Caller, repo_id: str, commit: str, folder: Path,
                   files: list[dict[str, Any]]) -> None:
    names = [f["path"] for f in files]
    infos = call("verifying", lambda: api.get_paths_info(repo_id, names, revision=commit or None,
                                                         token=call.token))
    remote = {info.path: info for info in infos}
    for entry in files:
        info = remote.get(entry["path"])
        if info is None or int(getattr(info, "size", -1)) != int(entry["size"]):
            raise HubError(f"after the upload, {entry['path']} is missing or has the wrong size in "
                           f"{repo_id}; push again (the local build is intact)")
        lfs = getattr(info, "lfs", None)
        expected = entry["sha256"] if lfs is not None else _git_blob_sha1(Path(folder) / entry["path"])
        found = lfs["sha256"] if lfs is not None else info.blob_id  # BlobLfsInfo is also a dict
        if found != expected:
            raise HubError(f"after the upload, {entry['path']} in {repo_id} has a different checksum; "
                           "push again (the local build is intact)")


def _git_blob_sha1(path: Path) -> str:
    """Git's id of a small (non-LFS) file, which the Hub reports as blob_id."""
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class _Caller:
    """Runs one Hub call, retrying busy answers and turning failures into HubError."""

    def __init__(self, token: str, repo_id: str, sleep: Callable[[float], None], attempts: int = 4):
        self.token, self.repo_id, self.sleep, self.attempts = token, repo_id, sleep, attempts

    def __call__(self, doing: str, fn: Callable[[], T]) -> T:
        for attempt in range(self.attempts):
            error = None
            try:
                return fn()
            except Exception as exc:  # translated below; an error we cannot explain re-raises
                status = getattr(getattr(exc, "response", None), "status_code", None)
                if status not in RETRY_STATUS or attempt + 1 == self.attempts:
                    error = self._translate(exc, status, doing)
                    if error is None:
                        raise
            if error is not None:
                # Raised outside the except block: the Hub exception (and its request headers,
                # which carry the token) must not ride along as __context__.
                raise error
            log.info("Hub busy while %s %s; retrying", doing, self.repo_id)
            self.sleep(2.0 * 2**attempt)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _translate(self, exc: Exception, status: int | None, doing: str) -> HubError | None:
        where = f"while {doing} {self.repo_id}"
        if status == 401:
            return HubError(f"the Hub rejected the token {where} (HTTP 401): sign in again or set a "
                            "valid HF_TOKEN")
        if status == 403:
            owner = self.repo_id.split("/")[0]
            return HubError(f"this token may not write to '{owner}' (HTTP 403) {where}: use a token with "
                            "write access, or a namespace you belong to")
        if status in RETRY_STATUS:
            return HubError(f"the Hub is busy (HTTP {status}) {where}, even after retries; try again "
                            "later (the local build is intact)")
        if status is not None:
            detail = scrub(str(getattr(exc, "server_message", "") or ""), self.token)
            return HubError(f"the Hub answered HTTP {status} {where}" + (f": {detail}" if detail else ""))
        if isinstance(exc, (OSError, *network_errors())):
            return HubError(f"no network: cannot reach the Hugging Face Hub {where}; check the connection "
                            "and push again (the local build is intact)")
        return None
