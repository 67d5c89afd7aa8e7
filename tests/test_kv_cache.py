"""Tests of the paged, pruned KV cache on its own (no model)."""

import math

import pytest
import torch

from src.dcp.kv_cache import PagedLayerCache, PrunedKVCache
from src.dcp.modeling import DCPGPT2Config

HEADS, HEAD_DIM, RANK, PAGE = 2, 4, 3, 4


pytestmark = pytest.mark.usefixtures("single_thread")


def make_cache(batch: int, rank: int | None = RANK, **kwargs) -> PagedLayerCache:
    return PagedLayerCache(batch, HEADS, HEAD_DIM, rank, torch.float32, "cpu", page_size=PAGE, **kwargs)


def random_prompt(batch: int, length: int, keep: torch.Tensor, generator: torch.Generator):
    """Return key, value (B, H, T, d), k_int (B, T, r), keep (B, T), position (B, T)."""
    key = torch.randn(batch, HEADS, length, HEAD_DIM, generator=generator)
    value = torch.randn(batch, HEADS, length, HEAD_DIM, generator=generator)
    k_int = torch.randn(batch, length, RANK, generator=generator)
    position = torch.arange(length).expand(batch, length)
    return key, value, k_int, keep, position


def reference_attention(query, key, value, keep, scaling):
    """Softmax attention of query (B, H, d) over the kept tokens of key/value (B, H, T, d)."""
    scores = torch.einsum("bhd,bhtd->bht", query, key) * scaling
    scores = scores.masked_fill(~keep[:, None, :], -math.inf)
    return torch.einsum("bht,bhtd->bhd", scores.softmax(dim=-1), value)


def test_fill_attend_matches_masked_softmax():
    generator = torch.Generator().manual_seed(0)
    keep = torch.rand(3, 11, generator=generator) < 0.6
    keep[:, -1] = True
    key, value, k_int, keep, position = random_prompt(3, 11, keep, generator)
    cache = make_cache(3)
    cache.fill(key, value, k_int, keep, position)
    cache.check_invariants()

    query = torch.randn(3, HEADS, HEAD_DIM, generator=generator)
    output = cache.attend(query, scaling=0.5)
    expected = reference_attention(query, key, value, keep, 0.5)
    assert torch.allclose(output, expected, atol=1e-6)
    assert cache.live.tolist() == keep.sum(dim=1).tolist()


def test_pages_follow_each_row_live_count():
    # One row keeps 200 tokens, 15 rows keep 3: pages follow each row, not the longest one.
    generator = torch.Generator().manual_seed(1)
    keep = torch.zeros(16, 200, dtype=torch.bool)
    keep[0] = True
    keep[1:, -3:] = True
    cache = make_cache(16)
    cache.fill(*random_prompt(16, 200, keep, generator))

    stats = cache.stats()
    assert stats.padded_length == 200
    assert stats.mean_live == pytest.approx((200 + 15 * 3) / 16)
    assert cache.used_pages == math.ceil(200 / PAGE) + 15
    padded_pages = 16 * math.ceil(200 / PAGE)
    assert cache.capacity < padded_pages / 4


def test_drop_removes_nonpositive_scores_only():
    cache = make_cache(1)
    key = torch.zeros(1, HEADS, 4, HEAD_DIM)
    # Scores against q_int = e0 with beta 0: +1, 0, -1, +2 (scaled by 1/sqrt(r)).
    k_int = torch.zeros(1, 4, RANK)
    k_int[0, :, 0] = torch.tensor([1.0, 0.0, -1.0, 2.0])
    cache.fill(key, key, k_int, torch.ones(1, 4, dtype=torch.bool), torch.arange(4)[None])

    q_int = torch.zeros(1, RANK)
    q_int[0, 0] = 1.0
    dropped = cache.drop(q_int, torch.tensor(0.0))
    assert dropped.tolist() == [2]
    alive = cache.alive_by_position(8)[0]
    assert alive.nonzero().squeeze(1).tolist() == [0, 3]


def test_drop_respects_beta():
    cache = make_cache(1)
    key = torch.zeros(1, HEADS, 3, HEAD_DIM)
    k_int = torch.zeros(1, 3, RANK)
    k_int[0, :, 0] = torch.tensor([-1.0, -2.0, -4.0]) * math.sqrt(RANK)
    cache.fill(key, key, k_int, torch.ones(1, 3, dtype=torch.bool), torch.arange(3)[None])

    q_int = torch.zeros(1, RANK)
    q_int[0, 0] = 1.0
    cache.drop(q_int, torch.tensor(2.5))  # scores 1.5, 0.5, -1.5
    assert cache.live.tolist() == [2]


def test_append_fills_holes_before_new_pages():
    generator = torch.Generator().manual_seed(2)
    keep = torch.ones(2, 8, dtype=torch.bool)
    key, value, k_int, keep, position = random_prompt(2, 8, keep, generator)
    # Every token scores > 0 against a query of ones except row 0, token 2.
    k_int = k_int.abs()
    k_int[0, 2, :] = -1.0
    cache = make_cache(2)
    cache.fill(key, value, k_int, keep, position)
    pages_before = cache.used_pages

    cache.drop(torch.ones(2, RANK), torch.tensor(0.0))
    new = torch.randn(2, HEADS, HEAD_DIM, generator=generator)
    cache.append(new, new, torch.ones(2, RANK), torch.tensor([8, 8]))
    cache.check_invariants()

    # Row 0 reused its hole; row 1 had full pages and got a new one.
    assert cache.used_pages == pages_before + 1
    assert cache.row_pages.tolist() == [2, 3]
    assert cache.live.tolist() == [8, 9]


def test_storage_grows_when_full():
    cache = make_cache(2)
    keep = torch.ones(2, 1, dtype=torch.bool)
    cache.fill(*random_prompt(2, 1, keep, torch.Generator().manual_seed(3)))
    capacities = {cache.capacity}
    for step in range(40):
        token = torch.randn(2, HEADS, HEAD_DIM)
        cache.append(token, token, torch.randn(2, RANK), torch.tensor([step + 1, step + 1]))
        capacities.add(cache.capacity)
    cache.check_invariants()
    assert cache.live.tolist() == [41, 41]
    assert cache.used_pages == 2 * math.ceil(41 / PAGE)
    assert max(capacities) > min(capacities)


def test_compaction_shrinks_allocated_bytes():
    generator = torch.Generator().manual_seed(4)
    batch, length = 4, 256
    key, value, k_int, keep, position = random_prompt(batch, length, torch.ones(batch, length, dtype=torch.bool), generator)
    # Every 8th token has k_int along +e0 and survives; the others point along -e0 and drop.
    k_int = torch.zeros(batch, length, RANK)
    k_int[:, :, 0] = -1.0
    k_int[:, ::8, 0] = 1.0
    cache = make_cache(batch)
    cache.fill(key, value, k_int, keep, position)
    bytes_full = cache.allocated_bytes()
    query_direction = torch.zeros(batch, RANK)
    query_direction[:, 0] = 1.0

    cache.drop(query_direction, torch.tensor(0.0))
    token = torch.randn(batch, HEADS, HEAD_DIM)
    cache.append(token, token, query_direction, torch.full((batch,), length))
    compacted_rows = cache.compact()
    cache.check_invariants()

    live = cache.live.tolist()
    assert live == [length // 8 + 1] * batch
    assert compacted_rows == batch
    assert cache.used_pages == batch * math.ceil(live[0] / PAGE)
    assert cache.allocated_bytes() < bytes_full / 4

    # Attention after compaction still sees exactly the survivors and the new token.
    survivors = torch.zeros(batch, length + 1, dtype=torch.bool)
    survivors[:, :length:8] = True
    survivors[:, length] = True
    all_keys = torch.cat([key, token[:, :, None]], dim=2)
    all_values = torch.cat([value, token[:, :, None]], dim=2)
    query = torch.randn(batch, HEADS, HEAD_DIM, generator=generator)
    expected = reference_attention(query, all_keys, all_values, survivors, 0.3)
    assert torch.allclose(cache.attend(query, 0.3), expected, atol=1e-6)


def test_compaction_keeps_positions():
    cache = make_cache(1)
    length = 3 * PAGE
    key = torch.randn(1, HEADS, length, HEAD_DIM)
    k_int = torch.full((1, length, RANK), -1.0)
    k_int[0, [1, 7, 11]] = 1.0
    cache.fill(key, key, k_int, torch.ones(1, length, dtype=torch.bool), torch.arange(100, 100 + length)[None])

    cache.drop(torch.ones(1, RANK), torch.tensor(0.0))
    cache.compact()
    cache.check_invariants()
    assert cache.used_pages == 1
    alive = cache.alive_by_position(200)[0].nonzero().squeeze(1).tolist()
    assert alive == [101, 107, 111]


def test_dense_cache_is_append_only():
    cache = make_cache(2, rank=None)
    keep = torch.ones(2, 5, dtype=torch.bool)
    key, value, _, keep, position = random_prompt(2, 5, keep, torch.Generator().manual_seed(5))
    cache.fill(key, value, None, keep, position)
    token = torch.randn(2, HEADS, HEAD_DIM)
    cache.append(token, token, None, torch.tensor([5, 5]))
    assert cache.live.tolist() == [6, 6]
    assert cache.k_int is None
    with pytest.raises(RuntimeError, match="dense layer"):
        cache.drop(torch.ones(2, RANK), torch.tensor(0.0))


def test_fill_rejects_row_without_tokens():
    keep = torch.ones(2, 4, dtype=torch.bool)
    keep[1] = False
    cache = make_cache(2)
    with pytest.raises(ValueError, match="at least one token"):
        cache.fill(*random_prompt(2, 4, keep, torch.Generator().manual_seed(6)))


def test_constructor_rejects_bad_settings():
    with pytest.raises(ValueError, match="page_size"):
        PagedLayerCache(1, HEADS, HEAD_DIM, RANK, torch.float32, "cpu", page_size=0)
    with pytest.raises(ValueError, match="min_fill"):
        make_cache(1, min_fill=0.0)
    with pytest.raises(ValueError, match="growth"):
        make_cache(1, growth=1.0)


def test_model_cache_reports_bytes_per_layer():
    config = DCPGPT2Config(n_layer=3, n_embd=16, n_head=2, n_positions=32, vocab_size=20, dcp_rank=4)
    cache = PrunedKVCache.for_model(config, batch_size=2, dtype=torch.float32, device="cpu", page_size=PAGE)
    assert len(cache.layers) == 3
    assert cache.layers[0].interaction_rank == 4
    assert sum(cache.layer_allocated_bytes()) == cache.allocated_bytes()

    dense_config = DCPGPT2Config(n_layer=2, n_embd=16, n_head=2, n_positions=32, vocab_size=20, dcp_enabled=False)
    dense = PrunedKVCache.for_model(dense_config, batch_size=2, dtype=torch.float32, device="cpu")
    assert all(layer.is_dense for layer in dense.layers)
