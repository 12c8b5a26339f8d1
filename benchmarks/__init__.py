"""Speed benchmarks of the fake-quant training step (``python benchmarks/bench.py``); not installed."""
