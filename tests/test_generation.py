"""Exactness tests of cached decoding: the pruned KV cache against the full-sequence hard mask."""

import pytest
import torch

from src.dcp import DCPGPT2Config, DCPGPT2LMHeadModel, decode_step, generate, prefill

VOCAB, CONTEXT = 50, 64


pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_model(dcp_enabled: bool = True, add_previous_mask: bool = False, seed: int = 0) -> DCPGPT2LMHeadModel:
    """A 2-layer model whose interaction weights drop a good share of the context at alpha = inf."""
    torch.manual_seed(seed)
    config = DCPGPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=4,
        n_positions=CONTEXT,
        vocab_size=VOCAB,
        dcp_enabled=dcp_enabled,
        dcp_rank=8,
        dcp_add_previous_mask=add_previous_mask,
        bos_token_id=None,
        eos_token_id=None,
    )
    model = DCPGPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for layer in model.dcp_layers:
            if dcp_enabled:
                layer.q_int.weight.normal_(0.0, 0.5)
                layer.k_int.weight.normal_(0.0, 0.5)
                layer.beta.fill_(1.0)
        # Larger output weights make greedy tokens vary instead of repeating one id.
        model.lm_head.weight.normal_(0.0, 1.0)
    model.generation_config.eos_token_id = None
    return model


def padded_batch(lengths: list[int], side: str, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts of the given lengths, padded on `side` with id 0; returns input_ids, attention_mask."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    input_ids = torch.zeros(len(lengths), width, dtype=torch.int64)
    attention_mask = torch.zeros(len(lengths), width, dtype=torch.int64)
    for row, length in enumerate(lengths):
        tokens = torch.randint(1, VOCAB, (length,), generator=generator)
        columns = slice(width - length, width) if side == "left" else slice(0, length)
        input_ids[row, columns] = tokens
        attention_mask[row, columns] = 1
    return input_ids, attention_mask


def row_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, row: int) -> torch.Tensor:
    return input_ids[row][attention_mask[row].bool()][None]


def reference_greedy(model, prompt: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding of one unpadded row (1, T) by full forward passes over the growing sequence.

    Returns the new tokens (steps,) and the logits before each of them (steps, V).
    """
    sequence = prompt
    logits = []
    with torch.no_grad():
        for _ in range(steps):
            step_logits = model(sequence).logits[0, -1]
            logits.append(step_logits)
            sequence = torch.cat([sequence, step_logits.argmax()[None, None]], dim=1)
    return sequence[0, prompt.shape[1] :], torch.stack(logits)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("dcp_enabled", [True, False])
def test_greedy_matches_full_forward(side, dcp_enabled):
    model = tiny_model(dcp_enabled=dcp_enabled)
    lengths = [9, 4, 13]
    input_ids, attention_mask = padded_batch(lengths, side)
    steps = 24

    result = generate(model, input_ids, attention_mask, max_new_tokens=steps, return_dict=True)

    assert result.sequences.shape == (3, input_ids.shape[1] + steps)
    for row in range(3):
        tokens, logits = reference_greedy(model, row_tokens(input_ids, attention_mask, row), steps)
        assert torch.equal(result.sequences[row, input_ids.shape[1] :], tokens), f"row {row}"
        assert torch.allclose(result.logits[row], logits, atol=1e-4, rtol=0), f"row {row}"


def test_left_padded_batch_matches_hf_generate_without_cache():
    model = tiny_model()
    input_ids, attention_mask = padded_batch([7, 12, 3], "left")
    ours = generate(model, input_ids, attention_mask, max_new_tokens=20)
    theirs = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=20, use_cache=False, do_sample=False, pad_token_id=0)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_rows_match_rows_alone(side):
    model = tiny_model(seed=3)
    input_ids, attention_mask = padded_batch([5, 11, 2, 8], side, seed=4)
    steps = 16
    batch_tokens = generate(model, input_ids, attention_mask, max_new_tokens=steps)[:, input_ids.shape[1] :]
    for row in range(4):
        alone = generate(model, row_tokens(input_ids, attention_mask, row), max_new_tokens=steps)
        assert torch.equal(batch_tokens[row], alone[0, -steps:]), f"row {row}"


def test_cache_keeps_exactly_the_hard_mask_tokens():
    model = tiny_model(seed=5)
    lengths = [10, 3, 14]
    input_ids, attention_mask = padded_batch(lengths, "left", seed=6)
    steps = 30
    result = generate(model, input_ids, attention_mask, max_new_tokens=steps, return_dict=True)

    # The cache has seen every token but the last generated one; its query row is index -2.
    full_mask = torch.cat([attention_mask, torch.ones(3, steps, dtype=torch.int64)], dim=1)
    with torch.no_grad():
        output = model(result.sequences, attention_mask=full_mask, return_log_keep=True)

    total_live, total_seen = 0, 0
    for layer, (log_keep, layer_cache) in enumerate(zip(output.log_keep, result.cache.layers)):
        layer_cache.check_invariants()
        alive = layer_cache.alive_by_position(CONTEXT)
        for row, length in enumerate(lengths):
            real = full_mask[row].bool()
            kept = (log_keep[row, -2][real][: length + steps - 1] == 0).nonzero().squeeze(1)
            cached = alive[row].nonzero().squeeze(1)
            assert torch.equal(cached, kept), f"layer {layer} row {row}"
            total_live += kept.numel()
            total_seen += length + steps - 1

    # The model really drops tokens, but not all of them.
    assert 0.1 < 1 - total_live / total_seen < 0.95


def test_decode_positions_are_true_positions():
    model = tiny_model(seed=7)
    lengths = [6, 2]
    input_ids, attention_mask = padded_batch(lengths, "right", seed=8)
    seen_positions = []
    hook = model.transformer.wpe.register_forward_hook(lambda module, args, output: seen_positions.append(args[0].clone()))
    try:
        logits, cache = prefill(model, input_ids, attention_mask, max_new_tokens=10)
        for _ in range(10):
            logits = decode_step(model, cache, logits.argmax(dim=-1))
    finally:
        hook.remove()

    assert seen_positions[0][0].tolist() == list(range(6))
    assert seen_positions[0][1, :2].tolist() == [0, 1]
    for step, positions in enumerate(seen_positions[1:]):
        assert positions.tolist() == [6 + step, 2 + step]

    # Tokens were evicted, so the live count is below the true position of the next token.
    live = cache.live_counts()
    assert bool((live < cache.next_position[None]).any())


def test_previous_mask_option_matches_full_forward():
    model = tiny_model(add_previous_mask=True, seed=9)
    input_ids, attention_mask = padded_batch([8, 12], "left", seed=10)
    steps = 20
    result = generate(model, input_ids, attention_mask, max_new_tokens=steps, return_dict=True)
    for row in range(2):
        tokens, logits = reference_greedy(model, row_tokens(input_ids, attention_mask, row), steps)
        assert torch.equal(result.sequences[row, -steps:], tokens)
        assert torch.allclose(result.logits[row], logits, atol=1e-4, rtol=0)


def test_sampling_matches_hf_generate_with_seed():
    model = tiny_model(seed=11)
    input_ids, attention_mask = padded_batch([6, 9], "left", seed=12)
    settings = dict(max_new_tokens=15, do_sample=True, temperature=0.8, top_k=10, top_p=0.9)

    torch.manual_seed(123)
    ours = generate(model, input_ids, attention_mask, **settings)
    torch.manual_seed(123)
    theirs = model.generate(input_ids, attention_mask=attention_mask, use_cache=False, pad_token_id=0, **settings)
    assert torch.equal(ours, theirs)


def test_eos_pads_finished_rows_and_stops_early():
    model = tiny_model(seed=13)
    input_ids, attention_mask = padded_batch([5, 7], "left", seed=14)
    greedy = generate(model, input_ids, attention_mask, max_new_tokens=12)
    eos = int(greedy[0, input_ids.shape[1] + 2])  # row 0's third new token

    result = generate(model, input_ids, attention_mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=49)
    theirs = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=12, use_cache=False, eos_token_id=eos, pad_token_id=49)
    assert torch.equal(result, theirs)
    new_tokens = result[0, input_ids.shape[1] :]
    first_eos = int((new_tokens == eos).nonzero()[0])
    assert bool((new_tokens[first_eos + 1 :] == 49).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits_are_finite(dtype):
    model = tiny_model(seed=15).to(dtype)
    input_ids, attention_mask = padded_batch([9, 4], "left", seed=16)
    result = generate(model, input_ids, attention_mask, max_new_tokens=8, return_dict=True)
    assert bool(torch.isfinite(result.logits).all())
    assert result.cache.layers[0].key.dtype == dtype


def test_bad_inputs_raise_clear_errors():
    model = tiny_model()
    prompt = torch.randint(0, VOCAB, (2, 5))
    with pytest.raises(ValueError, match="longer than the model context"):
        generate(model, torch.randint(0, VOCAB, (1, CONTEXT + 1)), max_new_tokens=1)
    with pytest.raises(ValueError, match="exceeds the model context"):
        generate(model, prompt, max_new_tokens=CONTEXT)
    with pytest.raises(ValueError, match="empty prompt"):
        generate(model, torch.zeros(2, 0, dtype=torch.int64), max_new_tokens=3)
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        generate(model, prompt, torch.tensor([[1, 1, 1, 1, 1], [0, 0, 0, 0, 0]]), max_new_tokens=3)
    for steps in (0, -2):
        with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
            generate(model, prompt, max_new_tokens=steps)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(model, prompt + VOCAB, max_new_tokens=3)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, prompt, max_new_tokens=3, do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, prompt, max_new_tokens=3, do_sample=True, top_p=1.5)


def test_soft_alpha_and_keep_policy_are_rejected():
    model = tiny_model()
    prompt = torch.randint(0, VOCAB, (1, 5))
    model.set_alpha(4.0)
    with pytest.raises(ValueError, match="set_alpha"):
        generate(model, prompt, max_new_tokens=2)
    model.set_alpha(float("inf"))
    model.dcp_layers[1].keep_policy = lambda **kwargs: None
    with pytest.raises(NotImplementedError, match="keep_policy"):
        generate(model, prompt, max_new_tokens=2)
