"""The offline API gaps of issue 26, closed with vLLM 0.32's names and semantics, checked by a script written the way
vLLM users write them and against references that do not share the engine's code: a float64 transformers forward
pass for log-probabilities and ranks, vLLM's bad_words and generation-config rules restated here."""
from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch

from prmkern import LLM, SamplingParams
from tests.conftest import random_prompts
from tests.test_vllm_compat import TOL, llm, model64, ref_logprobs  # noqa: F401 (llm, model64: fixtures)


def test_generation_config_defaults(qwen2_dir, tmp_path):
    model = str(tmp_path / "m")
    shutil.copytree(qwen2_dir, model)
    # top_k 50 and repetition_penalty 1.0 are transformers' own defaults: vLLM reads them as unset
    with open(os.path.join(model, "generation_config.json"), "w") as f:
        json.dump({"temperature": 0.6, "top_p": 0.9, "top_k": 50, "repetition_penalty": 1.0, "max_new_tokens": 7,
                   "eos_token_id": 2}, f)
    # ---- a vLLM user's script ----
    llm = LLM(model=model, device="cpu")
    params = llm.get_default_sampling_params()
    params.ignore_eos = True
    outs = llm.generate(["the sum is"], params)
    # ---- checks ----
    assert (params.temperature, params.top_p, params.top_k, params.repetition_penalty, params.max_tokens) == \
        (0.6, 0.9, -1, 1.0, 7)
    assert len(outs[0].outputs[0].token_ids) == 7
    # no sampling_params: the defaults apply (max_new_tokens 7 instead of SamplingParams' 16)
    assert len(llm.generate([[5, 6, 7]])[0].outputs[0].token_ids) <= 7
    assert LLM(model=model, device="cpu", generation_config="vllm").get_default_sampling_params() == SamplingParams()
    with pytest.raises(ValueError, match="generation_config='/nope' is invalid; accepted"):
        LLM(model=model, device="cpu", generation_config="/nope")
    assert LLM(model=qwen2_dir, device="cpu").get_default_sampling_params() == SamplingParams()


def test_logprob_token_ids_land_in_logprobs(llm, model64):
    ids = random_prompts([21], 509, seed=61)[0]
    watch = [3, 17, 400]
    out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=5, logprob_token_ids=watch,
                                             ignore_eos=True))[0].outputs[0]
    ref = ref_logprobs(model64, ids + out.token_ids)
    assert len(out.logprobs) == 5
    for j, (d, t) in enumerate(zip(out.logprobs, out.token_ids)):
        assert set(d) == {t, *watch}  # the sampled token and the asked ids, vLLM's layout
        row = ref[len(ids) - 1 + j]
        for k, lp in d.items():
            assert abs(lp.logprob - float(row[k])) < TOL
            assert int((row > row[k] + TOL).sum()) + 1 <= lp.rank <= int((row >= row[k] - TOL).sum())
        assert out.token_logprobs[j] == {k: d[k].logprob for k in watch}  # prmkern's plain view, unchanged
    assert out.cumulative_logprob == pytest.approx(sum(d[t].logprob for d, t in zip(out.logprobs, out.token_ids)))


def test_logprobs_minus_one_is_the_whole_vocabulary(llm, model64):
    ids = random_prompts([9], 509, seed=62)[0]
    out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=2, logprobs=-1, prompt_logprobs=-1,
                                             ignore_eos=True))[0]
    vocab = llm.engine.model.spec.vocab_size
    ref = ref_logprobs(model64, ids + out.outputs[0].token_ids)
    for j, d in enumerate(out.outputs[0].logprobs):
        assert len(d) == vocab
        assert math.fsum(math.exp(v.logprob) for v in d.values()) == pytest.approx(1.0, abs=1e-5)
        row = ref[len(ids) - 1 + j]
        for t, lp in d.items():  # every token's value and rank against float64
            assert abs(lp.logprob - float(row[t])) < TOL
            assert int((row > row[t] + TOL).sum()) + 1 <= lp.rank <= int((row >= row[t] - TOL).sum())
    assert len(out.prompt_logprobs[1]) == vocab
    with pytest.raises(ValueError, match="logprobs=-2 is invalid"):
        SamplingParams(logprobs=-2)


def _vllm_bad_words(tok, words):
    """vLLM's tokenization of bad_words, restated: each word stripped, and with a leading space when that gives a
    different first token and as many tokens."""
    out = []
    for w in words:
        plain = tok.encode(w.lstrip(), add_special_tokens=False)
        spaced = tok.encode(" " + w.lstrip(), add_special_tokens=False)
        out.append(plain)
        if spaced[0] != plain[0] and len(spaced) == len(plain):
            out.append(spaced)
    return out


def test_bad_words(llm, model64):
    tok = llm.get_tokenizer()
    ids = random_prompts([15], 509, seed=63)[0]
    free = llm.generate([ids], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0].outputs[0]
    word = tok.decode(free.token_ids[:1])
    banned = _vllm_bad_words(tok, [word])
    single = {w[0] for w in banned if len(w) == 1}
    assert free.token_ids[0] in single  # the word is the token greedy decoding chose first
    out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True,
                                             bad_words=[word]))[0].outputs[0]
    # the reference: greedy over the float64 distribution with the banned ids removed at every position
    ctx = list(ids)
    for t in out.token_ids:
        row = ref_logprobs(model64, ctx)[-1].clone()
        row[list(single)] = -math.inf
        assert t == int(row.argmax()) and t not in single
        ctx.append(t)
    with pytest.raises(ValueError, match="bad_words"):
        SamplingParams(bad_words=[""])


def test_greedy_n_above_one_raises_as_vllm_does():
    with pytest.raises(ValueError, match=r"^n must be 1 when using greedy sampling, got 3\.$"):
        SamplingParams(n=3, temperature=0)
    assert SamplingParams(n=3, temperature=0.5).n == 3


def test_max_model_len_above_the_checkpoint_raises(qwen2_dir):
    with open(os.path.join(qwen2_dir, "config.json")) as f:
        limit = json.load(f)["max_position_embeddings"]
    with pytest.raises(ValueError, match=rf"max_model_len \({limit + 1}\) is greater than the derived max_model_len"):
        LLM(qwen2_dir, device="cpu", max_model_len=limit + 1)
    assert LLM(qwen2_dir, device="cpu", max_model_len=limit).engine.max_model_len == limit


def test_engine_metrics_reset_prefix_cache_and_llm_engine(llm):
    # ---- a vLLM user's script ----
    prompt = random_prompts([70], 509, seed=64)[0]
    params = SamplingParams(temperature=0.7, max_tokens=4, seed=3, ignore_eos=True)
    first = llm.generate([{"prompt_token_ids": prompt}], params)[0]
    again = llm.generate([{"prompt_token_ids": prompt}], params)[0]
    assert llm.reset_prefix_cache()
    cold = llm.generate([{"prompt_token_ids": prompt}], params)[0]
    engine = llm.llm_engine
    engine.add_request("r1", {"prompt_token_ids": prompt}, SamplingParams(temperature=0.7, max_tokens=3, seed=3))
    steps = []
    while engine.has_unfinished_requests():
        steps.extend(engine.step())
    metrics = {m.name: m for m in llm.get_metrics()}
    # ---- checks ----
    assert again.num_cached_tokens >= 64 and cold.num_cached_tokens == 0
    assert again.outputs[0].token_ids == first.outputs[0].token_ids == cold.outputs[0].token_ids  # seeded
    finals = [o for o in steps if o.finished]
    assert [o.request_id for o in finals] == ["r1"] and len(finals[0].outputs[0].token_ids) == 3
    for out in (first, again, cold, finals[0]):
        m = out.metrics
        assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.last_token_time <= m.finished_time
        assert m.num_generation_tokens == sum(len(c.token_ids) for c in out.outputs)
        assert m.time_in_queue >= 0 and m.first_token_latency >= m.time_in_queue
    assert metrics["prmkern:generation_tokens"].value == llm.stats.generated_tokens
    assert metrics["prmkern:prefix_cache_hits"].value == llm.stats.cached_tokens >= again.num_cached_tokens
    assert metrics["prmkern:num_requests_running"].value == 0 and metrics["prmkern:kv_cache_usage_perc"].value == 0
    ttft = metrics["prmkern:time_to_first_token_seconds"]
    assert ttft.count >= 4 and ttft.buckets["+Inf"] == ttft.count
    assert metrics["prmkern:inter_token_latency_seconds"].count >= 3 * 3 + 2
    assert all(m.labels == {"model_name": llm.config.model} for m in metrics.values())
    # while requests hold blocks the cache cannot be reset (vLLM returns False too)
    engine.add_request("r2", [1, 2, 3], SamplingParams(temperature=0.7, max_tokens=2))
    engine.step()
    assert not llm.reset_prefix_cache()
    engine.abort_request("r2")
    with pytest.raises(ValueError, match="empty prompt"):
        engine.add_request("r3", [], SamplingParams())


def test_prompt_logprob_token_ids_from_a_start_row(llm, model64):
    """vLLM 0.32's prompt_logprob_token_ids + prompt_logprob_start (its spelling of what prmkern's
    prompt_logprobs_start does for prompt_logprobs): row i scores its ids as predictions of prompt token
    start + i + 1, -1 pads (-inf), against the float64 reference; cached blocks before the start row are reused."""
    import numpy as np
    ids = random_prompts([41], 509, seed=81)[0]
    start = 33
    rows = [[ids[start + i + 1], 7, 300][: 3 - i % 2] for i in range(len(ids) - 1 - start)]  # ragged: -1 padded
    llm.generate([ids[:36]], SamplingParams(temperature=0, max_tokens=1))  # caches the first two 16-token blocks
    # ---- a vLLM user's script ----
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprob_token_ids=np.array(
        [r + [-1] * (3 - len(r)) for r in rows]), prompt_logprob_start=start)
    out = llm.generate([{"prompt_token_ids": ids}], params)[0]
    scores = out.prompt_token_id_logprobs
    # ---- checks ----
    ref = ref_logprobs(model64, ids)
    assert isinstance(scores, np.ndarray) and scores.dtype == np.float32 and scores.shape == (len(rows), 3)
    for i, row in enumerate(rows):
        for j in range(3):
            if j < len(row):
                assert abs(float(scores[i, j]) - float(ref[start + i, row[j]])) < TOL, (i, j)
            else:
                assert scores[i, j] == -np.inf
    assert out.num_cached_tokens == 32 and out.prompt_logprobs is None
    # with prompt_logprobs too, vLLM's prompt_logprobs keep their meaning: every position from 1 on
    both = llm.generate([ids], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0,
                                              prompt_logprob_token_ids=rows, prompt_logprob_start=start))[0]
    assert both.prompt_logprobs[0] is None and len(both.prompt_logprobs) == len(ids)
    assert all(abs(d[t].logprob - float(ref[p - 1, t])) < TOL
               for p, (d, t) in enumerate(zip(both.prompt_logprobs, ids)) if p)
    assert np.array_equal(both.prompt_token_id_logprobs, scores)
    # vLLM's checks
    short = llm.generate([ids], SamplingParams(max_tokens=1, prompt_logprob_token_ids=rows[1:],
                                               prompt_logprob_start=start))[0]
    assert "has 6 rows, but the prompt has 7 scored rows" in short.error
    assert "out-of-vocab" in llm.generate([ids[:3]], SamplingParams(max_tokens=1, prompt_logprob_token_ids=[[600]],
                                                                    prompt_logprob_start=1))[0].error
    with pytest.raises(ValueError, match="prompt_logprob_start requires prompt_logprob_token_ids"):
        SamplingParams(prompt_logprob_start=2)
    with pytest.raises(ValueError, match="must be a non-empty integer array"):
        SamplingParams(prompt_logprob_token_ids=[[-2]])


def test_text_ends_before_an_incomplete_character(llm):
    """vLLM's text comes from its incremental detokenizer, which holds back a trailing incomplete UTF-8 character:
    a chain cut by max_tokens in the middle of one ends before it (seen against vLLM 0.32's server on a random
    checkpoint: its text lacked the final U+FFFD that a plain decode gives)."""
    tok = llm.get_tokenizer()
    cut = 0
    for ids in random_prompts([6, 9, 13], 509, seed=91):
        for m in range(1, 13):
            out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=m, ignore_eos=True))[0].outputs[0]
            full = tok.decode(out.token_ids, skip_special_tokens=True)
            assert out.text == full.rstrip("\ufffd")
            cut += full.endswith("\ufffd")
    assert cut >= 1  # the rule was exercised
