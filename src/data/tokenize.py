"""Tokenizer training and loading, and writing the prepared token files.

Layout of a prepared directory (`out_dir`):

    tokenizer/       Hugging Face tokenizer, loadable with AutoTokenizer.from_pretrained
    {split}.bin      token ids of the split as a flat array (dtype in stats.json, no header),
                     every document followed by the end-of-text id, GPT-2 style
    {split}.jsonl    one JSON object per document, in the order of the .bin file:
                     {"id", "title", "text", "tokens", ...source fields}
    stats.json       vocab size, dtype, eos id, and per split: tokens, documents, titles, characters
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from src.data.corpus import SPLITS, Document

log = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
TRAIN_TOKENIZER = "train"
# A byte-level BPE vocabulary contains all 256 byte symbols plus the end-of-text token before any merge.
MIN_BPE_VOCAB_SIZE = 256 + 1
TOKENIZER_DIRNAME = "tokenizer"


def validate_vocab_size(vocab_size) -> int:
    """Check the requested size of a trained byte-level BPE vocabulary."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise ValueError(
            f"data.vocab_size={vocab_size!r} is invalid: it must be an integer of at least "
            f"{MIN_BPE_VOCAB_SIZE} when data.tokenizer={TRAIN_TOKENIZER!r}."
        )
    if vocab_size < MIN_BPE_VOCAB_SIZE:
        raise ValueError(
            f"data.vocab_size={vocab_size} is too small: a byte-level BPE vocabulary needs 256 byte "
            f"tokens plus {EOS_TOKEN}, so at least {MIN_BPE_VOCAB_SIZE}. Set data.vocab_size to "
            "4096 (the default) or more."
        )
    return vocab_size


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2):
    """Train a byte-level BPE tokenizer (GPT-2 style) and wrap it as a Hugging Face tokenizer.

    `<|endoftext|>` is the only special token (id 0) and serves as bos, eos, unk and pad, as in
    GPT-2. Encoding adds no special tokens, and decode(encode(text)) == text for any string.
    The vocabulary can end up smaller than `vocab_size` when the text has too few distinct merges.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    validate_vocab_size(vocab_size)

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        clean_up_tokenization_spaces=False,
    )


def load_tokenizer(name_or_path: str):
    """Load a tokenizer with AutoTokenizer from a Hub id (`gpt2`) or a local directory.

    A tokenizer without an end-of-text token cannot separate documents, so it is rejected.
    Without network access a Hub id loads only from the local Hugging Face cache.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.eos_token_id is None:
        raise ValueError(
            f"Tokenizer {name_or_path!r} has no eos_token, which is needed to separate documents. "
            f"Use a tokenizer with one, or data.tokenizer={TRAIN_TOKENIZER!r} to train one."
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def token_dtype(vocab_size: int) -> np.dtype:
    """Return the smallest unsigned dtype that can store every id below `vocab_size`."""
    if vocab_size <= 2**16:
        return np.dtype(np.uint16)
    return np.dtype(np.uint32)


def encode_texts(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Encode a batch of documents without special tokens (the fast tokenizer encodes in parallel)."""
    encoded = tokenizer(
        list(texts),
        add_special_tokens=False,
        return_attention_mask=False,
        verbose=False,
    )
    return encoded["input_ids"]


class SplitWriter:
    """Append documents of one split to `{split}.bin` and `{split}.jsonl`, and count them."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, eos_id: int, max_titles: int):
        self.split = split
        self.dtype = dtype
        self.eos_id = eos_id
        self.max_titles = max_titles
        self.bin_path = directory / f"{split}.bin"
        self.jsonl_path = directory / f"{split}.jsonl"
        self._bin = open(self.bin_path, "wb")
        self._jsonl = open(self.jsonl_path, "w", encoding="utf-8")

        self.tokens = 0
        self.documents = 0
        self.characters = 0
        self.text_bytes = 0
        self.titles: list[str] = []

    def write(self, documents: Sequence[Document], token_ids: Sequence[Sequence[int]]) -> None:
        # One flat array for the batch: doc0 ids, eos, doc1 ids, eos, ...
        pieces = []
        for document, ids in zip(documents, token_ids, strict=True):
            pieces.append(np.asarray(ids, dtype=self.dtype))
            pieces.append(np.asarray([self.eos_id], dtype=self.dtype))

            record = {"id": document.id, "title": document.title, **document.meta}
            record["tokens"] = len(ids)
            record["text"] = document.text
            self._jsonl.write(json.dumps(record, ensure_ascii=False) + "\n")

            self.documents += 1
            self.characters += len(document.text)
            self.text_bytes += len(document.text.encode("utf-8"))
            if len(self.titles) < self.max_titles:
                self.titles.append(document.title)

        if pieces:
            batch = np.concatenate(pieces)
            batch.tofile(self._bin)
            self.tokens += int(batch.size)

    def close(self) -> dict:
        self._bin.close()
        self._jsonl.close()

        text_tokens = self.tokens - self.documents
        return {
            "tokens": self.tokens,
            "text_tokens": text_tokens,
            "documents": self.documents,
            "characters": self.characters,
            "bytes": self.text_bytes,
            "bytes_per_token": round(self.text_bytes / text_tokens, 4) if text_tokens else None,
            "titles": self.titles,
            "titles_truncated": self.documents > len(self.titles),
            "bin": self.bin_path.name,
            "jsonl": self.jsonl_path.name,
        }


def write_splits(
    labelled_documents: Iterator[tuple[str, Document]],
    tokenizer,
    directory: Path,
    batch_size: int = 256,
    max_titles: int = 1000,
) -> dict:
    """Tokenize (split, document) pairs in batches and write the token and text files of every split.

    Returns the per-split statistics and the token format. Documents with empty text are skipped
    and counted. Raises ValueError when a split ends up without documents.
    """
    vocab_size = len(tokenizer)
    dtype = token_dtype(vocab_size)
    eos_id = int(tokenizer.eos_token_id)
    writers = {split: SplitWriter(directory, split, dtype, eos_id, max_titles) for split in SPLITS}
    pending: dict[str, list[Document]] = {split: [] for split in SPLITS}
    skipped_empty = 0

    def flush(split: str) -> None:
        batch = pending[split]
        if batch:
            writers[split].write(batch, encode_texts(tokenizer, [doc.text for doc in batch]))
            pending[split] = []

    for split, document in labelled_documents:
        if not document.text.strip():
            skipped_empty += 1
            continue
        pending[split].append(document)
        if len(pending[split]) >= batch_size:
            flush(split)

    for split in SPLITS:
        flush(split)
    split_stats = {split: writer.close() for split, writer in writers.items()}

    if skipped_empty:
        log.warning("Skipped %d documents with empty text.", skipped_empty)
    for split, stats in split_stats.items():
        if stats["documents"] == 0:
            raise ValueError(
                f"Split {split!r} is empty after preparation. Add data (raise max_documents), "
                f"raise data.split_fractions.{split}, or, for a Hugging Face dataset, point its "
                "val_split or test_split at a split that has documents."
            )

    return {
        "vocab_size": vocab_size,
        "dtype": dtype.name,
        "eos_id": eos_id,
        "eos_token": tokenizer.eos_token,
        "skipped_empty_documents": skipped_empty,
        "splits": split_stats,
    }


def write_stats(directory: Path, stats: dict) -> Path:
    path = directory / "stats.json"
    path.write_text(json.dumps(stats, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path
