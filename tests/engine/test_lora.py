"""Multi-LoRA serving on a tiny random-weight Llama: one batch mixing the base model and several PEFT
adapters gives the tokens transformers + peft give for each adapter alone; adapters take turns in a bounded
slot cache; the prefix cache never shares KV across adapters; bad adapters are refused at submission."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import pytest
import torch
from peft import IA3Config, LoraConfig, PeftModel
from transformers import AutoModelForCausalLM

from tests.models.test_vs_transformers import assert_matches_reference
from tests.tiny_models import ARCHITECTURES, VOCAB_SIZE, load_reference, make_adapter
from tokenmill import LLM, AsyncLLM, SamplingParams
from tokenmill.config import ConfigError
from tokenmill.engine.lora import LoRARequest
from tokenmill.engine.sampling_params import InvalidRequestError
from tokenmill.models.lora_layers import LoRAStack

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {
    "qv": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "all": dict(r=8, lora_alpha=16, target_modules=ALL_TARGETS),
    "rslora": dict(r=6, lora_alpha=12, use_rslora=True, target_modules=["k_proj", "o_proj", "gate_proj"]),
    "patterns": dict(
        r=4,
        lora_alpha=4,
        target_modules=["q_proj", "up_proj", "down_proj"],
        rank_pattern={"down_proj": 2},
        alpha_pattern={"layers.1.self_attn.q_proj": 16},
    ),
}
MAX_TOKENS = 10
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=2)
PROMPT_LENGTHS = (5, 19, 33)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_llama_dir) -> dict[str, LoRARequest]:
    root = tmp_path_factory.mktemp("adapters")
    made = {}
    for seed, (name, settings) in enumerate(ADAPTERS.items()):
        config = LoraConfig(init_lora_weights=False, **settings)
        path = make_adapter(load_reference(tiny_llama_dir), root / name, seed, config)
        made[name] = LoRARequest(f"test:{name}", str(path))
    return made


@pytest.fixture(scope="module")
def references(tiny_llama_dir, adapters) -> dict[str | None, torch.nn.Module]:
    models: dict[str | None, torch.nn.Module] = {None: load_reference(tiny_llama_dir)}
    for name, lora in adapters.items():
        models[name] = PeftModel.from_pretrained(load_reference(tiny_llama_dir), lora.path).eval()
    return models


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = random.Random(5)
    return [[rng.randrange(VOCAB_SIZE) for _ in range(n)] for n in PROMPT_LENGTHS]


def mixed_workload(adapters, prompts) -> tuple[list[list[int]], list[SamplingParams], list[str | None]]:
    """Every prompt under the base model and under every adapter, interleaved."""
    names: list[str | None] = [None, *adapters]
    batch_prompts, params, owners = [], [], []
    for prompt in prompts:
        for name in names:
            batch_prompts.append(prompt)
            params.append(GREEDY if name is None else SamplingParams(**_greedy_kwargs(), lora=adapters[name]))
            owners.append(name)
    return batch_prompts, params, owners


def _greedy_kwargs() -> dict:
    return dict(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=2)


def record_steps(llm: LLM) -> list[set]:
    """The adapters (None: the base model) of the rows of every forward pass."""
    steps: list[set] = []
    execute = llm.engine.runner.execute

    def recording(batch):
        steps.append({item.seq.params.lora for item in batch.items})
        return execute(batch)

    llm.engine.runner.execute = recording
    return steps


def new_llm(tiny_llama_dir, **kwargs) -> LLM:
    return LLM(str(tiny_llama_dir), dtype="float32", block_size=8, num_blocks=512, **kwargs)


@pytest.fixture(scope="module")
def mixed_run(tiny_llama_dir, adapters, prompts):
    llm = new_llm(tiny_llama_dir)
    steps = record_steps(llm)
    batch_prompts, params, owners = mixed_workload(adapters, prompts)
    outputs = llm.generate(batch_prompts, params)
    return llm, steps, owners, outputs


def test_one_mixed_batch_equals_transformers_with_each_adapter(mixed_run, adapters, references, prompts):
    llm, steps, owners, outputs = mixed_run
    everyone = {None, *adapters.values()}
    assert any(step == everyone for step in steps), "the base model and every adapter shared a step"
    assert llm.engine.loras.num_loads == len(adapters)
    tokens: dict[tuple[str | None, int], list[int]] = {}
    for i, (owner, output) in enumerate(zip(owners, outputs, strict=True)):
        prompt = prompts[i // len(everyone)]
        assert output.prompt_token_ids == prompt
        assert_matches_reference(references[owner], prompt, output.outputs[0], MAX_TOKENS)
        tokens[owner, i // len(everyone)] = output.outputs[0].token_ids
    for name in adapters:
        # Each adapter changes the output, so a runner that ignored it could not pass.
        assert any(tokens[name, p] != tokens[None, p] for p in range(len(prompts))), name
    assert not llm.engine.loras.pins and llm.engine.pool.num_free_blocks == llm.engine.pool.num_blocks


def test_adapters_take_turns_in_two_slots_with_the_same_results(tiny_llama_dir, mixed_run, adapters, prompts):
    _, _, _, expected = mixed_run
    llm = new_llm(tiny_llama_dir, max_loras=2)
    steps = record_steps(llm)
    batch_prompts, params, _ = mixed_workload(adapters, prompts)
    outputs = llm.generate(batch_prompts, params)
    assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in expected]
    assert max(len(step - {None}) for step in steps) == 2
    assert llm.engine.loras.num_loads >= len(adapters)
    # An adapter evicted and loaded again gives the same tokens.
    first, *others = adapters.values()
    alone = llm.generate(prompts, SamplingParams(**_greedy_kwargs(), lora=first))
    for lora in others:
        llm.generate(prompts[0], SamplingParams(**_greedy_kwargs(), lora=lora))
    assert first not in llm.engine.loras.loaded
    loads = llm.engine.loras.num_loads
    again = llm.generate(prompts, SamplingParams(**_greedy_kwargs(), lora=first))
    assert llm.engine.loras.num_loads == loads + 1
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in alone]


def test_a_request_waiting_for_a_slot_does_not_block_others(tiny_llama_dir, adapters, prompts):
    llm = new_llm(tiny_llama_dir, max_loras=1)
    engine = llm.engine
    long = dict(temperature=0.0, max_tokens=30, ignore_eos=True)
    engine.add_request("a", prompts[0], SamplingParams(**long, lora=adapters["qv"]))
    engine.add_request("b", prompts[1], SamplingParams(**long, lora=adapters["all"]))
    engine.add_request("c", prompts[2], SamplingParams(**long))
    engine.add_request("d", prompts[1], SamplingParams(**long, lora=adapters["qv"]))
    engine.step()
    assert {seq.seq_id for seq in engine.scheduler.running} == {"a", "c", "d"}
    assert [seq.seq_id for seq in engine.scheduler.waiting] == ["b"]
    finished = set()
    while engine.has_unfinished:
        finished.update(o.request_id for o in engine.step() if o.finished)
    assert finished == {"a", "b", "c", "d"}
    assert list(engine.loras.loaded) == [adapters["all"]] and not engine.loras.pins


def test_prefix_cache_never_shares_kv_across_adapters(tiny_llama_dir, adapters, prompts, references):
    llm = new_llm(tiny_llama_dir)
    prompt = prompts[2]  # 33 tokens: four full blocks of 8 could be shared

    def run(lora):
        return llm.generate(prompt, SamplingParams(**_greedy_kwargs(), lora=lora))[0]

    base = run(None)
    first_qv = run(adapters["qv"])
    first_all = run(adapters["all"])
    assert (base.num_cached_tokens, first_qv.num_cached_tokens, first_all.num_cached_tokens) == (0, 0, 0)
    second_qv = run(adapters["qv"])
    assert second_qv.num_cached_tokens == 32
    assert run(None).num_cached_tokens == 32
    assert second_qv.outputs[0].token_ids == first_qv.outputs[0].token_ids
    assert_matches_reference(references["qv"], prompt, second_qv.outputs[0], MAX_TOKENS)
    assert_matches_reference(references["all"], prompt, first_all.outputs[0], MAX_TOKENS)


def write_bad_adapters(root: Path, tiny_llama_dir: Path) -> dict[str, Path]:
    def lora(name: str, **settings) -> Path:
        return make_adapter(load_reference(tiny_llama_dir), root / name, 0, LoraConfig(**settings))

    bad = {
        "lm_head": lora("lm_head", r=4, target_modules=["q_proj", "lm_head"]),
        "embed": lora("embed", r=4, target_modules=["embed_tokens"]),
        "dora": lora("dora", r=4, target_modules=["q_proj"], use_dora=True),
        "modules_to_save": lora("mts", r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]),
        "ia3": make_adapter(
            load_reference(tiny_llama_dir),
            root / "ia3",
            0,
            IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
        ),
    }
    # An adapter trained for another base model (a wider MLP).
    other = type(ARCHITECTURES["llama"])(**{**ARCHITECTURES["llama"].to_dict(), "intermediate_size": 96})
    other_base = AutoModelForCausalLM.from_config(other, dtype=torch.float32)
    bad["other_base"] = make_adapter(
        other_base, root / "other", 0, LoraConfig(r=4, target_modules=ALL_TARGETS)
    )
    # Hand-edited: a config that claims LoRA over a file holding a tensor of an unknown module.
    bad["not_lora"] = root / "not_lora"
    bad["not_lora"].mkdir()
    (bad["not_lora"] / "adapter_config.json").write_text(json.dumps({"peft_type": "PROMPT_TUNING"}))
    bad["missing"] = root / "does-not-exist"
    return bad


def test_bad_adapters_are_refused_at_submission_and_the_engine_keeps_serving(
    tmp_path, tiny_llama_dir, adapters, prompts
):
    llm = new_llm(tiny_llama_dir, max_lora_rank=4)
    engine = llm.engine
    bad = write_bad_adapters(tmp_path, tiny_llama_dir)
    bad_requests = {name: LoRARequest(f"bad:{name}", str(path)) for name, path in bad.items()}
    bad_requests["rank"] = adapters["all"]  # rank 8 > max_lora_rank 4
    reasons = {}
    for name, lora in bad_requests.items():
        with pytest.raises(InvalidRequestError) as err:
            llm.generate([prompts[0], prompts[1]], [GREEDY, SamplingParams(**_greedy_kwargs(), lora=lora)])
        assert err.value.param == "model", name
        assert lora.name in err.value.message
        reasons[name] = err.value.message
        with pytest.raises(InvalidRequestError):
            engine.add_request(f"r-{name}", prompts[0], SamplingParams(lora=lora))
    assert "lm_head" in reasons["lm_head"] and "embed_tokens" in reasons["embed"]
    assert "DoRA" in reasons["dora"] and "modules_to_save" in reasons["modules_to_save"]
    assert "IA3" in reasons["ia3"] and "PROMPT_TUNING" in reasons["not_lora"]
    assert "another model" in reasons["other_base"] and "max_lora_rank 4" in reasons["rank"]
    assert "no adapter directory" in reasons["missing"]
    assert not engine.has_unfinished and engine.pool.num_free_blocks == engine.pool.num_blocks
    assert not engine.loras.loaded
    output = llm.generate(prompts[0], SamplingParams(**_greedy_kwargs(), lora=adapters["qv"]))[0]
    assert len(output.outputs[0].token_ids) == MAX_TOKENS


def test_lora_settings_are_validated():
    with pytest.raises(ConfigError, match="max_loras"):
        LLM("unused", max_loras=0)
    with pytest.raises(ConfigError, match="max_lora_rank"):
        LLM("unused", max_lora_rank=0)
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(lora="my-adapter")  # type: ignore[arg-type]
    assert err.value.param == "model"


async def test_async_engine_serves_two_adapters_concurrently(tiny_llama_dir, adapters, prompts, references):
    engine = AsyncLLM(str(tiny_llama_dir), dtype="float32", block_size=8, num_blocks=128)
    await engine.start()
    try:

        async def final(prompt, name, request_id):
            params = SamplingParams(**_greedy_kwargs(), lora=adapters[name])
            outputs = [out async for out in engine.generate(prompt, params, request_id)]
            return outputs[-1]

        jobs = [(prompts[i % 3], name, f"r{i}") for i, name in enumerate(["all", "rslora"] * 3)]
        results = await asyncio.gather(*(final(*job) for job in jobs))
        for (prompt, name, _), result in zip(jobs, results, strict=True):
            assert result.finished
            assert_matches_reference(references[name], prompt, result.outputs[0], MAX_TOKENS)
        missing = SamplingParams(lora=LoRARequest("gone", str(Path("/nonexistent/adapter"))))
        with pytest.raises(InvalidRequestError) as err:
            await anext(engine.generate(prompts[0], missing, "bad"))
        assert err.value.param == "model"
        stats = engine.stats()
        assert stats.num_running_seqs == 0 and stats.num_free_blocks == 128
    finally:
        await engine.shutdown()


@pytest.mark.parametrize("sizes", [(1, 1, 1), (40, 1, 3), (7,), (1, 64, 2, 2, 9)])
def test_grouped_tiles_give_each_row_its_own_adapter_delta(tiny_llama_dir, sizes):
    """Rows of unequal groups (tiles padded or not), in any order, interleaved with base-model rows."""
    model = new_llm(tiny_llama_dir).engine.runner.model
    stack = LoRAStack(model, num_slots=len(sizes), dtype=torch.float32, device=torch.device("cpu"))
    stack.ensure_rank(4)
    generator = torch.Generator().manual_seed(0)
    for tensors in stack.weights:
        for a, b in tensors.values():
            a.copy_(torch.randn(a.shape, generator=generator))
            b.copy_(torch.randn(b.shape, generator=generator))
    segments, first = [], 0
    for slot, size in enumerate(sizes):
        first += 2  # two rows of the base model before each adapted sequence
        segments.append((first, size, slot))
        first += size
    in_features, out_features = 64, 64 + 2 * 32  # the tiny model's qkv_proj
    x = torch.randn(first + 1, in_features, generator=generator)
    out = torch.zeros(first + 1, out_features)
    stack.step(segments[::-1]).layer(1).add("qkv_proj", x, out)
    a, b = stack.weights[1]["qkv_proj"]
    expected = torch.zeros_like(out)
    for start, size, slot in segments:
        rows = slice(start, start + size)
        expected[rows] = x[rows] @ a[slot] @ b[slot]
    torch.testing.assert_close(out, expected)
