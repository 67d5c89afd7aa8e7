"""Fixed-size blocks of token ids over the memory-mapped `{split}.bin` files of a prepared directory.

Item format (Hugging Face causal-LM convention): each item is a dict with

    input_ids  LongTensor (block_size,)  the block's token ids
    labels     LongTensor (block_size,)  a copy of input_ids; -100 marks positions not to score

The model shifts labels by one position internally (as GPT2LMHeadModel does), so a block of
block_size tokens gives block_size - 1 next-token predictions. Blocks ignore document boundaries:
documents are packed back to back, each followed by the end-of-text id.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
STATS_FILENAME = "stats.json"


def _prepare_hint(directory: Path) -> str:
    return (
        f"Create it with `python -m src.prepare data={directory.name} out_dir={directory}` "
        "or `dvc repro prepare`."
    )


def check_block_fits(path: str | Path, num_tokens: int, block_size: int) -> None:
    """Raise ValueError when the token file at `path` is too short for one block of `block_size`."""
    if num_tokens < block_size:
        raise ValueError(
            f"Token file {path} has {num_tokens} tokens, fewer than one block of "
            f"block_size={block_size}. Lower block_size to at most {num_tokens}, or prepare more "
            "data for this split (larger split fraction or more documents)."
        )


def _read_dtype(bin_path: Path) -> np.dtype:
    stats_path = bin_path.parent / STATS_FILENAME
    if not stats_path.is_file():
        raise FileNotFoundError(
            f"Cannot tell the dtype of {bin_path}: no {STATS_FILENAME} next to it. Pass dtype= "
            f"(uint16 or uint32), or {_prepare_hint(bin_path.parent)}"
        )
    return np.dtype(json.loads(stats_path.read_text(encoding="utf-8"))["dtype"])


class TokenBlocks(Dataset):
    """Blocks of `block_size` token ids read from a flat token file (see the module docstring).

    Contiguous mode (default): block i starts at i * stride, and stride defaults to block_size
    (non-overlapping blocks). Tokens after the last full block are not used. With stride <
    block_size, each block after the first labels its first block_size - stride positions -100,
    because the previous block already scored them, so every token is scored once (sliding-window
    evaluation).

    Random mode (`random_offsets=True`): block i starts at a uniform random offset drawn from
    (seed, epoch, i), so an epoch is reproducible and `set_epoch` gives new offsets.
    `num_blocks` defaults to num_tokens // block_size.
    """

    def __init__(
        self,
        path: str | Path,
        block_size: int,
        stride: int | None = None,
        *,
        dtype: str | np.dtype | None = None,
        random_offsets: bool = False,
        num_blocks: int | None = None,
        seed: int = 0,
    ):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"Token file {self.path} not found. {_prepare_hint(self.path.parent)}")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size={block_size!r} is invalid: use a positive integer.")

        self.block_size = block_size
        self.stride = block_size if stride is None else stride
        if isinstance(self.stride, bool) or not isinstance(self.stride, int) or self.stride < 1:
            raise ValueError(f"stride={stride!r} is invalid: use a positive integer, or None for block_size.")

        self.dtype = np.dtype(dtype) if dtype is not None else _read_dtype(self.path)
        size = self.path.stat().st_size
        if size % self.dtype.itemsize:
            raise ValueError(
                f"Token file {self.path} has {size} bytes, not a multiple of {self.dtype.itemsize} "
                f"({self.dtype.name}): wrong dtype or a truncated file. Prepare the data again."
            )
        self.num_tokens = size // self.dtype.itemsize
        check_block_fits(self.path, self.num_tokens, block_size)

        self.random_offsets = random_offsets
        self.seed = seed
        self.epoch = 0
        if random_offsets:
            self._length = num_blocks if num_blocks is not None else self.num_tokens // block_size
        else:
            if num_blocks is not None:
                raise ValueError("num_blocks applies only with random_offsets=True.")
            self._length = (self.num_tokens - block_size) // self.stride + 1
        self._tokens: np.memmap | None = None

    def __len__(self) -> int:
        return self._length

    def set_epoch(self, epoch: int) -> None:
        """Draw new random offsets for `epoch` (random mode only)."""
        self.epoch = epoch

    def start(self, index: int) -> int:
        """Return the token offset where block `index` starts."""
        if not 0 <= index < self._length:
            raise IndexError(f"Block index {index} out of range for {self._length} blocks.")
        if self.random_offsets:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            return int(rng.integers(0, self.num_tokens - self.block_size + 1))
        return index * self.stride

    @property
    def tokens(self) -> np.memmap:
        # Opened lazily, so each DataLoader worker maps the file itself instead of receiving a copy.
        if self._tokens is None:
            self._tokens = np.memmap(self.path, dtype=self.dtype, mode="r")
        return self._tokens

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_tokens"] = None
        return state

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        start = self.start(index)
        chunk = np.asarray(self.tokens[start : start + self.block_size], dtype=np.int64)
        input_ids = torch.from_numpy(chunk)  # (block_size,)
        labels = input_ids.clone()  # (block_size,)

        overlap = self.block_size - self.stride
        if not self.random_offsets and index > 0 and overlap > 0:
            labels[:overlap] = IGNORE_INDEX
        return {"input_ids": input_ids, "labels": labels}


@dataclass(frozen=True)
class PreparedData:
    """A prepared data directory: its stats.json, token format and file paths."""

    directory: Path
    stats: dict

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.stats["dtype"])

    @property
    def eos_id(self) -> int:
        return int(self.stats["eos_id"])

    @property
    def vocab_size(self) -> int:
        return int(self.stats["vocab_size"])

    @property
    def splits(self) -> list[str]:
        return list(self.stats["splits"])

    @property
    def tokenizer_dir(self) -> Path:
        return self.directory / self.stats.get("tokenizer_dir", "tokenizer")

    def bin_path(self, split: str) -> Path:
        return self.directory / self._split_stats(split)["bin"]

    def jsonl_path(self, split: str) -> Path:
        return self.directory / self._split_stats(split)["jsonl"]

    def num_tokens(self, split: str) -> int:
        return int(self._split_stats(split)["tokens"])

    def blocks(self, split: str, block_size: int, stride: int | None = None, **kwargs) -> TokenBlocks:
        """Return a TokenBlocks dataset over one split (keyword arguments as for TokenBlocks)."""
        return TokenBlocks(self.bin_path(split), block_size, stride, dtype=self.dtype, **kwargs)

    def documents(self, split: str) -> Iterator[dict]:
        """Yield the split's documents from `{split}.jsonl` ({"id", "title", "text", ...})."""
        with open(self.jsonl_path(split), encoding="utf-8") as handle:
            for line in handle:
                yield json.loads(line)

    def load_tokenizer(self):
        """Load the tokenizer saved with the data (AutoTokenizer, offline)."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.tokenizer_dir)

    def _split_stats(self, split: str) -> dict:
        if split not in self.stats["splits"]:
            raise KeyError(f"Split {split!r} not in {self.directory}; available: {self.splits}.")
        return self.stats["splits"][split]


def load_prepared(directory: str | Path) -> PreparedData:
    """Open a prepared data directory and check that its token files match stats.json.

    Raises FileNotFoundError (naming the directory and the command that creates it) when the
    directory, stats.json or a token file is missing, and ValueError when a token file's size
    disagrees with stats.json.
    """
    directory = Path(directory)
    stats_path = directory / STATS_FILENAME
    if not stats_path.is_file():
        reason = "does not exist" if not directory.exists() else f"has no {STATS_FILENAME}"
        raise FileNotFoundError(f"Prepared data directory {directory} {reason}. {_prepare_hint(directory)}")

    prepared = PreparedData(directory, json.loads(stats_path.read_text(encoding="utf-8")))
    for split in prepared.splits:
        path = prepared.bin_path(split)
        if not path.is_file():
            raise FileNotFoundError(f"Token file {path} is missing. {_prepare_hint(directory)}")
        found = path.stat().st_size // prepared.dtype.itemsize
        if found != prepared.num_tokens(split):
            raise ValueError(
                f"Token file {path} has {found} tokens but {stats_path} lists "
                f"{prepared.num_tokens(split)}: the directory is stale or half-written. "
                f"{_prepare_hint(directory)}"
            )
    return prepared
