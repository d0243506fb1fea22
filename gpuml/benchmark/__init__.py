"""Benchmarks behind `gpuml bench`: kernel microbenchmarks and training throughput, each next to
an anchor (cuBLAS, PyTorch/cuDNN, NumPy, a plain copy) measured in the same run.

Nothing in gpuml imports this package; results, plots and run scripts live in the top-level
`bench/` folder.
"""
