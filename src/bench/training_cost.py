"""Time a fine-tuning step (forward and backward) of a dense and a DCP model of the same shape.

The models have random weights. The interaction projections get a standard deviation of
1/sqrt(d) and beta is 0, so the scores spread over roughly [-3, 3] and many of them fall inside the
sparse sigmoid's band |s| < 1/(alpha - 1), where it is costly to evaluate. Trained models put fewer
scores there late in training.

Two DCP-specific pieces are timed in isolation, forward and backward, on inputs of the step's shape:
the keep mask of every layer (DCPAttention.compute_log_keep: projections, scores, sparse sigmoid,
log I and keep statistics, plus the attention bias), and attention itself, once with an additive
bias that carries gradient (as log I does) and once with the fused causal kernel that the unpadded
dense model uses.
"""

import logging
import math

import torch
import torch.nn.functional as F

from src.dcp import DCPGPT2Config, DCPGPT2LMHeadModel
from src.dcp.keep_mask import attention_bias

from .timing import summarize, timed

logger = logging.getLogger(__name__)


def build_model(shape: dict, dcp_enabled: bool, device: torch.device, seed: int = 0) -> DCPGPT2LMHeadModel:
    """Random model of `shape` (n_layer, n_embd, n_head, n_positions, vocab_size, dcp_rank) in train mode."""
    torch.manual_seed(seed)
    config = DCPGPT2Config(dcp_enabled=dcp_enabled, dcp_beta_init=0.0, bos_token_id=None, eos_token_id=None, **shape)
    model = DCPGPT2LMHeadModel(config).to(device).train()
    if dcp_enabled:
        with torch.no_grad():
            for layer in model.dcp_layers:
                layer.q_int.weight.normal_(0.0, 1.0 / math.sqrt(config.n_embd))
                layer.k_int.weight.normal_(0.0, 1.0 / math.sqrt(config.n_embd))
    return model


def _step(model: DCPGPT2LMHeadModel, input_ids: torch.Tensor) -> None:
    """Forward and backward of the fine-tuning loss (LM loss plus the keep fraction for DCP)."""
    model.zero_grad(set_to_none=True)
    output = model(input_ids, labels=input_ids)
    loss = output.loss
    if model.config.dcp_enabled:
        loss = loss + output.keep_fraction
    loss.backward()


def _dcp_piece(model: DCPGPT2LMHeadModel, normed: torch.Tensor, upstream: torch.Tensor) -> None:
    """Forward and backward of every layer's keep mask (DCPAttention.compute_log_keep) and bias."""
    key_valid = torch.ones(normed.shape[:2], dtype=torch.bool, device=normed.device)
    total = normed.new_zeros(())
    for layer in model.dcp_layers:
        log_keep, stats = layer.compute_log_keep(normed, key_valid)
        bias = attention_bias(log_keep, key_valid, normed.dtype)
        total = total + (bias[:, 0] * upstream).sum() + stats.keep_sum
    total.backward()


def _attention(model: DCPGPT2LMHeadModel, qkv: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Forward and backward of every layer's SDPA, with the additive bias or with the fused causal kernel."""
    query, key, value = qkv.unbind(0)  # each (B, H, T, d_head)
    total = qkv.new_zeros(())
    for layer in model.dcp_layers:
        if bias is None:
            output = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=layer.scaling)
        else:
            output = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, scale=layer.scaling)
        total = total + output.sum()
    total.backward()


def measure_training_cost(
    shape: dict,
    batch_size: int,
    seq_len: int,
    alphas: list[float],
    warmup: int,
    repeats: int,
    device: torch.device,
) -> dict:
    """Time dense and DCP steps at each alpha; returns medians, spreads and the DCP/dense ratios."""
    if seq_len > shape["n_positions"]:
        raise ValueError(f"seq_len={seq_len} exceeds n_positions={shape['n_positions']}; lower training_cost seq_len")
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, shape["vocab_size"], (batch_size, seq_len), generator=generator).to(device)

    dense = build_model(shape, dcp_enabled=False, device=device)
    dense_time = _repeat(lambda: _step(dense, input_ids), warmup, repeats, device)
    del dense
    result = {"shape": shape, "batch_size": batch_size, "seq_len": seq_len, "dense_step_s": dense_time, "dcp": []}

    dcp = build_model(shape, dcp_enabled=True, device=device)
    normed = torch.nn.functional.layer_norm(torch.randn(batch_size, seq_len, shape["n_embd"], generator=generator), (shape["n_embd"],)).to(device)
    upstream = torch.randn(batch_size, seq_len, seq_len, generator=generator).to(device)
    # Attention alone: DCP adds log I as a (B, 1, T, T) bias, which rules out the fused causal kernel.
    config = dcp.config
    qkv = torch.randn(3, batch_size, config.n_head, seq_len, config.n_embd // config.n_head, generator=generator).to(device).requires_grad_()
    key_valid = torch.ones(batch_size, seq_len, dtype=torch.bool, device=device)
    # The bias carries gradient, as log I does in training, so SDPA also computes its gradient.
    bias = attention_bias(torch.zeros(batch_size, seq_len, seq_len, device=device), key_valid, qkv.dtype).requires_grad_()
    result["attention_causal_s"] = _repeat(lambda: _attention(dcp, qkv, None), warmup, repeats, device)
    result["attention_bias_s"] = _repeat(lambda: _attention(dcp, qkv, bias), warmup, repeats, device)

    for alpha in alphas:
        dcp.set_alpha(alpha)
        step_time = _repeat(lambda: _step(dcp, input_ids), warmup, repeats, device)
        piece_time = _repeat(lambda: _dcp_piece(dcp, normed, upstream), warmup, repeats, device)
        entry = {
            "alpha": alpha,
            "dcp_step_s": step_time,
            "dcp_over_dense": step_time["median"] / dense_time["median"],
            "keep_mask_s": piece_time,
            "keep_mask_share": piece_time["median"] / step_time["median"],
        }
        logger.info(
            "training step alpha=%s: dense %.3fs, DCP %.3fs (%.2fx), keep mask %.0f%% of the DCP step",
            alpha,
            dense_time["median"],
            step_time["median"],
            entry["dcp_over_dense"],
            100 * entry["keep_mask_share"],
        )
        result["dcp"].append(entry)
    return result


def _repeat(function, warmup: int, repeats: int, device: torch.device) -> dict:
    for _ in range(warmup):
        function()
    return summarize([timed(function, device)[1] for _ in range(repeats)])
