import os
import sys

import pytest
import torch

# Without a GPU the Triton kernel tests (test_kernels.py) run under the Triton interpreter.
# Triton fixes interpreter mode for its own library functions when it is first imported, which
# other test modules trigger (torch._dynamo imports triton), so it is set here, before them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    torch.manual_seed(0)
    yield
    torch._dynamo.reset()
