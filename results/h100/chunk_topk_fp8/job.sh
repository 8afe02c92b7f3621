python3 -m pip install -q --no-build-isolation --no-deps -e . >/dev/null 2>&1
python3 -c "import torch,triton,triton.language as tl; print(torch.__version__, triton.__version__, 'tl.topk', hasattr(tl,'topk'), torch.cuda.get_device_name())" > $JOB/env.txt 2>&1
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.max.mem --format=csv >> $JOB/env.txt 2>&1
python3 -u benchmarks/kernels.py --contexts 131072 --batches 8 --chunk-caches 4 --no-split-route > $JOB/bench.txt 2>&1
timeout 200 python3 -m pytest -m "gpu or not gpu" -q -p no:cacheprovider tests/test_kernels.py -k "topk or fp8" > $JOB/tests_topk_fp8.txt 2>&1
git apply results/h100/chunk_topk_fp8/topk_swap.patch && git diff --stat >> $JOB/env.txt
timeout 480 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_kernels.py tests/test_lowering.py tests/test_split_step.py tests/test_gpu.py > $JOB/gpu_suite_swap.txt 2>&1
timeout 100 python3 -u scripts/topk_configs.py --contexts 131072 32768 --batches 8 1 > $JOB/topk_configs.txt 2>&1
