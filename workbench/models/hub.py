"""Hugging Face Hub access for model sources: list a repo, fetch single files, fetch a snapshot.

Every call goes through `_call`, which turns huggingface_hub's exceptions into
`SourceError`s that say what to do (no network, gated, not found, bad revision). The
original exception is not chained: HTTP errors carry the request, whose headers hold
the token. A token is only ever handed to huggingface_hub as its `token` argument;
without one we pass `token=False`, so that huggingface_hub never falls back to a token
it finds on the machine (on a Space that would be the owner's, not the visitor's).

Sources decide *what* to download (`workbench.models.sources`); this module only fetches.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from workbench.errors import HubUnreachable, SourceError

log = logging.getLogger(__name__)


TOKEN_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_API_TOKEN")


def env_token() -> str | None:
    """The local Hub token: HF_TOKEN only (never argv, never a file we write)."""
    return os.environ.get("HF_TOKEN") or None

T = TypeVar("T")
NO_NETWORK_HINT = "no network: use a local folder or the demo model (demo:smollm2-135m-instruct)"
# Never fetched, even if a caller's file list named them: pickles and code.
NEVER_DOWNLOAD = ["*.py", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle"]
_TOKEN_LIKE = re.compile(r"hf_[A-Za-z0-9]{6,}")


@dataclass(frozen=True)
class HubListing:
    sha: str  # the commit the revision resolved to; every later fetch is pinned to it
    sizes: dict[str, int | None]  # top-level and nested file names -> bytes (None when unknown)


def list_repo(name: str, revision: str | None, token: str | None) -> HubListing:
    """Resolve `revision` (None = default branch) to a commit and list that commit's files."""
    import huggingface_hub as hf

    api = hf.HfApi()
    info = _call("listing the files of", name, revision, token,
                 lambda: api.model_info(name, revision=revision, files_metadata=True, token=token or False))
    if not info.sha:
        raise SourceError(f"the Hub did not report a commit for {name}@{revision or 'main'}; "
                          "pin a commit sha with `@<sha>` and try again")
    sizes = {s.rfilename: getattr(s, "size", None) for s in (info.siblings or [])}
    return HubListing(sha=info.sha, sizes=sizes)


def fetch_file(name: str, filename: str, revision: str | None, token: str | None) -> Path:
    """Download one small file (config.json, an index) and return its local path."""
    import huggingface_hub as hf

    return Path(_call(f"downloading {filename} of", name, revision, token,
                      lambda: hf.hf_hub_download(name, filename, revision=revision, token=token or False)))


def fetch_snapshot(name: str, sha: str, files: list[str], token: str | None) -> Path:
    """Download exactly `files` of commit `sha` into the Hugging Face cache; return the folder."""
    import huggingface_hub as hf

    return Path(_call(f"downloading {len(files)} files of", name, sha, token,
                      lambda: hf.snapshot_download(name, revision=sha, allow_patterns=files,
                                                   ignore_patterns=NEVER_DOWNLOAD, token=token or False)))


def scrub(text: str, token: str | None) -> str:
    """`text` with the token, and anything shaped like a Hub token, masked."""
    if token:
        text = text.replace(token, "***")
    return _TOKEN_LIKE.sub("hf_***", text)


# ---- reachability: offline is found out once, then answered at once --------------------------
#
# Offline, huggingface_hub retries each request five times over about 24 s; a recipe naming
# three Hub models kept validation (and, through the queue, other users) waiting for over a
# minute. So the first call makes a 3-second TCP connection to the Hub's endpoint; if that
# fails, or a real call fails for want of a network, every call in the next minute fails at
# once with HubUnreachable.

PROBE_SECONDS = 3.0
RECHECK_SECONDS = 60.0
_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


class _Reachability:
    def __init__(self) -> None:
        self.lock = threading.Lock()  # one probe at a time; the others wait for its answer
        self.known: bool | None = None
        self.until = 0.0

    def check(self, doing: str, name: str) -> None:
        """Return if the Hub is (or may be) reachable; raise HubUnreachable at once if not."""
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:  # huggingface_hub answers from its cache, without the network
            return
        with self.lock:
            if self.known is None or time.monotonic() >= self.until:
                self.set(_probe(constants.ENDPOINT))
            reachable = self.known
        if not reachable:
            raise HubUnreachable(f"cannot reach the Hugging Face Hub while {doing} {name}: {NO_NETWORK_HINT}")

    def set(self, reachable: bool) -> None:
        self.known, self.until = reachable, time.monotonic() + RECHECK_SECONDS


reachability = _Reachability()


def _probe(endpoint: str) -> bool:
    """Whether a TCP connection to the Hub's endpoint opens within PROBE_SECONDS (DNS included)."""
    if any(os.environ.get(v) for v in _PROXY_VARIABLES):
        return True  # only the proxy can tell; a failing call marks the Hub unreachable instead
    url = urllib.parse.urlsplit(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    answer: list[bool] = []

    def connect() -> None:  # in a thread: name resolution has no timeout of its own
        try:
            socket.create_connection((url.hostname, port), timeout=PROBE_SECONDS).close()
            answer.append(True)
        except OSError:
            answer.append(False)

    worker = threading.Thread(target=connect, name="hub-probe", daemon=True)
    worker.start()
    worker.join(PROBE_SECONDS)
    reachable = bool(answer and answer[0])
    if not reachable:
        log.info("the Hugging Face Hub (%s) is not reachable; Hub models are not checked for %.0f s",
                 url.hostname, RECHECK_SECONDS)
    return reachable


def _call(doing: str, name: str, revision: str | None, token: str | None, fn: Callable[[], T]) -> T:
    reachability.check(doing, name)
    try:
        return fn()
    except Exception as exc:  # translated below; anything we cannot explain re-raises as it is
        error = _translate(exc, doing, name, revision, token)
        if error is None:
            raise
        if isinstance(error, HubUnreachable):
            with reachability.lock:
                reachability.set(False)
        log.debug("hub call failed while %s %s: %s: %s", doing, name, type(exc).__name__,
                  scrub(str(exc), token))
    # Raised outside the except block so the Hub exception (and its request headers) is not
    # attached as __context__.
    raise error


def _translate(exc: Exception, doing: str, name: str, revision: str | None,
               token: str | None) -> SourceError | None:
    from huggingface_hub import errors as hf_errors

    if isinstance(exc, hf_errors.GatedRepoError):
        return SourceError(
            f"{name} is a gated model and {'this token has' if token else 'you have'} no access to it: "
            f"open https://huggingface.co/{name}, accept its licence, then sign in (on a Space) "
            "or set HF_TOKEN to a token of that account")
    if isinstance(exc, hf_errors.RepositoryNotFoundError):
        who = "the token given cannot see it" if token else "no token was given"
        return SourceError(
            f"no model {name} on the Hugging Face Hub, or it is private and {who}: check the id's "
            "spelling; for a private model sign in or set HF_TOKEN")
    if isinstance(exc, hf_errors.RevisionNotFoundError):
        return SourceError(f"revision {revision!r} does not exist in {name}: use a branch, tag or "
                           f"commit sha of that repo, or leave out '@{revision}'")
    if isinstance(exc, hf_errors.DisabledRepoError):
        return SourceError(f"{name} has been disabled on the Hub: choose another model")
    if isinstance(exc, network_errors()):
        offline = " (HF_HUB_OFFLINE is set)" if isinstance(exc, hf_errors.OfflineModeIsEnabled) else ""
        return HubUnreachable(
            f"cannot reach the Hugging Face Hub{offline} while {doing} {name}: {NO_NETWORK_HINT}")
    if isinstance(exc, hf_errors.HfHubHTTPError):
        return _http_error(exc, doing, name, token)
    return None


def _http_error(exc: Any, doing: str, name: str, token: str | None) -> SourceError:
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status == 401:
        return SourceError(f"the Hub rejected the token while {doing} {name} (HTTP 401): sign in "
                           "again or set HF_TOKEN to a valid token")
    if status == 429:
        return SourceError(f"the Hub is rate-limiting requests (HTTP 429) while {doing} {name}: "
                           "wait a minute and try again")
    if status is not None and status >= 500:
        return SourceError(f"the Hub is having trouble (HTTP {status}) while {doing} {name}: try again later")
    detail = scrub(getattr(exc, "server_message", None) or "", token)
    return SourceError(f"the Hub answered HTTP {status} while {doing} {name}"
                       + (f" ({detail})" if detail else "") + ": check the model id and your access")


def network_errors() -> tuple[type[BaseException], ...]:
    from huggingface_hub.errors import LocalEntryNotFoundError

    classes: list[type[BaseException]] = [ConnectionError, TimeoutError, LocalEntryNotFoundError]
    # huggingface_hub 2.x talks through httpx2 (1.x through httpx); either's transport errors
    # (DNS failure, refused connection, timeout) mean the Hub is unreachable.
    for module in ("httpx2", "httpx"):
        try:
            classes.append(__import__(module).TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(classes)


def child_environment(token: str | None) -> dict[str, str]:
    """The server's environment with inherited Hub tokens replaced by the job's own (or none)."""
    env = {k: v for k, v in os.environ.items() if k not in TOKEN_VARIABLES}
    if token:
        env["HF_TOKEN"] = token
    else:
        # Without this, huggingface_hub would fall back to a token saved on disk by `hf auth login`.
        env["HF_HUB_DISABLE_IMPLICIT_TOKEN"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env
