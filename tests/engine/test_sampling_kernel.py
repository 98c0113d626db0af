"""The sampling kernel (models/kernels/sampling.c) on its own: the exact sets it draws from, against
transformers' warpers on full-size rows. (tests/engine/test_sampler.py runs every sampler test through it
and through torch.)"""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from tests.engine.test_sampler import EOS, rows_of
from tokenmill.engine.sampler import Sampler, load_sampling_kernel
from tokenmill.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(
    load_sampling_kernel() is None, reason="no C compiler: the sampler runs torch"
)


def _kernel_tokens(logits: torch.Tensor, params: SamplingParams, uniforms: torch.Tensor) -> torch.Tensor:
    """The kernel's token for each uniform, every uniform drawing on the same one-row logits."""
    sampler = Sampler(logits.shape[-1], [EOS])
    batch = logits.expand(len(uniforms), -1).contiguous()
    rows = rows_of(params, len(uniforms))
    return sampler._kernel_draw(batch, torch.arange(len(uniforms)), rows, uniforms.float())


@pytest.mark.parametrize("spread", [0.5, 2.0, 6.0], ids=["wide", "medium", "narrow"])
def test_kernel_draws_exactly_from_transformers_nucleus(spread: float) -> None:
    """Uniforms spread over [0, 1) reach every token of the kept set with a share above their spacing and
    nothing outside it; u = 0 and u just below 1 give its first and last tokens, in token order."""
    torch.manual_seed(4)
    uniforms = torch.cat([torch.tensor([0.0, 1 - 2**-24]), (torch.arange(4000) + 0.5) / 4000])
    for top_p in (0.1, 0.5, 0.9):
        logits = torch.randn(1, 49152) * spread
        kept = TopPLogitsWarper(top_p)(None, logits.clone())[0] > float("-inf")
        tokens = _kernel_tokens(logits, SamplingParams(top_p=top_p), uniforms)
        ids = kept.nonzero()[:, 0]
        assert tokens[0] == ids[0] and tokens[1] == ids[-1], (top_p, int(kept.sum()))
        assert kept[tokens].all(), f"top_p={top_p}: drew outside the nucleus"
        probs = torch.softmax(logits[0], dim=-1)
        share = probs / probs[kept].sum()
        assert set(tokens.tolist()) >= set((kept & (share > 2 / 4000)).nonzero()[:, 0].tolist())


def _far_kth_logits() -> torch.Tensor:
    """A row whose 50th largest logit is 12 below its largest: 10 logits near the top, 100 around -12."""
    logits = torch.full((1, 49152), -30.0)
    ids = torch.randperm(49152)
    logits[0, ids[:10]] = -2 * torch.rand(10)
    logits[0, ids[10:110]] = -12 + torch.rand(100) - 0.5
    return logits


@pytest.mark.parametrize("row", ["near", "far"])
@pytest.mark.parametrize("top_k", [1, 50])
def test_kernel_top_k_keeps_exactly_transformers_set(top_k: int, row: str) -> None:
    """The kernel selects the k-th largest among the logits near a row's largest when k of them are
    (near), else over the whole row (far): either way transformers' set, its first and last tokens drawn
    at u = 0 and u just below 1."""
    torch.manual_seed(5)
    logits = torch.randn(1, 49152) * 6 if row == "near" else _far_kth_logits()
    kept = TopKLogitsWarper(top_k)(None, logits.clone())[0] > float("-inf")
    uniforms = torch.cat([torch.tensor([0.0, 1 - 2**-24]), (torch.arange(2000) + 0.5) / 2000])
    tokens = _kernel_tokens(logits, SamplingParams(top_k=top_k), uniforms)
    ids = kept.nonzero()[:, 0]
    assert tokens[0] == ids[0] and tokens[1] == ids[-1]
    assert kept[tokens].all()


def test_kernel_top_k_keeps_ties_with_the_kth_logit() -> None:
    logits = torch.tensor([[3.0, 1.0, 1.0, 1.0, 0.0, -1.0]])
    tokens = _kernel_tokens(logits, SamplingParams(top_k=2), (torch.arange(1000) + 0.5) / 1000)
    assert set(tokens.tolist()) == {0, 1, 2, 3}  # TopKLogitsWarper keeps ties too
    broken = torch.tensor([[float("nan"), 2.0, 5.0, float("-inf")]])
    assert _kernel_tokens(broken, SamplingParams(top_p=0.9), torch.tensor([0.5])).tolist() == [2]
