"""Byte-level corpora on HF ``datasets``: the stdlib's own sources, local files, or a hub set.

Tokens are bytes (vocabulary 256), so there is no tokenizer to download. Documents are encoded
as UTF-8, concatenated (a newline between two documents) and cut into fixed blocks of
``seq_len + 1`` bytes: inputs are a block's first ``seq_len`` bytes, targets its last.

Sources, first match wins:

1. ``hub_dataset``: ``datasets.load_dataset(hub_dataset, hub_config)`` (a hub name, or a local
   folder of data files); its ``validation`` (or ``test``) split if it has one.
2. ``files``: local paths or globs (``**`` allowed), a list or a single string. Files that
   are not UTF-8 text (NUL bytes, or bytes that do not decode) are skipped with a warning
   naming them; none left is an error.
3. Neither: the standard library of the running interpreter, found through
   ``sysconfig.get_paths()["stdlib"]``, with its test suites and ``site-packages`` left out.

Local sources are split into train / validation by file: the sorted file list, every
``round(1 / val_fraction)``-th file to validation. A single file is split at its last
``val_fraction`` of blocks instead.

Training order is an endless stream that depends only on ``seed``: epoch ``e`` visits the
blocks in the order ``randperm(N, seed, e)``, and the stream is cut into global micro-batches
of ``batch_size * world_size`` blocks of which rank ``r`` takes the ``r``-th slice. The
stream restarts at ``trainer.global_step * accumulate_grad_batches``, so a run resumed from a
checkpoint sees exactly the batches an uninterrupted run would have seen.

Shape legend: N blocks, L block length (``seq_len + 1``), B batch.
"""

from __future__ import annotations

import codecs
import functools
import glob
import math
import os
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

VOCAB_SIZE = 256


class DataPreparationInterrupted(BaseException):
    """Ctrl-C (SIGINT) while the data was being prepared, before training started.

    A ``BaseException`` as ``KeyboardInterrupt`` is (no ``except Exception`` stops it), but not
    one: Lightning answers a ``KeyboardInterrupt`` in ``fit`` / ``validate`` with exit code 1,
    while this one reaches ``models.cli.main``, which exits with 130 as for any SIGINT.
    """


def _interruptible(method: Callable) -> Callable:
    """Ctrl-C inside ``method`` raises :class:`DataPreparationInterrupted`."""

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except KeyboardInterrupt:
            raise DataPreparationInterrupted(
                "interrupted (Ctrl-C) while preparing the data: nothing was trained"
            ) from None

    return wrapper


# Path components that mark a test suite (or a vendored tree) inside the stdlib folder:
# `test/`, `tests/`, `idlelib/idle_test`, `lib2to3/tests`, `ctypes/test`, `unittest/test`, ...
_STDLIB_EXCLUDED_PARTS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
)


def stdlib_source_files(stdlib_dir: str | os.PathLike | None = None) -> list[Path]:
    """The ``.py`` sources of the Python standard library, test suites excluded, sorted.

    Args:
        stdlib_dir: Folder to scan; None for ``sysconfig.get_paths()["stdlib"]``.

    Returns:
        Absolute paths, sorted by their path relative to ``stdlib_dir`` (deterministic across
        machines with the same Python version).
    """
    root = Path(stdlib_dir if stdlib_dir is not None else sysconfig.get_paths()["stdlib"])
    files = [
        path
        for path in root.rglob("*.py")
        if path.is_file()
        and not _STDLIB_EXCLUDED_PARTS.intersection(path.relative_to(root).parts[:-1])
    ]
    return sorted(files, key=lambda path: path.relative_to(root).as_posix())


def resolve_files(patterns: list[str]) -> list[Path]:
    """Expands paths and globs into a sorted list of distinct files.

    Args:
        patterns: File paths or glob patterns (``**`` matches folders recursively).

    Returns:
        Sorted, de-duplicated file paths.

    Raises:
        ValueError: If ``patterns`` is empty or one of them matches no file.
    """
    if not patterns:
        raise ValueError("data.files=[] is not allowed: give at least one path or glob")
    files: set[Path] = set()
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        matches = [Path(p) for p in glob.glob(expanded, recursive=True) if os.path.isfile(p)]
        if not matches:
            raise ValueError(
                f"data.files: {pattern!r} matches no file (paths and globs such as "
                "'corpus/**/*.txt' are allowed)"
            )
        files.update(path.resolve() for path in matches)
    return sorted(files)


def text_file_problem(path: Path, chunk_bytes: int = 1 << 20) -> str | None:
    """Why ``path`` is not usable UTF-8 text, or None if it is.

    Reads the file in chunks through an incremental decoder, so memory stays bounded.

    Args:
        path: The file.
        chunk_bytes: Bytes read at a time.

    Returns:
        ``"binary (NUL byte at offset N)"``, ``"not UTF-8 (byte 0xXX at offset N)"`` or None.
    """
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    offset = 0
    with open(path, "rb") as handle:
        while True:
            chunk = handle.read(chunk_bytes)
            nul = chunk.find(b"\x00")
            if nul >= 0:
                return f"binary (NUL byte at offset {offset + nul})"
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as err:
                # The offset counts from the decoder's buffered tail (at most 3 bytes back).
                bad = offset + err.start - len(err.object) + len(chunk)
                return f"not UTF-8 (byte 0x{err.object[err.start]:02x} at offset {bad})"
            if not chunk:
                return None
            offset += len(chunk)


def check_text_files(files: list[Path], source: str) -> list[Path]:
    """The files that are UTF-8 text; warns naming every other one.

    Args:
        files: Candidate files.
        source: The setting they came from (for the messages).

    Returns:
        The usable files, order kept.

    Raises:
        ValueError: If no file is usable.
    """
    usable, rejected = [], []
    for path in files:
        problem = text_file_problem(path)
        if problem is None:
            usable.append(path)
        else:
            rejected.append(f"{path} ({problem})")
    if rejected and not usable:
        raise ValueError(
            f"{source}: no file is UTF-8 text, nothing to train on: {'; '.join(rejected)}"
        )
    if rejected:
        rank_zero_warn(
            f"{source}: skipped {len(rejected)} of {len(files)} files that are not UTF-8 "
            f"text: {'; '.join(rejected)}"
        )
    return usable


def _size(num_bytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.1f} {unit}"
    return f"{num_bytes} B"


def split_files(files: list[Path], val_fraction: float) -> tuple[list[Path], list[Path]]:
    """Deterministic train / validation split by file.

    Args:
        files: Sorted file list (at least two files).
        val_fraction: Approximate fraction of files for validation.

    Returns:
        ``(train_files, val_files)``: every ``round(1 / val_fraction)``-th file (starting from
        the last of the first stride) goes to validation, so validation spans the whole list.
    """
    stride = max(2, round(1 / val_fraction))
    val = [path for i, path in enumerate(files) if i % stride == stride - 1]
    if not val:
        val = [files[-1]]
    val_set = set(val)
    return [path for path in files if path not in val_set], val


def to_blocks(texts: list[str], block_len: int) -> np.ndarray:
    """Encodes documents as UTF-8, joins them with newlines and cuts fixed-length blocks.

    Args:
        texts: Documents.
        block_len: Bytes per block L.

    Returns:
        ``uint8`` array of shape ``(N, L)``; the tail shorter than a block is dropped.
    """
    # Strict: local files are checked up front, so an undecodable character here is a bug.
    stream = np.frombuffer("\n".join(texts).encode("utf-8"), dtype=np.uint8)
    num_blocks = len(stream) // block_len
    return stream[: num_blocks * block_len].reshape(num_blocks, block_len)


def _blocks_map(batch: dict[str, list], block_len: int, text_field: str) -> dict[str, list]:
    """``datasets.map`` function: a batch of documents -> a batch of blocks."""
    return {"tokens": list(to_blocks(batch[text_field], block_len))}


class BlockStream(IterableDataset):
    """Endless, seed-determined stream of training blocks for one rank (see module docstring).

    Args:
        blocks_NL: All training blocks.
        batch_size: Blocks per micro-batch on this rank.
        seed: Seed of the block order.
        start_micro_batch: Index of the first global micro-batch to produce.
        rank: Data-parallel rank.
        world_size: Number of data-parallel ranks.
    """

    def __init__(
        self,
        blocks_NL: Tensor,
        batch_size: int,
        seed: int,
        start_micro_batch: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__()
        self.blocks_NL = blocks_NL
        self.batch_size = batch_size
        self.seed = seed
        self.start_micro_batch = start_micro_batch
        self.rank = rank
        self.world_size = world_size

    def order(self, epoch: int) -> Tensor:
        """The permutation of block ids used in ``epoch``."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.blocks_NL), generator=generator)

    def positions(self, micro_batch: int) -> range:
        """Positions in the global stream that this rank reads for ``micro_batch``."""
        start = (micro_batch * self.world_size + self.rank) * self.batch_size
        return range(start, start + self.batch_size)

    def __iter__(self) -> Iterator[Tensor]:
        worker = get_worker_info()
        # DataLoader workers hand out batches round-robin, so worker w owning micro-batches
        # w, w + W, ... keeps the order identical to a single-process loader.
        worker_id, num_workers = (0, 1) if worker is None else (worker.id, worker.num_workers)
        num_blocks = len(self.blocks_NL)
        cached_epoch, order = -1, None
        micro_batch = self.start_micro_batch + worker_id
        while True:
            for position in self.positions(micro_batch):
                epoch, offset = divmod(position, num_blocks)
                if epoch != cached_epoch:
                    cached_epoch, order = epoch, self.order(epoch)
                yield self.blocks_NL[order[offset]]
            micro_batch += num_workers


class BlockDataset(Dataset):
    """Map-style view of fixed blocks (validation).

    Args:
        blocks_NL: The blocks.
    """

    def __init__(self, blocks_NL: Tensor) -> None:
        self.blocks_NL = blocks_NL

    def __len__(self) -> int:
        return len(self.blocks_NL)

    def __getitem__(self, index: int) -> Tensor:
        return self.blocks_NL[index]


class ByteCorpusDataModule(L.LightningDataModule):
    """Byte-level language-modelling data (see the module docstring for sources and order).

    Args:
        files: Local text files or globs (a list, or one string such as ``"docs/*.txt"``);
            None for the embedded stdlib corpus. Files that are not UTF-8 text are skipped
            with a warning.
        hub_dataset: A ``datasets.load_dataset`` name (hub id or local folder); overrides
            ``files``. Needs the network unless it is cached or local.
        hub_config: Configuration name of ``hub_dataset``.
        text_field: Column holding the text in ``hub_dataset``.
        seq_len: Tokens per training sequence (blocks hold ``seq_len + 1`` bytes).
        batch_size: Sequences per micro-batch on each rank.
        val_fraction: Fraction of files (or of a single file's blocks) kept for validation.
        max_val_blocks: Cap on validation blocks, taken evenly spread over the split; None
            for all of them.
        seed: Seed of the training order (the CLI links it to ``seed_everything``).
        cache_dir: Where ``datasets`` caches the processed blocks; None for its default
            (``HF_DATASETS_CACHE``).
        num_workers: DataLoader worker processes.

    Raises:
        ValueError: For a bad size, a path or glob that matches nothing, or an empty corpus
            (no file left that is UTF-8 text, or no bytes).
    """

    def __init__(
        self,
        files: list[str] | str | None = None,
        hub_dataset: str | None = None,
        hub_config: str | None = None,
        text_field: str = "text",
        seq_len: int = 128,
        batch_size: int = 16,
        val_fraction: float = 0.05,
        max_val_blocks: int | None = 64,
        seed: int = 0,
        cache_dir: str | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        for name, value in (("seq_len", seq_len), ("batch_size", batch_size)):
            if value <= 0:
                raise ValueError(f"data.{name}={value!r} is not allowed: it must be > 0")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"data.val_fraction={val_fraction!r} must be in (0, 1)")
        if max_val_blocks is not None and max_val_blocks <= 0:
            raise ValueError(f"data.max_val_blocks={max_val_blocks!r} must be > 0 or null")
        if num_workers < 0:
            raise ValueError(f"data.num_workers={num_workers!r} must be >= 0")
        self.hub_dataset = hub_dataset
        self.hub_config = hub_config
        self.text_field = text_field
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.max_val_blocks = max_val_blocks
        self.seed = seed
        self.cache_dir = cache_dir
        self.num_workers = num_workers
        self.train_files: list[Path] = []
        self.val_files: list[Path] = []
        if isinstance(files, str):
            files = [files]
        if hub_dataset is None:
            # Resolve and check local files now, so a wrong path, a binary file or an empty
            # corpus stops the run (or is reported) before any model is built or trained.
            all_files = stdlib_source_files() if files is None else resolve_files(files)
            source = "the stdlib corpus" if files is None else f"data.files={files!r}"
            if not all_files or sum(path.stat().st_size for path in all_files) == 0:
                raise ValueError(f"{source} is empty: no bytes to train on")
            all_files = check_text_files(all_files, source)
            if len(all_files) >= 2:
                self.train_files, self.val_files = split_files(all_files, val_fraction)
            else:
                self.train_files = all_files
        self.train_blocks_NL: Tensor | None = None
        self.val_blocks_NL: Tensor | None = None

    @property
    def vocab_size(self) -> int:
        """Number of token ids (bytes)."""
        return VOCAB_SIZE

    @property
    def block_len(self) -> int:
        """Bytes per block, ``seq_len + 1``."""
        return self.seq_len + 1

    def _load_splits(self):
        """The processed (block) ``datasets`` splits ``train`` and ``validation``.

        ``datasets`` caches both the parsed files and the block map by fingerprint, so the
        second call (and every later run with the same files and ``seq_len``) reads Arrow
        files from the cache.
        """
        import datasets

        block_map = {"block_len": self.block_len}
        if self.hub_dataset is not None:
            try:
                raw = datasets.load_dataset(
                    self.hub_dataset, self.hub_config, cache_dir=self.cache_dir
                )
            except Exception as err:  # re-raised with the setting to fix
                offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0")
                hint = " (HF_HUB_OFFLINE is set: it must be cached already)" if offline else ""
                raise ValueError(
                    f"data.hub_dataset={self.hub_dataset!r} could not be loaded{hint}: {err}"
                ) from err
            if "train" not in raw:
                raise ValueError(
                    f"data.hub_dataset={self.hub_dataset!r} has no 'train' split "
                    f"(it has {sorted(raw)})"
                )
            if self.text_field not in raw["train"].column_names:
                raise ValueError(
                    f"data.text_field={self.text_field!r} is not a column of "
                    f"{self.hub_dataset!r} (columns: {raw['train'].column_names})"
                )
            val_name = next((s for s in ("validation", "test") if s in raw), None)
            if val_name is None:
                split = raw["train"].train_test_split(
                    test_size=self.val_fraction, shuffle=True, seed=0
                )
                raw = datasets.DatasetDict(train=split["train"], validation=split["test"])
            else:
                raw = datasets.DatasetDict(train=raw["train"], validation=raw[val_name])
            text_field = self.text_field
        else:
            data_files = {"train": [str(p) for p in self.train_files]}
            if self.val_files:
                data_files["validation"] = [str(p) for p in self.val_files]
            # The packaged "text" builder reads local files only: no network, offline or not.
            raw = datasets.load_dataset(
                "text",
                data_files=data_files,
                sample_by="document",
                encoding_errors="strict",  # checked by check_text_files
                cache_dir=self.cache_dir,
            )
            text_field = "text"
        columns = raw["train"].column_names
        return raw.map(
            _blocks_map,
            batched=True,
            batch_size=256,
            remove_columns=columns,
            features=datasets.Features(
                {"tokens": datasets.Sequence(datasets.Value("uint8"), length=self.block_len)}
            ),
            fn_kwargs={**block_map, "text_field": text_field},
            desc="byte blocks",
        )

    @_interruptible
    def prepare_data(self) -> None:
        """Builds the ``datasets`` cache once per node (Lightning calls it on local rank 0).

        Raises:
            DataPreparationInterrupted: On Ctrl-C.
        """
        self._load_splits()

    @_interruptible
    def setup(self, stage: str | None = None) -> None:
        """Loads the cached blocks into memory and checks that both splits are non-empty.

        Raises:
            DataPreparationInterrupted: On Ctrl-C.
        """
        if self.train_blocks_NL is not None:
            return
        splits = self._load_splits()

        def as_tensor(split) -> Tensor:
            # Straight from the Arrow buffer: one copy, no Python list per block.
            column = split.data.column("tokens").combine_chunks()
            flat_bytes = column.flatten().to_numpy(zero_copy_only=False)
            return torch.from_numpy(flat_bytes.astype(np.uint8).reshape(-1, self.block_len))

        train_NL = as_tensor(splits["train"])
        if "validation" in splits:
            val_NL = as_tensor(splits["validation"])
        else:
            # A single local file: its last val_fraction of blocks is the validation set.
            num_val = max(1, math.ceil(self.val_fraction * len(train_NL)))
            train_NL, val_NL = train_NL[:-num_val], train_NL[-num_val:]
        for name, blocks in (("training", train_NL), ("validation", val_NL)):
            if len(blocks) == 0:
                raise ValueError(
                    f"the {name} split has no block of seq_len + 1 = {self.block_len} bytes: "
                    "the corpus is empty or too small (add data or lower data.seq_len)"
                )
        val_total = len(val_NL)
        if self.max_val_blocks is not None and len(val_NL) > self.max_val_blocks:
            keep = torch.linspace(0, len(val_NL) - 1, self.max_val_blocks).round().long()
            val_NL = val_NL[keep]
        self.train_blocks_NL, self.val_blocks_NL = train_NL, val_NL
        rank_zero_info(self.describe(len(train_NL), len(val_NL), val_total))

    def describe(self, train_blocks: int, val_blocks: int, val_total: int) -> str:
        """One line: where the data came from and how much went to each split."""
        block = f"blocks of {self.block_len} bytes"
        cap = f" (capped from {val_total} by data.max_val_blocks)" if val_blocks < val_total else ""
        if self.hub_dataset is not None:
            return (
                f"data: {self.hub_dataset!r}: {train_blocks} training {block}, "
                f"{val_blocks} validation blocks{cap}"
            )

        def files(paths: list[Path]) -> str:
            count = len(paths)
            size = _size(sum(path.stat().st_size for path in paths))
            return f"{count} file{'s' if count != 1 else ''} ({size})"

        if not self.val_files:
            return (
                f"data: {files(self.train_files)}, split by blocks: {train_blocks} training "
                f"{block}, the last {val_total} for validation, {val_blocks} used{cap}"
            )
        return (
            f"data: training {files(self.train_files)} -> {train_blocks} {block}; validation "
            f"{files(self.val_files)} -> {val_blocks} blocks{cap}"
        )

    def _start_micro_batch(self) -> int:
        trainer = self.trainer
        if trainer is None:
            return 0
        return trainer.global_step * trainer.accumulate_grad_batches

    def train_dataloader(self) -> DataLoader:
        """Endless seed-ordered stream, restarted where the (resumed) run stands."""
        trainer = self.trainer
        rank, world_size = (0, 1) if trainer is None else (trainer.global_rank, trainer.world_size)
        stream = BlockStream(
            self.train_blocks_NL,
            self.batch_size,
            self.seed,
            start_micro_batch=self._start_micro_batch(),
            rank=rank,
            world_size=world_size,
        )
        return DataLoader(
            stream,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        """The fixed validation blocks, in order."""
        return DataLoader(
            BlockDataset(self.val_blocks_NL),
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
        )
