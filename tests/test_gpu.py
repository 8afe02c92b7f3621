"""GPU checks (run on the GPU machine: pytest -m gpu)."""
import pytest
import torch

import shadowpass
from cases import hf_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

EXACT = {"rank": 4096, "budget": 1 << 16, "min_sparse_len": 0, "outlier_chunks": 3}


BF16_PHI3 = pytest.param(
    "phi3", torch.bfloat16, marks=pytest.mark.xfail(
        reason="seen on H200: keys rebuilt from bf16 U/SV flip a near-tied greedy token", strict=False))


@pytest.mark.parametrize("name,dtype", [(n, d) for n in ("llama", "phi3", "glm")
                                        for d in (torch.float32, torch.bfloat16)
                                        if (n, d) != ("phi3", torch.bfloat16)] + [BF16_PHI3])
def test_exactness_anchor_cuda(name, dtype):
    model = hf_model(name).to("cuda", dtype)
    ids = torch.randint(0, 256, (2, 600), device="cuda")
    mask = torch.ones_like(ids)
    mask[0, :9] = 0
    kw = dict(attention_mask=mask, max_new_tokens=32, do_sample=False,
              return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        dense = model.generate(ids, **kw)
        model.compile(backend="shadowkv", options=EXACT)
        out = model.generate(ids, **kw)
    sites = shadowpass.runtime_of(model).sites
    assert len(sites) == model.config.num_hidden_layers
    st = next(iter(sites.values())).prefill
    assert st.values.device.type == "cpu" and st.values.is_pinned()
    assert st.U.device.type == "cuda"
    diff = max((a - b).abs().max().item() for a, b in zip(out.logits, dense.logits))
    print(f"{name} {dtype}: max logit diff {diff:.3g}")
    assert torch.equal(out.sequences, dense.sequences)
