"""The sampler against transformers' logits processors and against the distributions it claims to draw from."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from tokenmill.engine import sampler as sampler_module
from tokenmill.engine.sampler import Sampler, SamplingRow, _top_p_threshold
from tokenmill.engine.sampling_params import SamplingParams

EOS = 2


@pytest.fixture(autouse=True, params=["kernel", "torch"])
def sampling_path(request, monkeypatch) -> str:
    """Every test on both paths: the C kernel that draws sampled rows on the CPU, and torch."""
    if request.param == "torch":
        monkeypatch.setattr(sampler_module, "load_sampling_kernel", lambda: None)
    elif sampler_module.load_sampling_kernel() is None:
        pytest.skip("no C compiler: the sampler runs torch")
    return request.param


def row(
    params: SamplingParams,
    token_ids: list[int] | None = None,
    num_prompt_tokens: int | None = None,
    seq_id: str = "s",
    sample_index: int = 0,
) -> SamplingRow:
    token_ids = [5, 6, 7] if token_ids is None else token_ids
    num_prompt_tokens = len(token_ids) if num_prompt_tokens is None else num_prompt_tokens
    return SamplingRow(seq_id, params, token_ids, num_prompt_tokens, sample_index)


def rows_of(params: SamplingParams, n: int) -> list[SamplingRow]:
    return [row(params, seq_id=f"s{i}") for i in range(n)]


def draw(sampler: Sampler, logits: torch.Tensor, params: SamplingParams, repeats: int) -> torch.Tensor:
    """Sample every row of logits `repeats` times in one batch; returns [repeats, rows] token ids."""
    batch = logits.repeat(repeats, 1)
    tokens = [t for t, _ in sampler(batch, rows_of(params, batch.shape[0]))]
    return torch.tensor(tokens).view(repeats, logits.shape[0])


def chi_square(observed: torch.Tensor, expected_probs: torch.Tensor) -> tuple[float, int]:
    """Pearson statistic over the tokens expected at least 5 times (the rest pooled into one cell)."""
    total = observed.sum()
    expected = expected_probs.double() * total
    big = expected >= 5
    obs = torch.cat([observed[big].double(), observed[~big].double().sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    stat = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum().item()
    return stat, int(keep.sum()) - 1


def assert_fits(observed: torch.Tensor, expected_probs: torch.Tensor) -> None:
    stat, dof = chi_square(observed, expected_probs)
    # ~6 standard deviations above the mean of a chi-square with `dof` degrees of freedom.
    assert stat < dof + 6 * (2 * dof) ** 0.5, f"chi-square {stat:.1f} with {dof} degrees of freedom"


# -- greedy ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_is_argmax_of_the_logits_in_every_batch_shape(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    logits = (torch.randn(16, 1000) * 4).to(dtype)
    sampler = Sampler(1000, [EOS])
    expected = logits.float().argmax(dim=-1).tolist()
    all_greedy = sampler(logits, rows_of(SamplingParams(temperature=0.0), 16))
    assert [t for t, _ in all_greedy] == expected
    # The same rows inside a batch that also samples, penalizes and reports logprobs elsewhere.
    mixed = [
        row(SamplingParams(temperature=0.0))
        if i % 2 == 0
        else row(SamplingParams(temperature=1.0, top_p=0.5, repetition_penalty=1.5, logprobs=2))
        for i in range(16)
    ]
    got = sampler(logits, mixed)
    assert [got[i][0] for i in range(0, 16, 2)] == expected[::2]


def test_greedy_with_repetition_penalty_matches_transformers() -> None:
    torch.manual_seed(1)
    vocab_size, num_rows = 300, 64
    logits = torch.randn(num_rows, vocab_size) * 3
    histories = [torch.randint(0, vocab_size, (40,)).tolist() for _ in range(num_rows)]
    # Make the seen tokens the current favourites so the penalty changes many argmaxes.
    for i, history in enumerate(histories):
        logits[i, history[:3]] += 6.0
        logits[i, history[3:6]] -= 9.0
    # In half the rows every logit is negative: seen tokens must get worse (x * p), not better (x / p).
    logits[::2] -= 30.0
    reference = RepetitionPenaltyLogitsProcessor(penalty=1.8)(torch.tensor(histories), logits.clone())
    expected = reference.argmax(dim=-1)
    assert (expected != logits.argmax(dim=-1)).sum() > num_rows // 4, "the penalty must matter in this test"

    params = SamplingParams(temperature=0.0, repetition_penalty=1.8)
    rows = [row(params, history, num_prompt_tokens=25, seq_id=f"s{i}") for i, history in enumerate(histories)]
    got = Sampler(vocab_size, [EOS])(logits, rows)
    assert [t for t, _ in got] == expected.tolist()


def test_logit_bias_then_repetition_penalty_order() -> None:
    # Token 3 was seen; raw logit -1, bias +2. Bias first gives (−1 + 2) / 2 = 0.5; penalty first would
    # give −1 * 2 + 2 = 0. Token 4 (unseen) sits at 0.25, between the two.
    logits = torch.full((1, 10), -5.0)
    logits[0, 3], logits[0, 4] = -1.0, 0.25
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0, logit_bias={3: 2.0})
    [(token, _)] = Sampler(10, [EOS])(logits, [row(params, [3])])
    assert token == 3


# -- top-k / top-p / min-p -------------------------------------------------------------------------


WARPERS = [
    (SamplingParams(temperature=0.8, top_k=12), TopKLogitsWarper(12)),
    (SamplingParams(temperature=0.8, top_p=0.7), TopPLogitsWarper(0.7)),
    (SamplingParams(temperature=0.8, min_p=0.1), MinPLogitsWarper(0.1)),
    (SamplingParams(temperature=1.3, top_k=40, top_p=0.8, min_p=0.15), None),
]


@pytest.mark.parametrize(("params", "warper"), WARPERS, ids=["top_k", "top_p", "min_p", "all_three"])
def test_truncation_samples_exactly_the_allowed_set_with_the_right_frequencies(
    params: SamplingParams, warper: object
) -> None:
    torch.manual_seed(2)
    vocab_size = 500
    logits = torch.randn(4, vocab_size)
    scaled = logits / params.temperature
    if warper is None:  # transformers' order: temperature, top-k, top-p, min-p
        warped = scaled
        for w in (
            TopKLogitsWarper(params.top_k),
            TopPLogitsWarper(params.top_p),
            MinPLogitsWarper(params.min_p),
        ):
            warped = w(None, warped)
    else:
        warped = warper(None, scaled)
    expected = torch.softmax(warped, dim=-1)
    allowed = expected > 0
    assert ((allowed.sum(-1) > 5) & (allowed.sum(-1) < vocab_size // 2)).all(), "a test that can fail"

    tokens = draw(Sampler(vocab_size, [EOS], seed=3), logits, params, repeats=5000)
    for i in range(logits.shape[0]):
        counts = torch.bincount(tokens[:, i], minlength=vocab_size)
        assert not counts[~allowed[i]].any(), f"row {i} sampled outside the allowed set"
        likely = expected[i] > 10 / tokens.shape[0]
        assert counts[likely].all(), f"row {i} never sampled an allowed token"
        assert_fits(counts, expected[i])


@pytest.mark.parametrize("spread", [0.5, 2.0, 6.0], ids=["wide", "medium", "narrow"])
def test_top_p_nucleus_matches_transformers_for_narrow_and_wide_nuclei(spread: float) -> None:
    # Wide nuclei (thousands of tokens) take the full-sort path, narrow ones the top-k probes.
    torch.manual_seed(4)
    logits = torch.randn(32, 49152) * spread
    top_p = torch.linspace(0.05, 0.99, 32)
    probs = torch.softmax(logits, dim=-1)
    kept = probs >= _top_p_threshold(probs, top_p)[:, None]
    for i in range(32):
        reference = TopPLogitsWarper(float(top_p[i]))(None, logits[i : i + 1])[0] > float("-inf")
        assert torch.equal(kept[i], reference), (
            f"row {i}: {int(kept[i].sum())} vs {int(reference.sum())} kept"
        )


def test_top_p_keeps_at_least_the_most_likely_token() -> None:
    logits = torch.tensor([[5.0, 1.0, 0.0, 0.0]])
    tokens = draw(Sampler(4, [EOS]), logits, SamplingParams(top_p=0.01), repeats=200)
    assert (tokens == 0).all()


# -- temperature and seeds -------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_sampling_follows_softmax_of_scaled_logits(temperature: float) -> None:
    torch.manual_seed(5)
    logits = torch.randn(1, 64) * 2
    tokens = draw(Sampler(64, [EOS], seed=6), logits, SamplingParams(temperature=temperature), repeats=40000)
    counts = torch.bincount(tokens[:, 0], minlength=64)
    assert_fits(counts, torch.softmax(logits[0] / temperature, dim=-1))
    # The same draws are far from the distribution of a different temperature (the check has teeth).
    stat, dof = chi_square(counts, torch.softmax(logits[0] / (temperature * 1.25), dim=-1))
    assert stat > dof + 6 * (2 * dof) ** 0.5


def _run_seeded(
    sampler: Sampler,
    steps: list[torch.Tensor],
    target: SamplingRow,
    position: int,
    companions: list[SamplingRow],
) -> list[int]:
    out = []
    for logits in steps:
        batch_rows = companions[:position] + [target] + companions[position:]
        batch = torch.randn(len(batch_rows), logits.shape[-1]) * 3  # companions see other logits
        batch[position] = logits
        out.append(sampler(batch, batch_rows)[position][0])
    return out


def test_seeded_request_reproduces_whatever_else_is_in_the_batch() -> None:
    torch.manual_seed(7)
    vocab_size = 2000
    steps = [torch.randn(vocab_size) for _ in range(25)]
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=1234)
    target = row(params, seq_id="req-a")
    unseeded = SamplingParams(temperature=1.0)
    first = _run_seeded(Sampler(vocab_size, [EOS], seed=0), steps, target, 0, [])
    crowded = [row(unseeded, seq_id=f"x{i}") for i in range(5)] + [
        row(SamplingParams(temperature=0.0), seq_id="g"),
        row(SamplingParams(temperature=0.7, seed=1234), seq_id="other-seeded"),
    ]
    second = _run_seeded(Sampler(vocab_size, [EOS], seed=99), steps, target, 3, crowded)
    assert first == second

    # A different sample of the same seeded request gets its own stream.
    sibling = row(params, seq_id="req-a-1", sample_index=1)
    assert _run_seeded(Sampler(vocab_size, [EOS]), steps, sibling, 0, []) != first
    # Unseeded rows are not reproducible across sampler seeds.
    loose = row(SamplingParams(temperature=1.0), seq_id="req-b")
    assert _run_seeded(Sampler(vocab_size, [EOS], seed=1), steps, loose, 0, []) != _run_seeded(
        Sampler(vocab_size, [EOS], seed=2), steps, loose, 0, []
    )


def test_free_forgets_the_generator_so_a_reused_id_starts_over() -> None:
    torch.manual_seed(8)
    sampler = Sampler(1000, [EOS])
    logits = torch.randn(1, 1000)
    target = row(SamplingParams(temperature=1.0, seed=5), seq_id="s")
    first = [sampler(logits, [target])[0][0] for _ in range(10)]
    sampler.free("s")
    again = [sampler(logits, [target])[0][0] for _ in range(10)]
    assert first == again
    assert len(set(first)) > 1


# -- min_tokens, logit_bias, presence/frequency ----------------------------------------------------


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_min_tokens_blocks_eos_and_stop_tokens_until_reached(temperature: float) -> None:
    logits = torch.zeros(1, 50)
    logits[0, EOS] = logits[0, 9] = 30.0
    params = SamplingParams(temperature=temperature, min_tokens=3, stop_token_ids=(9,))
    sampler = Sampler(50, [EOS])
    for num_output in range(3):
        history = [11, 12] + [13] * num_output
        batch = logits.repeat(20, 1)
        got = [t for t, _ in sampler(batch, [row(params, history, num_prompt_tokens=2)] * 20)]
        assert EOS not in got and 9 not in got, (num_output, got)
    got = sampler(logits, [row(params, [11, 12, 13, 13, 13], num_prompt_tokens=2)])[0][0]
    assert got in (EOS, 9)


def test_logit_bias_bans_and_forces() -> None:
    torch.manual_seed(9)
    logits = torch.randn(8, 100) * 3
    favourite = int(logits[0].argmax())
    sampler = Sampler(100, [EOS])
    banned = SamplingParams(temperature=0.0, logit_bias={favourite: -100.0})
    assert sampler(logits[:1], [row(banned)])[0][0] != favourite
    tokens = draw(sampler, logits[:1], SamplingParams(temperature=2.0, logit_bias={favourite: -100.0}), 2000)
    assert (tokens != favourite).all()
    forced = SamplingParams(temperature=1.5, logit_bias={42: 100.0})
    tokens = draw(sampler, logits, forced, repeats=200)
    assert (tokens == 42).all()


@pytest.mark.parametrize(
    ("frequency", "presence", "output", "winner"),
    [
        (0.3, 0.0, [0, 0], 0),  # 5 - 0.6 = 4.4 > 4
        (0.6, 0.0, [0, 0], 1),  # 5 - 1.2 = 3.8 < 4
        (0.0, 0.9, [0, 0, 0], 0),  # presence counts once: 5 - 0.9 = 4.1
        (0.0, 1.1, [0], 1),  # 5 - 1.1 = 3.9
        (0.2, 0.7, [0, 0], 1),  # 5 - 0.4 - 0.7 = 3.9
        (0.2, 0.7, [0], 0),  # 5 - 0.2 - 0.7 = 4.1
        (-0.5, 0.0, [1, 1, 1], 1),  # negative penalties encourage: 4 + 1.5 = 5.5
        (2.0, 2.0, [], 0),  # only output tokens count, and token 0 is only in the prompt
    ],
)
def test_presence_and_frequency_penalty_arithmetic(
    frequency: float, presence: float, output: list[int], winner: int
) -> None:
    logits = torch.full((1, 20), -10.0)
    logits[0, 0], logits[0, 1] = 5.0, 4.0
    params = SamplingParams(temperature=0.0, frequency_penalty=frequency, presence_penalty=presence)
    history = [0, 0, 7] + output
    assert Sampler(20, [EOS])(logits, [row(params, history, num_prompt_tokens=3)])[0][0] == winner


# -- logprobs and padding --------------------------------------------------------------------------


def test_logprobs_come_from_the_raw_logits_sorted_descending() -> None:
    torch.manual_seed(10)
    logits = (torch.randn(6, 400) * 3).to(torch.bfloat16)
    raw = torch.log_softmax(logits.float(), dim=-1)
    rows = [
        row(
            SamplingParams(temperature=0.7, top_k=5, logprobs=5, repetition_penalty=1.5, logit_bias={1: 9.0})
        ),
        row(SamplingParams(temperature=0.0, logprobs=0, presence_penalty=2.0)),
        row(SamplingParams(temperature=1.0)),
        row(SamplingParams(temperature=1.0, logprobs=20, seed=3)),
        row(SamplingParams(temperature=0.0)),
        row(SamplingParams(temperature=0.0, logprobs=1)),
    ]
    got = Sampler(400, [EOS])(logits, rows)
    assert got[2][1] is None and got[4][1] is None
    for i, k in [(0, 5), (1, 0), (3, 20), (5, 1)]:
        token, logprob = got[i]
        assert logprob is not None and logprob.token_id == token
        assert logprob.logprob == pytest.approx(raw[i, token].item(), abs=1e-6)
        assert len(logprob.top) == k
        values = [lp for _, lp in logprob.top]
        assert values == sorted(values, reverse=True)
        top_values, top_ids = raw[i].topk(k) if k else (torch.empty(0), torch.empty(0))
        assert [t for t, _ in logprob.top] == top_ids.tolist()
        assert values == pytest.approx(top_values.tolist(), abs=1e-6)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.0, repetition_penalty=1.2),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=1.0, top_p=0.9, top_k=100, min_p=0.01),
        SamplingParams(temperature=1.0, seed=1, logprobs=3),
    ],
    ids=["greedy", "greedy_penalty", "sample", "truncated", "seeded_logprobs"],
)
def test_padded_vocab_columns_are_never_sampled(params: SamplingParams) -> None:
    torch.manual_seed(11)
    vocab_size = 100
    logits = torch.randn(64, 128)
    logits[:, vocab_size:] = 1e4
    got = Sampler(vocab_size, [EOS])(logits, rows_of(params, 64))
    assert all(token < vocab_size for token, _ in got)
    for _, logprob in got:
        assert logprob is None or all(t < vocab_size for t, _ in logprob.top)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(top_k=5, top_p=0.8, min_p=0.1),  # temperature 1, no penalties: nothing copies first
        SamplingParams(
            temperature=0.9,
            top_k=5,
            repetition_penalty=1.3,
            frequency_penalty=0.5,
            logit_bias={3: 5.0},
            min_tokens=2,
            logprobs=2,
        ),
    ],
    ids=["plain", "processed"],
)
def test_sampler_does_not_modify_the_callers_logits(params: SamplingParams) -> None:
    torch.manual_seed(12)
    logits = torch.randn(4, 50)
    before = logits.clone()
    Sampler(50, [EOS])(logits, rows_of(params, 4))
    assert torch.equal(logits, before)
