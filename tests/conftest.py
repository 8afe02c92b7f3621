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


@pytest.fixture
def triton_on_cpu(monkeypatch):
    """Inductor emitting Triton for CPU tensors, run by the interpreter. Triton has no driver on
    a machine without a GPU; Inductor only asks it for a target while generating code, so a
    stub naming sm_90 stands in for the test's duration."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the CPU template route runs under the Triton interpreter")
    pytest.importorskip("triton", reason="the templates need Triton (pip install triton numpy)")
    from torch._inductor import config as inductor_config
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    class StubDriver:
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

    monkeypatch.setattr(driver, "_active", StubDriver())
    # the FX graph cache keys do not cover our lowering's sources: compile afresh
    with inductor_config.patch(cpu_backend="triton", force_disable_caches=True):
        yield
