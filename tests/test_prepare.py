"""Tests for the data preparation stage: built-in corpus, tokenizer, token files, HF path, errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from src.data.corpus import (  # noqa: E402
    SPLITS,
    clean_play,
    hashed_split,
    load_shakespeare,
    split_documents,
)
from src.data.tokenize import train_bpe_tokenizer  # noqa: E402
from src.prepare import prepare, validate_data_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}
SAMPLE_TEXT = "First Witch:\nWhen shall we three meet again\n\n[Thunder]  ünïcödé — 🎭\n"


def shakespeare_config(**overrides):
    config = {
        "name": "shakespeare",
        "source": "builtin",
        "corpus": "shakespeare",
        "tokenizer": "train",
        "vocab_size": 4096,
        "min_frequency": 2,
        "split_fractions": dict(FRACTIONS),
        "split_seed": 1234,
        "batch_size": 64,
        "max_titles_in_stats": 1000,
    }
    config.update(overrides)
    return config


def read_jsonl(path):
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def read_bin(directory, split, stats):
    return np.fromfile(directory / f"{split}.bin", dtype=stats["dtype"])


# ---------------------------------------------------------------------------------------------
# Built-in corpus


def test_clean_play_format():
    markdown = (
        "# Macbeth\n\n## ACT I\n\n### SCENE I. A desert place.\n\n"
        "_Thunder and lightning. Enter three Witches,\nmeeting_\n\n"
        "**First Witch**  \n_\\[Aside]_  \nWhen shall we three  \nmeet again\\--\n\n"
        "**PAGE**  \n[Within]_  \nWho's there? __\\[ ]_\n\n*Exeunt lords.*\n"
    )

    title, text = clean_play(markdown, "fallback")

    assert title == "Macbeth"
    assert text == (
        "Macbeth\n\nACT I\n\nSCENE I. A desert place.\n\n"
        "[Thunder and lightning. Enter three Witches, meeting]\n\n"
        "First Witch:\n[Aside]\nWhen shall we three\nmeet again--\n\n"
        "PAGE:\n[Within]\nWho's there?\n\n[Exeunt lords.]\n"
    )


def test_clean_play_without_title_heading():
    title, text = clean_play("## ACT I\n\n**DUKE**  \nOf government.\n", "Measure for Measure")

    assert title == "Measure for Measure"
    assert text.startswith("Measure for Measure\n\nACT I\n\nDUKE:\nOf government.")


def test_shakespeare_documents_are_plain_text():
    documents = load_shakespeare()

    assert len(documents) == 38
    assert len({doc.id for doc in documents}) == 38
    for doc in documents:
        assert doc.text.startswith(doc.title + "\n\n"), doc.id
        for marker in ("**", "_", "#", "\\", "  \n"):
            assert marker not in doc.text, (doc.id, marker)
    macbeth = next(doc for doc in documents if doc.id == "tragedies/macbeth")
    assert "DUNCAN:\nWhat bloody man is that?" in macbeth.text


def test_split_by_play_is_disjoint_and_seeded():
    documents = load_shakespeare()

    splits = split_documents(documents, FRACTIONS, seed=1234, description="plays")
    again = split_documents(documents, FRACTIONS, seed=1234, description="plays")
    other = split_documents(documents, FRACTIONS, seed=7, description="plays")

    ids = {name: {doc.id for doc in docs} for name, docs in splits.items()}
    assert all(ids[name] for name in SPLITS)
    assert not ids["train"] & ids["val"]
    assert not ids["train"] & ids["test"]
    assert not ids["val"] & ids["test"]
    assert set().union(*ids.values()) == {doc.id for doc in documents}
    assert [len(ids[name]) for name in SPLITS] == [30, 4, 4]
    assert {name: [d.id for d in docs] for name, docs in again.items()} == {
        name: [d.id for d in docs] for name, docs in splits.items()
    }
    assert {d.id for d in other["val"]} != ids["val"]


def test_hashed_split_is_deterministic():
    labels = [hashed_split(str(i), 3, FRACTIONS) for i in range(2000)]

    assert labels == [hashed_split(str(i), 3, FRACTIONS) for i in range(2000)]
    assert labels != [hashed_split(str(i), 4, FRACTIONS) for i in range(2000)]
    assert 0.05 < labels.count("val") / 2000 < 0.15
    assert 0.05 < labels.count("test") / 2000 < 0.15


# ---------------------------------------------------------------------------------------------
# Tokenizer


def test_trained_tokenizer_round_trips_with_autotokenizer(tmp_path):
    from transformers import AutoTokenizer

    texts = [SAMPLE_TEXT * 20, "When the hurlyburly's done, when the battle's lost and won. " * 20]
    tokenizer = train_bpe_tokenizer(texts, vocab_size=400)
    tokenizer.save_pretrained(tmp_path)

    loaded = AutoTokenizer.from_pretrained(tmp_path)
    ids = loaded(SAMPLE_TEXT, add_special_tokens=False)["input_ids"]

    assert 257 < len(loaded) <= 400
    assert loaded.eos_token == "<|endoftext|>"
    assert loaded.eos_token_id == 0
    assert loaded.pad_token_id == 0
    assert 0 not in ids
    assert loaded.decode(ids) == SAMPLE_TEXT
    assert len(ids) < len(SAMPLE_TEXT.encode("utf-8"))


# ---------------------------------------------------------------------------------------------
# Full built-in preparation


@pytest.fixture(scope="module")
def prepared_shakespeare(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("prepared") / "shakespeare"
    stats = prepare(shakespeare_config(), out_dir)
    return out_dir, stats


@pytest.mark.slow
def test_prepare_builtin_token_files_match_stats(prepared_shakespeare):
    out_dir, stats = prepared_shakespeare
    on_disk = json.loads((out_dir / "stats.json").read_text())

    assert on_disk == stats
    assert stats["vocab_size"] == 4096
    assert stats["dtype"] == "uint16"
    for split in SPLITS:
        split_stats = stats["splits"][split]
        tokens = read_bin(out_dir, split, stats)
        records = read_jsonl(out_dir / f"{split}.jsonl")

        assert tokens.size == split_stats["tokens"]
        assert int(tokens.max()) < stats["vocab_size"]
        assert tokens[-1] == stats["eos_id"]
        assert int((tokens == stats["eos_id"]).sum()) == split_stats["documents"]
        assert len(records) == split_stats["documents"]
        assert [r["title"] for r in records] == split_stats["titles"]
        assert sum(r["tokens"] for r in records) + len(records) == split_stats["tokens"]
        assert sum(len(r["text"]) for r in records) == split_stats["characters"]
        assert 2.5 < split_stats["bytes_per_token"] < 4.0

    titles = [set(stats["splits"][split]["titles"]) for split in SPLITS]
    assert not titles[0] & titles[1]
    assert not titles[0] & titles[2]
    assert not titles[1] & titles[2]
    assert not list(out_dir.parent.glob(".*.partial"))


@pytest.mark.slow
def test_prepare_builtin_tokens_decode_to_documents(prepared_shakespeare):
    from transformers import AutoTokenizer

    out_dir, stats = prepared_shakespeare
    tokenizer = AutoTokenizer.from_pretrained(out_dir / "tokenizer")
    tokens = read_bin(out_dir, "val", stats)
    first = read_jsonl(out_dir / "val.jsonl")[0]

    first_ids = tokens[: first["tokens"]].tolist()

    assert tokens[first["tokens"]] == stats["eos_id"]
    assert tokenizer.decode(first_ids) == first["text"]
    assert tokenizer(first["text"], add_special_tokens=False)["input_ids"] == first_ids


# ---------------------------------------------------------------------------------------------
# Hugging Face path on local files


def write_json_docs(path, count, prefix="doc", text_key="body"):
    rows = [
        {"title": f"{prefix} {i}", "uid": f"{prefix}-{i}", text_key: f"{prefix} {i}: " + "lorem ipsum " * (i % 7 + 1)}
        for i in range(count)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return rows


@pytest.fixture(scope="module")
def tiny_tokenizer_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tokenizer")
    texts = ["lorem ipsum dolor sit amet " * 20, "doc 1: 2 3 4 5 6 7 8 9 0", SAMPLE_TEXT]
    train_bpe_tokenizer(texts, vocab_size=300).save_pretrained(directory)
    return directory


def hf_config(tmp_path, tokenizer_dir, data_files, **overrides):
    config = {
        "name": "tiny",
        "source": "hf",
        "path": "json",
        "data_files": data_files,
        "cache_dir": str(tmp_path / "hf_cache"),
        "streaming": False,
        "split": "train",
        "val_split": "auto",
        "test_split": "auto",
        "text_column": "body",
        "title_column": "title",
        "id_column": "uid",
        "max_documents": None,
        "rows_per_document": 1,
        "row_separator": " ",
        "tokenizer": str(tokenizer_dir),
        "split_fractions": dict(FRACTIONS),
        "split_seed": 1234,
        "batch_size": 4,
    }
    config.update(overrides)
    return config


def test_hf_json_carves_val_and_test(tmp_path, tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    rows = write_json_docs(tmp_path / "docs.jsonl", 30)
    out_dir = tmp_path / "out"

    stats = prepare(hf_config(tmp_path, tiny_tokenizer_dir, str(tmp_path / "docs.jsonl")), out_dir)

    counts = {split: stats["splits"][split]["documents"] for split in SPLITS}
    assert counts == {"train": 24, "val": 3, "test": 3}
    records = {split: read_jsonl(out_dir / f"{split}.jsonl") for split in SPLITS}
    ids = [{r["id"] for r in records[split]} for split in SPLITS]
    assert set().union(*ids) == {row["uid"] for row in rows}
    assert sum(len(i) for i in ids) == 30
    by_id = {row["uid"]: row for row in rows}
    for record in records["val"]:
        assert record["text"] == by_id[record["id"]]["body"]
        assert record["title"] == by_id[record["id"]]["title"]
    assert stats["vocab_size"] == len(AutoTokenizer.from_pretrained(tiny_tokenizer_dir))
    assert stats["datasets"][0]["carved_from_train"] == ["val", "test"]
    for split in SPLITS:
        assert read_bin(out_dir, split, stats).size == stats["splits"][split]["tokens"]


def test_hf_uses_native_validation_split(tmp_path, tiny_tokenizer_dir):
    write_json_docs(tmp_path / "train.jsonl", 20, prefix="train")
    valid_rows = write_json_docs(tmp_path / "valid.jsonl", 5, prefix="valid")
    data_files = {"train": str(tmp_path / "train.jsonl"), "validation": str(tmp_path / "valid.jsonl")}

    stats = prepare(hf_config(tmp_path, tiny_tokenizer_dir, data_files), tmp_path / "out")

    assert stats["splits"]["val"]["titles"] == [row["title"] for row in valid_rows]
    assert stats["splits"]["test"]["documents"] == 2
    assert stats["splits"]["train"]["documents"] == 18
    assert stats["datasets"][0]["splits"] == {"train": "train", "val": "validation"}


@pytest.mark.parametrize("streaming", [False, True])
def test_hf_groups_rows_and_limits_documents(tmp_path, tiny_tokenizer_dir, streaming):
    write_json_docs(tmp_path / "docs.jsonl", 40)
    config = hf_config(
        tmp_path,
        tiny_tokenizer_dir,
        str(tmp_path / "docs.jsonl"),
        streaming=streaming,
        rows_per_document=3,
        max_documents=10,
        id_column=None,
        title_column=None,
    )

    stats = prepare(config, tmp_path / "out")

    records = [r for split in SPLITS for r in read_jsonl(tmp_path / "out" / f"{split}.jsonl")]
    assert len(records) == 10
    assert sorted(r["id"] for r in records)[0] == "json/train/0-2"
    grouped = next(r for r in records if r["id"] == "json/train/0-2")
    assert grouped["text"].startswith("doc 0: ")
    assert " doc 1: " in grouped["text"]
    assert " doc 2: " in grouped["text"]
    assert sum(stats["splits"][split]["documents"] for split in SPLITS) == 10


def test_hf_trains_tokenizer_on_train_split_only(tmp_path):
    from transformers import AutoTokenizer

    write_json_docs(tmp_path / "train.jsonl", 20, prefix="train")
    rows = [{"title": f"v{i}", "uid": f"v{i}", "body": "zqxjv wkpfy " * 50} for i in range(3)]
    (tmp_path / "valid.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    data_files = {"train": str(tmp_path / "train.jsonl"), "validation": str(tmp_path / "valid.jsonl")}
    config = hf_config(tmp_path, "train", data_files, vocab_size=300)

    stats = prepare(config, tmp_path / "out")

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out" / "tokenizer")
    assert stats["vocab_size"] == len(tokenizer)
    assert len(tokenizer(" lorem", add_special_tokens=False)["input_ids"]) == 1
    assert len(tokenizer(" zqxjv", add_special_tokens=False)["input_ids"]) >= 4


def test_hf_streaming_matches_hashed_split(tmp_path, tiny_tokenizer_dir):
    write_json_docs(tmp_path / "docs.jsonl", 60)
    config = hf_config(tmp_path, tiny_tokenizer_dir, str(tmp_path / "docs.jsonl"), streaming=True)

    first = prepare(config, tmp_path / "a")
    second = prepare(config, tmp_path / "b")

    expected = {split: 0 for split in SPLITS}
    for position in range(60):
        expected[hashed_split(f"0:{position}", 1234, FRACTIONS)] += 1
    assert {split: first["splits"][split]["documents"] for split in SPLITS} == expected
    assert first["splits"] == second["splits"]
    assert all(count > 0 for count in expected.values())


def test_prepare_replaces_previous_output(tmp_path, tiny_tokenizer_dir):
    write_json_docs(tmp_path / "docs.jsonl", 10)
    config = hf_config(tmp_path, tiny_tokenizer_dir, str(tmp_path / "docs.jsonl"))
    out_dir = tmp_path / "out"
    prepare(config, out_dir)
    (out_dir / "train.bin").write_bytes(b"stale")
    (out_dir / "leftover.txt").write_text("from an older run")

    stats = prepare(config, out_dir)

    assert (out_dir / "train.bin").stat().st_size == stats["splits"]["train"]["tokens"] * 2
    assert not (out_dir / "leftover.txt").exists()
    assert not (tmp_path / ".out.partial").exists()


# ---------------------------------------------------------------------------------------------
# Bad input


def test_unknown_source_is_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"data.source='csv'.*'builtin'.*'hf'"):
        prepare(shakespeare_config(source="csv"), tmp_path / "out")


def test_unknown_builtin_corpus_is_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"data.corpus='marlowe'.*\['shakespeare'\]"):
        prepare(shakespeare_config(corpus="marlowe"), tmp_path / "out")


@pytest.mark.parametrize("vocab_size", [100, 256, 257 - 1, "big", None])
def test_small_or_invalid_vocab_size_is_rejected(tmp_path, vocab_size):
    with pytest.raises(ValueError, match=rf"data.vocab_size={vocab_size!r}.*257"):
        validate_data_config(shakespeare_config(vocab_size=vocab_size))


def test_vocab_size_minimum_is_accepted(tmp_path):
    validate_data_config(shakespeare_config(vocab_size=257))


@pytest.mark.parametrize(
    "fractions, message",
    [
        ({"train": 0.9, "val": 0.1}, "exactly the keys"),
        ({"train": 0.9, "val": 0.1, "test": 0.0}, r"split_fractions.test=0.0"),
        ({"train": 0.8, "val": 0.2, "test": 0.2}, "sum to 1.2"),
    ],
)
def test_bad_split_fractions_are_rejected(fractions, message):
    with pytest.raises(ValueError, match=message):
        validate_data_config(shakespeare_config(split_fractions=fractions))


def test_missing_text_column_names_available_columns(tmp_path, tiny_tokenizer_dir):
    write_json_docs(tmp_path / "docs.jsonl", 10)
    config = hf_config(tmp_path, tiny_tokenizer_dir, str(tmp_path / "docs.jsonl"), text_column="text")

    with pytest.raises(ValueError) as error:
        prepare(config, tmp_path / "out")

    message = str(error.value)
    assert "'text'" in message
    assert "['title', 'uid', 'body']" in message
    assert "text_column" in message
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / ".out.partial").exists()


def test_too_few_documents_for_splits(tmp_path, tiny_tokenizer_dir):
    write_json_docs(tmp_path / "docs.jsonl", 2)
    config = hf_config(tmp_path, tiny_tokenizer_dir, str(tmp_path / "docs.jsonl"))

    with pytest.raises(ValueError, match=r"has 2 documents, too few to carve \['val', 'test'\]"):
        prepare(config, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_streaming_empty_split_is_reported(tmp_path, tiny_tokenizer_dir):
    # Two documents cannot fill three splits, and streaming cannot know that in advance.
    write_json_docs(tmp_path / "docs.jsonl", 2)
    config = hf_config(tmp_path, tiny_tokenizer_dir, str(tmp_path / "docs.jsonl"), streaming=True)
    labels = [hashed_split(f"0:{position}", 1234, FRACTIONS) for position in range(2)]
    empty = next(split for split in SPLITS if split not in labels)

    with pytest.raises(ValueError, match=rf"Split '{empty}' is empty"):
        prepare(config, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / ".out.partial").exists()


def test_missing_requested_split_names_available(tmp_path, tiny_tokenizer_dir):
    write_json_docs(tmp_path / "docs.jsonl", 10)
    config = hf_config(tmp_path, tiny_tokenizer_dir, str(tmp_path / "docs.jsonl"), val_split="dev")

    with pytest.raises(ValueError, match=r"no split 'dev' \(val_split\). Available splits: \['train'\]"):
        prepare(config, tmp_path / "out")


def test_same_split_twice_is_rejected(tmp_path, tiny_tokenizer_dir):
    write_json_docs(tmp_path / "docs.jsonl", 10)
    config = hf_config(tmp_path, tiny_tokenizer_dir, str(tmp_path / "docs.jsonl"), test_split="train")

    with pytest.raises(ValueError, match=r"would feed one split into several outputs"):
        prepare(config, tmp_path / "out")


def test_hf_entry_errors_before_loading(tmp_path):
    with pytest.raises(ValueError, match=r"data.path is missing"):
        validate_data_config({**hf_config(tmp_path, "gpt2", None), "path": "???"})
    with pytest.raises(ValueError, match=r"data.datasets\[0\] has unknown keys \['txt_column'\]"):
        validate_data_config(
            {**shakespeare_config(source="hf", tokenizer="gpt2"), "datasets": [{"path": "x", "txt_column": "t"}]}
        )


def test_foreign_out_dir_is_kept(tmp_path):
    out_dir = tmp_path / "precious"
    out_dir.mkdir()
    (out_dir / "notes.txt").write_text("keep me")

    with pytest.raises(ValueError, match=r"contains no stats.json"):
        prepare(shakespeare_config(), out_dir)
    assert (out_dir / "notes.txt").read_text() == "keep me"


# ---------------------------------------------------------------------------------------------
# Hydra configs and entry point


@pytest.mark.parametrize("data", ["shakespeare", "hf", "wikipedia_bookcorpus"])
def test_data_configs_compose_and_validate(data):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    overrides = [f"data={data}"] + (["data.path=json"] if data == "hf" else [])
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="prepare", overrides=overrides)

    assert cfg.out_dir == f"data/prepared/{cfg.data.name}"
    validate_data_config(OmegaConf.to_container(cfg.data, resolve=True))


@pytest.mark.slow
def test_entry_point_runs_hf_json(tmp_path, tiny_tokenizer_dir):
    write_json_docs(tmp_path / "docs.jsonl", 12, text_key="text")
    out_dir = tmp_path / "cli"
    command = [
        sys.executable,
        "-m",
        "src.prepare",
        "data=hf",
        "data.name=cli",
        "data.path=json",
        f"data.data_files={tmp_path / 'docs.jsonl'}",
        f"data.tokenizer={tiny_tokenizer_dir}",
        f"data.cache_dir={tmp_path / 'hf_cache'}",
        f"out_dir={out_dir}",
        f"hydra.run.dir={tmp_path / 'hydra'}",
    ]

    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)

    assert result.returncode == 0, result.stderr[-2000:]
    assert "Prepared cli" in result.stdout + result.stderr
    stats = json.loads((out_dir / "stats.json").read_text())
    assert sum(stats["splits"][split]["documents"] for split in SPLITS) == 12
