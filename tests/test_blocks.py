"""Tests for TokenBlocks and load_prepared over memory-mapped token files."""

import json
import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from src.data.blocks import IGNORE_INDEX, TokenBlocks, check_block_fits, load_prepared
from src.data.corpus import Document
from src.data.tokenize import train_bpe_tokenizer, write_splits, write_stats


def write_tokens(path, count, dtype="uint16"):
    np.arange(count, dtype=dtype).tofile(path)
    return path


@pytest.fixture
def token_file(tmp_path):
    return write_tokens(tmp_path / "train.bin", 100)


def test_contiguous_blocks_shapes_and_values(token_file):
    blocks = TokenBlocks(token_file, block_size=10, dtype="uint16")

    item = blocks[3]

    assert len(blocks) == 10
    assert item["input_ids"].shape == (10,)
    assert item["labels"].shape == (10,)
    assert item["input_ids"].dtype == torch.int64
    assert item["input_ids"].tolist() == list(range(30, 40))
    assert torch.equal(item["labels"], item["input_ids"])


def test_contiguous_blocks_drop_the_tail(tmp_path):
    blocks = TokenBlocks(write_tokens(tmp_path / "x.bin", 25), block_size=10, dtype="uint16")

    assert len(blocks) == 2
    assert blocks[1]["input_ids"].tolist() == list(range(10, 20))
    with pytest.raises(IndexError):
        blocks[2]


def test_strided_blocks_score_each_token_once(token_file):
    blocks = TokenBlocks(token_file, block_size=10, stride=4, dtype="uint16")

    scored = []
    for index in range(len(blocks)):
        item = blocks[index]
        start = blocks.start(index)
        # The model shifts labels, so position 0 of a block is never a prediction target.
        scored += [start + j for j in range(1, 10) if item["labels"][j] != IGNORE_INDEX]

    assert len(blocks) == (100 - 10) // 4 + 1
    assert blocks[0]["labels"].tolist() == list(range(10))
    assert blocks[1]["labels"][:6].tolist() == [IGNORE_INDEX] * 6
    assert blocks[1]["labels"][6:].tolist() == list(range(10, 14))
    assert sorted(scored) == list(range(1, blocks.start(len(blocks) - 1) + 10))


def test_random_offsets_are_seeded_per_epoch(token_file):
    blocks = TokenBlocks(token_file, block_size=10, dtype="uint16", random_offsets=True, seed=5)
    same = TokenBlocks(token_file, block_size=10, dtype="uint16", random_offsets=True, seed=5)

    first = [blocks.start(i) for i in range(len(blocks))]
    blocks.set_epoch(1)
    second = [blocks.start(i) for i in range(len(blocks))]

    assert len(blocks) == 10
    assert first == [same.start(i) for i in range(len(same))]
    assert first != second
    assert all(0 <= start <= 90 for start in first + second)
    item = blocks[0]
    assert item["input_ids"].tolist() == list(range(second[0], second[0] + 10))


def test_random_offsets_num_blocks(token_file):
    blocks = TokenBlocks(token_file, 10, dtype="uint16", random_offsets=True, num_blocks=3)

    assert len(blocks) == 3
    with pytest.raises(ValueError, match="num_blocks applies only"):
        TokenBlocks(token_file, 10, dtype="uint16", num_blocks=3)


def test_dataloader_batches_and_pickles(token_file):
    blocks = TokenBlocks(token_file, block_size=8, dtype="uint16")
    blocks[0]  # opens the memmap, which pickling must drop

    restored = pickle.loads(pickle.dumps(blocks))
    batch = next(iter(DataLoader(restored, batch_size=4)))

    assert batch["input_ids"].shape == (4, 8)
    assert batch["labels"].shape == (4, 8)
    assert batch["input_ids"][1].tolist() == list(range(8, 16))


def test_short_file_error_names_file_tokens_and_fix(tmp_path):
    path = write_tokens(tmp_path / "val.bin", 7)

    with pytest.raises(ValueError) as error:
        TokenBlocks(path, block_size=8, dtype="uint16")

    message = str(error.value)
    assert str(path) in message
    assert "7 tokens" in message
    assert "block_size=8" in message
    assert "Lower block_size" in message


def test_check_block_fits_accepts_exact_length():
    check_block_fits("x.bin", 8, 8)
    with pytest.raises(ValueError, match="x.bin has 0 tokens"):
        check_block_fits("x.bin", 0, 1)


@pytest.mark.parametrize("kwargs", [{"block_size": 0}, {"block_size": 4, "stride": 0}])
def test_invalid_block_arguments(token_file, kwargs):
    with pytest.raises(ValueError, match="positive integer"):
        TokenBlocks(token_file, dtype="uint16", **kwargs)


def test_dtype_comes_from_stats_or_must_be_given(tmp_path):
    path = write_tokens(tmp_path / "train.bin", 40, dtype="uint32")

    with pytest.raises(FileNotFoundError, match="Pass dtype="):
        TokenBlocks(path, block_size=4)
    (tmp_path / "stats.json").write_text(json.dumps({"dtype": "uint32"}))

    blocks = TokenBlocks(path, block_size=4)

    assert len(blocks) == 10
    assert blocks[9]["input_ids"].tolist() == [36, 37, 38, 39]


def test_truncated_file_is_rejected(tmp_path):
    path = tmp_path / "odd.bin"
    path.write_bytes(b"\x00" * 21)

    with pytest.raises(ValueError, match="21 bytes, not a multiple of 2"):
        TokenBlocks(path, block_size=4, dtype="uint16")


# ---------------------------------------------------------------------------------------------
# load_prepared


@pytest.fixture(scope="module")
def prepared_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("prepared") / "tiny"
    directory.mkdir()
    tokenizer = train_bpe_tokenizer(["to be or not to be, that is the question " * 30], vocab_size=300)
    tokenizer.save_pretrained(directory / "tokenizer")
    labelled = [
        (split, Document(id=f"{split}-{i}", title=f"{split} {i}", text=f"to be {split} {i} " * 20))
        for split in ("train", "val", "test")
        for i in range(3)
    ]
    stats = write_splits(iter(labelled), tokenizer, directory, batch_size=2)
    write_stats(directory, {**stats, "tokenizer_dir": "tokenizer"})
    return directory


def test_load_prepared_gives_blocks_and_documents(prepared_dir):
    prepared = load_prepared(prepared_dir)

    blocks = prepared.blocks("val", block_size=16)
    documents = list(prepared.documents("val"))
    tokenizer = prepared.load_tokenizer()

    assert prepared.splits == ["train", "val", "test"]
    assert prepared.eos_id == tokenizer.eos_token_id == 0
    assert prepared.vocab_size == len(tokenizer) <= 300
    assert len(blocks) == prepared.num_tokens("val") // 16
    assert blocks[0]["input_ids"].shape == (16,)
    assert [doc["id"] for doc in documents] == ["val-0", "val-1", "val-2"]
    first_ids = blocks.tokens[: documents[0]["tokens"]].tolist()
    assert tokenizer.decode(first_ids) == documents[0]["text"]


def test_load_prepared_missing_directory_names_command(tmp_path):
    missing = tmp_path / "data" / "prepared" / "wikipedia_bookcorpus"

    with pytest.raises(FileNotFoundError) as error:
        load_prepared(missing)

    message = str(error.value)
    assert str(missing) in message
    assert "does not exist" in message
    assert "python -m src.prepare data=wikipedia_bookcorpus" in message
    assert "dvc repro prepare" in message


def test_load_prepared_without_stats(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no stats.json"):
        load_prepared(tmp_path)


def test_load_prepared_detects_stale_token_file(prepared_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(prepared_dir, copy)
    with open(copy / "test.bin", "ab") as handle:
        handle.write(b"\x00\x00")

    with pytest.raises(ValueError, match=r"test.bin has \d+ tokens but .* lists"):
        load_prepared(copy)


def test_load_prepared_unknown_split(prepared_dir):
    with pytest.raises(KeyError, match="'dev' not in"):
        load_prepared(prepared_dir).blocks("dev", 4)
