"""Crash-safe output folders on their own, without a model: naming, leftovers of dead
writers, manifest, permissions and the swap into place. The end-to-end promises (a failed or
killed build leaves nothing) are tested through `build` in test_build.py."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from workbench import staging
from workbench.errors import BuildError


@pytest.fixture(scope="module")
def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def folder_with(path: Path, **files: str) -> Path:
    path.mkdir()
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def output_with(path: Path, **files: str) -> Path:
    """A finished workbench output: the files and a manifest listing them."""
    path.mkdir()
    staging.write_manifest(path, [staging.write_text(path / name, text) for name, text in files.items()])
    return path


def names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def test_staging_names_are_hidden_siblings_that_carry_the_pid(tmp_path: Path) -> None:
    final = tmp_path / "moe"
    first, second = staging.staging_path(final), staging.staging_path(final)
    assert first.parent == tmp_path and first != second and not first.exists()
    assert first.name.startswith(f".moe.staging-{os.getpid()}-")
    made = staging.new_staging(final, 1000)
    assert stat.S_IMODE(made.stat().st_mode) == 0o755 and list(made.iterdir()) == []
    assert staging.staging_folders(final) == [made]


def test_clean_stale_removes_dead_writers_folders_and_restores_a_set_aside_output(
        tmp_path: Path, dead_pid: int) -> None:
    folder_with(tmp_path / f".a.staging-{dead_pid}-0badf00d", half="written")
    output_with(tmp_path / f".b.old-{dead_pid}-0badf00d", config="old")  # b itself is gone
    folder_with(tmp_path / "c", config="new")
    folder_with(tmp_path / f".c.old-{dead_pid}-0badf00d", config="old")  # c was swapped in
    live = folder_with(tmp_path / f".d.staging-{os.getpid()}-0badf00d")
    staging.clean_stale(tmp_path)
    assert names(tmp_path) == [live.name, "b", "c"]
    assert (tmp_path / "b" / "config").read_text() == "old"
    assert (tmp_path / "c" / "config").read_text() == "new"


def test_an_old_output_killed_half_deleted_is_discarded_not_restored(tmp_path: Path, dead_pid: int) -> None:
    """A --force rebuild killed while deleting the old output leaves part of it aside: putting
    that back under the final name would pass an incomplete model off as a finished one."""
    half = output_with(tmp_path / f".moe.old-{dead_pid}-0badf00d", config="old", shard="weights")
    (half / "shard").unlink()
    no_manifest = folder_with(tmp_path / f".other.old-{dead_pid}-0badf00d", config="old")
    staging.clean_stale(tmp_path)
    assert names(tmp_path) == []
    assert not half.exists() and not no_manifest.exists()


def test_manifest_lists_sizes_and_hashes_and_catches_changes(tmp_path: Path) -> None:
    folder = staging.new_staging(tmp_path / "out", 0)
    written = [staging.write_text(folder / "config.json", "{}\n"),
               staging.write_text(folder / "README.md", "# card\n")]
    staging.write_manifest(folder, written)
    manifest = json.loads((folder / staging.MANIFEST).read_text())
    assert {f["path"]: (f["size"], f["sha256"]) for f in manifest["files"]} == {
        "config.json": (3, hashlib.sha256(b"{}\n").hexdigest()),
        "README.md": (7, hashlib.sha256(b"# card\n").hexdigest())}
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in folder.iterdir())
    assert staging.check_manifest(folder) == {"config.json", "README.md"}
    (folder / "README.md").write_text("# longer card\n")
    with pytest.raises(BuildError, match="README.md is 14 bytes, the manifest says 7"):
        staging.check_manifest(folder)
    (folder / "stray.bin").write_bytes(b"x")
    with pytest.raises(BuildError, match="stray.bin"):
        staging.check_manifest(folder)


def test_make_durable_makes_files_world_readable(tmp_path: Path) -> None:
    folder = folder_with(tmp_path / "cache", weights="w")
    os.chmod(folder / "weights", 0o600)  # as transformers writes model.safetensors
    os.chmod(folder, 0o700)
    staging.make_durable(folder)
    assert stat.S_IMODE((folder / "weights").stat().st_mode) == 0o644
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755


def test_commit_replaces_only_with_force_and_leaves_nothing_beside(tmp_path: Path) -> None:
    final = output_with(tmp_path / "moe", config="old")
    new = folder_with(staging.staging_path(final), config="new")
    with pytest.raises(BuildError, match="appeared during the build; pass --force"):
        staging.commit(new, final, force=False)
    staging.commit(new, final, force=True)
    assert names(tmp_path) == ["moe"] and (final / "config").read_text() == "new"
    empty = tmp_path / "empty"
    empty.mkdir()
    staging.commit(folder_with(staging.staging_path(empty), config="x"), empty, force=False)
    assert names(tmp_path) == ["empty", "moe"]


def test_commit_never_replaces_a_folder_that_is_not_a_whole_output(tmp_path: Path) -> None:
    """A user's folder that appeared (or changed) during the build is not replaced, even forced."""
    mine = folder_with(tmp_path / "mine", **{"notes.txt": "x"})
    new = folder_with(staging.staging_path(mine), config="new")
    with pytest.raises(BuildError, match="is not an earlier workbench build .*notes.txt"):
        staging.commit(new, mine, force=True)
    assert names(mine) == ["notes.txt"] and new.is_dir()


def test_commit_puts_the_old_output_back_when_the_rename_fails(tmp_path: Path, monkeypatch) -> None:
    final = output_with(tmp_path / "moe", config="old")
    new = folder_with(staging.staging_path(final), config="new")
    real_rename = os.rename

    def refuse_the_new_one(src, dst) -> None:
        if Path(src) == new:
            raise OSError(28, "No space left on device")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", refuse_the_new_one)
    with pytest.raises(OSError, match="No space left"):
        staging.commit(new, final, force=True)
    assert (final / "config").read_text() == "old"
    assert names(tmp_path) == sorted([new.name, "moe"])  # the caller discards the staging folder


def test_check_final_refuses_what_commit_would_refuse(tmp_path: Path) -> None:
    staging.check_final(tmp_path / "absent", force=False)
    (tmp_path / "empty").mkdir()
    staging.check_final(tmp_path / "empty", force=False)
    full = output_with(tmp_path / "full", config="built")
    with pytest.raises(BuildError, match="exists; pass --force"):
        staging.check_final(full, force=False)
    staging.check_final(full, force=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(BuildError, match="not a folder"):
        staging.check_final(tmp_path / "file", force=True)


@pytest.mark.parametrize("extra", ["user file", "file missing", "no manifest", "bad manifest"])
def test_force_replaces_only_an_earlier_workbench_output(tmp_path: Path, extra: str) -> None:
    """--force once deleted any folder given as OUT, a project included."""
    folder = output_with(tmp_path / "out", config="built", shard="weights")
    if extra == "user file":
        (folder / "notes.txt").write_text("mine")
    elif extra == "file missing":
        (folder / "shard").unlink()
    elif extra == "no manifest":
        (folder / staging.MANIFEST).unlink()
    else:
        (folder / staging.MANIFEST).write_text("[1, 2")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(BuildError, match="not an earlier workbench build.*left untouched, even with --force"):
        staging.check_final(folder, force=True)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_check_final_names_what_makes_a_path_impossible(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(BuildError, match="file is a file, so .* cannot be made under it"):
        staging.check_final(tmp_path / "file" / "deeper" / "moe", force=False)
    with pytest.raises(BuildError, match="name is 240 bytes; keep it under 200"):
        staging.check_final(tmp_path / ("m" * 240), force=False)
    with pytest.raises(BuildError, match="names no folder"):
        staging.check_final(Path("/"), force=False)
