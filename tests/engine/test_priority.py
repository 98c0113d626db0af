"""Priority classes: interactive work is served first, batch work only gets the capacity left and gives memory
back first. Scheduler tests with hand-made tokens (exact budgets, blocks, victims); one engine test that the
class changes the order work runs in, never what it generates."""

from __future__ import annotations

import random

import pytest

from tokenmill import LLM
from tokenmill.config import BatchBudget
from tokenmill.engine.block_pool import BlockPool
from tokenmill.engine.lora import LoRARequest
from tokenmill.engine.request import RequestStatus, Sequence
from tokenmill.engine.sampling_params import InvalidRequestError, Priority, SamplingParams
from tokenmill.engine.scheduler import Scheduler

EOS = 0


def make_scheduler(
    num_blocks=64, block_size=4, budget=32, max_seqs=8, batch_tokens=8, idle_tokens=64, loras=None
) -> Scheduler:
    return Scheduler(
        BlockPool(num_blocks, block_size),
        budget,
        max_seqs,
        max_model_len=256,
        eos_token_ids=[EOS],
        loras=loras,
        batch_budget=BatchBudget(fill_tokens=batch_tokens, idle_tokens=idle_tokens),
    )


def seq(seq_id: str, num_prompt: int, max_tokens: int = 4, first_token: int = 1, **params) -> Sequence:
    prompt = list(range(first_token, first_token + num_prompt))
    return Sequence(seq_id, seq_id, 0, prompt, num_prompt, SamplingParams(max_tokens=max_tokens, **params))


def live(seq_id: str, num_prompt: int, **kwargs) -> Sequence:
    return seq(seq_id, num_prompt, **kwargs)


def bulk(seq_id: str, num_prompt: int, **kwargs) -> Sequence:
    return seq(seq_id, num_prompt, priority="batch", **kwargs)


def step(sched: Scheduler, token: int = 7):
    batch = sched.schedule()
    sched.update(batch, [token] * len(batch.sampling_items))
    return batch


def sizes(batch) -> list[tuple[str, int]]:
    return [(item.seq.seq_id, item.num_new_tokens) for item in batch.items]


def ids(seqs) -> list[str]:
    return [s.seq_id for s in seqs]


def test_sampling_params_priority_is_validated_and_stored_as_the_enum():
    assert SamplingParams().priority is Priority.INTERACTIVE
    assert SamplingParams(priority="batch").priority is Priority.BATCH
    assert SamplingParams(priority=Priority.BATCH) == SamplingParams(priority="batch")
    for bad in ("urgent", "BATCH", None, 1):
        with pytest.raises(InvalidRequestError) as err:
            SamplingParams(priority=bad)
        assert err.value.param == "priority"


def test_interactive_runs_before_batch_that_arrived_first():
    sched = make_scheduler(budget=32, batch_tokens=16)
    b, i = bulk("b", 4), live("i", 4, first_token=50)
    sched.add(b)
    sched.add(i)
    assert sizes(step(sched)) == [("i", 4), ("b", 4)]
    assert sizes(step(sched)) == [("i", 1), ("b", 1)]


def test_batch_waits_while_an_interactive_request_waits_even_when_it_would_fit():
    sched = make_scheduler(num_blocks=8, block_size=4, budget=32)
    i1 = live("i1", 20, max_tokens=2)
    sched.add(i1)
    step(sched)  # 5 blocks
    i2, b = live("i2", 16, first_token=100), bulk("b", 4, first_token=200)
    sched.add(i2)
    sched.add(b)
    # i1's decode takes a 6th block: i2 needs 4 of the 2 left; b needs 1 but may not overtake i2.
    assert sizes(step(sched)) == [("i1", 1)]
    assert i1.finished and ids(sched.waiting) == ["i2", "b"]
    assert sizes(step(sched)) == [("i2", 16), ("b", 4)]


def test_batch_takes_its_share_beside_live_work_and_the_idle_share_alone():
    sched = make_scheduler(budget=32, batch_tokens=8)
    i = live("i", 4, max_tokens=10)
    b1, b2 = bulk("b1", 20, first_token=100), bulk("b2", 20, first_token=200)
    for s in (i, b1, b2):
        sched.add(s)
    assert sizes(step(sched)) == [("i", 4), ("b1", 8)]
    assert sizes(step(sched)) == [("i", 1), ("b1", 8)]
    assert sizes(step(sched)) == [("i", 1), ("b1", 4), ("b2", 4)]
    assert sizes(step(sched)) == [("i", 1), ("b1", 1), ("b2", 7)]
    sched.abort(["i"])
    # No live work: batch fills the step (b2 has 9 prompt tokens left).
    assert sizes(step(sched)) == [("b1", 1), ("b2", 9)]
    alone = make_scheduler(budget=32, batch_tokens=8)
    alone.add(bulk("big", 40))
    assert sizes(step(alone)) == [("big", 32)]
    # ...but no more than idle_tokens: a live request arriving meanwhile waits for at most that step.
    capped = make_scheduler(budget=32, batch_tokens=8, idle_tokens=12)
    capped.add(bulk("big", 40))
    assert sizes(step(capped)) == [("big", 12)]


def test_zero_share_pauses_batch_while_live_work_exists_and_resumes_after():
    sched = make_scheduler(budget=32, batch_tokens=16)
    b = bulk("b", 8, max_tokens=5)
    sched.add(b)
    assert sizes(step(sched)) == [("b", 8)]
    sched.batch_budget = BatchBudget(max_slowdown=0)  # e.g. the end of an off-peak window
    i = live("i", 4, max_tokens=2, first_token=50)
    sched.add(i)
    assert sizes(step(sched)) == [("i", 4)]
    assert sizes(step(sched)) == [("i", 1)]
    assert i.finished and b.status == RequestStatus.RUNNING and b.num_output_tokens == 1
    assert sizes(step(sched)) == [("b", 1)]
    while sched.has_work:
        step(sched)
    assert b.num_output_tokens == 5


def test_running_interactive_preempts_the_newest_batch_sequence():
    sched = make_scheduler(num_blocks=6, block_size=4, budget=64, batch_tokens=64)
    i, b1, b2 = live("i", 7, max_tokens=8), bulk("b1", 7, first_token=50), bulk("b2", 7, first_token=90)
    for s in (i, b1, b2):
        sched.add(s)
    step(sched)  # 2 blocks each: pool full
    step(sched)  # position 7 still fits in each second block
    batch = step(sched)  # i needs a third block
    assert ids(batch.preempted) == ["b2"]
    assert sizes(batch) == [("i", 1), ("b1", 1)]  # b2's two blocks: one for i, one for b1
    assert ids(sched.running) == ["i", "b1"] and ids(sched.waiting) == ["b2"]
    while sched.has_work:
        step(sched)
    assert [s.num_output_tokens for s in (i, b1, b2)] == [8, 4, 4]
    assert i.num_preemptions == 0 and sched.num_batch_preemptions == sched.num_preemptions


def test_batch_sequence_short_of_blocks_preempts_itself_never_an_older_interactive_one():
    sched = make_scheduler(num_blocks=4, block_size=4, budget=64, batch_tokens=64)
    b = bulk("b", 7, max_tokens=6)
    sched.add(b)
    step(sched)
    i = live("i", 5, max_tokens=3, first_token=50)  # never needs more than its 2 blocks
    sched.add(i)
    step(sched)  # pool full
    batch = step(sched)  # b needs a third block
    assert ids(batch.preempted) == ["b"] and i.status == RequestStatus.RUNNING
    while sched.has_work:
        step(sched)
    assert i.num_output_tokens == 3 and b.num_output_tokens == 6
    assert sched.num_batch_preemptions == sched.num_preemptions >= 1


def test_waiting_interactive_that_does_not_fit_preempts_batch_and_is_admitted():
    sched = make_scheduler(num_blocks=6, block_size=4, budget=64)
    b1, b2 = bulk("b1", 8, max_tokens=8), bulk("b2", 8, max_tokens=8, first_token=50)
    sched.add(b1)
    sched.add(b2)
    step(sched)
    step(sched)  # both decode position 8 into a third block: pool full
    assert sched.pool.num_free_blocks == 0
    i = live("i", 8, first_token=100)
    sched.add(i)
    batch = step(sched)
    assert ids(batch.preempted) == ["b2"]
    assert sizes(batch) == [("i", 8), ("b1", 1)]
    assert sched.num_batch_preemptions == 1


def test_full_sequence_slots_of_batch_yield_one_to_a_waiting_interactive_request():
    sched = make_scheduler(max_seqs=2, budget=64)
    sched.add(bulk("b1", 4))
    sched.add(bulk("b2", 4, first_token=50))
    step(sched)
    sched.add(live("i", 4, first_token=100))
    batch = step(sched)
    assert ids(batch.preempted) == ["b2"]
    assert sizes(batch) == [("i", 4), ("b1", 1)]


def test_batch_work_is_not_thrown_away_when_it_would_not_make_room_anyway():
    sched = make_scheduler(num_blocks=8, block_size=4, budget=64)
    i1 = live("i1", 24, max_tokens=8)
    sched.add(i1)
    step(sched)  # 6 blocks (24 tokens; the 25th takes a 7th block next step)
    b = bulk("b", 3, max_tokens=2, first_token=100)
    sched.add(b)
    step(sched)  # i1: 7 blocks, b: 1 block, pool full
    i2 = live("i2", 8, first_token=200)  # needs 2 blocks; preempting b would free only 1
    sched.add(i2)
    batch = step(sched)
    assert batch.preempted == [] and ids(sched.waiting) == ["i2"]
    assert sizes(batch) == [("i1", 1), ("b", 1)] and b.finished


class OneSlot:
    """Adapter slots as the scheduler sees them (LoRASlots), with room for one adapter."""

    def __init__(self) -> None:
        self.pins: dict[LoRARequest, int] = {}

    def can_pin(self, lora: LoRARequest) -> bool:
        return not self.pins or lora in self.pins

    def pin(self, lora: LoRARequest) -> None:
        self.pins[lora] = self.pins.get(lora, 0) + 1

    def unpin(self, lora: LoRARequest) -> None:
        self.pins[lora] -= 1
        if not self.pins[lora]:
            del self.pins[lora]


def test_batch_sequences_holding_the_only_adapter_slot_give_it_to_interactive_work():
    slots = OneSlot()
    sched = make_scheduler(batch_tokens=0, loras=slots)
    a, other = LoRARequest("a", "/a"), LoRARequest("b", "/b")
    b = bulk("b", 4, max_tokens=4, lora=a)
    sched.add(b)
    step(sched)
    i = live("i", 4, max_tokens=2, lora=other, first_token=50)
    sched.add(i)
    batch = step(sched)
    assert ids(batch.preempted) == ["b"] and sizes(batch) == [("i", 4)]
    assert slots.pins == {other: 1}
    while sched.has_work:
        step(sched)
    assert b.num_output_tokens == 4 and i.num_output_tokens == 2 and not slots.pins


def test_randomized_mixed_classes_finish_whole_and_counters_add_up():
    rng = random.Random(1)
    sched = make_scheduler(num_blocks=12, block_size=4, budget=12, max_seqs=4, batch_tokens=3)
    seqs, total_tokens = [], 0

    def run_step():
        nonlocal total_tokens
        budget = sched.batch_budget
        had_live = bool(sched.running.interactive or sched.waiting.interactive)
        batch = step(sched, token=rng.randint(1, 5))
        total_tokens += batch.num_tokens
        batch_tokens = sum(item.num_new_tokens for item in batch.items if item.seq.params.priority == "batch")
        if had_live:
            assert batch_tokens <= budget.fill_tokens
        else:
            assert batch_tokens <= budget.idle_tokens
        if any(s.params.priority == "interactive" for s in batch.preempted):
            assert not sched.running.batch  # batch sequences always go first
        sched.pool.check_invariants()

    for n in range(40):
        make = bulk if rng.random() < 0.5 else live
        s = make(str(n), rng.randint(1, 20), max_tokens=rng.randint(1, 12), first_token=rng.randint(1, 3))
        sched.add(s)
        seqs.append(s)
        if rng.random() < 0.1:
            sched.batch_budget = BatchBudget(
                fill_tokens=rng.choice([0, 3, 12]), idle_tokens=rng.choice([1, 5, 12])
            )
        for _ in range(rng.randint(0, 3)):
            run_step()
    while sched.has_work:
        run_step()
    assert all(s.status == RequestStatus.FINISHED_LENGTH for s in seqs)
    assert all(s.num_output_tokens == s.params.max_tokens for s in seqs)
    assert sched.pool.num_free_blocks == 12
    assert sched.num_batch_tokens + sched.num_interactive_tokens == total_tokens
    assert 0 < sched.num_batch_preemptions <= sched.num_preemptions
    assert sched.num_batch_preemptions == sum(s.num_preemptions for s in seqs if s.params.priority == "batch")


def test_priority_changes_the_order_never_the_tokens(tiny_llama_dir):
    # 12 blocks of 8 tokens for four requests of up to 4 blocks each: preemption is certain. A slowdown bound
    # no step reaches (11x) lets batch work join live steps whatever the measured step costs of the moment:
    # the schedule, and with it the preemption, does not depend on the machine's timing.
    llm = LLM(
        str(tiny_llama_dir),
        dtype="float32",
        block_size=8,
        num_blocks=12,
        batch_budget=BatchBudget(max_slowdown=10.0, fill_tokens=4, idle_tokens=8),
    )
    prompts = ["Hello, my name is", "The capital of France is", "1 2 3 4 5", "Once upon a time there"]
    kinds = ["batch", "interactive", "batch", "interactive"]
    params = [
        SamplingParams(temperature=0.0, max_tokens=22, ignore_eos=True, priority=kind) for kind in kinds
    ]
    alone = [llm.generate(p, sp)[0].outputs[0].token_ids for p, sp in zip(prompts, params, strict=True)]
    scheduler = llm.engine.scheduler
    preemptions = scheduler.num_batch_preemptions
    mixed = llm.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in mixed] == alone
    assert scheduler.num_batch_preemptions > preemptions
    stats = llm.engine.stats()
    assert stats.num_batch_preemptions == scheduler.num_batch_preemptions
    assert stats.num_batch_tokens > 0 and stats.num_interactive_tokens > 0
    assert stats.num_batch_running_seqs == stats.num_batch_waiting_seqs == 0
