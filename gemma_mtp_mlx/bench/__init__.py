"""Measuring: does speculation pay for this pair on this machine, and why.

`benchmark.py` is `gemma-mtp bench` (plain vs speculative tokens/s in one process, the costs
c and v(k) and the speedup they predict), `batch.py` its batched mode, `shapes.py` the
real-size layer timings built in memory, `timeline.py` the per-round profile (`--profile`),
and `selfcheck.py` the exactness check behind `gemma-mtp doctor`. Nothing in the generation
path imports this package.
"""
