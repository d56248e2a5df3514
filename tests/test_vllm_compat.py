"""A vLLM offline script, unchanged but for the import, runs on prmkern and gives vLLM's values: per-position
{token_id: Logprob} dicts and ranks and prompt_logprobs against a float64 full-sequence forward pass of transformers
on the same checkpoint; penalties and min_p against plain reference implementations written here; TextPrompt /
TokensPrompt dicts, chat(), get_tokenizer(), str request ids, vLLM engine arguments."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from prmkern import LLM, Logprob, SamplingParams
from prmkern.engine.sampler import _apply_min_p, apply_penalties
from tests.conftest import hf_model, random_prompts

TOL = 1e-4  # float32 engine vs float64 reference, log-probability units


@pytest.fixture(scope="module")
def model64(qwen2_dir):
    return hf_model(qwen2_dir, torch.float64)


@pytest.fixture(scope="module")
def llm(qwen2_dir):
    return LLM(qwen2_dir, device="cpu")


def ref_logprobs(model64, ids: list[int]) -> torch.Tensor:
    """[len(ids), V] float64: row p is log P(next token | ids[:p + 1])."""
    with torch.no_grad():
        return torch.log_softmax(model64(torch.tensor([ids])).logits[0].double(), dim=-1)


def check_position(d: dict, ref: torch.Tensor, chosen: int, k: int, tok) -> None:
    """One vLLM logprob dict against the reference row: the chosen token plus the top k, values, ranks, text."""
    assert chosen in d and all(isinstance(v, Logprob) for v in d.values())
    ordered = ref.sort(descending=True)
    top = set(ordered.indices[:k].tolist())
    if k == 0 or float(ordered.values[k - 1] - ordered.values[k]) > TOL:  # no near-tie at the top-k boundary
        assert set(d) == top | {chosen}
    for t, lp in d.items():
        assert abs(lp.logprob - float(ref[t])) < TOL, (t, lp, float(ref[t]))
        # vLLM's rank: how many tokens have a logprob >= this one's (1-based); near-ties may fall either way.
        lo = int((ref > ref[t] + TOL).sum()) + 1
        hi = int((ref >= ref[t] - TOL).sum())
        assert lo <= lp.rank <= hi, (t, lp.rank, lo, hi)
        assert lp.decoded_token == tok.decode([t])


def test_vllm_style_offline_script(qwen2_dir, model64):
    # ---- a vLLM user's script (only the import differs) ----
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        llm = LLM(model=qwen2_dir, dtype="float32", gpu_memory_utilization=0.5, tensor_parallel_size=1,
                  trust_remote_code=True, swap_space=4, disable_log_stats=True, seed=0, max_model_len=512)
    tokenizer = llm.get_tokenizer()
    ids = random_prompts([37], 509, seed=51)[0]
    prompts = [{"prompt_token_ids": ids}, {"prompt": "we compute the total sum of each step"}]
    params = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=10, logprobs=5, prompt_logprobs=3, seed=1,
                            ignore_eos=True)
    outputs = llm.generate(prompts, params)
    conversation = [{"role": "system", "content": "check the solution"},
                    {"role": "user", "content": "step 1: 2 + 2 = 4"}]
    chat_out = llm.chat(conversation, SamplingParams(temperature=0, max_tokens=6, logprobs=0, ignore_eos=True))
    # ---- checks ----
    assert [type(o.request_id) for o in outputs] == [str, str] and outputs[0].request_id != outputs[1].request_id
    assert outputs[1].prompt_token_ids == tokenizer.encode(prompts[1]["prompt"], add_special_tokens=False)
    for out in outputs:
        full = out.prompt_token_ids + out.outputs[0].token_ids
        ref = ref_logprobs(model64, full)
        n_prompt = len(out.prompt_token_ids)
        comp = out.outputs[0]
        assert out.finished and comp.finished() and comp.finish_reason == "length"
        assert len(comp.logprobs) == len(comp.token_ids) == 10
        for j, (d, t) in enumerate(zip(comp.logprobs, comp.token_ids)):
            check_position(d, ref[n_prompt - 1 + j], t, 5, tokenizer)
        expected_cum = sum(float(ref[n_prompt - 1 + j, t]) for j, t in enumerate(comp.token_ids))
        assert comp.cumulative_logprob == pytest.approx(expected_cum, abs=10 * TOL)
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == n_prompt
        for p in range(1, n_prompt):
            check_position(out.prompt_logprobs[p], ref[p - 1], out.prompt_token_ids[p], 3, tokenizer)
    rendered = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    chat = chat_out[0]
    assert chat.prompt_token_ids == tokenizer.encode(rendered, add_special_tokens=False)
    ref = ref_logprobs(model64, chat.prompt_token_ids + chat.outputs[0].token_ids)
    n = len(chat.prompt_token_ids)
    assert chat.outputs[0].token_ids == [int(ref[n - 1 + j].argmax()) for j in range(6)]
    for j, (d, t) in enumerate(zip(chat.outputs[0].logprobs, chat.outputs[0].token_ids)):
        assert list(d) == [t] and d[t].rank == 1  # logprobs=0: the sampled token only
        check_position(d, ref[n - 1 + j], t, 0, tokenizer)


def test_chat_batches_conversations_and_uses_a_given_template(llm):
    convs = [[{"role": "user", "content": "one"}], [{"role": "user", "content": "two"}]]
    outs = llm.chat(convs, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert len(outs) == 2 and outs[0].prompt_token_ids != outs[1].prompt_token_ids
    template = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    out = llm.chat(convs[0], SamplingParams(max_tokens=2), chat_template=template)[0]
    assert out.prompt_token_ids == llm.get_tokenizer().encode("[one]", add_special_tokens=False)


def test_prompt_dicts_are_never_iterated_and_unknown_keys_fail_alone(llm):
    ids = random_prompts([12], 509, seed=52)[0]
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    single = llm.generate({"prompt_token_ids": ids}, greedy)
    assert len(single) == 1 and single[0].prompt_token_ids == ids
    outs = llm.generate([{"prompt_token_ids": ids, "multi_modal_data": {}}, {"text": "x"}, ids], greedy)
    assert "multi_modal_data" in outs[0].error and "'prompt'" in outs[1].error
    assert outs[2].error is None and outs[2].outputs[0].token_ids == single[0].outputs[0].token_ids


def test_vllm_engine_arguments(qwen2_dir):
    with pytest.raises(NotImplementedError, match="pipeline_parallel_size=2.*supported: 1"):
        LLM(qwen2_dir, device="cpu", pipeline_parallel_size=2)
    with pytest.raises(TypeError, match="no_such_argument.*accepted"):
        LLM(qwen2_dir, device="cpu", no_such_argument=1)
    with pytest.warns(UserWarning, match="gpu_memory_utilization=0.7 is ignored on cpu"):
        LLM(qwen2_dir, device="cpu", gpu_memory_utilization=0.7)
    with pytest.warns(UserWarning, match="trust_remote_code"):
        LLM(qwen2_dir, device="cpu", trust_remote_code=True)
    with pytest.raises(ValueError, match="quantization='awq' is not supported"):
        LLM(qwen2_dir, device="cpu", quantization="awq")
    with pytest.raises(ValueError, match=r"gpu_memory_utilization=1.5 is invalid; accepted: a float in \(0, 1\]"):
        LLM(qwen2_dir, device="cpu", gpu_memory_utilization=1.5)
    with pytest.raises(ValueError, match=r"logits_processors=.*not supported"):
        LLM(qwen2_dir, device="cpu", logits_processors=[lambda ids, logits: logits])
    a = LLM(qwen2_dir, device="cpu", kv_cache_memory_bytes=1 << 20, swap_space=4, disable_log_stats=True,
            enable_prefix_caching=True, max_num_seqs=8, task="auto", served_model_name=None)
    b = LLM(qwen2_dir, device="cpu", kv_cache_memory=1 << 20, max_num_seqs=8)
    assert a.engine.num_blocks == b.engine.num_blocks < 8 * 1024 // 16  # the 1 MiB budget binds


def test_prompt_logprobs_across_chunks_and_chains(qwen2_dir, model64):
    llm = LLM(qwen2_dir, device="cpu", max_num_batched_tokens=24)
    ids = random_prompts([70], 509, seed=53)[0]
    out = llm.generate([ids], SamplingParams(n=2, max_tokens=3, prompt_logprobs=2, seed=0))[0]
    ref = ref_logprobs(model64, ids)
    tok = llm.get_tokenizer()
    assert out.prompt_logprobs[0] is None and len(out.outputs) == 2
    for p in range(1, 70):
        check_position(out.prompt_logprobs[p], ref[p - 1], ids[p], 2, tok)


def test_prompt_logprobs_score_a_chain_after_a_cached_prefix(qwen2_dir, model64):
    """Scoring a chain after a cached problem prefix recomputes only from the first scored position's block."""
    llm = LLM(qwen2_dir, device="cpu")
    problem, chain = random_prompts([64, 30], 509, seed=54)
    llm.generate([problem], SamplingParams(max_tokens=1))
    llm.reset_stats()
    out = llm.generate([problem + chain], SamplingParams(max_tokens=1, prompt_logprobs=0,
                                                         prompt_logprobs_start=64))[0]
    assert llm.stats.cached_tokens == 48 and llm.stats.prefill_tokens == 94 - 48  # blocks wholly before 63
    assert out.num_cached_tokens == 48
    ref = ref_logprobs(model64, problem + chain)
    assert out.prompt_logprobs[:64] == [None] * 64
    for p in range(64, 94):
        d = out.prompt_logprobs[p]
        assert list(d) == [chain[p - 64]]
        check_position(d, ref[p - 1], chain[p - 64], 0, llm.get_tokenizer())
    # Without a start every position is scored, the cache cannot skip any of them, and the values agree.
    llm.reset_stats()
    full = llm.generate([problem + chain], SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
    assert llm.stats.prefill_tokens == 94
    assert [d[t].logprob for d, t in zip(full.prompt_logprobs[64:], chain)] == \
        pytest.approx([d[t].logprob for d, t in zip(out.prompt_logprobs[64:], chain)], abs=1e-5)


def reference_penalized_greedy(model64, prompt, steps, rep, freq, pres):
    """Plain Python greedy decoding with vLLM's penalty definitions; stops early at a near-tie (float32 vs 64)."""
    out: list[int] = []
    for _ in range(steps):
        with torch.no_grad():
            logits = model64(torch.tensor([prompt + out])).logits[0, -1].double().tolist()
        for t in set(prompt) | set(out):
            logits[t] = logits[t] / rep if logits[t] > 0 else logits[t] * rep
        for t in set(out):
            logits[t] -= freq * out.count(t) + pres
        order = sorted(range(len(logits)), key=lambda t: -logits[t])
        if logits[order[0]] - logits[order[1]] < 1e-3:
            break
        out.append(order[0])
    return out


@pytest.mark.parametrize("rep, freq, pres", [(1.5, 0.5, 0.7), (0.8, -0.3, 0.2), (1.0, 0.0, 1.5), (2.0, 0.0, 0.0)])
def test_penalties_match_reference_greedy(llm, model64, rep, freq, pres):
    prompt = random_prompts([20], 509, seed=55)[0]
    plain = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                                repetition_penalty=rep, frequency_penalty=freq,
                                                presence_penalty=pres))[0].outputs[0].token_ids
    ref = reference_penalized_greedy(model64, prompt, 24, rep, freq, pres)
    assert len(ref) >= 12 and out[:len(ref)] == ref
    assert out != plain.outputs[0].token_ids  # the penalties changed something


def test_penalty_and_min_p_functions_against_plain_python():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 40, generator=g, dtype=torch.float64) * 3
    prompts, outs = [[1, 2, 3], [4], [5, 5, 6]], [[2, 2, 7, 9], [], [6, 6, 6, 1]]
    rep, freq, pres = [1.3, 0.7, 1.0], [0.4, -0.2, 1.1], [0.5, 0.3, -0.6]
    got = apply_penalties(logits.clone(), prompts, outs, rep, freq, pres)
    for r in range(3):
        row = logits[r].tolist()
        for t in range(40):
            x = row[t]
            if t in prompts[r] or t in outs[r]:
                x = x / rep[r] if x > 0 else x * rep[r]
            x -= freq[r] * outs[r].count(t) + (pres[r] if t in outs[r] else 0.0)
            assert float(got[r, t]) == pytest.approx(x, abs=1e-12)
    min_p = torch.tensor([0.0, 0.1, 0.5], dtype=torch.float64)
    kept = torch.isfinite(_apply_min_p(logits.clone(), min_p))
    for r in range(3):
        probs = [math.exp(x) for x in logits[r].tolist()]
        probs = [p / sum(probs) for p in probs]
        assert kept[r].tolist() == [p >= min_p[r].item() * max(probs) for p in probs]


def test_min_p_samples_only_likely_tokens(llm, model64):
    prompt = random_prompts([15], 509, seed=56)[0]
    probs = ref_logprobs(model64, prompt)[-1].exp()
    out = llm.generate([prompt], SamplingParams(n=300, temperature=1.0, min_p=0.2, max_tokens=1, seed=3))[0]
    drawn = {c.token_ids[0] for c in out.outputs}
    allowed = set((probs >= 0.2 * probs.max() - 1e-6).nonzero()[:, 0].tolist())
    assert drawn <= allowed and int(probs.argmax()) in drawn
    assert len(allowed) < 509 // 4  # the filter removed most of the vocabulary


def test_max_tokens_none_runs_to_the_context_end(qwen2_dir):
    llm = LLM(qwen2_dir, device="cpu", max_model_len=40)
    out = llm.generate([list(range(1, 31))], SamplingParams(temperature=0, max_tokens=None, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 10 and out.outputs[0].finish_reason == "length"


def test_allowed_token_ids_logit_bias_and_detokenize(llm, model64):
    prompt = random_prompts([14], 509, seed=57)[0]
    allowed = list(range(100, 140))
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True,
                                                allowed_token_ids=allowed, logprobs=0))[0].outputs[0]
    seq = list(prompt)
    for t in out.token_ids:  # greedy over the allowed ids of the model's distribution, step by step
        assert t == max(allowed, key=lambda a: float(ref_logprobs(model64, seq)[-1, a]))
        seq.append(t)
    # Log-probabilities stay those of the raw distribution (vLLM's raw_logprobs), not of the restricted one.
    ref = ref_logprobs(model64, prompt + out.token_ids)
    assert out.sampled_logprobs == pytest.approx([float(ref[13 + j, t]) for j, t in enumerate(out.token_ids)],
                                                 abs=TOL)
    biased = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True,
                                                   logit_bias={"77": 100.0}, detokenize=False))[0].outputs[0]
    assert biased.token_ids == [77] * 4 and biased.text == ""
    bad = llm.generate([prompt], SamplingParams(allowed_token_ids=[5, 600]))[0]
    assert "allowed_token_ids" in bad.error and "[0, 509)" in bad.error


def test_prompt_logprobs_on_the_triton_backend_match_torch(qwen2_dir):
    """Recomputed cached positions (not rewritten) and scored rows through the Triton prefill path."""
    problem, chain = random_prompts([32, 12], 509, seed=58)
    got = {}
    for backend in ("torch", "triton"):
        llm = LLM(qwen2_dir, device="cpu", attention_backend=backend, block_size=8)
        llm.generate([problem], SamplingParams(max_tokens=1))
        out = llm.generate([problem + chain], SamplingParams(max_tokens=1, prompt_logprobs=2,
                                                             prompt_logprobs_start=30))[0]
        assert llm.stats.cached_tokens == 24  # blocks wholly before position 29
        got[backend] = [{t: lp.logprob for t, lp in d.items()} for d in out.prompt_logprobs[30:]]
    assert [list(d) for d in got["triton"]] == [list(d) for d in got["torch"]]
    for a, b in zip(got["triton"], got["torch"]):
        assert list(a.values()) == pytest.approx(list(b.values()), abs=1e-4)


def test_sampling_params_clone_is_a_deep_copy_as_vllm():
    """vLLM's clone(): an equal SamplingParams sharing no list or dict with the original, so an engine may edit its
    copy (as vLLM's do at admission) and leave the caller's as it was."""
    sp = SamplingParams(n=2, temperature=0.7, stop=["\n\n", "Step"], stop_token_ids=[7, 3], logit_bias={5: 1.5},
                        allowed_token_ids=[3, 5, 7], bad_words=["no"], logprob_token_ids=[4], seed=11)
    before = repr(sp)
    c = sp.clone()
    assert c == sp and c is not sp and type(c) is SamplingParams and repr(c) == before
    for name in ("stop", "stop_token_ids", "logit_bias", "allowed_token_ids", "bad_words", "logprob_token_ids"):
        assert getattr(c, name) is not getattr(sp, name), name
    c.stop_token_ids.append(9)
    c.logit_bias[6] = -2.0
    c.allowed_token_ids.append(8)
    c.update_from_generation_config({"eos_token_id": [1, 2]}, eos_token_id=1)
    assert repr(sp) == before and sp.all_stop_token_ids == {7, 3} and sp.eos_token_id is None
    assert c.all_stop_token_ids == {7, 3, 9, 1, 2}


def test_all_stop_token_ids_as_vllm():
    """vLLM's rule: a new SamplingParams holds its stop_token_ids; update_from_generation_config (what the engine
    does at admission) adds the EOS id and generation_config's other EOS ids whatever ignore_eos says (min_tokens
    holds them all back), while stop_token_ids gains those other ids, and eos_token_id is set, only without
    ignore_eos."""
    assert SamplingParams().all_stop_token_ids == set()
    sp = SamplingParams(stop_token_ids=[11, 4])
    assert sp.all_stop_token_ids == {11, 4} and isinstance(sp.all_stop_token_ids, set)
    sp.stop_token_ids = [12]  # set after construction: counted (the engine re-checks fields at admission too)
    assert sp.all_stop_token_ids == {12}
    eos, others = 2, [2, 6, 8]
    sp.update_from_generation_config({"eos_token_id": others}, eos_token_id=eos)
    assert sp.all_stop_token_ids == {12, *others} and sp.eos_token_id == eos
    assert sorted(sp.stop_token_ids) == sorted({12, *others} - {eos})  # the primary EOS stops on its own
    ig = SamplingParams(stop_token_ids=[12], ignore_eos=True)
    ig.update_from_generation_config({"eos_token_id": others}, eos_token_id=eos)
    assert ig.all_stop_token_ids == {12, *others} and ig.stop_token_ids == [12] and ig.eos_token_id is None
    one = SamplingParams()
    one.update_from_generation_config({"eos_token_id": 5})  # an int, no tokenizer EOS
    assert one.all_stop_token_ids == {5} and one.stop_token_ids == [5] and one.eos_token_id is None
    one.update_from_generation_config({})
    assert one.all_stop_token_ids == {5}
    with pytest.raises(ValueError, match=r"eos_token_id=-1 is invalid; accepted"):
        SamplingParams().update_from_generation_config({}, eos_token_id=-1)
    with pytest.raises(ValueError, match=r"eos_token_id='x' is invalid; accepted"):
        SamplingParams().update_from_generation_config({"eos_token_id": "x"})
