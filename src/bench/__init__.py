"""Benchmarks of decoding with the pruned KV cache and of fine-tuning cost (`python -m src.benchmark`).

stage.py runs the enabled parts: pipeline.py (saved models), paper_scale.py (wired random models of
paper-scale shapes, from synthetic.py) and training_cost.py. decode.py measures one case, with the
paged cache of src/dcp or the contiguous dense baseline of contiguous.py, and results.py and
plots.py write the outputs.
"""
