"""Benchmark at paper-scale shapes: wired random models (src/bench/synthetic.py) decoded from a
cache filled with what their prefill keeps, with real prefills timed separately.
"""

import logging

import torch
from omegaconf import DictConfig, OmegaConf

from src.dcp import PrunedKVCache, decode_step, prefill

from . import synthetic
from .contiguous import ContiguousKVCache, contiguous_decode_step
from .decode import CONTIGUOUS, PAGED, Runner, measure_case
from .results import add_ratios, log_case
from .timing import summarize, timed

logger = logging.getLogger(__name__)


def _synthetic_runner(synthetic_model, token_ids: torch.Tensor, new_tokens: int, cache_kind: str, page_size: int, device, dtype, generator) -> Runner:
    """Runner whose start fills the cache with what the wired model's prefill would keep (no prompt pass)."""
    model = synthetic_model.model
    batch, length = token_ids.shape
    layer_inputs = [
        tuple(None if tensor is None else tensor.to(device) for tensor in inputs)
        for inputs in synthetic.synthetic_cache_inputs(synthetic_model, token_ids, dtype, generator)
    ]
    positions = torch.arange(length, device=device).expand(batch, length)

    def start():
        if cache_kind == PAGED:
            cache = PrunedKVCache.for_model(model.config, batch, dtype, device, page_size=page_size)
        else:
            cache = ContiguousKVCache(model, batch, length + new_tokens, dtype, device)
        for layer_cache, (key, value, k_int, keep) in zip(cache.layers, layer_inputs):
            layer_cache.fill(key, value, k_int, keep, positions)
        cache.next_position = torch.full((batch,), length, dtype=torch.int64, device=device)
        return None, cache

    step = decode_step if cache_kind == PAGED else contiguous_decode_step
    return Runner(start=start, step=lambda cache, tokens: step(model, cache, tokens), real_prefill=False)


def benchmark_paper_scale(cfg: DictConfig, device: torch.device, dtype: torch.dtype) -> dict:
    """Decode GPT-2-small-shaped random models (dense and wired DCP) from synthetic caches."""
    scale = cfg.paper_scale
    shape = OmegaConf.to_container(scale.shape)
    if scale.prompt_length + scale.new_tokens > shape["n_positions"]:
        raise ValueError(
            f"paper_scale.prompt_length {scale.prompt_length} + new_tokens {scale.new_tokens} exceeds "
            f"n_positions={shape['n_positions']}; lower one of them"
        )
    variants = [("dense", None)] + [(f"keep-{keep:g}", float(keep)) for keep in scale.keep_fractions]
    cases, models, prefills = [], {}, []

    for name, keep_fraction in variants:
        synthetic_model = synthetic.build_synthetic_model(
            **shape, keep_fraction=keep_fraction, layer_spread=scale.layer_spread, seed=cfg.seed
        )
        synthetic_model.model.to(device=device, dtype=dtype)
        models[name] = synthetic.describe(synthetic_model)
        cache_kinds = [PAGED] + ([CONTIGUOUS] if keep_fraction is None and scale.contiguous_baseline else [])

        for batch_size in scale.batch_sizes:
            generator = torch.Generator().manual_seed(cfg.seed + batch_size)
            row_factors = synthetic.row_keep_factors(batch_size, scale.row_spread, generator)
            tokens = synthetic.sample_tokens(synthetic_model, row_factors, scale.prompt_length + scale.new_tokens, generator)
            prompt, forced = tokens[:, : scale.prompt_length], tokens[:, scale.prompt_length :].to(device)
            for cache_kind in cache_kinds:
                runner = _synthetic_runner(synthetic_model, prompt, scale.new_tokens, cache_kind, cfg.page_size, device, dtype, generator)
                case = measure_case(runner, batch_size, scale.new_tokens, device, scale.warmup, scale.repeats, forced_tokens=forced)
                case.update(model=name, cache=cache_kind, batch_size=batch_size, prompt_length=scale.prompt_length, new_tokens=scale.new_tokens)
                if keep_fraction is not None:
                    case["expected_keep_fraction"] = synthetic.expected_keep_fraction(synthetic_model, row_factors)
                log_case(case)
                cases.append(case)

        prefills.append(_time_real_prefill(cfg, synthetic_model, name, device))
        del synthetic_model

    add_ratios(cases, "dense")
    return {"cases": cases, "models": models, "prefill": prefills}


def _time_real_prefill(cfg: DictConfig, synthetic_model, name: str, device: torch.device) -> dict:
    """Time real prefills of the wired model at paper_scale.prefill_batch_size."""
    scale = cfg.paper_scale
    generator = torch.Generator().manual_seed(cfg.seed)
    row_factors = synthetic.row_keep_factors(scale.prefill_batch_size, scale.row_spread, generator)
    prompt = synthetic.sample_tokens(synthetic_model, row_factors, scale.prompt_length, generator).to(device)
    model = synthetic_model.model
    run = lambda: prefill(model, prompt, page_size=cfg.page_size, max_new_tokens=scale.new_tokens)  # noqa: E731
    for _ in range(scale.prefill_warmup):
        run()
    seconds = [timed(run, device)[1] for _ in range(scale.prefill_repeats)]
    (_, cache), _ = timed(run, device)
    live = cache.live_counts().double()
    result = {
        "model": name,
        "batch_size": scale.prefill_batch_size,
        "prompt_length": scale.prompt_length,
        "prefill_s": summarize(seconds),
        "kv_bytes_after_prefill": cache.allocated_bytes(),
        "prompt_keep_fraction": float(live.mean()) / scale.prompt_length,
    }
    logger.info("%s: prefill of %d x %d tokens %.2f s", name, scale.prefill_batch_size, scale.prompt_length, result["prefill_s"]["median"])
    return result
