"""Tests for DCPGPT2LMHeadModel against the Hugging Face GPT-2 it is built on.

Every model here is a tiny GPT-2 built locally (no hub access). The dense reference is
transformers' own GPT2LMHeadModel with eager attention. Where the DCP model drops tokens, the
reference gets a hand-built 4D additive mask per layer (causal, padding and the hard keep mask).
In transformers 5.25 create_causal_mask returns a 4D mask as is, and eager_attention_forward adds
it to the attention logits.
"""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel
from transformers.utils import logging as transformers_logging

from src.dcp import DCPGPT2Config, DCPGPT2LMHeadModel
from src.dcp.keep_mask import LOG_KEEP_FLOOR, interaction_scores, log_keep_mask

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
VOCAB_SIZE = 101
RANK = 8


@pytest.fixture(autouse=True)
def quiet_transformers():
    """Silence the load reports and config warnings that transformers prints for tiny local models."""
    previous = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    yield
    transformers_logging.set_verbosity(previous)


def tiny_config(**overrides) -> GPT2Config:
    settings = dict(
        vocab_size=VOCAB_SIZE,
        n_positions=48,
        n_embd=32,
        n_layer=3,
        n_head=4,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        attn_implementation="eager",
    )
    settings.update(overrides)
    return GPT2Config(**settings)


def tiny_dense(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(tiny_config()).eval()


def random_ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB_SIZE, (batch, length), generator=generator)


def padded_batch(length: int = 14) -> tuple[torch.Tensor, torch.Tensor]:
    """Return input_ids (3, T) and attention_mask (3, T): no padding, 4 left, 5 right."""
    input_ids = random_ids(3, length, seed=1)
    attention_mask = torch.ones(3, length, dtype=torch.long)
    attention_mask[1, :4] = 0
    attention_mask[2, -5:] = 0
    return input_ids, attention_mask


def real_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Return each token's index among the real tokens of its row, as GPT-2 positions."""
    return (attention_mask.cumsum(-1) - 1).clamp_min(0)


def make_trained_like(model: DCPGPT2LMHeadModel, beta: float = 0.5, std: float = 0.15, seed: int = 2) -> None:
    """Give every layer interaction weights large enough, and beta small enough, that tokens drop."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.dcp_layers:
            layer.q_int.weight.copy_(torch.randn(layer.q_int.weight.shape, generator=generator) * std)
            layer.k_int.weight.copy_(torch.randn(layer.k_int.weight.shape, generator=generator) * std)
            layer.beta.fill_(beta)


def hard_keep_by_rule(scores: torch.Tensor, query_valid: torch.Tensor) -> torch.Tensor:
    """Return keep (B, T, T) bool for j <= k: j is dropped for k iff a real n in (j, k] has s[n, j] <= 0."""
    batch, length, _ = scores.shape
    positions = torch.arange(length)
    keep = torch.zeros(batch, length, length, dtype=torch.bool)
    for k in range(length):
        # window[n, j]: query n lies in (j, k].
        window = (positions[:, None] > positions[None, :]) & (positions[:, None] <= k)
        dropping = window[None] & query_valid[:, :, None] & (scores <= 0)  # (B, n, j)
        keep[:, k, : k + 1] = ~dropping.any(dim=1)[:, : k + 1]
    return keep


class KeepMaskHooks:
    """Forward pre-hooks that give each eager GPT2Attention of a dense model a DCP keep mask.

    Each hook scores the layer's input (the layer-normed hidden states) with the interaction
    weights of the matching DCP layer, applies the hard drop rule and replaces the attention mask
    with an additive (B, 1, T, T) mask: 0 where key j <= k is real and kept or j == k, else the
    float32 minimum.
    """

    def __init__(self, dense: GPT2LMHeadModel, dcp: DCPGPT2LMHeadModel, attention_mask: torch.Tensor):
        self.dcp_layers = dcp.dcp_layers
        self.key_valid = attention_mask.bool()
        self.keeps: list[torch.Tensor] = []
        self.smallest_score_magnitude = math.inf
        self.handles = [
            block.attn.register_forward_pre_hook(self.make_hook(index), with_kwargs=True)
            for index, block in enumerate(dense.transformer.h)
        ]

    def make_hook(self, index: int):
        layer = self.dcp_layers[index]

        def hook(module, args, kwargs):
            hidden = args[0]  # (B, T, d), after ln_1
            scores = layer.q_int(hidden) @ layer.k_int(hidden).transpose(-1, -2) / math.sqrt(RANK) + layer.beta
            keep = hard_keep_by_rule(scores, self.key_valid)
            self.keeps.append(keep)
            self.record_margin(scores)

            length = hidden.shape[1]
            causal = torch.ones(length, length, dtype=torch.bool).tril()
            allowed = (keep & causal & self.key_valid[:, None, :]) | torch.eye(length, dtype=torch.bool)
            mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
            kwargs["attention_mask"] = mask[:, None]
            return args, kwargs

        return hook

    def record_margin(self, scores: torch.Tensor) -> None:
        # Scores within float error of 0 could be decided differently by the two implementations.
        length = scores.shape[-1]
        deciding = torch.ones(length, length, dtype=torch.bool).tril(-1) & self.key_valid[:, :, None]
        self.smallest_score_magnitude = min(self.smallest_score_magnitude, scores[deciding].abs().min().item())

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def original_weights_equal(dense: GPT2LMHeadModel, dcp: DCPGPT2LMHeadModel) -> list[str]:
    """Return the names of dense parameters that differ in (or are missing from) the DCP model."""
    dcp_state = dcp.state_dict()
    different = []
    for name, tensor in dense.state_dict().items():
        if name not in dcp_state or not torch.equal(tensor, dcp_state[name]):
            different.append(name)
    return different


# ---------------------------------------------------------------- equality with the dense model


def test_fresh_model_keeps_everything_and_matches_dense():
    dense = tiny_dense()
    model = DCPGPT2LMHeadModel.from_dense(dense, dcp_rank=RANK).eval()
    input_ids = random_ids(2, 20)

    with torch.no_grad():
        output = model(input_ids, return_log_keep=True)
        expected = dense(input_ids).logits

    assert all(layer.alpha == math.inf for layer in model.dcp_layers)
    assert output.keep_fraction.item() == 1.0
    assert torch.equal(output.layer_keep_fraction, torch.ones(3))
    assert all(torch.equal(log_keep, torch.zeros(2, 20, 20)) for log_keep in output.log_keep)
    torch.testing.assert_close(output.logits, expected, rtol=0, atol=1e-4)


def test_fresh_model_matches_dense_with_padding():
    dense = tiny_dense()
    model = DCPGPT2LMHeadModel.from_dense(dense, dcp_rank=RANK).eval()
    input_ids, attention_mask = padded_batch()
    real = attention_mask.bool()

    with torch.no_grad():
        output = model(input_ids, attention_mask=attention_mask)
        expected = dense(input_ids, attention_mask=attention_mask, position_ids=real_positions(attention_mask)).logits

    assert output.keep_fraction.item() == 1.0
    torch.testing.assert_close(output.logits[real], expected[real], rtol=0, atol=1e-4)


def test_padding_does_not_change_real_logits():
    model = DCPGPT2LMHeadModel.from_dense(tiny_dense(), dcp_rank=RANK).eval()
    make_trained_like(model)
    input_ids, attention_mask = padded_batch()

    with torch.no_grad():
        padded = model(input_ids, attention_mask=attention_mask)
        left_padded_row = model(input_ids[1:2], attention_mask=attention_mask[1:2])
        left_alone = model(input_ids[1:2, 4:])
        right_alone = model(input_ids[2:3, :-5])

    torch.testing.assert_close(padded.logits[1, 4:], left_alone.logits[0], rtol=0, atol=1e-4)
    torch.testing.assert_close(padded.logits[2, :-5], right_alone.logits[0], rtol=0, atol=1e-4)
    # The keep statistics count the real tokens only.
    assert torch.equal(left_padded_row.layer_pair_count, left_alone.layer_pair_count)
    torch.testing.assert_close(left_padded_row.layer_keep_sum, left_alone.layer_keep_sum, rtol=1e-6, atol=0)
    assert 0 < left_alone.keep_fraction.item() < 1


@pytest.mark.parametrize("with_padding", [False, True])
def test_hard_drops_match_dense_with_4d_masks(with_padding):
    dense = tiny_dense()
    model = DCPGPT2LMHeadModel.from_dense(dense, dcp_rank=RANK).eval()
    make_trained_like(model)
    if with_padding:
        input_ids, attention_mask = padded_batch()
    else:
        input_ids = random_ids(2, 16, seed=3)
        attention_mask = torch.ones_like(input_ids)
    real = attention_mask.bool()

    hooks = KeepMaskHooks(dense, model, attention_mask)
    try:
        with torch.no_grad():
            expected = dense(input_ids, attention_mask=attention_mask, position_ids=real_positions(attention_mask))
    finally:
        hooks.remove()
    with torch.no_grad():
        output = model(input_ids, attention_mask=attention_mask, return_log_keep=True)

    assert hooks.smallest_score_magnitude > 1e-4, "a score is too close to 0 to compare; change the seed"
    fraction = output.keep_fraction.item()
    assert 0.1 < fraction < 0.9, f"keep fraction {fraction}: the test needs some drops and some kept tokens"

    # The same tokens are dropped (j <= k, real queries), and the logits agree.
    lower = torch.ones(input_ids.shape[1], input_ids.shape[1], dtype=torch.bool).tril()
    compared = lower & real[:, :, None] & real[:, None, :]
    for layer_index, (keep, log_keep) in enumerate(zip(hooks.keeps, output.log_keep)):
        assert torch.equal((log_keep == 0)[compared], keep[compared]), f"layer {layer_index}"
    torch.testing.assert_close(output.logits[real], expected.logits[real], rtol=0, atol=1e-4)


def test_loss_matches_dense():
    dense = tiny_dense()
    model = DCPGPT2LMHeadModel.from_dense(dense, dcp_rank=RANK).eval()
    input_ids = random_ids(2, 12)
    labels = input_ids.clone()
    labels[0, :3] = -100

    with torch.no_grad():
        loss = model(input_ids, labels=labels).loss
        expected = dense(input_ids, labels=labels).loss

    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_dense_baseline_matches_dense():
    dense = tiny_dense()
    model = DCPGPT2LMHeadModel.from_dense(dense, dcp_enabled=False).eval()
    input_ids, attention_mask = padded_batch()
    real = attention_mask.bool()

    with torch.no_grad():
        output = model(input_ids, attention_mask=attention_mask)
        expected = dense(input_ids, attention_mask=attention_mask, position_ids=real_positions(attention_mask)).logits

    names = [name for name, _ in model.named_parameters()]
    assert not [name for name in names if "q_int" in name or "k_int" in name or name.endswith("beta")]
    assert output.keep_fraction.item() == 1.0
    torch.testing.assert_close(output.logits[real], expected[real], rtol=0, atol=1e-4)


def test_forward_rejects_unsupported_arguments():
    model = DCPGPT2LMHeadModel.from_dense(tiny_dense(), dcp_rank=RANK)
    with pytest.raises(TypeError, match="inputs_embeds"):
        model(random_ids(1, 4), inputs_embeds=torch.zeros(1, 4, 32))


# ---------------------------------------------------------------- checkpoints


def test_dense_checkpoint_conversion(tmp_path):
    dense = tiny_dense()
    dense.save_pretrained(tmp_path)
    loaded = GPT2LMHeadModel.from_pretrained(tmp_path)

    model = DCPGPT2LMHeadModel.from_dense(loaded, dcp_rank=RANK, dcp_beta_init=1.25)

    assert original_weights_equal(dense, model) == []
    assert model.config.dcp_rank == RANK
    assert model.config.dcp_beta_init == 1.25
    for layer in model.dcp_layers:
        assert layer.beta.item() == 1.25
        assert layer.q_int.weight.shape == (RANK, 32)
        assert layer.k_int.weight.shape == (RANK, 32)
        for weight in (layer.q_int.weight, layer.k_int.weight):
            # Initialised with std initializer_range = 0.02, like the other GPT-2 linear layers.
            assert 0.01 < weight.std().item() < 0.04


def test_from_pretrained_dense_checkpoint_keeps_weights(tmp_path):
    dense = tiny_dense()
    dense.save_pretrained(tmp_path)

    model = DCPGPT2LMHeadModel.from_pretrained(tmp_path, dcp_rank=RANK, dcp_beta_init=1.25)

    assert original_weights_equal(dense, model) == []
    for layer in model.dcp_layers:
        assert layer.q_int.weight.shape == (RANK, 32)
        assert torch.isfinite(layer.q_int.weight).all()
        assert torch.isfinite(layer.k_int.weight).all()


def test_from_pretrained_dense_checkpoint_initialises_beta(tmp_path):
    tiny_dense().save_pretrained(tmp_path)

    model = DCPGPT2LMHeadModel.from_pretrained(tmp_path, dcp_rank=RANK, dcp_beta_init=1.25)

    assert [layer.beta.item() for layer in model.dcp_layers] == [1.25] * 3


@pytest.mark.parametrize("loader", [DCPGPT2LMHeadModel, AutoModelForCausalLM], ids=["dcp_class", "auto_class"])
def test_save_and_load_round_trip(tmp_path, loader):
    model = DCPGPT2LMHeadModel.from_dense(
        tiny_dense(), dcp_rank=RANK, dcp_beta_init=0.7, dcp_add_previous_mask=True
    ).eval()
    make_trained_like(model, beta=0.3)
    with torch.no_grad():
        model.dcp_layers[1].beta.fill_(-0.4)
    model.save_pretrained(tmp_path)

    loaded = loader.from_pretrained(tmp_path).eval()

    assert type(loaded) is DCPGPT2LMHeadModel
    assert isinstance(loaded.config, DCPGPT2Config)
    assert loaded.config.model_type == "dcp_gpt2"
    assert loaded.config.dcp_enabled is True
    assert loaded.config.dcp_rank == RANK
    assert loaded.config.dcp_beta_init == 0.7
    assert loaded.config.dcp_add_previous_mask is True
    assert [layer.beta.item() for layer in loaded.dcp_layers] == pytest.approx([0.3, -0.4, 0.3])

    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert sorted(state) == sorted(loaded_state)
    different = [name for name in state if not torch.equal(state[name], loaded_state[name])]
    assert different == []

    input_ids = random_ids(2, 12)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids).logits, model(input_ids).logits, rtol=0, atol=0)


def test_dense_baseline_round_trip(tmp_path):
    model = DCPGPT2LMHeadModel.from_dense(tiny_dense(), dcp_enabled=False)
    model.save_pretrained(tmp_path)

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)

    assert type(loaded) is DCPGPT2LMHeadModel
    assert loaded.config.dcp_enabled is False
    assert not any("q_int" in name for name in loaded.state_dict())


# ---------------------------------------------------------------- training behaviour


def test_set_alpha():
    model = DCPGPT2LMHeadModel.from_dense(tiny_dense(), dcp_rank=RANK)

    model.set_alpha(1.5)
    assert [layer.alpha for layer in model.dcp_layers] == [1.5] * 3

    model.set_alpha(math.inf)
    assert [layer.alpha for layer in model.dcp_layers] == [math.inf] * 3

    for invalid in (0.5, -1.0, math.nan):
        with pytest.raises(ValueError, match="alpha"):
            model.set_alpha(invalid)


@pytest.mark.parametrize("alpha", [1.0, 1.2, 1.5])
def test_soft_alpha_gradients_reach_interaction_weights(alpha):
    model = DCPGPT2LMHeadModel.from_dense(tiny_dense(), dcp_rank=RANK).train()
    make_trained_like(model, beta=1.0, std=0.1)
    model.set_alpha(alpha)
    input_ids = random_ids(2, 12)

    output = model(input_ids, labels=input_ids)
    (output.loss + 0.3 * output.keep_fraction).backward()

    fraction = output.keep_fraction.item()
    assert 0.0 < fraction < 1.0
    assert ((output.layer_keep_fraction > 0) & (output.layer_keep_fraction <= 1)).all()
    for index, layer in enumerate(model.dcp_layers):
        for name, parameter in (("q_int", layer.q_int.weight), ("k_int", layer.k_int.weight), ("beta", layer.beta)):
            assert parameter.grad is not None, f"layer {index} {name}: no gradient"
            assert torch.isfinite(parameter.grad).all(), f"layer {index} {name}: non-finite gradient"
            assert parameter.grad.abs().sum() > 0, f"layer {index} {name}: zero gradient"


@pytest.mark.parametrize("alpha", [1.5, math.inf])
def test_sparsity_term_falls_with_beta(alpha):
    model = DCPGPT2LMHeadModel.from_dense(tiny_dense(), dcp_rank=RANK).eval()
    make_trained_like(model)
    model.set_alpha(alpha)
    input_ids = random_ids(2, 16)

    fractions = []
    for beta in (3.0, 1.5, 0.5, 0.0, -0.5, -2.0):
        with torch.no_grad():
            for layer in model.dcp_layers:
                layer.beta.fill_(beta)
            fractions.append(model(input_ids).keep_fraction.item())

    steps = [later - earlier for earlier, later in zip(fractions, fractions[1:])]
    if math.isinf(alpha):
        assert all(step <= 0 for step in steps), fractions
        assert fractions[0] > fractions[-1], fractions
    else:
        assert all(step < 0 for step in steps), fractions


def capture_layer_inputs(model: DCPGPT2LMHeadModel) -> list[torch.Tensor]:
    """Record the layer-normed input (B, T, d) of every attention layer on the next forward pass."""
    captured = []

    def hook(module, args):
        captured.append(args[0])

    for layer in model.dcp_layers:
        layer.register_forward_pre_hook(hook)
    return captured


def own_log_keep(layer, hidden_states: torch.Tensor, alpha: float) -> torch.Tensor:
    """Compute one layer's own log I (B, T, T) from its input, before any composition."""
    scores = interaction_scores(layer.q_int(hidden_states), layer.k_int(hidden_states), layer.beta)
    return log_keep_mask(scores, alpha)


@pytest.mark.parametrize("alpha", [1.5, math.inf])
@pytest.mark.parametrize("add_previous", [False, True])
def test_add_previous_mask(alpha, add_previous):
    model = DCPGPT2LMHeadModel.from_dense(tiny_dense(), dcp_rank=RANK, dcp_add_previous_mask=add_previous).eval()
    make_trained_like(model, beta=1.0)
    model.set_alpha(alpha)
    inputs = capture_layer_inputs(model)

    with torch.no_grad():
        composed = model(random_ids(2, 16), return_log_keep=True).log_keep
        raw = [own_log_keep(layer, hidden, alpha) for layer, hidden in zip(model.dcp_layers, inputs)]

    torch.testing.assert_close(composed[0], raw[0], rtol=0, atol=1e-5)
    for index in range(1, 3):
        expected = (raw[index] + composed[index - 1]).clamp_min(LOG_KEEP_FLOOR) if add_previous else raw[index]
        torch.testing.assert_close(composed[index], expected, rtol=0, atol=1e-5)
        if add_previous and math.isinf(alpha):
            # A token dropped by an earlier layer stays dropped.
            kept_here = composed[index] == 0
            assert not (kept_here & (composed[index - 1] != 0)).any()

    if add_previous:
        assert any(not torch.equal(c, r) for c, r in zip(composed[1:], raw[1:])), "composition changed nothing"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("alpha", [1.5, math.inf])
def test_half_precision_forward_finite(dtype, alpha):
    model = DCPGPT2LMHeadModel.from_dense(tiny_dense(), dcp_rank=RANK).eval()
    make_trained_like(model, beta=-1.0)  # most tokens dropped: the hardest case for finite rows
    model = model.to(dtype)
    model.set_alpha(alpha)
    input_ids, attention_mask = padded_batch()

    with torch.no_grad():
        output = model(input_ids, attention_mask=attention_mask, labels=input_ids)

    assert output.logits.dtype == dtype
    assert torch.isfinite(output.logits).all()
    assert torch.isfinite(output.loss)
    assert torch.isfinite(output.layer_keep_sum).all()
    assert 0.0 <= output.keep_fraction.item() < 0.5


# ---------------------------------------------------------------- packaging


@pytest.mark.slow
def test_method_imports_without_pipeline_packages():
    code = (
        "import sys\n"
        "import src.dcp\n"
        "forbidden = ('lightning', 'pytorch_lightning', 'lightning_fabric', 'hydra', 'mlflow')\n"
        "loaded = sorted(name for name in sys.modules if name.split('.')[0] in forbidden)\n"
        "assert not loaded, loaded\n"
    )
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPOSITORY_ROOT, env=environment, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
