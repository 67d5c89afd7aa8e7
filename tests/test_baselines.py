"""Fixed-pattern baselines: budget fitting, mask conventions, StreamingLLM sinks, H2O eviction."""

import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from src.dcp import LOG_KEEP_FLOOR, DCPGPT2Config, DCPGPT2LMHeadModel, keep_stats
from src.eval.baselines import (
    POLICY_NAMES,
    HeavyHitters,
    StreamingLLM,
    Strided,
    apply_keep_policy,
    h2o_log_keep,
    make_keep_policy,
    pair_count,
)


def random_heads(batch: int, length: int, heads: int = 2, head_dim: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, heads, length, head_dim, generator=generator)
    key = torch.randn(batch, heads, length, head_dim, generator=generator)
    return query, key


def run_policy(policy, key_valid: torch.Tensor, seed: int = 0) -> torch.Tensor:
    query, key = random_heads(key_valid.shape[0], key_valid.shape[1], seed=seed)
    return policy(layer_idx=0, query=query, key=key, key_valid=key_valid)


@pytest.mark.parametrize("name", POLICY_NAMES)
@pytest.mark.parametrize("keep_fraction", [0.2, 0.5, 0.8])
@pytest.mark.parametrize("length", [64, 101])
def test_budget_within_one_token_per_row(name, keep_fraction, length):
    policy = make_keep_policy(name, keep_fraction, length=length)
    key_valid = torch.ones(1, length, dtype=torch.bool)
    stats = keep_stats(run_policy(policy, key_valid), key_valid)

    target = keep_fraction * pair_count(length)
    rows = length - 2  # queries that have valid pairs
    assert int(stats.pair_count) == pair_count(length)
    assert abs(float(stats.keep_sum) - target) <= rows


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_mask_follows_conventions(name):
    length = 40
    policy = make_keep_policy(name, 0.4, length=length)
    log_keep = run_policy(policy, torch.ones(3, length, dtype=torch.bool))

    assert log_keep.shape == (3, length, length)
    assert log_keep.dtype == torch.float32
    assert set(log_keep.unique().tolist()) <= {0.0, LOG_KEEP_FLOOR}
    assert (log_keep.diagonal(dim1=-2, dim2=-1) == 0).all(), "a token never drops itself"
    assert (log_keep.triu(1) == 0).all(), "future entries stay 0"

    dropped = log_keep == LOG_KEEP_FLOOR
    reappears = dropped[:, :-1] & ~dropped[:, 1:]
    assert not reappears.any(), "dropped stays dropped along the query axis"
    assert dropped.any(), "the budget drops something"


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_left_padding_gives_same_mask(name):
    length, padding = 30, 5
    policy = make_keep_policy(name, 0.4, length=length)
    query, key = random_heads(1, length, seed=3)
    alone = policy(layer_idx=0, query=query, key=key, key_valid=torch.ones(1, length, dtype=torch.bool))

    padded_query = torch.cat([torch.randn(1, 2, padding, 8), query], dim=2)
    padded_key = torch.cat([torch.randn(1, 2, padding, 8), key], dim=2)
    key_valid = torch.ones(1, length + padding, dtype=torch.bool)
    key_valid[:, :padding] = False
    padded = policy(layer_idx=0, query=padded_query, key=padded_key, key_valid=key_valid)

    assert torch.equal(padded[:, padding:, padding:], alone)
    assert (padded[:, :padding] == 0).all(), "padding queries drop nothing"
    assert (padded[:, :, :padding] == 0).all(), "padding keys are never marked"


def test_streaming_llm_keeps_sinks():
    length = 80
    policy = make_keep_policy("streaming_llm", 0.25, length=length, sinks=4)
    assert isinstance(policy, StreamingLLM)
    log_keep = run_policy(policy, torch.ones(2, length, dtype=torch.bool))

    assert (log_keep[:, :, :4] == 0).all(), "every query keeps the sinks"
    last_row = log_keep[0, -1]
    kept = (last_row == 0).nonzero().flatten().tolist()
    window = list(range(length - policy.window, length))
    assert kept == [0, 1, 2, 3] + window


def test_strided_keeps_summary_columns():
    length = 60
    policy = make_keep_policy("strided", 0.3, length=length, stride=6)
    assert isinstance(policy, Strided)
    log_keep = run_policy(policy, torch.ones(1, length, dtype=torch.bool))

    summary = [j for j in range(length) if j % 6 == 5]
    assert (log_keep[0, :, summary] == 0).all()
    far = [j for j in range(length - policy.window) if j % 6 != 5]
    assert (log_keep[0, -1, far] == LOG_KEEP_FLOOR).all()


def test_h2o_evicts_lowest_accumulated_score():
    length, heavy, recent = 48, 6, 4
    query, key = random_heads(2, length, seed=7)
    key_valid = torch.ones(2, length, dtype=torch.bool)
    log_keep, scores = h2o_log_keep(query, key, key_valid, heavy=heavy, recent=recent, record_scores=True)
    kept = log_keep == 0  # (B, T, T), True on the diagonal and above

    positions = torch.arange(length)
    for batch in range(2):
        for step in range(heavy + recent, length):
            before = kept[batch, step - 1, :step]  # cache after the previous step
            after = kept[batch, step, :step]
            evicted = before & ~after
            assert int(evicted.sum()) == 1, f"one eviction at step {step}"
            assert int(after.sum()) + 1 == heavy + recent, "the cache holds heavy + recent tokens"

            candidates = after & (step - positions[:step] >= recent)
            assert scores[batch, step, :step][evicted].max() <= scores[batch, step, :step][candidates].min()


def test_h2o_keeps_heavy_hitters():
    length, heads, head_dim = 40, 2, 8
    query = torch.zeros(1, heads, length, head_dim)
    query[..., 0] = 1.0
    key = torch.randn(1, heads, length, head_dim) * 0.1
    # Every later query attends to token 3, and from step 11 on almost only to token 11, so both
    # outscore token 0, which H2O favours because it collects all attention of the first queries.
    key[:, :, 3, 0] = 20.0
    key[:, :, 11, 0] = 30.0
    log_keep, _ = h2o_log_keep(query, key, torch.ones(1, length, dtype=torch.bool), heavy=2, recent=3)

    kept_last = (log_keep[0, -1] == 0).nonzero().flatten().tolist()
    assert kept_last == [3, 11, length - 3, length - 2, length - 1]


def test_h2o_policy_budget_matches_window():
    policy = make_keep_policy("h2o", 0.5, length=64, heavy_ratio=0.25)
    assert isinstance(policy, HeavyHitters)
    window = make_keep_policy("local", 0.5, length=64).window
    assert policy.budget == window
    assert policy.heavy == round(window * 0.25)


def test_make_keep_policy_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown keep policy"):
        make_keep_policy("random", 0.5, length=64)
    with pytest.raises(ValueError, match="keep_fraction"):
        make_keep_policy("local", 0.0, length=64)
    with pytest.raises(ValueError, match="keep_fraction"):
        make_keep_policy("local", 1.5, length=64)
    with pytest.raises(TypeError, match="unexpected"):
        make_keep_policy("local", 0.5, length=64, windows=3)
    with pytest.raises(ValueError, match="fewer sinks"):
        make_keep_policy("streaming_llm", 0.05, length=64, sinks=32)


def test_aliases_resolve():
    assert make_keep_policy("sliding_window", 0.5, length=32).name == "local"
    assert make_keep_policy("StreamingLLM", 0.5, length=32).name == "streaming_llm"


def tiny_model(dcp_enabled: bool) -> DCPGPT2LMHeadModel:
    config = DCPGPT2Config(vocab_size=50, n_positions=64, n_embd=16, n_layer=2, n_head=2, dcp_rank=4, dcp_enabled=dcp_enabled)
    torch.manual_seed(0)
    return DCPGPT2LMHeadModel(config).eval()


def test_apply_keep_policy_sets_model_mask():
    model = tiny_model(dcp_enabled=False)
    policy = make_keep_policy("local", 0.3, length=32)
    input_ids = torch.randint(0, 50, (2, 32))

    apply_keep_policy(model, policy)
    output = model(input_ids, return_log_keep=True)
    expected = policy(layer_idx=0, query=None, key=None, key_valid=torch.ones(2, 32, dtype=torch.bool))
    for log_keep in output.log_keep:
        assert torch.equal(log_keep, expected)
    assert math.isclose(float(output.keep_fraction), 0.3, abs_tol=30 / pair_count(32))

    apply_keep_policy(model, None)
    dense = model(input_ids, return_log_keep=True)
    assert all(log_keep is None for log_keep in dense.log_keep)
    assert float(dense.keep_fraction) == 1.0


def test_apply_keep_policy_changes_logits():
    model = tiny_model(dcp_enabled=True)
    input_ids = torch.randint(0, 50, (1, 40))
    learned = model(input_ids).logits

    apply_keep_policy(model, make_keep_policy("local", 0.1, length=40))
    windowed = model(input_ids).logits
    assert torch.allclose(learned[:, :2], windowed[:, :2], atol=1e-5), "the first tokens see the same context"
    assert not torch.allclose(learned[:, -1], windowed[:, -1], atol=1e-4)


def test_apply_keep_policy_rejects_plain_gpt2():
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(TypeError, match="from_dense"):
        apply_keep_policy(model, make_keep_policy("local", 0.5, length=16))
