"""LLM.beam_search against an independent beam search written here over transformers' float64 log-probabilities on
the same random weights: vLLM 0.32's rule restated (2 * beam_width candidates per beam, EOS candidates set aside as
completed, ranking by cum_logprob / len(prompt + generated, less a final EOS) ** length_penalty), in a script
written the way vLLM users write beam search."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from prmkern import LLM
from prmkern.sampling_params import BeamSearchParams
from tests.conftest import hf_model, random_prompts

TOL = 1e-4  # float32 engine vs float64 reference, log-probability units per token
MARGIN = 1e-4  # the reference's smallest ranking gap: no near-tie the float32 engine (errors ~1e-6) could flip


@pytest.fixture(scope="module")
def model64(qwen2_dir):
    return hf_model(qwen2_dir, torch.float64)


def _row(model64, tokens: list[int]) -> torch.Tensor:
    """[V] float64: log P(next token | tokens)."""
    with torch.no_grad():
        return torch.log_softmax(model64(torch.tensor([tokens])).logits[0, -1].double(), dim=-1)


def ref_beam_search(model64, prompt: list[int], width: int, steps: int, eos: int, length_penalty: float = 1.0,
                    ignore_eos: bool = False) -> tuple[list[tuple[list[int], float]], float]:
    """(the best `width` (tokens, cum_logprob), best first; the smallest gap at any ranking boundary, in log-prob
    units: a score gap times len(prompt) ** length_penalty, since a score is a cum_logprob over at least that)."""
    def score(beam: tuple[list[int], float]) -> float:
        tokens, cum = beam
        return cum / max(len(tokens) - (tokens[-1] == eos), 1) ** length_penalty

    live, done, gaps = [(list(prompt), 0.0)], [], []
    scale = len(prompt) ** length_penalty
    for _ in range(steps):
        if not live:
            break
        candidates = []
        for tokens, cum in live:
            top = torch.topk(_row(model64, tokens), 2 * width + 1)
            gaps.append(float(top.values[2 * width - 1] - top.values[2 * width]))
            for value, token in zip(top.values[:2 * width].tolist(), top.indices[:2 * width].tolist()):
                beam = (tokens + [token], cum + value)
                (done if token == eos and not ignore_eos else candidates).append(beam)
        candidates.sort(key=score, reverse=True)
        if len(candidates) > width:
            gaps.append((score(candidates[width - 1]) - score(candidates[width])) * scale)
        live = candidates[:width]
    final = sorted(done + live, key=score, reverse=True)
    if len(final) > width:
        gaps.append((score(final[width - 1]) - score(final[width])) * scale)
    return final[:width], min(gaps)


def _check(out, ref: list[tuple[list[int], float]], gap: float, tok) -> None:
    assert gap > MARGIN, f"the reference has a near-tie ({gap:.2e}): choose other prompts"
    assert [s.tokens for s in out.sequences] == [t for t, _ in ref]
    for seq, (tokens, cum) in zip(out.sequences, ref):
        assert abs(seq.cum_logprob - cum) < TOL * len(seq.logprobs), (seq.cum_logprob, cum)
        assert seq.text == tok.decode(tokens, skip_special_tokens=True)  # vLLM's text: prompt and generated


def test_beam_search_matches_the_reference(qwen2_dir, model64):
    ids = random_prompts([9], 509, seed=71)[0]
    # ---- a vLLM user's script ----
    llm = LLM(model=qwen2_dir, device="cpu")
    tokenizer = llm.get_tokenizer()
    outputs = llm.beam_search([{"prompt_token_ids": ids}, {"prompt": "the sum of 12 and 7 is"}],
                              BeamSearchParams(beam_width=3, max_tokens=5))
    for output in outputs:
        for seq in output.sequences:
            assert isinstance(seq.text, str) and isinstance(seq.cum_logprob, float)
    # ---- checks ----
    text_ids = tokenizer.encode("the sum of 12 and 7 is", add_special_tokens=False)
    eos = tokenizer.eos_token_id
    for out, prompt in zip(outputs, [ids, text_ids]):
        assert len(out.sequences) == 3 and all(s.tokens[:len(prompt)] == prompt for s in out.sequences)
        ref, gap = ref_beam_search(model64, prompt, 3, 5, eos)
        _check(out, ref, gap, tokenizer)
        for seq in out.sequences:  # per generated position vLLM's dict: the 2 * beam_width candidates offered
            assert len(seq.logprobs) == 5 and all(len(d) == 6 for d in seq.logprobs)
            assert seq.cum_logprob == pytest.approx(sum(d[t].logprob for d, t in
                                                        zip(seq.logprobs, seq.tokens[len(prompt):])), abs=1e-9)


@pytest.mark.parametrize("length_penalty", [0.0, 2.0])
def test_length_penalty_and_concurrency_limit(qwen2_dir, model64, length_penalty):
    prompts = random_prompts([5, 12], 509, seed=72)
    llm = LLM(model=qwen2_dir, device="cpu")
    outs = llm.beam_search(prompts, BeamSearchParams(beam_width=2, max_tokens=4, length_penalty=length_penalty),
                           concurrency_limit=1)
    for out, prompt in zip(outs, prompts):
        ref, gap = ref_beam_search(model64, prompt, 2, 4, llm.get_tokenizer().eos_token_id, length_penalty)
        _check(out, ref, gap, llm.get_tokenizer())


def test_eos_candidates_complete_unless_ignore_eos(qwen2_dir, model64, tmp_path):
    prompt = random_prompts([7], 509, seed=73)[0]
    # EOS made a likely token: the tokenizer's eos_token set to the third most likely first token (a copy of the model)
    eos = int(torch.topk(_row(model64, prompt), 3).indices[2])
    model = str(tmp_path / "m")
    shutil.copytree(qwen2_dir, model)
    from transformers import AutoTokenizer
    eos_text = AutoTokenizer.from_pretrained(model).convert_ids_to_tokens(eos)
    cfg_path = os.path.join(model, "tokenizer_config.json")
    cfg = json.load(open(cfg_path))
    cfg["eos_token"] = eos_text
    json.dump(cfg, open(cfg_path, "w"))
    llm = LLM(model=model, device="cpu")
    tok = llm.get_tokenizer()
    assert tok.eos_token_id == eos
    outs = llm.beam_search([prompt], BeamSearchParams(beam_width=2, max_tokens=4))
    ref, gap = ref_beam_search(model64, prompt, 2, 4, eos)
    _check(outs[0], ref, gap, tok)
    assert any(s.tokens[-1] == eos and len(s.tokens) < len(prompt) + 4 for s in outs[0].sequences)  # one completed
    kept = llm.beam_search([prompt], BeamSearchParams(beam_width=2, max_tokens=4, ignore_eos=True))
    ref, gap = ref_beam_search(model64, prompt, 2, 4, eos, ignore_eos=True)
    _check(kept[0], ref, gap, tok)
    assert all(len(s.tokens) == len(prompt) + 4 for s in kept[0].sequences)


def test_sampled_candidates_and_bad_params(qwen2_dir, model64):
    prompt = random_prompts([6], 509, seed=74)[0]
    llm = LLM(model=qwen2_dir, device="cpu", seed=5)
    out = llm.beam_search([prompt], BeamSearchParams(beam_width=2, max_tokens=3, temperature=1.0))[0]
    for seq in out.sequences:  # a sampled token may join the top 2 * beam_width; every value is the model's raw one
        tokens = seq.tokens
        cum = sum(float(_row(model64, tokens[:p])[tokens[p]]) for p in range(len(prompt), len(tokens)))
        assert abs(seq.cum_logprob - cum) < TOL * 3 and all(len(d) in (4, 5) for d in seq.logprobs)
    for bad, says in [(dict(beam_width=0, max_tokens=2), "beam_width=0 is invalid; accepted: an int in"),
                      (dict(beam_width=2, max_tokens=-1), "max_tokens=-1"),
                      (dict(beam_width=2, max_tokens=2, temperature=-1.0), "temperature=-1.0"),
                      (dict(beam_width=True, max_tokens=2), "beam_width=True")]:
        with pytest.raises(ValueError, match=says):
            BeamSearchParams(**bad)
    with pytest.raises(TypeError, match="BeamSearchParams"):
        llm.beam_search([prompt], {"beam_width": 2})
