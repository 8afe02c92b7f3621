import os
import sys

import pytest
import torch

# Without a GPU the Triton kernel tests (test_kernels.py) run under the Triton interpreter.
# Triton fixes interpreter mode for its own library functions when it is first imported, which
# other test modules trigger (torch._dynamo imports triton), so it is set here, before them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (the README's test command), workers share the cores instead of each
# running torch's intra-op pool on all of them.
workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
if workers:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    torch.manual_seed(0)
    yield
    torch._dynamo.reset()
