"""End-to-end decode throughput, ShadowKV vs dense, Llama-3.1-8B shape (see shadowpass.bench).

    python benchmarks/e2e.py --out results/          # 32K, 60K, 122K; same as `shadowpass bench`
    python benchmarks/e2e.py --check                                  # the benchmarked path is real
"""
import sys

from shadowpass.bench import main

if __name__ == "__main__":
    sys.exit(main())
