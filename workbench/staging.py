"""Crash-safe output folders: written beside the final name, made durable, then renamed into place.

Nothing is ever written under the final name, so a crash, a cancel or a kill -9 leaves
either the old folder or the new one, never half of one (docs/reliability.md, "Crash-safe
outputs"). A writer goes through these steps:

    clean_stale(parent)                  # dead writers' leftovers; a whole output a dead swap set aside
    check_final(final, force)            # refuse early a name that cannot be made, a replace without
                                         # force, or of anything but an earlier (whole) output
    folder = new_staging(final, needed)  # free space checked, an empty 0755 folder beside `final`
    try:
        write_text / copy_file / hash_file   # each file 0644, sized and hashed (WrittenFile)
        write_manifest(folder, written)      # fsyncs shards, manifest and folder
        check_manifest(folder)               # the folder holds exactly what the manifest lists
        commit(folder, final, force)         # rename; a forced replace keeps the old until then
    except BaseException:
        discard(folder)
        raise

A writer whose files are written by someone else (transformers' save_pretrained) and who
serialises writers with a lock uses the smaller set: `staging_path` (the name only, not
created), `make_durable`, `rename_into_place`, and `staging_folders` to clear leftovers.

Folders are named `.NAME.staging-PID-HEX` and `.NAME.old-PID-HEX`: hidden, on the same file
system as the final name (so the rename is atomic), and carrying the writer's pid so that a
later writer can tell a dead writer's folder from a live one's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

from workbench.errors import BuildError

log = logging.getLogger(__name__)

MANIFEST = "workbench_manifest.json"
MANIFEST_FORMAT = "moe-workbench-manifest/1"
# Staging folders and set-aside outputs end in -PID-RANDOM; a GGUF export's file being written in -PID.
_STALE = re.compile(r"^\.(?P<name>.+)\."
                    r"(?:(?P<kind>staging|old)-(?P<pid>\d+)-[0-9a-f]+|partial-(?P<file_pid>\d+))$")


@dataclass(frozen=True)
class WrittenFile:
    """One file of an output as its manifest records it."""

    path: Path
    size: int
    sha256: str


def staging_path(final: Path) -> Path:
    """A fresh name beside `final` for this process's staging folder; not created."""
    return final.parent / f".{final.name}.staging-{os.getpid()}-{secrets.token_hex(4)}"


def staging_folders(final: Path) -> list[Path]:
    """Every staging folder of `final`, live or dead: only a caller holding a lock that every
    writer holds until its rename may take them all for dead."""
    return sorted(final.parent.glob(f".{final.name}.staging-*"))


def check_free_space(folder: Path, needed: int, what: str = "the MoE") -> None:
    """Refuse, with the numbers, when `needed` bytes (and a margin) are not free in `folder`."""
    free = shutil.disk_usage(folder).free
    margin = max(64 * 2**20, needed // 100)
    if needed + margin > free:
        raise BuildError(f"{what} needs {needed / 1e9:.2f} GB (+{margin / 1e9:.2f} GB margin) in "
                         f"{folder} but only {free / 1e9:.2f} GB are free; free space or choose "
                         "another output folder")


def new_staging(final: Path, needed: int, what: str = "the MoE") -> Path:
    """Create an empty staging folder for `final` after checking `needed` bytes are free."""
    check_free_space(final.parent, needed, what)
    folder = staging_path(final)
    folder.mkdir(mode=0o755)
    os.chmod(folder, 0o755)  # whatever the umask: outputs are world-readable
    return folder


def discard(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def clean_stale(parent: Path) -> None:
    """Remove staging folders and partial GGUF files of dead writers; put back an old output a
    dead swap left aside, if it is still whole (a writer killed while deleting it leaves only
    part of it)."""
    for entry in parent.iterdir():
        match = _STALE.match(entry.name)
        if match and match["file_pid"] and entry.is_file() and not _pid_alive(int(match["file_pid"])):
            log.info("removing stale %s", entry)
            entry.unlink(missing_ok=True)
            continue
        if not match or not match["pid"] or not entry.is_dir() or _pid_alive(int(match["pid"])):
            continue
        final = parent / match["name"]
        if match["kind"] == "old" and not final.exists() and is_output(entry):
            log.warning("restoring %s, left aside by a build that died while swapping", final)
            os.rename(entry, final)
        else:
            log.info("removing stale %s", entry)
            discard(entry)


MAX_NAME_BYTES = 200  # file names are capped at 255 bytes; a staging name adds about 30


def check_final(final: Path, force: bool) -> None:
    """Refuse, before any work, a final name that cannot be made or that `commit` would refuse."""
    if not final.name:
        raise BuildError(f"the output {str(final)!r} names no folder; name one, e.g. out/my-moe")
    if len(final.name.encode("utf-8")) > MAX_NAME_BYTES:
        raise BuildError(f"the output folder's name is {len(final.name.encode('utf-8'))} bytes; keep it "
                         f"under {MAX_NAME_BYTES} (file names are capped at 255 bytes)")
    for above in final.parents:
        if above.exists() or above.is_symlink():
            if not above.is_dir():
                raise BuildError(f"{above} is a file, so {final} cannot be made under it; "
                                 "choose another output folder")
            break
    if final.is_symlink() or (final.exists() and not final.is_dir()):
        raise BuildError(f"{final} exists and is not a folder; choose another output name")
    if final.is_dir() and any(final.iterdir()):
        if not force:
            raise BuildError(f"{final} exists; pass --force to replace it (the old model stays until "
                             "the new one is verified)")
        _check_replaceable(final)


def is_output(folder: Path) -> bool:
    """Whether `folder` is a whole workbench output: a manifest listing exactly its files."""
    try:
        check_manifest(folder)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, BuildError):
        return False
    return True


def _check_replaceable(final: Path) -> None:
    """Only an earlier workbench output is ever replaced: never a folder of anything else."""
    if is_output(final):
        return
    found = sorted(p.name for p in final.iterdir())
    shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
    raise BuildError(f"{final} is not an earlier workbench build (it holds {shown} and no whole "
                     f"{MANIFEST}), so it is left untouched, even with --force; choose another "
                     "output folder, or empty this one yourself")


# ---- files: each one 0644, hashed, and durable once the manifest is ---------------------


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder's fsync makes its entries' names durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text(path: Path, text: str) -> WrittenFile:
    data = text.encode("utf-8")
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fchmod(f.fileno(), 0o644)
        os.fsync(f.fileno())
    return WrittenFile(path, len(data), hashlib.sha256(data).hexdigest())


def copy_file(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)
    os.chmod(dst, 0o644)


def hash_file(path: Path) -> WrittenFile:
    """Hash and fsync a small file written by someone else (tokenizer files)."""
    digest = hashlib.sha256()
    with open(path, "rb+") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
        os.fsync(f.fileno())
    return WrittenFile(path, path.stat().st_size, digest.hexdigest())


def make_durable(folder: Path) -> None:
    """chmod 0644 and fsync every file below `folder`, then chmod 0755 and fsync `folder`."""
    # transformers writes model.safetensors as 0600; a cache shared by a server and its users
    # must be world-readable.
    for path in folder.rglob("*"):
        if path.is_file():
            os.chmod(path, 0o644)
            fsync_path(path)
    os.chmod(folder, 0o755)
    fsync_path(folder)


def write_manifest(folder: Path, written: list[WrittenFile]) -> WrittenFile:
    """workbench_manifest.json: every other file with its size and sha256 (uploads send only these).

    Flushes the shards first (written unsynced, so one fsync per shard comes at the end),
    then the manifest and the folder: once the manifest is durable, so is everything it lists.
    """
    for shard in written:
        if shard.path.suffix == ".safetensors":
            fsync_path(shard.path)
    files = [{"path": w.path.name, "size": w.size, "sha256": w.sha256} for w in written]
    manifest = {"format": MANIFEST_FORMAT, "files": files,
                "total_size": sum(w.size for w in written)}
    done = write_text(folder / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    fsync_path(folder)
    return done


def check_manifest(folder: Path) -> set[str]:
    """The names the manifest lists, after checking the folder holds exactly them, at their sizes."""
    manifest = json.loads((folder / MANIFEST).read_text())
    if manifest.get("format") != MANIFEST_FORMAT:
        raise BuildError(f"{folder / MANIFEST} is not a {MANIFEST_FORMAT} manifest")
    listed = {f["path"]: f["size"] for f in manifest["files"]}
    present = {p.name for p in folder.iterdir()} - {MANIFEST}
    if present != set(listed):
        raise BuildError(f"staging folder {folder} holds {sorted(present ^ set(listed))} not in the manifest")
    for name, size in listed.items():
        if (folder / name).stat().st_size != size:
            raise BuildError(f"{name} is {(folder / name).stat().st_size} bytes, the manifest says {size}")
    return set(listed)


# ---- into place --------------------------------------------------------------------------


def rename_into_place(staging: Path, final: Path) -> None:
    """Rename `staging` to an absent or empty `final` and make the new name durable."""
    os.rename(staging, final)
    fsync_path(final.parent)


def commit(staging: Path, final: Path, force: bool) -> None:
    """Rename the verified staging folder to `final`; an old output is removed only after."""
    if final.is_dir() and any(final.iterdir()):
        if not force:
            raise BuildError(f"{final} appeared during the build; pass --force to replace it")
        _check_replaceable(final)  # again: it may have changed during the build
        aside = final.parent / f".{final.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
        os.rename(final, aside)
        try:
            os.rename(staging, final)
        except OSError:
            os.rename(aside, final)
            raise
        discard(aside)
    else:
        try:
            os.rename(staging, final)  # replaces an empty folder atomically
        except OSError as exc:
            raise BuildError(f"{final} appeared during the build ({exc}); "
                             "pass --force to replace it") from exc
    fsync_path(final.parent)
