"""The sampling kernel (models/kernels/sampling.c) on its own: the exact sets it draws from, against
transformers' warpers on full-size rows. (tests/engine/test_sampler.py runs every sampler test through it
and through torch.)"""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from tests.engine.test_sampler import EOS, row, rows_of
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
    temperature = torch.full((len(uniforms),), params.temperature)
    return sampler._kernel_call(batch, torch.arange(len(uniforms)), rows, temperature, uniforms.float())


def _assert_draws_transformers_nucleus(logits: torch.Tensor, top_p: float) -> None:
    """Uniforms spread over [0, 1) reach every token of the kept set with a share above their spacing and
    nothing outside it; u = 0 and u just below 1 give its first and last tokens, in token order."""
    uniforms = torch.cat([torch.tensor([0.0, 1 - 2**-24]), (torch.arange(4000) + 0.5) / 4000])
    kept = TopPLogitsWarper(top_p)(None, logits.clone())[0] > float("-inf")
    tokens = _kernel_tokens(logits, SamplingParams(top_p=top_p), uniforms)
    ids = kept.nonzero()[:, 0]
    assert tokens[0] == ids[0] and tokens[1] == ids[-1], (top_p, int(kept.sum()))
    assert kept[tokens].all(), f"top_p={top_p}: drew outside the nucleus"
    probs = torch.softmax(logits[0], dim=-1)
    share = probs / probs[kept].sum()
    assert set(tokens.tolist()) >= set((kept & (share > 2 / 4000)).nonzero()[:, 0].tolist())


@pytest.mark.parametrize("spread", [0.5, 2.0, 6.0], ids=["wide", "medium", "narrow"])
def test_kernel_draws_exactly_from_transformers_nucleus(spread: float) -> None:
    torch.manual_seed(4)
    for top_p in (0.1, 0.5, 0.9):
        _assert_draws_transformers_nucleus(torch.randn(1, 49152) * spread, top_p)


def test_kernel_nucleus_reaching_below_its_first_probe() -> None:
    """A row whose nucleus takes hundreds of weights around e^-8 (below the kernel's first probe, 2^-10;
    above its second, 2^-16) besides its ten likeliest: transformers' set all the same."""
    torch.manual_seed(7)
    logits = torch.full((1, 49152), -30.0)
    ids = torch.randperm(49152)
    logits[0, ids[:10]] = -0.1 * torch.rand(10)
    logits[0, ids[10:2010]] = -8 + torch.rand(2000) - 0.5
    for top_p in (0.94, 0.95, 0.97):
        _assert_draws_transformers_nucleus(logits, top_p)


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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernel_processes_the_heads_logits_as_torch_does_on_a_float32_copy(dtype: torch.dtype) -> None:
    """Bias and penalties in the kernel's pass over the logits as the head wrote them give, row for row, the
    tokens of torch's processing of a float32 copy, for greedy and sampled rows (the same uniforms drawn)."""
    torch.manual_seed(6)
    vocab = 64  # a small vocabulary, so that the penalties touch most of every row's likely tokens
    logits = (torch.randn(48, vocab + 24) * 2).to(dtype)
    logits[5, 17] = float("nan")  # a broken row: torch's argmax takes its first NaN
    logits[6] = float("-inf")
    settings = [
        SamplingParams(temperature=0.0, frequency_penalty=1.5, presence_penalty=0.5),
        SamplingParams(temperature=0.0, logit_bias={3: 4.0, 63: -2.0}, frequency_penalty=-0.7),
        SamplingParams(temperature=0.8, top_p=0.9, frequency_penalty=0.4, logit_bias={7: 3.0}),
        SamplingParams(temperature=1.0, top_k=20, presence_penalty=1.0, seed=11),
        SamplingParams(temperature=0.6, min_p=0.05),
        SamplingParams(temperature=0.0),
    ]
    # Each row has output its six most likely tokens twice: every penalty moves a token that could win.
    likely = logits[:, :vocab].float().nan_to_num(0.0).topk(6).indices.tolist()
    history = [[*torch.randint(0, vocab, (10,)).tolist(), *tokens, *tokens] for tokens in likely]
    rows = [
        row(settings[i % len(settings)], history[i], num_prompt_tokens=10, seq_id=f"s{i}") for i in range(48)
    ]
    fused = Sampler(vocab, [EOS])
    assert fused._kernel_takes(logits[:, :vocab], rows, None)
    got = [token for token, _ in fused(logits, rows)]
    expected = Sampler(vocab, [EOS])._torch_sample(logits[:, :vocab].float(), rows, None).tolist()
    assert got == expected
    assert got[5] == 17
    plain = logits[:, :vocab].float().argmax(dim=-1).tolist()
    penalized = [i for i in range(48) if i % len(settings) < 2]
    assert any(got[i] != plain[i] for i in penalized), (
        "no greedy row changed: missing penalties would go unseen"
    )
