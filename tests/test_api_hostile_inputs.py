"""What an audit of the offline API found on 2026-12-07, each a case that misbehaved before its fix: one bad item in a
list of SamplingParams lost the whole batch, min_tokens let a stop string end inside the first min_tokens tokens
(vLLM looks for stop strings only once the output has more than min_tokens tokens), bytes / arrays / tensors were
iterated into one failed request per element, and a logit_bias that overflows float32 failed its request with a
message blaming the model. The references restate vLLM's rules here, on the shipped verifier's own tokens."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from prmkern import LLM, SamplingParams

PROMPT = "<|im_start|>user\nCompute $13 - 5 + 10$.<|im_end|>\n<|im_start|>assistant\n"


def test_one_bad_params_item_fails_alone(shipped_llm):
    sp = SamplingParams(temperature=0, max_tokens=4)
    outs = shipped_llm.generate(["Compute 3", "Step 1", "Compute 4"], [sp, {"max_tokens": 2}, sp])
    assert [o.error is None for o in outs] == [True, False, True]
    assert "SamplingParams" in outs[1].error and "dict" in outs[1].error, outs[1].error
    assert all(len(outs[i].outputs[0].token_ids) == 4 for i in (0, 2))
    assert shipped_llm.generate(["Compute 3"], sp)[0].outputs[0].token_ids == outs[0].outputs[0].token_ids


def _vllm_stop(tok, ids: list[int], stop: str, min_tokens: int) -> str | None:
    """vLLM's stop-string rule on a fixed token sequence: after each token past the first min_tokens, a stop string
    that ends in that token's new text cuts the output before it. None: no stop."""
    prev = tok.decode(ids[:min_tokens])
    for k in range(min_tokens + 1, len(ids) + 1):
        text = tok.decode(ids[:k])
        hit = text.find(stop, max(0, len(prev) - len(stop) + 1))
        if hit >= 0:
            return text[:hit]
        prev = text
    return None


def test_min_tokens_keeps_stop_strings_out_of_the_first_tokens(shipped_llm):
    tok = shipped_llm.get_tokenizer()
    full = shipped_llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=16))[0].outputs[0]
    ids = list(full.token_ids)
    # a stop string equal to an early token's text: it ends inside the first tokens unless min_tokens says not
    stops = sorted({tok.decode([t]).strip() for t in ids[:4]} - {""}, key=len)[-2:]
    assert stops, [tok.decode([t]) for t in ids[:4]]
    checked = 0
    for stop in stops:
        for min_tokens in range(0, 5):
            expected = _vllm_stop(tok, ids, stop, min_tokens)
            out = shipped_llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=16, stop=[stop],
                                                                min_tokens=min_tokens))[0].outputs[0]
            if expected is None:
                assert out.finish_reason == "length" and out.text == full.text, (stop, min_tokens, out.text)
            else:
                assert (out.finish_reason, out.stop_reason, out.text) == ("stop", stop, expected), (stop, min_tokens)
                checked += 1
    assert checked >= 2  # the references stopped somewhere, so the rule was exercised


@pytest.mark.parametrize("prompts,names", [
    (b"abc", "bytes"), (np.array([5, 6, 7]), "ndarray"), (torch.tensor([5, 6, 7]), "Tensor"), (5, "int"),
    (None, "NoneType"),
])
def test_prompts_that_are_not_prompts_are_one_type_error(shipped_llm, prompts, names):
    with pytest.raises(TypeError, match=names) as e:
        shipped_llm.generate(prompts, SamplingParams(max_tokens=2))
    assert "a list of int token ids" in str(e.value)
    assert shipped_llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=2))[0].error is None


def test_an_overflowing_logit_bias_is_named_in_the_error(shipped_llm):
    sp = SamplingParams(temperature=0, max_tokens=3)
    outs = shipped_llm.generate(["Compute 3", "Compute 4"], [SamplingParams(temperature=0, max_tokens=3,
                                                                            logit_bias={5: 1e300}), sp])
    assert outs[0].error is not None and "logit_bias" in outs[0].error, outs[0].error
    assert outs[1].error is None and len(outs[1].outputs[0].token_ids) == 3


class _Loaded(Exception):
    """Raised in place of loading the model: an argument got past LLM's checks."""


@pytest.fixture
def no_engine(monkeypatch):
    def load(*a, **k):
        raise _Loaded
    monkeypatch.setattr("prmkern.llm.LLMEngine", load)


@pytest.mark.parametrize("kwargs,error", [
    ({"seed": "x"}, TypeError), ({"seed": 1.5}, TypeError), ({"seed": True}, TypeError),
    ({"tensor_parallel_size": 0}, ValueError), ({"tensor_parallel_size": 1.0}, ValueError),
    ({"tensor_parallel_size": True}, ValueError), ({"tensor_parallel_size": "2"}, ValueError),
    ({"kv_cache_memory": "1GiB"}, ValueError), ({"kv_cache_memory": 1.5}, ValueError),
    ({"kv_cache_memory": True}, ValueError), ({"attention_backend": "nope"}, ValueError),
    ({"attention_backend": 3}, ValueError), ({"device": "nope"}, ValueError), ({"tokenizer": 3}, TypeError),
    ({"gpu_memory_utilization": "0.5"}, ValueError), ({"max_model_len": "512"}, ValueError),
])
def test_llm_arguments_of_the_wrong_type_fail_before_the_model_loads(qwen2_dir, no_engine, kwargs, error):
    # Before: seed="x" / 1.5 / True, tensor_parallel_size=1.0 / True, kv_cache_memory=1.5 / True and an unknown
    # attention_backend were taken silently (the last failed every request after the load); kv_cache_memory="1GiB"
    # and device="nope" raised errors that did not name the argument; tokenizer=3 went to the network.
    (name, value), = kwargs.items()
    with pytest.raises(error) as e:
        LLM(qwen2_dir, **{"device": "cpu", **kwargs})
    assert f"{name}={value!r} is invalid" in str(e.value) and "accepted" in str(e.value), str(e.value)


def test_llm_takes_int_seeds_and_none(qwen2_dir, monkeypatch):
    made = []

    def load(config, *a, **k):
        made.append(config)
        raise _Loaded
    monkeypatch.setattr("prmkern.llm.LLMEngine", load)
    for seed, want in ((None, 0), (7, 7), (np.int64(9), 9), (-3, -3)):
        with pytest.raises(_Loaded):
            LLM(qwen2_dir, device="cpu", seed=seed)
        assert made[-1].seed == want and type(made[-1].seed) is int


def test_triton_without_a_gpu_or_the_interpreter_fails_before_the_model_loads(qwen2_dir, no_engine, monkeypatch):
    # Before: accepted; every request then failed on its first step with TritonUnavailableError.
    from prmkern.config import EngineConfigError
    monkeypatch.setattr("prmkern.kernels.interpreted", lambda: False)  # as in a process without TRITON_INTERPRET=1
    with pytest.raises(EngineConfigError, match=r"attention_backend='triton' is invalid; accepted: a backend that "
                                                r"runs on cpu: .*TRITON_INTERPRET=1") as e:
        LLM(qwen2_dir, device="cpu", attention_backend="triton")
    assert e.value.field == "attention_backend"
    monkeypatch.setattr("prmkern.kernels.interpreted", lambda: True)
    with pytest.raises(_Loaded):
        LLM(qwen2_dir, device="cpu", attention_backend="triton")
