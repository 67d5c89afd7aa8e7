"""Local zero-shot tasks and the lm-evaluation-harness wrapper, on a tiny model built here."""

import json
import math
import random
from pathlib import Path

import pytest
import torch
from lm_eval.api.instance import Instance
from omegaconf import OmegaConf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from src.dcp import DCPGPT2Config, DCPGPT2LMHeadModel
from src.eval.baselines import apply_keep_policy, make_keep_policy
from src.eval.local_tasks import TASK_FILES, generate_local_tasks, parse_play, read_documents
from src.eval.zero_shot import LOCAL_TASKS, PAPER_TASKS, PrunedContextLM, load_model, resolve_task_names

SPEAKERS = ["ALPHA", "BRAVO", "CHARLIE", "First Guard", "DELTA"]
WORDS = (
    "the king is gone and my lord will follow him to the sea where thunder "
    "breaks upon the castle walls tonight good friend speak no more of crowns"
).split()


def fake_play(title: str, seed: int, speeches: int = 60) -> str:
    """Return a play in the corpus format: title, headings, directions and 'NAME:' speeches."""
    rng = random.Random(seed)
    paragraphs = [title, "ACT I", "SCENE I. A room in the castle.", f"[Enter {SPEAKERS[0]} and {SPEAKERS[1]}]"]
    for number in range(speeches):
        lines = []
        for _ in range(rng.randint(1, 3)):
            words = [rng.choice(WORDS) for _ in range(rng.randint(4, 8))]
            lines.append(" ".join(words).capitalize() + rng.choice([".", ",", "!", "?", ";"]))
        paragraphs.append(f"{SPEAKERS[(number + rng.randint(0, 1)) % len(SPEAKERS)]}:\n" + "\n".join(lines))
        if number == speeches // 2:
            paragraphs.append("SCENE II. The sea-coast.")
    return "\n\n".join(paragraphs) + "\n"


def write_documents(path: Path) -> None:
    with path.open("w") as handle:
        for index, title in enumerate(["The Storm", "The Crown"]):
            handle.write(json.dumps({"id": f"test/{index}", "title": title, "text": fake_play(title, index)}) + "\n")


def train_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>", unk_token="<|endoftext|>")


def build_model(vocab_size: int) -> DCPGPT2LMHeadModel:
    """A 2-layer DCP model whose interaction scores vary enough to drop some tokens and keep others."""
    config = DCPGPT2Config(
        vocab_size=vocab_size, n_positions=128, n_embd=32, n_layer=2, n_head=2, dcp_rank=8, dcp_beta_init=3.0,
        bos_token_id=0, eos_token_id=0,
    )
    torch.manual_seed(0)
    model = DCPGPT2LMHeadModel(config)
    with torch.no_grad():
        for layer in model.dcp_layers:
            layer.q_int.weight.normal_(0.0, 0.5)
            layer.k_int.weight.normal_(0.0, 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Held-out documents, a tokenizer trained on them and a tiny DCP model saved as a pipeline model dir."""
    root = tmp_path_factory.mktemp("zero_shot")
    documents = root / "test.jsonl"
    write_documents(documents)

    tokenizer = train_tokenizer([record["text"] for record in read_documents(documents)])
    model_dir = root / "models" / "tiny"
    build_model(len(tokenizer)).save_pretrained(model_dir / "model")
    tokenizer.save_pretrained(model_dir / "model")
    return {"root": root, "documents": documents, "model_dir": model_dir}


def test_generated_tasks_are_deterministic(workspace, tmp_path):
    first = generate_local_tasks(workspace["documents"], tmp_path / "a", max_examples=12, context_chars=200, seed=3)
    generate_local_tasks(workspace["documents"], tmp_path / "b", max_examples=12, context_chars=200, seed=3)

    for filename in [*TASK_FILES.values(), "manifest.json"]:
        assert (tmp_path / "a" / filename).read_bytes() == (tmp_path / "b" / filename).read_bytes()
    for name in TASK_FILES:
        assert first["tasks"][name]["examples"] == 12


def test_generated_examples_are_valid(workspace, tmp_path):
    generate_local_tasks(workspace["documents"], tmp_path, max_examples=30, context_chars=200, seed=5)
    texts = [record["text"] for record in read_documents(workspace["documents"])]

    for name in ("next_line", "speaker"):
        for row in map(json.loads, (tmp_path / TASK_FILES[name]).read_text().splitlines()):
            assert len(row["choices"]) == 4
            assert len(set(row["choices"])) == 4
            assert 0 <= row["label"] < 4
            assert len(row["context"]) <= 200
            assert texts[row["doc"]][: row["offset"]].endswith(row["context"]), "context is the text before the answer"
            answer = row["choices"][row["label"]]
            assert texts[row["doc"]][row["offset"] :].startswith(answer)

    for row in map(json.loads, (tmp_path / TASK_FILES["cloze"]).read_text().splitlines()):
        word = row["target"].strip()
        assert row["target"] == f" {word}"
        assert word.lower() in row["context"].lower(), "the target word occurs in the context"
        assert texts[row["doc"]][row["offset"] :].startswith(word)


def test_speaker_choices_are_names(workspace, tmp_path):
    generate_local_tasks(workspace["documents"], tmp_path, max_examples=20, context_chars=200, seed=1)
    for row in map(json.loads, (tmp_path / TASK_FILES["speaker"]).read_text().splitlines()):
        assert all(choice[:-1] in SPEAKERS and choice.endswith(":") for choice in row["choices"])
        assert row["context"].endswith("\n\n")


def test_parse_play_handles_inline_speakers():
    text = "Title\n\nALPHA: First words here.\nMore words.\n\nBRAVO:\nReply one.\n\nALPHA: Again.\n\nBRAVO:\nReply two.\n\nNote: only once.\n"
    play = parse_play("Title", text)

    assert [speech.speaker for speech in play.speeches] == ["ALPHA", "BRAVO", "ALPHA", "BRAVO"]
    assert [line.text for line in play.speeches[0].lines] == ["First words here.", "More words."]
    first = play.speeches[0].lines[0]
    assert text[first.start : first.end] == "First words here."


def test_generate_rejects_text_without_speeches(tmp_path):
    documents = tmp_path / "test.jsonl"
    documents.write_text(json.dumps({"title": "Essay", "text": "Just prose.\n\nMore prose.\n"}) + "\n")
    with pytest.raises(ValueError, match="no speeches"):
        generate_local_tasks(documents, tmp_path / "out")


def test_resolve_task_names():
    assert resolve_task_names("local") == list(LOCAL_TASKS)
    assert resolve_task_names("paper") == list(PAPER_TASKS)
    assert resolve_task_names(["local", "dcp_cloze", "piqa"]) == [*LOCAL_TASKS, "piqa"]
    with pytest.raises(ValueError, match="empty"):
        resolve_task_names([])


def direct_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """Sum of log p(continuation | context) from one unpadded forward of the model."""
    context_ids = tokenizer(context)["input_ids"]
    whole = tokenizer(context + continuation)["input_ids"]
    continuation_ids = whole[len(context_ids) :]
    logits = model(torch.tensor([whole[:-1]])).logits[0].float()
    log_probs = torch.log_softmax(logits, dim=-1)[len(context_ids) - 1 :]
    return float(log_probs.gather(-1, torch.tensor(continuation_ids)[:, None]).sum())


def test_loglikelihood_goes_through_hard_mask(workspace):
    model, tokenizer = load_model(workspace["model_dir"])
    lm = PrunedContextLM(model, tokenizer, batch_size=4)
    assert all(math.isinf(layer.alpha) for layer in model.dcp_layers)

    context = "ALPHA:\nThe king is gone and my lord will follow him to the sea.\n\nBRAVO:\nGood friend speak no"
    requests = [(context, " more"), (context, " crowns"), ("CHARLIE:\nThe", " sea")]
    instances = [Instance("loglikelihood", doc={}, arguments=request, idx=0) for request in requests]
    scores = [value for value, _ in lm.loglikelihood(instances)]
    with torch.no_grad():
        expected = [direct_loglikelihood(model, tokenizer, *request) for request in requests]
    assert scores == pytest.approx(expected, abs=1e-4), "batched, padded scoring equals one unpadded forward"

    summary = lm.keep_summary()
    assert 0.0 < summary["sparsity"] < 1.0, "the tiny model drops some tokens and keeps others"
    assert summary["scored_sequences"] == 3

    apply_keep_policy(model, make_keep_policy("local", 0.05, length=64))
    windowed = [value for value, _ in lm.loglikelihood(instances)]
    apply_keep_policy(model, None)
    assert windowed[0] != pytest.approx(scores[0], abs=1e-4), "changing the keep mask changes the scores"


@pytest.mark.slow
def test_lm_eval_runs_local_tasks_offline(workspace, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from src.eval.zero_shot import evaluate, load_tasks

    data_dir = workspace["root"] / "tasks"
    generate_local_tasks(workspace["documents"], data_dir, max_examples=6, context_chars=200, seed=0)
    model, tokenizer = load_model(workspace["model_dir"])
    lm = PrunedContextLM(model, tokenizer, batch_size=8)

    summary = evaluate(lm, load_tasks(list(LOCAL_TASKS), data_dir), limit=6, bootstrap_iters=10)
    assert set(summary) == set(LOCAL_TASKS)
    for task in LOCAL_TASKS:
        assert 0.0 <= summary[task]["acc"] <= 1.0
        assert summary[task]["acc_stderr"] >= 0.0
    assert summary["dcp_cloze"]["perplexity"] > 1.0
    assert lm.keep_summary()["scored_sequences"] == 6 * 4 + 6 * 4 + 6


@pytest.mark.slow
def test_run_stage_writes_metrics_and_mlflow(workspace, monkeypatch, tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    from src.eval.zero_shot import run_stage
    from src.tracking import write_run_file

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = MlflowClient().create_run(MlflowClient().create_experiment("zero-shot-test"))
    write_run_file(workspace["model_dir"] / "model", run.info.run_id, run.info.experiment_id)

    cfg = OmegaConf.create(
        {
            "tag": None,
            "model_dir": str(workspace["model_dir"] / "model"),
            "out_path": None,
            "device": "cpu",
            "mlflow": True,
            "zero_shot": {"tasks": "local", "limit": 4, "batch_size": 8, "max_length": None, "num_fewshot": 0, "bootstrap_iters": 10, "seed": 0},
            "local_tasks": {"documents": str(workspace["documents"]), "data_dir": str(tmp_path / "tasks"), "max_examples": 4, "context_chars": 150, "seed": 0},
            "baseline": {"name": "local", "keep_fraction": 0.5, "length": None, "options": {}},
        }
    )
    monkeypatch.chdir(tmp_path)
    record = run_stage(cfg)

    written = json.loads((tmp_path / "metrics" / "zero_shot" / "tiny.json").read_text())
    assert written == json.loads(json.dumps(record))
    assert written["tag"] == "tiny", "the tag defaults to the model's folder name"
    assert written["baseline"]["name"] == "local"
    assert 0.0 < written["sparsity"] < 1.0
    logged = MlflowClient().get_run(run.info.run_id).data.metrics
    assert logged["zero_shot/local-0.5/dcp_next_line/acc"] == written["tasks"]["dcp_next_line"]["acc"]
    assert logged["zero_shot/local-0.5/sparsity"] == pytest.approx(written["sparsity"])


@pytest.mark.slow
def test_hub_task_offline_names_hf_hub_offline(monkeypatch):
    from src.eval.zero_shot import load_tasks

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE"):
        load_tasks(["piqa"], None)


@pytest.mark.slow
def test_generate_from_prepared_corpus(tiny_data, tmp_path):
    manifest = generate_local_tasks(tiny_data / "test.jsonl", tmp_path, max_examples=20, context_chars=500, seed=0)
    assert len(manifest["plays"]) >= 1
    for name in TASK_FILES:
        assert manifest["tasks"][name]["examples"] == 20, f"{name} finds enough questions in the held-out plays"
