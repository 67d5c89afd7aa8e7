"""Evaluation beyond perplexity: zero-shot tasks, fixed-pattern baselines and interpretability views.

The submodules are imported on demand, because `zero_shot` pulls in lm-evaluation-harness and
`interpret` pulls in matplotlib:

- `baselines`: keep policies at a given KV budget (sliding window, StreamingLLM, H2O, strided).
- `local_tasks`: multiple-choice and cloze tasks generated from held-out plays.
- `zero_shot`: lm-evaluation-harness integration.
- `interpret`: keep-mask heat maps, token views and drop statistics.
"""
