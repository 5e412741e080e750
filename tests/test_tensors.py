"""Safetensors I/O: golden bytes against safetensors itself, lazy reads, corrupt files."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from workbench.build import writer as tensor_writer
from workbench.build.writer import write_safetensors
from workbench.errors import BuildError, SourceError
from workbench.models import TensorFileError, WeightIndex, dtype_code
from workbench.models.tensors import read_header

TENSORS = {
    "model.embed_tokens.weight": torch.randn(7, 5),
    "model.layers.0.mlp.gate_proj.weight": torch.randn(3, 5).to(torch.bfloat16),
    "model.norm.weight": torch.randn(5).to(torch.float16),
    "position_ids": torch.arange(6, dtype=torch.int64).reshape(2, 3),
    "scalar": torch.tensor(2.5),
    "empty": torch.zeros(0, 4),
}


def saved_order(path: Path) -> list[str]:
    """Tensor names in the order safetensors wrote their bytes."""
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    header = json.loads(path.read_bytes()[8:8 + n])
    header.pop("__metadata__")
    return sorted(header, key=lambda k: header[k]["data_offsets"])


def entries_of(order: list[str]) -> list[tuple[str, str, tuple[int, ...]]]:
    return [(k, dtype_code(TENSORS[k].dtype), tuple(TENSORS[k].shape)) for k in order]


@pytest.fixture()
def golden(tmp_path: Path) -> Path:
    path = tmp_path / "golden.safetensors"
    save_file(TENSORS, str(path), metadata={"format": "pt"})
    return path


def test_tensors_from_memory_match_safetensors_bytes(golden: Path, tmp_path: Path) -> None:
    order = saved_order(golden)
    out = tmp_path / "mine.safetensors"
    written = write_safetensors(out, entries_of(order), lambda name: TENSORS[name])
    assert out.read_bytes() == golden.read_bytes()
    assert written.size == out.stat().st_size
    assert written.sha256 == hashlib.sha256(out.read_bytes()).hexdigest()
    loaded = load_file(str(out))
    for name, value in TENSORS.items():
        assert torch.equal(loaded[name], value), name


def refuse_o_direct(monkeypatch) -> None:
    """A filesystem without O_DIRECT (tmpfs on older kernels, macOS): open refuses the flag."""
    real_open = os.open

    def open_without_direct(path, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(tensor_writer.os, "open", open_without_direct)


@pytest.fixture(params=["direct", "page cache"])
def output_mode(request, monkeypatch) -> str:
    if request.param == "page cache":
        refuse_o_direct(monkeypatch)
    return request.param


def test_passthrough_copies_are_byte_identical(golden: Path, tmp_path: Path, output_mode: str) -> None:
    infos = read_header(golden)
    order = saved_order(golden)
    out = tmp_path / "copied.safetensors"
    seen: list[tuple[str, int]] = []
    written = write_safetensors(out, entries_of(order), lambda name: infos[name],
                                after=lambda n, b: seen.append((n, b)))
    assert out.read_bytes() == golden.read_bytes()
    assert written.sha256 == hashlib.sha256(golden.read_bytes()).hexdigest()
    assert [n for n, _ in seen] == order
    with safe_open(str(out), framework="pt") as f:
        assert set(f.keys()) == set(TENSORS)


def test_tensors_straddling_many_buffers_are_written_in_order(tmp_path: Path, monkeypatch,
                                                              output_mode: str) -> None:
    # Three 4 KB blocks per buffer, tensors of odd sizes from a file and from memory, and a
    # last block that is not full (padded for O_DIRECT, then cut back to the real size).
    monkeypatch.setattr(tensor_writer, "CHUNK", 3 * tensor_writer.ALIGN)
    big = {f"t{i}": torch.randn(1000 + 37 * i) for i in range(9)}
    source = tmp_path / "source.safetensors"
    save_file(big, str(source), metadata={"format": "pt"})
    infos = read_header(source)
    order = saved_order(source)
    entries = [(k, "F32", tuple(big[k].shape)) for k in order]
    out = tmp_path / "out.safetensors"
    written = write_safetensors(out, entries, lambda n: infos[n] if int(n[1:]) % 2 else big[n])
    assert out.read_bytes() == source.read_bytes()
    assert written.size == source.stat().st_size
    assert written.sha256 == hashlib.sha256(source.read_bytes()).hexdigest()


def test_a_failed_disk_write_is_reported_and_stops_the_threads(golden: Path, tmp_path: Path,
                                                               monkeypatch) -> None:
    def disk_full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tensor_writer, "CHUNK", tensor_writer.ALIGN)
    monkeypatch.setattr(tensor_writer, "_pwrite_all", disk_full)
    big = {f"t{i}": torch.randn(2000) for i in range(8)}
    with pytest.raises(BuildError, match="No space left on device"):
        write_safetensors(tmp_path / "a.safetensors", [(k, "F32", (2000,)) for k in big], lambda n: big[n])
    assert not any(t.name in ("sha256", "writer") and t.is_alive() for t in threading.enumerate())


def test_written_files_are_world_readable(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        write_safetensors(tmp_path / "a.safetensors", [("x", "F32", (2,))], lambda n: torch.ones(2))
    finally:
        os.umask(old)
    assert (tmp_path / "a.safetensors").stat().st_mode & 0o777 == 0o644


def test_wrong_tensor_from_fill_names_it(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match=r"'w'.*\(2, 3\).*\(3, 2\)"):
        write_safetensors(tmp_path / "a.safetensors", [("w", "F32", (2, 3))], lambda n: torch.ones(3, 2))
    with pytest.raises(BuildError, match="BF16"):
        write_safetensors(tmp_path / "b.safetensors", [("w", "F32", (2,))],
                          lambda n: torch.ones(2, dtype=torch.bfloat16))


def test_read_header_gives_absolute_byte_ranges(golden: Path) -> None:
    infos = read_header(golden)
    data = golden.read_bytes()
    info = infos["model.layers.0.mlp.gate_proj.weight"]
    assert (info.dtype, info.shape, info.nbytes) == ("BF16", (3, 5), 30)
    raw = data[info.start:info.start + info.nbytes]
    assert raw == TENSORS[info.name].view(torch.uint8).numpy().tobytes()


def test_weight_index_reads_sharded_folders_one_tensor_at_a_time(tmp_path: Path) -> None:
    a = {"a.weight": torch.randn(4, 3), "b.weight": torch.randn(2)}
    b = {"c.weight": torch.randn(5).to(torch.bfloat16)}
    save_file(a, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file(b, str(tmp_path / "model-00002-of-00002.safetensors"))
    weight_map = {**{k: "model-00001-of-00002.safetensors" for k in a},
                  **{k: "model-00002-of-00002.safetensors" for k in b}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    index = WeightIndex(tmp_path)
    assert sorted(index.names) == ["a.weight", "b.weight", "c.weight"]
    for name, value in {**a, **b}.items():
        assert torch.equal(index.load(name), value)
    with pytest.raises(SourceError, match="nope"):
        index.info("nope")


def test_weight_index_refuses_shards_outside_the_folder(tmp_path: Path) -> None:
    index = {"weight_map": {"a": "../x.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(TensorFileError, match="plain file name"):
        WeightIndex(tmp_path)


def test_weight_index_needs_safetensors(tmp_path: Path) -> None:
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(SourceError, match="safetensors"):
        WeightIndex(tmp_path)


def _rewrite_header(path: Path, edit) -> None:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n:])


def test_huge_header_length_is_refused_naming_the_file(golden: Path) -> None:
    data = golden.read_bytes()
    golden.write_bytes(struct.pack("<Q", 2**40) + data[8:])
    with pytest.raises(TensorFileError, match=rf"{golden.name}.*header length"):
        read_header(golden)


def test_truncated_file_is_refused_naming_the_file(golden: Path) -> None:
    data = golden.read_bytes()
    golden.write_bytes(data[:-16])
    with pytest.raises(TensorFileError, match=rf"{golden.name}.*truncated"):
        read_header(golden)
    golden.write_bytes(data[:4])
    with pytest.raises(TensorFileError, match=golden.name):
        read_header(golden)


def test_shape_that_disagrees_with_the_byte_range_is_refused(golden: Path) -> None:
    def grow(header: dict) -> None:
        header["model.embed_tokens.weight"]["shape"] = [7, 6]

    _rewrite_header(golden, grow)
    with pytest.raises(TensorFileError, match=rf"{golden.name}.*model.embed_tokens.weight.*\(7, 6\)"):
        read_header(golden)


def test_overlapping_and_malformed_entries_are_refused(golden: Path) -> None:
    original = golden.read_bytes()

    def overlap(header: dict) -> None:
        header["model.norm.weight"]["data_offsets"] = [0, 10]

    _rewrite_header(golden, overlap)
    with pytest.raises(TensorFileError, match="overlap"):
        read_header(golden)
    golden.write_bytes(original)
    _rewrite_header(golden, lambda h: h["scalar"].update(dtype="Q9"))
    with pytest.raises(TensorFileError, match="unknown dtype"):
        read_header(golden)
    golden.write_bytes(struct.pack("<Q", 8) + b"{not js}" + original[8:])
    with pytest.raises(TensorFileError, match="not valid JSON"):
        read_header(golden)


