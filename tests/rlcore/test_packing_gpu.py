"""The packed forward on a GPU: torch's varlen flash kernel (bf16) against the padded sdpa forward.
Skipped without CUDA; the CPU side (layout, cumulative lengths, bucketed attention) is tests/rlcore/test_packing.py."""

import pytest
import torch

from rlcore import packing
from rlcore.logprobs import response_logprobs
from rlcore.models import tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_varlen_kernel_packed_equals_padded_bf16():
    model = tiny_model(512, hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=512,
                       seed=0).to("cuda", torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([300, 7, 120, 1, 64, 250])
    mask = (torch.arange(300)[None] < lengths[:, None]).float()
    prompts = torch.randint(2, 512, (6, 20), generator=g).tolist()
    ids = torch.randint(2, 512, (6, 300), generator=g) * mask.long()
    q = torch.zeros(1, 4, 8, 64, device="cuda", dtype=torch.bfloat16)
    assert packing.uses_varlen_kernel(q)  # the packed forward below runs torch's varlen kernel
    out = []
    for packed in (False, True):
        model.zero_grad()
        logp, _ = response_logprobs(model, prompts, ids, mask, temperature=1.0, pad_id=0, lengths=lengths,
                                    packed=packed)
        (logp * mask.cuda()).sum().backward()
        out.append((logp.detach().float().cpu(), model.model.layers[0].self_attn.q_proj.weight.grad.float().cpu()))
    (logp_pad, grad_pad), (logp_packed, grad_packed) = out
    # bf16: the two kernels round differently; compare at bf16's resolution
    assert (logp_pad - logp_packed).abs().max() < 0.05
    assert ((grad_pad - grad_packed).norm() / grad_pad.norm()) < 0.02
