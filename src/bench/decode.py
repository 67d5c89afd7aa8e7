"""Measure prefill and decode of one model on one (batch size, prompt length, new tokens) case.

Every case runs `warmup` untimed runs, `repeats` timed runs and one instrumented run. A run is a
prefill followed by `new_tokens` decode steps, each feeding one token per row and timed on its own
(with a device synchronisation on CUDA). The instrumented run records, after the prefill and after
every step, the live tokens per layer and row and the bytes the cache holds; it is not timed, so the
bookkeeping does not slow the timed runs.
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from src.dcp import DCPGPT2LMHeadModel, PrunedKVCache, decode_step, prefill

from .contiguous import ContiguousKVCache, contiguous_decode_step
from .timing import summarize, synchronize, timed

logger = logging.getLogger(__name__)

PAGED = "paged"
CONTIGUOUS = "contiguous"


@dataclass
class Runner:
    """How to start a run (prefill or a synthetic fill) and how to take one decode step.

    start() -> (logits (B, V) or None, cache); step(cache, token_ids (B,)) -> logits (B, V).
    real_prefill: False when start() fills the cache without running the prompt through the model.
    """

    start: Callable
    step: Callable
    real_prefill: bool = True


def model_runner(model: DCPGPT2LMHeadModel, input_ids: torch.Tensor, new_tokens: int, cache_kind: str, page_size: int) -> Runner:
    """Runner that prefills `input_ids` (B, T) with the model and decodes with the chosen cache."""
    batch, length = input_ids.shape
    dtype = model.transformer.wte.weight.dtype
    if cache_kind == PAGED:
        return Runner(
            start=lambda: prefill(model, input_ids, page_size=page_size, max_new_tokens=new_tokens),
            step=lambda cache, tokens: decode_step(model, cache, tokens),
        )
    if cache_kind == CONTIGUOUS:

        def start():
            cache = ContiguousKVCache(model, batch, length + new_tokens, dtype, input_ids.device)
            return prefill(model, input_ids, max_new_tokens=new_tokens, cache=cache)

        return Runner(start=start, step=lambda cache, tokens: contiguous_decode_step(model, cache, tokens))
    raise ValueError(f"unknown cache kind {cache_kind!r}; use {PAGED!r} or {CONTIGUOUS!r}")


def _cache_snapshot(cache) -> tuple[torch.Tensor, list[int], int | None]:
    """Return live counts (L, B) on the CPU, bytes per layer, and used slots per row (paged only)."""
    live = cache.live_counts().cpu()
    layer_bytes = cache.layer_allocated_bytes()
    paged_slots = None
    if isinstance(cache, PrunedKVCache):
        paged_slots = sum(layer.used_pages * layer.page_size for layer in cache.layers)
    return live, layer_bytes, paged_slots


def _run(runner: Runner, new_tokens: int, forced_tokens: torch.Tensor | None, device: torch.device, instrument: bool) -> dict:
    """One prefill and `new_tokens` decode steps; returns times and, when instrumented, the cache trace."""
    (logits, cache), prefill_seconds = timed(runner.start, device)
    step_seconds = []
    trace = {"live": [], "layer_bytes": [], "paged_slots": [], "query_position": []}

    if instrument:
        _record(trace, cache, None)
    for step in range(new_tokens):
        tokens = forced_tokens[:, step] if forced_tokens is not None else logits.argmax(dim=-1)
        query_position = cache.next_position.clone() if instrument else None
        logits, seconds = timed(lambda: runner.step(cache, tokens), device)
        step_seconds.append(seconds)
        if instrument:
            _record(trace, cache, query_position)
    return {"prefill_s": prefill_seconds, "step_s": step_seconds, "trace": trace if instrument else None}


def _record(trace: dict, cache, query_position: torch.Tensor | None) -> None:
    live, layer_bytes, paged_slots = _cache_snapshot(cache)
    trace["live"].append(live)
    trace["layer_bytes"].append(layer_bytes)
    trace["paged_slots"].append(paged_slots)
    trace["query_position"].append(None if query_position is None else query_position.cpu())


def measure_case(
    runner: Runner,
    batch_size: int,
    new_tokens: int,
    device: torch.device,
    warmup: int,
    repeats: int,
    forced_tokens: torch.Tensor | None = None,
) -> dict:
    """Measure one case; returns the timings (median and spread) and the cache statistics."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        _run(runner, new_tokens, forced_tokens, device, instrument=False)

    runs = []
    cuda_peak = None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        runs.append(_run(runner, new_tokens, forced_tokens, device, instrument=False))
        if device.type == "cuda":
            cuda_peak = max(cuda_peak or 0, torch.cuda.max_memory_allocated(device))
    trace = _run(runner, new_tokens, forced_tokens, device, instrument=True)["trace"]
    synchronize(device)

    decode_seconds = [sum(run["step_s"]) for run in runs]
    tokens = batch_size * new_tokens
    result = {
        "step_s": summarize([sorted(run["step_s"])[len(run["step_s"]) // 2] for run in runs]),
        "decode_tokens_per_s": summarize([tokens / seconds for seconds in decode_seconds]),
        "real_prefill": runner.real_prefill,
        "cuda_max_memory_allocated": cuda_peak,
    }
    if runner.real_prefill:
        result["prefill_s"] = summarize([run["prefill_s"] for run in runs])
        result["end_to_end_tokens_per_s"] = summarize([tokens / (run["prefill_s"] + sum(run["step_s"])) for run in runs])
    result.update(trace_statistics(trace))
    return result


def trace_statistics(trace: dict) -> dict:
    """Summarise the instrumented run: bytes, live counts over time, padded length and sparsity."""
    live = torch.stack(trace["live"]).double()  # (steps + 1, L, B)
    total_bytes = [sum(layer_bytes) for layer_bytes in trace["layer_bytes"]]
    final = live[-1]  # (L, B)

    statistics = {
        "kv_bytes_after_prefill": total_bytes[0],
        "kv_bytes_final": total_bytes[-1],
        "kv_bytes_peak": max(total_bytes),
        "kv_bytes_per_layer_peak": [max(step[layer] for step in trace["layer_bytes"]) for layer in range(live.shape[1])],
        "padded_length": float(final.amax(dim=1).mean()),
        "mean_live": float(final.mean()),
        "live_mean_per_layer": live.mean(dim=2).T.tolist(),  # (L, steps + 1)
        "live_max_per_layer": live.amax(dim=2).T.tolist(),
    }
    if trace["paged_slots"][-1] is not None:
        statistics["paged_slots_per_row"] = trace["paged_slots"][-1] / (live.shape[1] * live.shape[2])

    # Decode sparsity: the query at true position k has k earlier tokens and keeps live - 1 of them.
    kept, pairs = 0.0, 0.0
    for step_live, position in zip(trace["live"][1:], trace["query_position"][1:]):
        kept += float((step_live.double() - 1).sum())
        pairs += float(position.double().sum()) * step_live.shape[0]
    statistics["decode_sparsity"] = 1.0 - kept / pairs if pairs else 0.0
    return statistics
