"""Benchmarks behind `experiments/bench.py`: `dispatch` (one MoE layer's dispatch paths against a dense
matmul of the same FLOPs) and `e2e` (a whole random-weight model, unpruned and compressed)."""
