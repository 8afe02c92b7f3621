"""Tolerances in one place."""
FP32_LOGITS = 1e-4      # the exactness anchor (full rank, full budget) in fp32
FP32_OP = 1e-5          # reference ops against their direct formulas in fp32
# Attention outputs, shadowkv-compiled (full rank + full budget) against eager, by dtype: the
# low-precision dtypes differ by rounding (ShadowKV's decode computes in fp32, eager does not).
ATTENTION_TOL = {"fp32": dict(atol=1e-4, rtol=1e-4),
                 "bf16": dict(atol=3e-2, rtol=3e-2),
                 "fp16": dict(atol=3e-3, rtol=3e-3)}
