"""The engine survives what users and faults throw at it: NaN/inf or wrong-typed parameters, an exception inside a
step, non-finite logits in one row, a KeyboardInterrupt in generate(); each leaves the LLM answering the next call
with the greedy tokens of a fresh LLM. Also: missing tokenizers, huge prompts, loader shape errors, KV-pool stops."""
from __future__ import annotations

import json
import os
import re
import time

import pytest

from prmkern import LLM, SamplingParams
from prmkern.tiny import build_checkpoint
from tests.conftest import random_prompts

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
PROMPTS = random_prompts([9, 23, 40], 509, seed=41)


@pytest.fixture(scope="module")
def fresh(qwen2_dir):
    """Greedy tokens of a fresh LLM for PROMPTS: what a surviving LLM must still produce."""
    return [o.outputs[0].token_ids for o in LLM(qwen2_dir, device="cpu").generate(PROMPTS, GREEDY)]


def _assert_healthy(llm: LLM, fresh) -> None:
    engine = llm.engine
    assert not engine.has_unfinished() and not engine.requests
    assert engine.block_manager.num_free_blocks == engine.num_blocks  # every block was given back
    outs = llm.generate(PROMPTS, GREEDY)
    assert [o.error for o in outs] == [None] * 3
    assert [o.outputs[0].token_ids for o in outs] == fresh


@pytest.mark.parametrize("field, value", [("temperature", float("nan")), ("temperature", float("inf")),
                                          ("top_p", float("nan")), ("min_p", float("inf")),
                                          ("presence_penalty", float("nan")), ("n", True), ("logprobs", -2)])
def test_bad_params_set_after_construction_fail_alone(qwen2_dir, fresh, field, value):
    with pytest.raises(ValueError, match=f"SamplingParams.{field}=.*accepted"):
        SamplingParams(**{field: value})
    llm = LLM(qwen2_dir, device="cpu")
    bad = SamplingParams(temperature=1.0, max_tokens=5)
    setattr(bad, field, value)  # bypassing the constructor's checks: the engine checks again
    outs = llm.generate(PROMPTS[:2], [bad, GREEDY])
    assert f"SamplingParams.{field}" in outs[0].error and outs[0].outputs == []
    assert outs[1].error is None and outs[1].outputs[0].token_ids == fresh[1]
    _assert_healthy(llm, fresh)


def test_n_beyond_the_pool_fails_alone(qwen2_dir, fresh):
    llm = LLM(qwen2_dir, device="cpu", num_kvcache_blocks=200)
    outs = llm.generate(PROMPTS[:2], [SamplingParams(n=10**6), GREEDY])
    assert "at most 256 chains" in outs[0].error and outs[1].outputs[0].token_ids == fresh[1]
    _assert_healthy(llm, fresh)


@pytest.mark.parametrize("at_call", [1, 4])  # the first prefill step, or a decode step
def test_exception_inside_a_step_fails_that_steps_requests(qwen2_dir, fresh, monkeypatch, at_call):
    llm = LLM(qwen2_dir, device="cpu")
    run, calls = llm.engine.runner.run, [0]

    def flaky(step):
        calls[0] += 1
        if calls[0] == at_call:
            raise RuntimeError("injected fault")
        return run(step)

    monkeypatch.setattr(llm.engine.runner, "run", flaky)
    outs = llm.generate(PROMPTS, GREEDY)
    assert all("injected fault" in o.error for o in outs)
    assert all(c.finish_reason == "error" for o in outs for c in o.outputs)
    assert llm.stats.failed_requests == 3
    monkeypatch.setattr(llm.engine.runner, "run", run)
    _assert_healthy(llm, fresh)


@pytest.mark.parametrize("params, bad_value", [(GREEDY, float("nan")), (GREEDY, float("inf")),
                                               (SamplingParams(temperature=0.9, max_tokens=12, seed=4,
                                                               ignore_eos=True), float("nan"))])
def test_non_finite_logits_fail_only_their_request(qwen2_dir, fresh, monkeypatch, params, bad_value):
    expected = [o.outputs[0].token_ids for o in LLM(qwen2_dir, device="cpu").generate(PROMPTS, params)]
    llm = LLM(qwen2_dir, device="cpu")
    run, calls, victim = llm.engine.runner.run, [0], []

    def poison(step):
        logits = run(step)
        calls[0] += 1
        if calls[0] == 3:  # a decode step: row 0 belongs to step.scheduled[0] (the runner's order)
            victim.append(step.scheduled[0].seq.request)
            logits[0, 5] = bad_value
        return logits

    monkeypatch.setattr(llm.engine.runner, "run", poison)
    outs = llm.generate(PROMPTS, params)
    bad = [i for i, o in enumerate(outs) if o.error is not None]
    assert len(bad) == 1 and outs[bad[0]].request_id == victim[0].request_id
    assert "non-finite logits" in outs[bad[0]].error
    for i in set(range(3)) - set(bad):
        assert outs[i].outputs[0].token_ids == expected[i]
    monkeypatch.setattr(llm.engine.runner, "run", run)
    _assert_healthy(llm, fresh)


@pytest.mark.parametrize("at_call", [1, 5])
def test_keyboard_interrupt_aborts_the_calls_requests(qwen2_dir, fresh, monkeypatch, at_call):
    llm = LLM(qwen2_dir, device="cpu")
    run, calls = llm.engine.runner.run, [0]

    def interrupted(step):
        calls[0] += 1
        if calls[0] == at_call:
            raise KeyboardInterrupt
        return run(step)

    monkeypatch.setattr(llm.engine.runner, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(PROMPTS, SamplingParams(n=3, temperature=1.0, max_tokens=30, ignore_eos=True))
    monkeypatch.setattr(llm.engine.runner, "run", run)
    generated = llm.stats.generated_tokens
    _assert_healthy(llm, fresh)
    # Nothing of the interrupted call was finished silently by the next one.
    assert llm.stats.generated_tokens - generated == 3 * GREEDY.max_tokens


def test_missing_tokenizer_is_reported_as_missing(tmp_path, fresh):
    path = build_checkpoint(str(tmp_path / "notok"), "qwen2", seed=0, tokenizer=False, vocab_size=509,
                            intermediate_size=197)
    with pytest.warns(UserWarning, match="no tokenizer files"):
        llm = LLM(path, device="cpu")
    assert llm.get_tokenizer() is None
    out = llm.generate(["some text", PROMPTS[0]], GREEDY)
    assert "no tokenizer files" in out[0].error and "token ids" in out[0].error
    assert out[1].error is None and len(out[1].outputs[0].token_ids) == 12
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        LLM(path, tokenizer=path, device="cpu")


def test_huge_text_prompt_is_rejected_without_tokenizing_it_all(qwen2_dir):
    llm = LLM(qwen2_dir, device="cpu", max_model_len=256)
    text = "the step is correct 12 + 7 = 19 " * 200_000  # 6.4 M characters
    start = time.perf_counter()
    out = llm.generate([text, "a short prompt"], GREEDY)
    assert time.perf_counter() - start < 20
    assert "max_model_len" in out[0].error and f"{len(text)} characters" in out[0].error
    assert out[1].error is None
    # A prompt just under the limit still runs (the prefix test is an upper bound, never a false rejection).
    ids = llm.get_tokenizer().encode(text[:2000], add_special_tokens=False)[:200]
    ok = llm.get_tokenizer().decode(ids)
    assert llm.generate([ok], GREEDY)[0].error is None


@pytest.mark.parametrize("key, value, tensor", [("vocab_size", 600, r"'(model\.embed_tokens|lm_head)\.weight'"),
                                                ("hidden_size", 120, r"'(model\.|lm_head)[a-z_.0-9]*'"),
                                                ("intermediate_size", 100, r"'model\.layers\.\d+\.mlp\.")])
def test_loader_names_tensor_config_and_shapes(qwen2_dir, tmp_path, key, value, tensor):
    path = tmp_path / "ckpt"
    path.mkdir()
    for f in os.listdir(qwen2_dir):
        if f != "config.json":
            os.symlink(os.path.join(qwen2_dir, f), path / f)
    config = json.load(open(os.path.join(qwen2_dir, "config.json")))
    old = config[key]
    config[key] = value
    if key == "hidden_size":
        config["head_dim"] = 16
    json.dump(config, open(path / "config.json", "w"))
    with pytest.raises(ValueError) as e:
        LLM(str(path), device="cpu")
    msg = str(e.value)
    assert re.search(tensor, msg) and key in msg and "config.json" in msg
    assert str(old) in msg and str(value) in msg  # both shapes


def test_loader_names_a_missing_config_key(qwen2_dir, tmp_path):
    config = json.load(open(os.path.join(qwen2_dir, "config.json")))
    del config["num_hidden_layers"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config.json lacks the key 'num_hidden_layers'"):
        LLM(str(tmp_path), device="cpu")


def test_chain_stopped_by_the_kv_pool_is_flagged(qwen2_dir):
    llm = LLM(qwen2_dir, device="cpu", block_size=4, num_kvcache_blocks=5)  # 20 tokens of KV in all
    out = llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))[0].outputs[0]
    assert out.finish_reason == "length" and out.kv_pool_exhausted and len(out.token_ids) < 100
    short = llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0].outputs[0]
    assert short.finish_reason == "length" and not short.kv_pool_exhausted
