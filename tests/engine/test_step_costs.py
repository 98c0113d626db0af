"""Measured step costs decide how much batch work joins a live step: free rows are taken, rows that would
slow the live work past the allowed share are not, and sizes never measured are tried one at a time."""

import pytest

from tests.engine.test_priority import bulk, live, sizes, step
from tokenmill.config import BatchBudget
from tokenmill.engine.block_pool import BlockPool
from tokenmill.engine.scheduler import Scheduler
from tokenmill.engine.step_costs import StepCosts, TpotPacer


def roofline(num_tokens: int) -> float:
    """A CPU step: reading the weights takes 10 ms whatever the rows, arithmetic 3 ms a row past that."""
    return max(0.010, 0.003 * num_tokens) + 0.001


def measured(sizes_: range) -> StepCosts:
    costs = StepCosts()
    for n in sizes_:
        costs.observe(n, roofline(n))
    return costs


def test_rows_are_taken_while_nearly_free_and_not_beyond():
    costs = measured(range(1, 33))
    # 1 live row: 11 ms; up to 3 rows stay 11 ms, 4 rows cost 13 ms (+18%): at 10%, 2 extra rows.
    assert costs.affordable(1, 0.10, limit=16) == 2
    assert costs.affordable(1, 0.25, limit=16) == 3
    assert costs.affordable(1, 0.10, limit=1) == 1
    assert costs.affordable(8, 0.10, limit=16) == 0  # 25 ms, arithmetic-bound: one more row is +12%
    assert costs.affordable(1, 0.0, limit=16) == 2  # no slower at all still allows the free rows


def test_unmeasured_sizes_are_explored_one_at_a_time():
    costs = StepCosts()
    assert costs.affordable(2, 0.1, limit=8) == 0  # the live step itself is unknown: nothing yet
    costs.observe(2, roofline(2))
    assert costs.affordable(2, 0.1, limit=8) == 1
    costs.observe(3, roofline(3))
    assert costs.affordable(2, 0.1, limit=8) == 2
    costs.observe(64, roofline(64))  # a large idle batch step: sizes between are interpolated
    assert costs.estimate(20) is not None and costs.estimate(20) > costs.estimate(3)


def test_the_running_average_follows_a_machine_that_slows_down():
    costs = StepCosts()
    for _ in range(30):
        costs.observe(4, 0.010)
    for _ in range(30):
        costs.observe(4, 0.020)
    assert abs(costs.estimate(4) - 0.020) < 0.001


def test_the_scheduler_fits_batch_work_to_the_measured_costs():
    costs = measured(range(1, 33))
    sched = Scheduler(
        BlockPool(64, 4),
        32,
        8,
        max_model_len=256,
        batch_budget=BatchBudget(max_slowdown=0.10, fill_tokens=16, idle_tokens=32),
        step_costs=costs,
    )
    i, b = live("i", 4, max_tokens=8), bulk("b", 20, first_token=100)
    sched.add(i)
    sched.add(b)
    assert sizes(step(sched)) == [("i", 4)]  # 4 live tokens are past the free rows already
    assert sizes(step(sched)) == [("i", 1), ("b", 2)]  # a decode leaves two free rows
    sched.abort(["i"])
    assert sizes(step(sched)) == [("b", 18)]  # no live work: the idle share


def test_large_steps_cost_in_proportion_to_their_tokens():
    costs = measured(range(1, 33))
    costs.observe(150, roofline(150))  # a live prefill chunk: 451 ms at 3 ms a token
    assert abs(costs.estimate(160) - costs.estimate(150) * 160 / 150) < 1e-9
    assert costs.affordable(150, 0.10, limit=64) == 15  # 10% more tokens, not "free within the bucket"


def test_most_within_finds_the_largest_addition_under_a_time():
    costs = measured(range(1, 33))
    assert costs.most_within(2, 0.0625, limit=64) == 18  # 20 rows: 61 ms, 21 rows: 64 ms
    assert costs.most_within(2, 0.0625, limit=5) == 5
    assert costs.most_within(2, 0.005, limit=64) == 0  # the base step alone takes longer
    assert costs.most_within(2, 10.0, limit=64) == 31  # past 32 rows nothing is measured: 33 is the probe
    assert StepCosts().most_within(2, 10.0, limit=64) == 0


def paced_costs() -> StepCosts:
    costs = measured(range(1, 33))
    costs.observe(128, roofline(128))  # a prompt step: sizes between are interpolated (exactly, here)
    return costs


def test_decode_steps_bank_the_time_they_leave_and_a_prompt_spends_it():
    pacer = TpotPacer(0.030, paced_costs())
    assert pacer.allowance(2, limit=200) == 7  # 9 rows: 28 ms of the 30
    for _ in range(3):
        pacer.spent(2, 0)  # 11 ms each: 19 ms banked each
    assert pacer.allowance(2, limit=200) == 26  # 28 rows: 85 ms, within 30 + 57
    for _ in range(10):
        pacer.spent(2, 0)
    assert pacer.credit_s == pytest.approx(TpotPacer.CREDIT_STEPS * 0.030)  # saved up to a bound
    assert pacer.allowance(2, limit=200) == 47  # 49 rows: 148 ms, within 30 + 120
    pacer.spent(2, 100)  # a step far over: the debt is bounded too, and repaid by decode-only steps
    assert pacer.credit_s == pytest.approx(-TpotPacer.CREDIT_STEPS * 0.030)
    assert pacer.allowance(2, limit=200) == 0
    for _ in range(7):
        pacer.spent(2, 0)
    assert pacer.allowance(2, limit=200) > 0


def test_prompts_still_advance_when_the_decodes_alone_take_the_target():
    pacer = TpotPacer(0.005, paced_costs())
    assert pacer.allowance(2, limit=200) == TpotPacer.MIN_PREFILL_TOKENS
    pacer.spent(2, TpotPacer.MIN_PREFILL_TOKENS)
    assert pacer.allowance(2, limit=200) == TpotPacer.MIN_PREFILL_TOKENS
    assert pacer.allowance(0, limit=200) == 200 and pacer.credit_s == 0  # nothing decodes: all of it


def tpot_scheduler(costs: StepCosts, target_s: float | None) -> Scheduler:
    return Scheduler(BlockPool(256, 4), 256, 8, max_model_len=512, step_costs=costs, target_tpot_s=target_s)


def decoding_pair(sched: Scheduler) -> None:
    for name in "ab":
        sched.add(live(name, 4, max_tokens=50))
    assert sizes(step(sched)) == [("a", 4), ("b", 4)]  # nothing decodes yet: the whole budget


def test_streams_keep_their_pace_while_a_long_prompt_is_computed_beside_them():
    costs = paced_costs()
    sched = tpot_scheduler(costs, 0.030)
    decoding_pair(sched)
    for _ in range(3):
        assert sizes(step(sched)) == [("a", 1), ("b", 1)]
    sched.add(live("long", 100, first_token=200))
    chunks = []
    while sum(chunks) < 100:
        batch = step(sched)
        assert sizes(batch)[:2] == [("a", 1), ("b", 1)]  # every stream gets its token in every step
        chunks.append(dict(sizes(batch)).get("long", 0))
    assert chunks[0] == 26  # what the 3 decode-only steps banked, spent at once
    assert 1 < len(chunks) < 20 and sched.num_tpot_limited_steps >= len(chunks) - 1
    paced = [costs.estimate(2)] * 3 + [costs.estimate(2 + chunk) for chunk in chunks]
    assert sum(paced) / len(paced) <= 0.030  # the streams' pace, on average since they started


def test_throughput_mode_fills_the_budget():
    sched = tpot_scheduler(paced_costs(), None)
    decoding_pair(sched)
    sched.add(live("long", 100, first_token=200))
    assert sizes(step(sched)) == [("a", 1), ("b", 1), ("long", 100)]
    assert sched.num_tpot_limited_steps == 0
