"""Incremental decoding of DCPGPT2LMHeadModel with the pruned KV cache, and `generate`.

`prefill` runs the prompt through the model once with the full-sequence hard mask and stores, per
layer, the tokens that the last real token of each row still keeps (I[last, j] = 1). `decode_step`
then feeds one token per row: in every layer the new token scores the live interaction keys of its
row, drops those with score <= 0 (never itself), and attends to what is left. GPT-2 positions are
each token's true position in its row, whatever the cache holds.

Why not `model.generate()`: transformers 5.25's Cache API returns dense (B, H, S, d_head) keys and
values from `Cache.update`, with one sequence length S for the whole batch (`get_seq_length()` is a
single int that generate turns into `cache_position`). Rows that drop different tokens would be
padded to the longest row again, which is the memory and work this cache avoids. So `generate` here
is a function with the arguments of `model.generate()` that matter for decoding, and the same output.
"""

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from .keep_mask import LOG_KEEP_FLOOR, attention_bias, interaction_scores, log_keep_mask
from .kv_cache import PrunedKVCache
from .modeling import DCPGPT2LMHeadModel

logger = logging.getLogger(__name__)


@dataclass
class GenerationOutput:
    """Result of `generate(..., return_dict=True)`.

    sequences: (B, T + n) the prompt as given followed by the n generated tokens.
    logits: (B, n, V) float32 raw model logits before each generated token (before sampling warpers).
    cache: the pruned KV cache after the last decode step.
    """

    sequences: torch.LongTensor
    logits: torch.Tensor
    cache: PrunedKVCache


# --------------------------------------------------------------------------------------------------
# Input checks


def _check_model(model: DCPGPT2LMHeadModel) -> None:
    """Raise when the model cannot decode incrementally with the pruned cache."""
    for layer in model.dcp_layers:
        if layer.keep_policy is not None:
            raise NotImplementedError(
                f"layer {layer.layer_idx} has a keep_policy; the pruned KV cache only supports the learned "
                "DCP mask and dense layers. Evaluate keep policies with the full-sequence forward."
            )
        if layer.dcp_enabled and not math.isinf(layer.alpha):
            raise ValueError(
                f"layer {layer.layer_idx} has alpha={layer.alpha}; cached decoding needs hard drops. "
                "Call model.set_alpha(float('inf')) first."
            )


def check_prompt(
    model: DCPGPT2LMHeadModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    max_new_tokens: int,
) -> torch.Tensor:
    """Validate a prompt batch for decoding; return the attention mask as (B, T) bool.

    Raises ValueError on: input_ids that are not (B, T) integers, an empty prompt, a mask of another
    shape, a row with no real token, token ids outside the vocabulary, max_new_tokens <= 0, and a
    prompt that with max_new_tokens new tokens would run past the model's n_positions.
    """
    if input_ids.dim() != 2 or input_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"input_ids must be an integer tensor of shape (B, T), got {tuple(input_ids.shape)} {input_ids.dtype}")
    batch, length = input_ids.shape
    if batch == 0 or length == 0:
        raise ValueError(f"empty prompt: input_ids has shape {tuple(input_ids.shape)}; give at least one token per row")
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")

    if attention_mask is None:
        key_valid = torch.ones_like(input_ids, dtype=torch.bool)
    elif attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids {tuple(input_ids.shape)}; they must match")
    else:
        key_valid = attention_mask.bool()

    lengths = key_valid.sum(dim=1)
    empty_rows = (lengths == 0).nonzero().squeeze(1).tolist()
    if empty_rows:
        raise ValueError(f"rows {empty_rows} of the batch have no real token (attention_mask all 0); drop them or give each a token")

    vocab_size = model.config.vocab_size
    real_ids = input_ids[key_valid]
    if bool((real_ids < 0).any()) or bool((real_ids >= vocab_size).any()):
        raise ValueError(f"input_ids contain ids outside the vocabulary [0, {vocab_size}); check the tokenizer")

    context = model.config.n_positions
    longest = int(lengths.max())
    if longest > context:
        raise ValueError(f"prompt of {longest} tokens is longer than the model context n_positions={context}; truncate it")
    if longest + max_new_tokens > context:
        raise ValueError(
            f"prompt of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds the model context "
            f"n_positions={context}; set max_new_tokens <= {context - longest} or shorten the prompt"
        )
    return key_valid


# --------------------------------------------------------------------------------------------------
# Prefill and decode


def _split_heads(attn, x: torch.Tensor) -> torch.Tensor:
    """(B, d) -> (B, H, d_head)."""
    return x.view(x.shape[0], attn.num_heads, attn.head_dim)


def _prefill_layer(attn, normed: torch.Tensor, key_valid: torch.Tensor, last: torch.Tensor, previous_log_keep):
    """Run one attention layer on the whole prompt; return its output and what the cache stores.

    normed: (B, T, d) layer-normed input; last: (B,) index of each row's last real token.
    Returns (output (B, T, d), log I (B, T, T) or None, key, value (B, H, T, d_head), k_int (B, T, r)
    or None, keep (B, T) bool: the tokens that the last real token still attends to).
    """
    query, key, value = attn.c_attn(normed).split(attn.split_size, dim=2)
    query, key, value = attn.split_heads(query), attn.split_heads(key), attn.split_heads(value)

    log_keep, k_int = None, None
    keep = key_valid
    if attn.dcp_enabled:
        k_int = attn.k_int(normed)  # (B, T, r)
        scores = interaction_scores(attn.q_int(normed), k_int, attn.beta)
        log_keep = log_keep_mask(scores, attn.alpha, key_valid)
        if previous_log_keep is not None:
            log_keep = (log_keep + previous_log_keep).clamp_min(LOG_KEEP_FLOOR)
        batch_index = torch.arange(normed.shape[0], device=normed.device)
        keep = key_valid & (log_keep[batch_index, last] > LOG_KEEP_FLOOR / 2)

    if log_keep is None and bool(key_valid.all()):
        # Dense and unpadded: the fused causal kernel, as the full-sequence forward uses it.
        output = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=attn.scaling)
    else:
        bias_source = log_keep if log_keep is not None else torch.zeros(key_valid.shape + key_valid.shape[-1:], device=normed.device)
        bias = attention_bias(bias_source, key_valid, query.dtype)
        output = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, scale=attn.scaling)
    output = attn.c_proj(output.transpose(1, 2).reshape(normed.shape))
    return output, log_keep, key, value, k_int, keep


@torch.no_grad()
def prefill(
    model: DCPGPT2LMHeadModel,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None = None,
    page_size: int = 16,
    max_new_tokens: int = 1,
    cache: PrunedKVCache | None = None,
) -> tuple[torch.Tensor, PrunedKVCache]:
    """Run the prompt batch (left- or right-padded) and build its pruned KV cache.

    input_ids, attention_mask: (B, T). Returns the logits of each row's last real token (B, V) and
    the cache. max_new_tokens is only checked against the context length here. `cache` replaces the
    new PrunedKVCache: any object with `next_position` and `layers[i].fill(key, value, k_int, keep,
    position)` (PagedLayerCache.fill's arguments), such as a benchmark's contiguous baseline cache.
    """
    _check_model(model)
    key_valid = check_prompt(model, input_ids, attention_mask, max_new_tokens)
    batch, length = input_ids.shape
    device = input_ids.device
    positions = (key_valid.long().cumsum(-1) - 1).clamp_min(0)  # (B, T)
    last = torch.where(key_valid, torch.arange(length, device=device), -1).amax(dim=-1)  # (B,)

    transformer = model.transformer
    dtype = transformer.wte.weight.dtype
    if cache is None:
        cache = PrunedKVCache.for_model(model.config, batch, dtype, device, page_size=page_size)

    hidden = transformer.wte(input_ids) + transformer.wpe(positions)  # (B, T, d)
    previous_log_keep = None
    for block, layer_cache in zip(transformer.h, cache.layers):
        output, log_keep, key, value, k_int, keep = _prefill_layer(block.attn, block.ln_1(hidden), key_valid, last, previous_log_keep)
        hidden = hidden + output
        hidden = hidden + block.mlp(block.ln_2(hidden))
        layer_cache.fill(key, value, k_int, keep, positions)
        if model.config.dcp_add_previous_mask:
            previous_log_keep = log_keep

    last_hidden = hidden[torch.arange(batch, device=device), last]  # (B, d)
    logits = model.lm_head(transformer.ln_f(last_hidden))  # (B, V)
    cache.next_position = key_valid.sum(dim=1)
    return logits, cache


@torch.no_grad()
def decode_step(model: DCPGPT2LMHeadModel, cache: PrunedKVCache, token_ids: torch.LongTensor) -> torch.Tensor:
    """Feed one token per row (B,) at each row's next true position; return the next logits (B, V).

    The cache is updated in place: drops, the new tokens, compaction, and next_position + 1.
    """
    if token_ids.shape != (cache.batch_size,):
        raise ValueError(f"token_ids must have shape ({cache.batch_size},), got {tuple(token_ids.shape)}")
    context = model.config.n_positions
    if int(cache.next_position.max()) >= context:
        raise ValueError(f"a row reached the model context n_positions={context}; no position is left for a new token")

    transformer = model.transformer
    positions = cache.next_position  # (B,)
    hidden = transformer.wte(token_ids) + transformer.wpe(positions)  # (B, d)

    previous_cache = None
    for block, layer_cache in zip(transformer.h, cache.layers):
        hidden = hidden + _decode_attention(block.attn, block.ln_1(hidden), layer_cache, positions, previous_cache, context)
        hidden = hidden + block.mlp(block.ln_2(hidden))
        if model.config.dcp_add_previous_mask:
            previous_cache = layer_cache

    cache.next_position = positions + 1
    return model.lm_head(transformer.ln_f(hidden))  # (B, V)


def _decode_attention(attn, normed: torch.Tensor, layer_cache, positions: torch.Tensor, previous_cache, context: int) -> torch.Tensor:
    """One attention layer for one new token per row; normed: (B, d). Returns the output (B, d)."""
    query, key, value = attn.c_attn(normed).split(attn.split_size, dim=1)

    k_int = None
    if attn.dcp_enabled:
        k_int = attn.k_int(normed)  # (B, r)
        also_drop = None
        if previous_cache is not None:
            # The previous layer's log I is added to this layer's: what it dropped is dropped here too.
            also_drop = ~previous_cache.alive_by_position(context)
        layer_cache.drop(attn.q_int(normed), attn.beta, also_drop)

    layer_cache.append(_split_heads(attn, key), _split_heads(attn, value), k_int, positions)
    output = layer_cache.attend(_split_heads(attn, query), attn.scaling)  # (B, H, d_head)
    layer_cache.compact()
    return attn.c_proj(output.reshape(normed.shape))


# --------------------------------------------------------------------------------------------------
# generate


def _logits_warpers(do_sample: bool, temperature: float, top_k: int | None, top_p: float | None) -> LogitsProcessorList:
    """Build transformers' sampling warpers in generate()'s order: temperature, top-k, top-p."""
    warpers = LogitsProcessorList()
    if not do_sample:
        return warpers
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 or None: no top-k), got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")

    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k:
        warpers.append(TopKLogitsWarper(top_k=top_k))
    if top_p is not None and top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=top_p))
    return warpers


def _eos_tensor(eos_token_id: int | list[int] | None, device: torch.device) -> torch.Tensor | None:
    if eos_token_id is None:
        return None
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    return torch.tensor(ids, dtype=torch.int64, device=device)


@torch.no_grad()
def generate(
    model: DCPGPT2LMHeadModel,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 20,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    page_size: int = 16,
    return_dict: bool = False,
) -> torch.LongTensor | GenerationOutput:
    """Generate with the pruned KV cache; a stand-in for `model.generate()` with the same arguments.

    input_ids, attention_mask: (B, T), left- or right-padded. Returns (B, T + n) like
    `model.generate()`: the prompt tensor as given followed by n <= max_new_tokens new tokens; n is
    smaller only when every row has produced an EOS. After its EOS a row gets pad_token_id (the first
    EOS id when pad_token_id is None). For a right-padded row the new tokens therefore follow its
    padding in the output tensor, but they were decoded at the row's true positions.

    Greedy when do_sample is False. Sampling applies transformers' temperature, top-k and top-p warpers
    in generate()'s order, then draws with torch.multinomial, so a seeded run matches
    `model.generate(use_cache=False)` with the same settings. Unlike `model.generate()`, top_k=None
    means no top-k filtering (transformers' default is 50). return_dict=True returns a
    GenerationOutput with the raw logits and the cache. Call model.eval() first: in training mode
    the MLP dropout is applied (attention and residual dropout never are).
    """
    warpers = _logits_warpers(do_sample, temperature, top_k, top_p)
    if model.training:
        logger.warning("generate() got a model in training mode; call model.eval() first, else MLP dropout changes the tokens")
    eos = _eos_tensor(eos_token_id, input_ids.device)
    if pad_token_id is None and eos is not None:
        pad_token_id = int(eos[0])

    logits, cache = prefill(model, input_ids, attention_mask, page_size=page_size, max_new_tokens=max_new_tokens)
    sequences = input_ids
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    step_logits = []

    for step in range(max_new_tokens):
        scores = logits.float()
        step_logits.append(scores)
        next_tokens = _choose_tokens(warpers(sequences, scores.clone()), do_sample)
        if eos is not None:
            next_tokens = torch.where(unfinished, next_tokens, pad_token_id)
            unfinished &= ~torch.isin(next_tokens, eos)
        sequences = torch.cat([sequences, next_tokens[:, None]], dim=1)

        if not bool(unfinished.any()) or step == max_new_tokens - 1:
            break
        logits = decode_step(model, cache, next_tokens)

    if return_dict:
        return GenerationOutput(sequences=sequences, logits=torch.stack(step_logits, dim=1), cache=cache)
    return sequences


def _choose_tokens(scores: torch.Tensor, do_sample: bool) -> torch.LongTensor:
    """Pick one token per row from warped scores (B, V): argmax, or a draw from the softmax."""
    if not do_sample:
        return scores.argmax(dim=-1)
    probabilities = torch.softmax(scores, dim=-1)
    return torch.multinomial(probabilities, num_samples=1).squeeze(1)
