"""The engine end to end: greedy generation token-identical to transformers under batching, prefix-cache hits,
chunked prefill and preemption; KV sharing across chains; seeds; per-request failures."""
from __future__ import annotations

import pytest
import torch

from prmkern import LLM, SamplingParams
from tests.conftest import hf_greedy, hf_model, random_prompts

GREEDY = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)


@pytest.fixture(scope="module")
def references(checkpoint_dirs):
    """Greedy continuations from transformers, per checkpoint, for a fixed set of prompts of mixed lengths."""
    prompts = random_prompts([5, 16, 33, 70, 129], 509, seed=7)
    return prompts, {name: [hf_greedy(hf_model(path), p, 64) for p in prompts]
                     for name, path in checkpoint_dirs.items() if name != "qwen2-tied"}


@pytest.mark.parametrize("name", ["qwen2", "llama3", "qwen3"])
def test_greedy_matches_transformers_single_and_batched(checkpoint_dirs, references, name):
    prompts, refs = references
    llm = LLM(checkpoint_dirs[name], device="cpu")
    single = llm.generate([prompts[2]], GREEDY)[0].outputs[0].token_ids
    assert single == refs[name][2]
    batched = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]
    assert batched == refs[name]


def test_second_call_hits_prefix_cache(qwen2_dir, references):
    prompts, refs = references
    llm = LLM(qwen2_dir, device="cpu")
    first = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]
    llm.reset_stats()
    second = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]
    assert first == second == refs["qwen2"]
    assert llm.stats.cached_tokens >= sum((len(p) - 1) // 16 * 16 for p in prompts)
    assert llm.stats.prefill_tokens <= sum(len(p) for p in prompts) - llm.stats.cached_tokens


def test_chunked_prefill_and_seq_cap(qwen2_dir, references):
    prompts, refs = references
    llm = LLM(qwen2_dir, device="cpu", max_num_batched_tokens=24, max_num_seqs=2)
    outs = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]
    assert outs == refs["qwen2"]
    assert llm.stats.prefill_steps >= sum(len(p) for p in prompts) // 24


@pytest.mark.parametrize("name", ["qwen2", "llama3"])
def test_preemption_keeps_outputs(checkpoint_dirs, references, name):
    prompts, refs = references
    # 30 blocks of 8 tokens cannot hold all five sequences at full length (~ 61 blocks): preemption must happen.
    llm = LLM(checkpoint_dirs[name], device="cpu", block_size=8, num_kvcache_blocks=30)
    outs = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]
    assert llm.stats.preemptions > 0
    assert outs == refs[name]


def test_chains_share_prompt_blocks_and_prefill_once(qwen2_dir):
    llm = LLM(qwen2_dir, device="cpu", max_num_batched_tokens=1024)
    prompt = random_prompts([512], 509, seed=11)[0]
    params = SamplingParams(n=16, temperature=1.0, max_tokens=8, ignore_eos=True, seed=123)
    engine = llm.engine
    request = engine.add_request(prompt, params)
    tables = None
    while engine.has_unfinished():
        engine.step()
        running = [s for s in request.seqs if s.block_table]
        if len(running) == 16 and tables is None and all(len(s.block_table) > 32 for s in running):
            tables = [list(s.block_table) for s in running]
    # Every chain's first 32 blocks (the 512-token prompt) are the same physical blocks.
    assert tables is not None and all(t[:32] == tables[0][:32] for t in tables)
    assert len({t[32] for t in tables}) == 16  # each chain writes into its own block
    assert llm.stats.prefill_tokens == 512
    out = engine.output(request)
    assert len(out.outputs) == 16 and all(len(c.token_ids) == 8 for c in out.outputs)
    # Same seed, same chains; and different chains differ from each other.
    again = llm.generate([prompt], params)[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1


def test_duplicate_prompts_in_one_step_prefill_once(qwen2_dir):
    """Separate requests with one prompt, admitted in the same step, compute the shared blocks once."""
    llm = LLM(qwen2_dir, device="cpu", max_num_batched_tokens=4096)
    prompt = random_prompts([256], 509, seed=12)[0]
    outs = llm.generate([prompt] * 4, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert len({tuple(o.outputs[0].token_ids) for o in outs}) == 1
    # 256 tokens once; each other request recomputes only its last token (whose logits it needs).
    assert llm.stats.prefill_tokens == 256 + 3


def test_seed_reproduces_chains_whatever_the_batch(qwen2_dir):
    prompts = random_prompts([20, 30, 40], 509, seed=13)
    params = SamplingParams(n=3, temperature=0.9, top_p=0.95, max_tokens=16, seed=7)
    alone = LLM(qwen2_dir, device="cpu").generate([prompts[1]], params)[0]
    other = SamplingParams(n=2, temperature=1.0, max_tokens=20)
    mixed = LLM(qwen2_dir, device="cpu", seed=99).generate(prompts, [other, params, other])[1]
    assert [c.token_ids for c in alone.outputs] == [c.token_ids for c in mixed.outputs]


def test_resubmitting_continuation_recomputes_only_new_tokens(qwen2_dir):
    llm = LLM(qwen2_dir, device="cpu")
    prompt = random_prompts([100], 509, seed=14)[0]
    first = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=60, ignore_eos=True))[0].outputs[0]
    appended = [5, 6, 7, 8, 9]
    llm.reset_stats()
    llm.generate([prompt + first.token_ids + appended], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    total = 100 + 60 + 5
    # Everything up to the last full block whose KV was computed is reused: at most one block + the new text.
    assert llm.stats.prefill_tokens <= 16 + len(appended)
    assert llm.stats.cached_tokens == total - llm.stats.prefill_tokens


def test_bad_requests_fail_alone(qwen2_dir):
    llm = LLM(qwen2_dir, device="cpu", max_model_len=256)
    good = random_prompts([10], 509, seed=15)[0]
    outs = llm.generate([good, list(range(1, 300)), [], [1, 2, 10_000], good],
                        SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    assert outs[0].error is None and len(outs[0].outputs[0].token_ids) == 5
    assert outs[4].outputs[0].token_ids == outs[0].outputs[0].token_ids
    assert "299 tokens" in outs[1].error and "max_model_len" in outs[1].error
    assert "empty prompt" in outs[2].error
    assert "[0, 509)" in outs[3].error
    assert llm.stats.failed_requests == 3


def test_generation_stops_at_context_end(qwen2_dir):
    llm = LLM(qwen2_dir, device="cpu", max_model_len=40)
    out = llm.generate([list(range(1, 31))], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 10 and out.outputs[0].finish_reason == "length"


def test_text_prompts_and_mismatched_params(qwen2_dir):
    llm = LLM(qwen2_dir, device="cpu")
    out = llm.generate("the step is correct", SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert out[0].prompt_token_ids == llm.tokenizer.encode("the step is correct", add_special_tokens=False)
    assert len(out[0].outputs[0].token_ids) == 4
    with pytest.raises(ValueError, match="2 SamplingParams for 1 prompts"):
        llm.generate(["a"], [SamplingParams(), SamplingParams()])


def test_sequence_that_outgrows_the_pool_ends_with_length(qwen2_dir):
    llm = LLM(qwen2_dir, device="cpu", block_size=4, num_kvcache_blocks=5)  # 20 tokens of KV in all
    outs = llm.generate([[1, 2, 3], [4, 5, 6]], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))
    for o in outs:
        # 20 slots: at most 17 generated tokens have KV, plus the last sampled one.
        assert o.outputs[0].finish_reason == "length" and 10 <= len(o.outputs[0].token_ids) <= 18


def test_shared_uncomputed_tail_block_does_not_stall(qwen2_dir):
    """A chunk ending one token short of a full last prompt block, while a second request shares that block,
    once made the engine wait forever for a block whose owner had moved to a private copy."""
    llm = LLM(qwen2_dir, device="cpu", block_size=4, max_num_batched_tokens=7)
    prompt = random_prompts([8], 509, seed=31)[0]
    outs = llm.generate([prompt, prompt], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    assert outs[0].outputs[0].token_ids == outs[1].outputs[0].token_ids
    assert outs[0].outputs[0].token_ids == hf_greedy(hf_model(qwen2_dir), prompt, 6)


def test_out_of_vocabulary_ids_in_params_fail_alone(qwen2_dir):
    llm = LLM(qwen2_dir, device="cpu")
    outs = llm.generate([[1, 2, 3], [4, 5, 6]],
                        [SamplingParams(max_tokens=3, stop_token_ids=[509]),
                         SamplingParams(max_tokens=3, logprob_token_ids=[1, 600])])
    assert "stop_token_ids" in outs[0].error and "logprob_token_ids" in outs[1].error
    again = llm.generate([[4, 5, 6]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))[0]
    assert again.error is None and len(again.outputs[0].token_ids) == 3


def test_max_num_seqs_counts_chains_to_come(qwen2_dir):
    llm = LLM(qwen2_dir, device="cpu", max_num_seqs=2)
    peak = 0
    engine = llm.engine
    engine.add_request([1, 2, 3], SamplingParams(n=2, max_tokens=4, ignore_eos=True))
    engine.add_request([4, 5, 6], SamplingParams(max_tokens=4, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
        peak = max(peak, len(engine.scheduler.running))
    assert peak == 2


def test_tiny_temperature_is_greedy(qwen2_dir):
    llm = LLM(qwen2_dir, device="cpu")
    prompt = random_prompts([12], 509, seed=32)[0]
    greedy = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    tiny = llm.generate([prompt], SamplingParams(temperature=1e-46, max_tokens=8, ignore_eos=True))[0]
    assert greedy.outputs[0].token_ids == tiny.outputs[0].token_ids


def test_abort_request_frees_blocks_and_ends_chains(qwen2_dir):
    llm = LLM(qwen2_dir, device="cpu", block_size=4)
    engine = llm.engine
    prompts = random_prompts([9, 13], 509, seed=33)
    keep = engine.add_request(prompts[0], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    drop = engine.add_request(prompts[1], SamplingParams(n=3, temperature=1.0, max_tokens=50, ignore_eos=True),
                              request_id="client-7")
    for _ in range(3):
        engine.step()
    assert all(s.block_table for s in drop.seqs)
    assert engine.abort_request("client-7") and not engine.abort_request("client-7")
    assert all(not s.block_table for s in drop.seqs) and drop.finished
    while engine.has_unfinished():
        engine.step()
    out = engine.output(drop)
    assert out.request_id == "client-7" and out.finished
    assert [c.finish_reason for c in out.outputs] == ["abort"] * 3
    assert engine.output(keep).outputs[0].token_ids == hf_greedy(hf_model(qwen2_dir), prompts[0], 6)
    assert engine.block_manager.num_free_blocks == engine.num_blocks and not engine.requests
