"""Sampling and stopping: distributions against the model's own probabilities, filters, stops, parameter checks."""
from __future__ import annotations

import math

import pytest
import torch

from prmkern import LLM, SamplingParams
from prmkern.engine.sampler import _apply_top_k_top_p
from tests.conftest import hf_model, random_prompts, stop_token_position


@pytest.fixture(scope="module")
def llm(qwen2_dir):
    return LLM(qwen2_dir, device="cpu")


def first_token_probs(path: str, prompt: list[int], temperature: float = 1.0) -> torch.Tensor:
    with torch.no_grad():
        logits = hf_model(path)(torch.tensor([prompt])).logits[0, -1].double()
    return torch.softmax(logits / temperature, -1)


def test_sampled_first_tokens_follow_model_distribution(llm, qwen2_dir):
    prompt = random_prompts([12], 509, seed=21)[0]
    probs = first_token_probs(qwen2_dir, prompt, temperature=0.7)
    n = 3000
    out = llm.generate([prompt], SamplingParams(n=n, temperature=0.7, max_tokens=1, ignore_eos=True, seed=1))[0]
    counts = torch.bincount(torch.tensor([c.token_ids[0] for c in out.outputs]), minlength=509).double()
    # Total variation distance between empirical and model distribution: ~sqrt(k / n) for k likely tokens.
    tv = 0.5 * float((counts / n - probs).abs().sum())
    support = int((probs > 1e-3).sum())
    assert tv < 1.5 * math.sqrt(support / n), (tv, support)


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.5, 0.3, 0.15, 0.05]]))
    out = _apply_top_k_top_p(logits.clone(), torch.tensor([2, -1]), torch.tensor([1.0, 0.7]))
    assert torch.isfinite(out[0]).tolist() == [True, True, False, False]
    # top_p 0.7: 0.5 < 0.7 so the second token is kept; 0.8 >= 0.7 so the third is dropped.
    assert torch.isfinite(out[1]).tolist() == [True, True, False, False]


def test_top_k_one_is_greedy(llm):
    prompt = random_prompts([30], 509, seed=22)[0]
    greedy = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))[0]
    top1 = llm.generate([prompt], SamplingParams(temperature=1.3, top_k=1, max_tokens=16, ignore_eos=True))[0]
    assert greedy.outputs[0].token_ids == top1.outputs[0].token_ids


def test_sampled_logprobs_are_model_logprobs(llm, qwen2_dir):
    prompt = random_prompts([25], 509, seed=23)[0]
    out = llm.generate([prompt], SamplingParams(temperature=1.0, max_tokens=6, ignore_eos=True, logprobs=True,
                                                seed=3))[0].outputs[0]
    with torch.no_grad():
        ref = torch.log_softmax(hf_model(qwen2_dir)(torch.tensor([prompt + out.token_ids])).logits[0].double(), -1)
    expected = [float(ref[len(prompt) - 1 + i, t]) for i, t in enumerate(out.token_ids)]
    assert out.sampled_logprobs == pytest.approx(expected, abs=1e-4)
    assert out.cumulative_logprob == pytest.approx(sum(expected), abs=1e-3)


def test_min_tokens_eos_and_stop_token_ids(llm):
    prompt = random_prompts([20], 509, seed=24)[0]
    greedy = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0].outputs[0]
    third = greedy.token_ids[2]
    stopped = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[third],
                                                    ignore_eos=True))[0].outputs[0]
    assert stopped.token_ids == greedy.token_ids[:3] and stopped.finish_reason == "stop"
    assert stopped.stop_reason == third
    # With min_tokens past that position the stop token is suppressed there.
    later = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[third],
                                                  min_tokens=5, ignore_eos=True))[0].outputs[0]
    assert third not in later.token_ids[:5]
    # EOS (token 0 in these checkpoints) ends a chain unless ignore_eos.
    assert llm.engine.eos_token_ids == (0,)


def test_stop_token_text_is_left_out_as_vllm(llm):
    """vLLM's detokenizer leaves the text of the stop token that ended a chain out of `text` (token_ids keep it)
    unless include_stop_str_in_output; a chain ended by max_tokens keeps all of its text."""
    tok = llm.get_tokenizer()
    prompt = random_prompts([20], 509, seed=27)[0]
    greedy = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0].outputs[0]
    pos, texts = stop_token_position(tok, greedy.token_ids)
    stop = greedy.token_ids[pos]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop],
                                                ignore_eos=True))[0].outputs[0]
    assert out.token_ids == greedy.token_ids[:pos + 1] and out.stop_reason == stop
    assert out.text == texts[pos] != texts[pos + 1]
    kept = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop], ignore_eos=True,
                                                 include_stop_str_in_output=True))[0].outputs[0]
    assert kept.text == texts[pos + 1]
    assert greedy.text == texts[-1]


def test_stop_strings_cut_text(llm):
    prompt = random_prompts([20], 509, seed=25)[0]
    full = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))[0].outputs[0]
    text = full.text
    assert len(text) > 12
    stop = text[8:12]
    first = text.find(stop)
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[stop]))[0]
    c = out.outputs[0]
    assert c.text == text[:first] and c.finish_reason == "stop" and c.stop_reason == stop
    assert len(c.token_ids) < len(full.token_ids)
    kept = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=stop,
                                                 include_stop_str_in_output=True))[0].outputs[0]
    assert kept.text == text[:first + len(stop)]


def test_max_tokens_finish_reason(llm):
    out = llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=7, ignore_eos=True))[0].outputs[0]
    assert len(out.token_ids) == 7 and out.finish_reason == "length"


@pytest.mark.parametrize("kwargs, accepted", [
    (dict(n=0), "an int >= 1"),
    (dict(temperature=-1), "a float >= 0"),
    (dict(top_p=0), r"\(0, 1\]"),
    (dict(max_tokens=0), "an int >= 1"),
    (dict(min_tokens=20, max_tokens=10), r"\[0, max_tokens=10\]"),
    (dict(stop=[""]), "non-empty"),
    (dict(stop_token_ids=[-1]), "non-negative token ids"),
    (dict(logprob_token_ids="yes"), "non-negative token ids"),
    (dict(seed=1.5), "an int or None"),
    (dict(temperature=float("nan")), "not NaN or inf"),
    (dict(temperature=float("inf")), "not NaN or inf"),
    (dict(top_p=float("nan")), r"\(0, 1\]"),
    (dict(min_p=float("nan")), r"\[0, 1\]"),
    (dict(min_p=1.5), r"\[0, 1\]"),
    (dict(presence_penalty=float("inf")), r"\[-2, 2\]"),
    (dict(frequency_penalty=2.5), r"\[-2, 2\]"),
    (dict(repetition_penalty=0), "> 0"),
    (dict(repetition_penalty=float("nan")), "> 0"),
    (dict(n=True), "not a bool"),
    (dict(max_tokens=True), "an int >= 1"),
    (dict(top_k=True), "an int"),
    (dict(seed=False), "an int or None"),
    (dict(logprobs=-2), "an int >= 0"),
    (dict(logprobs=2.0), "an int >= 0"),
    (dict(prompt_logprobs=-2), "an int >= 0"),
    (dict(prompt_logprobs_start=0), "an int >= 1"),
    (dict(first_chain=-1), "an int >= 0"),
    (dict(stop_token_ids=[True]), "non-negative token ids"),
    (dict(ignore_eos="yes"), "True or False"),
    (dict(stop=5), "non-empty string"),
])
def test_invalid_sampling_params_say_what_is_accepted(kwargs, accepted):
    name = next(iter(kwargs)) if len(kwargs) == 1 else "min_tokens"
    with pytest.raises(ValueError, match=f"SamplingParams.{name}=.*accepted: .*{accepted}"):
        SamplingParams(**kwargs)


def test_logprobs_bool_maps_to_vllm_counts():
    assert SamplingParams(logprobs=True).logprobs == 0 and SamplingParams(logprobs=False).logprobs is None
    assert SamplingParams(logprobs=3).logprobs == 3


def test_chains_in_waves_equal_one_request(llm):
    # first_chain: n=5 then n=3 from chain 5 sample the chains of one seeded n=8 request (stop at the first error
    # draws a solution's chains this way), whatever the batch around them
    prompt = random_prompts([20], 509, seed=26)[0]
    sp = dict(temperature=1.0, max_tokens=12, ignore_eos=True, seed=9)
    whole = llm.generate([prompt], SamplingParams(n=8, **sp))[0].outputs
    first, rest = llm.generate([prompt, prompt], [SamplingParams(n=5, **sp),
                                                  SamplingParams(n=3, first_chain=5, **sp)])
    assert [o.token_ids for o in first.outputs + rest.outputs] == [o.token_ids for o in whole]
    assert len({tuple(o.token_ids) for o in whole}) == 8  # the chains differ: the seeds are the chains' own
