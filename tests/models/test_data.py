"""Byte corpora: file discovery, splits, blocks, training order, offline use, errors."""

from __future__ import annotations

import socket
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from models_testing import write_corpus
from torch.utils.data import DataLoader

from models.data import (
    BlockStream,
    ByteCorpusDataModule,
    resolve_files,
    split_files,
    stdlib_source_files,
    text_file_problem,
    to_blocks,
)


def test_stdlib_files_exclude_test_suites_and_are_sorted():
    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_source_files()
    relative = [path.relative_to(root).as_posix() for path in files]
    assert relative == sorted(relative)
    assert "os.py" in relative and "json/decoder.py" in relative
    for path in relative:
        parts = path.split("/")[:-1]
        assert not {"test", "tests", "idle_test", "site-packages"} & set(parts), path
    # What the filter removed is really there (so the test above can fail).
    all_py = {p.relative_to(root).as_posix() for p in root.rglob("*.py")}
    assert any(p.startswith("test/") for p in all_py)


def test_stdlib_filter_on_a_fake_tree(tmp_path):
    for rel in (
        "a.py",
        "pkg/b.py",
        "test/t.py",
        "pkg/tests/t.py",
        "idlelib/idle_test/t.py",
        "site-packages/x/y.py",
        "lib2to3/tests/data/z.py",
        "notes.txt",
    ):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x = 1\n")
    got = [p.relative_to(tmp_path).as_posix() for p in stdlib_source_files(tmp_path)]
    assert got == ["a.py", "pkg/b.py"]


def test_resolve_files_globs_dedup_and_errors(tmp_path):
    paths = write_corpus(tmp_path / "c", num_files=3)
    (tmp_path / "c" / "sub").mkdir()
    nested = tmp_path / "c" / "sub" / "more.txt"
    nested.write_text("hello\n")
    got = resolve_files(
        [str(tmp_path / "c" / "*.txt"), str(paths[0]), str(tmp_path / "c" / "**" / "more.txt")]
    )
    assert got == sorted([p.resolve() for p in paths] + [nested.resolve()])
    with pytest.raises(ValueError, match="matches no file"):
        resolve_files([str(tmp_path / "missing" / "*.txt")])
    with pytest.raises(ValueError, match="data.files"):
        resolve_files([])


def test_split_files_is_deterministic_and_disjoint():
    files = [Path(f"f{i:02d}") for i in range(40)]
    train, val = split_files(files, 0.1)
    assert val == [files[i] for i in range(9, 40, 10)]
    assert set(train) | set(val) == set(files) and not set(train) & set(val)
    assert split_files(files, 0.1) == (train, val)


def test_to_blocks_matches_bytes():
    blocks = to_blocks(["héllo", "wörld!"], block_len=4)
    stream = "héllo\nwörld!".encode()
    expected = np.frombuffer(stream[: len(stream) // 4 * 4], dtype=np.uint8).reshape(-1, 4)
    np.testing.assert_array_equal(blocks, expected)


def _stream_batches(stream: BlockStream, num_batches: int, num_workers: int = 0):
    loader = DataLoader(stream, batch_size=stream.batch_size, num_workers=num_workers)
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == num_batches:
            break
    return batches


def test_block_stream_order_reference():
    blocks = torch.arange(10).unsqueeze(-1).repeat(1, 3)  # block i holds the value i
    stream = BlockStream(blocks, batch_size=4, seed=7)
    got = torch.cat([b[:, 0] for b in _stream_batches(stream, 6)])
    # Slow reference: concatenated per-epoch permutations.
    orders = [
        torch.randperm(10, generator=torch.Generator().manual_seed(7 * 1_000_003 + e))
        for e in range(3)
    ]
    assert torch.equal(got, torch.cat(orders)[:24])
    # Every epoch visits every block once.
    assert sorted(got[:10].tolist()) == list(range(10))


def test_block_stream_restart_resumes_the_same_sequence():
    blocks = torch.arange(13).unsqueeze(-1)
    full = _stream_batches(BlockStream(blocks, batch_size=3, seed=1), 9)
    resumed = _stream_batches(BlockStream(blocks, batch_size=3, seed=1, start_micro_batch=5), 4)
    for a, b in zip(full[5:], resumed, strict=True):
        assert torch.equal(a, b)
    other_seed = _stream_batches(BlockStream(blocks, batch_size=3, seed=2), 9)
    assert not all(torch.equal(a, b) for a, b in zip(full, other_seed, strict=False))


def test_block_stream_ranks_partition_the_global_batch():
    blocks = torch.arange(50).unsqueeze(-1)
    single = _stream_batches(BlockStream(blocks, batch_size=4, seed=3), 6)
    rank0 = _stream_batches(BlockStream(blocks, 2, 3, rank=0, world_size=2), 6)
    rank1 = _stream_batches(BlockStream(blocks, 2, 3, rank=1, world_size=2), 6)
    for whole, a, b in zip(single, rank0, rank1, strict=True):
        assert torch.equal(whole, torch.cat([a, b]))


@pytest.mark.slow
def test_block_stream_workers_keep_the_order():
    blocks = torch.arange(30).unsqueeze(-1)
    single = _stream_batches(BlockStream(blocks, batch_size=4, seed=5), 7)
    workers = _stream_batches(BlockStream(blocks, batch_size=4, seed=5), 7, num_workers=2)
    for a, b in zip(single, workers, strict=True):
        assert torch.equal(a, b)


def _datamodule(corpus_dir: Path, tmp_path: Path, **kwargs) -> ByteCorpusDataModule:
    kwargs = {"seq_len": 16, "batch_size": 4, "cache_dir": str(tmp_path / "hf"), **kwargs}
    return ByteCorpusDataModule(files=[str(corpus_dir / "*.txt")], **kwargs)


def _raw_blocks(files: list[Path], block_len: int) -> np.ndarray:
    return to_blocks([f.read_text() for f in files], block_len)


def test_datamodule_local_files_blocks_match_reference(corpus_dir, tmp_path):
    dm = _datamodule(corpus_dir, tmp_path, max_val_blocks=None)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.train_blocks_NL.dtype == torch.uint8 and dm.train_blocks_NL.shape[1] == 17
    # Batched map: documents are joined within each map batch (all of them here).
    np.testing.assert_array_equal(dm.train_blocks_NL.numpy(), _raw_blocks(dm.train_files, 17))
    np.testing.assert_array_equal(dm.val_blocks_NL.numpy(), _raw_blocks(dm.val_files, 17))
    assert dm.val_files and not set(dm.val_files) & set(dm.train_files)


def test_datamodule_is_cached_and_offline(corpus_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise AssertionError("network access while offline")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    dm = _datamodule(corpus_dir, tmp_path)
    dm.prepare_data()
    dm.setup("fit")
    cache_files = sorted((tmp_path / "hf").rglob("*.arrow"))
    assert cache_files
    again = _datamodule(corpus_dir, tmp_path)
    again.setup("fit")
    assert torch.equal(again.train_blocks_NL, dm.train_blocks_NL)
    assert sorted((tmp_path / "hf").rglob("*.arrow")) == cache_files  # nothing rebuilt


def test_datamodule_single_file_splits_its_tail(tmp_path):
    path = write_corpus(tmp_path / "one", num_files=1, lines_per_file=100)[0]
    dm = ByteCorpusDataModule(
        files=[str(path)],
        seq_len=16,
        val_fraction=0.1,
        max_val_blocks=None,
        cache_dir=str(tmp_path / "hf"),
    )
    dm.setup("fit")
    blocks = _raw_blocks([path], 17)
    num_val = int(np.ceil(0.1 * len(blocks)))
    np.testing.assert_array_equal(dm.val_blocks_NL.numpy(), blocks[-num_val:])
    np.testing.assert_array_equal(dm.train_blocks_NL.numpy(), blocks[:-num_val])


def test_datamodule_max_val_blocks_spreads_over_the_split(corpus_dir, tmp_path):
    full = _datamodule(corpus_dir, tmp_path, max_val_blocks=None)
    full.setup("fit")
    capped = _datamodule(corpus_dir, tmp_path, max_val_blocks=5)
    capped.setup("fit")
    n = len(full.val_blocks_NL)
    keep = torch.linspace(0, n - 1, 5).round().long()
    assert torch.equal(capped.val_blocks_NL, full.val_blocks_NL[keep])


def test_hub_loader_on_a_local_dataset_folder(tmp_path):
    # load_dataset(name) with a local folder runs the same code path as a hub name.
    folder = tmp_path / "hub_like"
    folder.mkdir()
    (folder / "train.jsonl").write_text(
        "".join(f'{{"content": "train document number {i} " }}\n' for i in range(30))
    )
    (folder / "validation.jsonl").write_text(
        "".join(f'{{"content": "validation text {i} "}}\n' for i in range(10))
    )
    dm = ByteCorpusDataModule(
        hub_dataset=str(folder),
        text_field="content",
        seq_len=8,
        max_val_blocks=None,
        cache_dir=str(tmp_path / "hf"),
    )
    dm.setup("fit")
    train_text = "\n".join(f"train document number {i} " for i in range(30))
    expected = to_blocks([train_text], 9)
    np.testing.assert_array_equal(dm.train_blocks_NL.numpy(), expected)
    assert bytes(dm.val_blocks_NL[0].tolist()).startswith(b"validati")


def test_hub_loader_errors_name_the_setting(tmp_path):
    folder = tmp_path / "hub_like"
    folder.mkdir()
    (folder / "train.jsonl").write_text('{"content": "abc"}\n')
    dm = ByteCorpusDataModule(
        hub_dataset=str(folder), text_field="text", cache_dir=str(tmp_path / "hf")
    )
    with pytest.raises(ValueError, match="data.text_field='text'"):
        dm.setup("fit")
    missing = ByteCorpusDataModule(
        hub_dataset=str(tmp_path / "nope"), cache_dir=str(tmp_path / "hf")
    )
    with pytest.raises(ValueError, match="data.hub_dataset="):
        missing.setup("fit")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"seq_len": 0}, "data.seq_len=0"),
        ({"batch_size": -1}, "data.batch_size=-1"),
        ({"val_fraction": 1.0}, "data.val_fraction=1.0"),
        ({"max_val_blocks": 0}, "data.max_val_blocks=0"),
    ],
)
def test_datamodule_bad_settings(corpus_dir, tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _datamodule(corpus_dir, tmp_path, **kwargs)


def test_datamodule_empty_and_too_small_corpus(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="is empty"):
        ByteCorpusDataModule(files=[str(tmp_path / "empty.txt")])
    (tmp_path / "small").mkdir()
    for i in range(3):
        (tmp_path / "small" / f"{i}.txt").write_text("tiny")
    dm = ByteCorpusDataModule(
        files=[str(tmp_path / "small" / "*.txt")], seq_len=64, cache_dir=str(tmp_path / "hf")
    )
    with pytest.raises(ValueError, match="no block of seq_len"):
        dm.setup("fit")


def test_text_file_problem_finds_binary_and_non_utf8_bytes(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("h\u00e9llo w\u00f6rld \u2603\n" * 50, encoding="utf-8")
    binary = tmp_path / "ls.bin"
    binary.write_bytes(b"\x7fELF\x02\x01" + bytes(range(256)))
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9 cr\u00e8me\n".encode("latin-1"))
    assert text_file_problem(good) is None
    assert text_file_problem(good, chunk_bytes=3) is None  # characters split across chunks
    assert text_file_problem(binary) == "binary (NUL byte at offset 6)"
    assert text_file_problem(latin1) == "not UTF-8 (byte 0xe9 at offset 3)"
    assert text_file_problem(latin1, chunk_bytes=2) == "not UTF-8 (byte 0xe9 at offset 3)"
    truncated = tmp_path / "cut.txt"
    truncated.write_bytes("ab\u2603".encode()[:-1])
    assert text_file_problem(truncated) == "not UTF-8 (byte 0xe2 at offset 2)"


def test_datamodule_skips_files_that_are_not_text_and_reports_the_split(tmp_path):
    paths = write_corpus(tmp_path / "c", num_files=4)
    (tmp_path / "c" / "ls.txt").write_bytes(b"\x7fELF\x00\x00" * 100)
    (tmp_path / "c" / "latin1.txt").write_bytes("caf\u00e9\n".encode("latin-1") * 100)
    with pytest.warns(UserWarning, match="skipped 2 of 6 files that are not UTF-8 text") as record:
        dm = ByteCorpusDataModule(
            files=str(tmp_path / "c" / "*.txt"),  # a single string works as a glob
            seq_len=15,
            val_fraction=0.5,
            max_val_blocks=None,
            cache_dir=str(tmp_path / "hf"),
        )
    message = str(record[0].message)
    assert "latin1.txt (not UTF-8 (byte 0xe9 at offset 3))" in message
    assert "ls.txt (binary (NUL byte at offset 4))" in message
    kept = sorted(p.resolve() for p in paths)
    assert dm.train_files + dm.val_files == [kept[0], kept[2], kept[1], kept[3]]
    dm.setup("fit")
    for blocks_NL in (dm.train_blocks_NL, dm.val_blocks_NL):  # no NUL, no U+FFFD (EF BF BD)
        assert not (blocks_NL == 0).any() and not (blocks_NL == 0xEF).any()
    assert len(dm.train_blocks_NL) == sum(p.stat().st_size for p in dm.train_files) // 16
    train_bytes = sum(p.stat().st_size for p in dm.train_files)
    line = dm.describe(len(dm.train_blocks_NL), len(dm.val_blocks_NL), len(dm.val_blocks_NL))
    assert line.startswith(f"data: training 2 files ({train_bytes / 1e3:.1f} kB) -> ")
    assert "validation 2 files" in line


def test_datamodule_without_any_text_file_is_an_error(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"\x00\x01\x02" * 10)
    with pytest.raises(ValueError, match=r"no file is UTF-8 text, nothing to train on: .*a\.bin"):
        ByteCorpusDataModule(files=[str(tmp_path / "*.bin")])
