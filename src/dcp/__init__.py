"""Dynamic Context Pruning (Anagnostidis et al., NeurIPS 2023, arXiv 2305.15805) for GPT-2.

This package is the method alone: it depends on torch and transformers, not on Lightning, Hydra
or MLflow, so it can be imported into any training or serving code.
"""

from .generation import GenerationOutput, check_prompt, decode_step, generate, prefill
from .keep_mask import LOG_KEEP_FLOOR, KeepStats, interaction_scores, keep_stats, log_keep_mask, valid_pairs
from .kv_cache import LayerCacheStats, PagedLayerCache, PrunedKVCache
from .modeling import DCPAttention, DCPCausalLMOutput, DCPGPT2Config, DCPGPT2LMHeadModel, causal_lm_loss
from .sparse_sigmoid import sparse_sigmoid

__all__ = [
    "LOG_KEEP_FLOOR",
    "DCPAttention",
    "DCPCausalLMOutput",
    "DCPGPT2Config",
    "DCPGPT2LMHeadModel",
    "GenerationOutput",
    "KeepStats",
    "LayerCacheStats",
    "PagedLayerCache",
    "PrunedKVCache",
    "causal_lm_loss",
    "check_prompt",
    "decode_step",
    "generate",
    "interaction_scores",
    "keep_stats",
    "log_keep_mask",
    "prefill",
    "sparse_sigmoid",
    "valid_pairs",
]
