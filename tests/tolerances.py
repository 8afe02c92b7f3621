"""Tolerances in one place."""
FP32_LOGITS = 1e-4      # the exactness anchor (full rank, full budget) in fp32
FP32_OP = 1e-5          # reference ops against their direct formulas in fp32
