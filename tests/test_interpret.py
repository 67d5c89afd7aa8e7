"""Interpretability views: token classes, drop steps, statistics, and files from a tiny model."""

import json
import random

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from src.dcp import LOG_KEEP_FLOOR, DCPGPT2Config, DCPGPT2LMHeadModel
from src.eval.interpret import (
    classify_pieces,
    drop_statistics,
    drop_steps,
    dropped_masks,
    make_passage,
    masks_from_steps,
    run_stage,
    write_passage_views,
)

SPEAKERS = ["ALPHA", "BRAVO", "First Guard"]
WORDS = "the king is gone and my lord will follow him to the sea where thunder breaks upon the castle walls".split()


def fake_play(seed: int) -> str:
    """A short play in the corpus format: 'NAME:' speeches separated by blank lines."""
    rng = random.Random(seed)
    paragraphs = ["The Storm", "ACT I", "[Enter ALPHA and BRAVO]"]
    for number in range(40):
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 8))).capitalize() + rng.choice(".,!?") for _ in range(rng.randint(1, 3))]
        paragraphs.append(f"{SPEAKERS[number % len(SPEAKERS)]}:\n" + "\n".join(lines))
    return "\n\n".join(paragraphs) + "\n"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tokenizer trained here, a 2-layer DCP model that drops part of its context, saved as a model dir."""
    root = tmp_path_factory.mktemp("interpret")
    texts = [fake_play(seed) for seed in range(2)]
    documents = root / "test.jsonl"
    documents.write_text("".join(json.dumps({"title": "The Storm", "text": text}) + "\n" for text in texts))

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")

    config = DCPGPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2, dcp_rank=8, dcp_beta_init=3.0)
    torch.manual_seed(0)
    model = DCPGPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for layer in model.dcp_layers:
            layer.q_int.weight.normal_(0.0, 0.5)
            layer.k_int.weight.normal_(0.0, 0.5)

    model_dir = root / "model_dir"
    model.save_pretrained(model_dir / "model")
    tokenizer.save_pretrained(model_dir / "model")
    return {"root": root, "documents": documents, "model_dir": model_dir, "model": model, "tokenizer": tokenizer, "texts": texts}


def test_classify_pieces():
    pieces = ["\n\n", "BR", "AVO", ":", "\n", "The", " king", " is", " gone", ".", " 12"]
    classes = classify_pieces(pieces)
    assert classes == ["whitespace", "speaker", "speaker", "punctuation", "whitespace", "function", "content", "function", "content", "punctuation", "content"]


def test_speaker_needs_paragraph_start():
    classes = classify_pieces(["said", " ALPHA", ":", " no"])
    assert "speaker" not in classes


def test_drop_steps_round_trip():
    dropped = np.zeros((2, 5, 5), dtype=bool)
    dropped[0, 3:, 1] = True  # token 1 dropped from query 3 on
    dropped[1, 2:, 0] = True
    dropped[1, 4:, 2] = True
    steps = drop_steps(dropped)

    assert steps.tolist() == [[-1, 3, -1, -1, -1], [2, -1, 4, -1, -1]]
    assert np.array_equal(masks_from_steps(steps), dropped)


def test_drop_steps_rejects_non_monotone_mask():
    dropped = np.zeros((4, 4), dtype=bool)
    dropped[2, 0] = True  # dropped at query 2, kept again at query 3
    with pytest.raises(ValueError, match="monotone"):
        drop_steps(dropped)


def test_drop_statistics_on_known_mask():
    length = 6
    classes = [["speaker", "punctuation", "function", "content", "punctuation", "content"]]
    pieces = [["A", ".", " the", " king", ".", " sea"]]
    dropped = np.zeros((1, 1, length, length), dtype=bool)
    dropped[0, 0, 4:, 2] = True  # the function word is dropped by the second period (query 4)
    dropped[0, 0, 4:, 0] = True  # so is the speaker token
    stats = drop_statistics(dropped, classes, pieces, top=3, min_count=1)

    # Valid pairs: queries 1..4 (the last token predicts nothing), keys before them.
    assert stats["drop_rate_by_class"]["function"] == [pytest.approx(1 / 2)]  # pairs (3, 2), (4, 2)
    assert stats["drop_rate_by_class"]["speaker"] == [pytest.approx(1 / 4)]  # pairs (1..4, 0)
    assert stats["triggers_by_class"]["punctuation"]["share_of_drops"] == pytest.approx(1.0)
    assert stats["trigger_target"]["punctuation"]["function"] == 1
    assert stats["trigger_target"]["punctuation"]["speaker"] == 1
    assert stats["top_triggers"][0] == {"token": ".", "occurrences": 2, "mean_drops": 1.0}
    assert stats["layer_sparsity"] == [pytest.approx(2 / 10)]


def test_views_match_model_mask(tiny, tmp_path):
    model, tokenizer = tiny["model"], tiny["tokenizer"]
    ids = tokenizer(tiny["texts"][0])["input_ids"][:64]
    passage = make_passage(tokenizer, ids)
    view = write_passage_views(model, passage, tmp_path, "tiny")

    for name, minimum in [("keep_masks.png", 5_000), ("token_view.png", 5_000), ("token_view.html", 2_000), ("token_view.json", 500)]:
        size = (tmp_path / name).stat().st_size
        assert minimum < size < 5_000_000, f"{name} has {size} bytes"

    with torch.no_grad():
        log_keep = model(torch.tensor([ids]), return_log_keep=True).log_keep
    expected = np.stack([(layer[0] == LOG_KEEP_FLOOR).numpy() for layer in log_keep])  # (L, T, T)
    record = json.loads((tmp_path / "token_view.json").read_text())
    assert np.array_equal(masks_from_steps(np.array(record["drop_steps"])), expected)
    assert record["pieces"] == passage.pieces
    assert 0.0 < np.mean(view["layer_sparsity"]) < 1.0, "the tiny model drops some tokens and keeps others"

    page = (tmp_path / "token_view.html").read_text()
    assert page.count('class="t"') == 2 * len(ids)


def test_dropped_masks_dense_model_drops_nothing():
    config = DCPGPT2Config(vocab_size=20, n_positions=16, n_embd=16, n_layer=2, n_head=2, dcp_enabled=False)
    dropped = dropped_masks(DCPGPT2LMHeadModel(config).eval(), torch.zeros(1, 8, dtype=torch.long))
    assert dropped.shape == (2, 1, 8, 8)
    assert not dropped.any()


@pytest.mark.slow
def test_run_stage_writes_report(tiny, tmp_path):
    cfg = OmegaConf.create(
        {
            "tag": "tiny",
            "model_dir": str(tiny["model_dir"]),
            "documents": str(tiny["documents"]),
            "out_dir": str(tmp_path / "report"),
            "device": "cpu",
            "interpret": {
                "passage_document": 1, "passage_offset": 50, "passage_tokens": 48, "generate_tokens": 8,
                "num_passages": 6, "batch_size": 4, "top_triggers": 5, "min_trigger_count": 2,
            },
            "baseline": {"name": None, "keep_fraction": None, "length": None, "options": {}},
        }
    )
    stats = run_stage(cfg)

    for name in ("keep_masks.png", "token_view.png", "token_view.html", "token_view.json", "stats.json", "stats.md"):
        assert (tmp_path / "report" / name).exists(), name
    assert stats["passages"] == 6
    assert stats["passage"]["generated_tokens"] == 8
    assert stats["passage"]["tokens"] == 48 + 8, "the prompt keeps passage_tokens when the context has room"
    assert 0.0 < stats["sparsity"] < 1.0
    assert "| punctuation |" in (tmp_path / "report" / "stats.md").read_text()


@pytest.mark.slow
def test_run_stage_with_baseline(tiny, tmp_path):
    cfg = OmegaConf.create(
        {
            "tag": "tiny-dense",
            "model_dir": str(tiny["model_dir"]),
            "documents": str(tiny["documents"]),
            "out_dir": str(tmp_path / "report"),
            "device": "cpu",
            "interpret": {
                "passage_document": 0, "passage_offset": 0, "passage_tokens": None, "generate_tokens": 0,
                "num_passages": 4, "batch_size": 4, "top_triggers": 5, "min_trigger_count": 2,
            },
            "baseline": {"name": "streaming_llm", "keep_fraction": 0.4, "length": None, "options": {"sinks": 2}},
        }
    )
    stats = run_stage(cfg)
    assert stats["baseline"]["name"] == "streaming_llm"
    assert stats["sparsity"] == pytest.approx(0.6, abs=64 / (63 * 62 / 2))
