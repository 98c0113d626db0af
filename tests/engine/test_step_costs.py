"""Measured step costs decide how much batch work joins a live step: free rows are taken, rows that would
slow the live work past the allowed share are not, and sizes never measured are tried one at a time."""

from tests.engine.test_priority import bulk, live, sizes, step
from tokenmill.config import BatchBudget
from tokenmill.engine.block_pool import BlockPool
from tokenmill.engine.scheduler import Scheduler
from tokenmill.engine.step_costs import StepCosts


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
