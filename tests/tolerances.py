"""Tolerances in one place."""
FP32_LOGITS = 1e-4      # the exactness anchor (full rank, full budget) in fp32
FP32_OP = 1e-5          # reference ops against their direct formulas in fp32

# Triton kernels against the reference ops (tests/test_kernels.py, benchmarks/kernels.py):
# (atol, rtol) per dtype of the data the kernel reads; values are O(1) in those tests.
KERNEL_FP32 = (2e-5, 2e-5)   # fp32 data, fp32 accumulation (order of sums differs)
KERNEL_FP16 = (5e-3, 5e-3)   # one fp16 rounding of the output (2^-11) plus accumulation order
KERNEL_BF16 = (3e-2, 3e-2)   # one bf16 rounding (2^-8) of rebuilt keys and of p before p @ V
SCORES = (1e-5, 1e-4)        # chunk softmax probabilities: the dot is exact products either way

# Attention outputs, shadowkv-compiled (full rank + full budget) against eager, by dtype: the
# low-precision dtypes differ by rounding (ShadowKV's decode computes in fp32, eager does not).
ATTENTION_TOL = {"fp32": dict(atol=1e-4, rtol=1e-4),
                 "bf16": dict(atol=3e-2, rtol=3e-2),
                 "fp16": dict(atol=3e-3, rtol=3e-3)}
