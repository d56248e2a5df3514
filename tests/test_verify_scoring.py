"""Scoring hand-written verifier outputs: verdict positions from token offsets, P(correct) from the two chosen
log-probabilities, unscorable verdicts counted, K-chain means with coverage, solution scores, earliest error."""
import math
import re

import pytest

from prmkern.verify import (
    CRITIC,
    GENPRM,
    THINKPRM,
    Generated,
    aggregate,
    earliest_error,
    parse_output,
    score_chain,
    solution_score,
    token_char_offsets,
    verdict_probability,
)


class WordTok:
    """A toy tokenizer: words, spaces, punctuation and backslash-commands are tokens; ids assigned on first use."""

    def __init__(self):
        self.vocab, self.inv = {}, {}

    def _id(self, piece):
        if piece not in self.vocab:
            self.vocab[piece] = len(self.vocab)
            self.inv[self.vocab[piece]] = piece
        return self.vocab[piece]

    def encode(self, text, add_special_tokens=False):
        return [self._id(p) for p in re.findall(r"\\[a-z]+|[A-Za-z]+|\d|\s|[^\sA-Za-z\d]", text)]

    def decode(self, ids):
        return "".join(self.inv[i] for i in ids)


def chain(tok, text, probs):
    """Generated tokens for text; at the verdict tokens, logprobs from probs in order (then 0.5)."""
    c, i = THINKPRM.verdict_token_ids(tok)
    ids = tok.encode(text)
    lps, it = [], iter(probs)
    for t in ids:
        if t in (c, i):
            pc = next(it, 0.5)
            lps.append({c: math.log(pc * 0.9), i: math.log((1 - pc) * 0.9)})  # 0.1 on other tokens
        else:
            lps.append({c: -30.0, i: -30.0})
    return Generated(ids, lps)


TEXT = ("Step 1: fine. The step is \\boxed{correct}\nStep 2: wrong. The step is \\boxed{incorrect}\n"
        "Is the solution correct? No")


def test_probability_is_renormalised_over_the_two_verdicts():
    assert verdict_probability({1: math.log(0.6), 2: math.log(0.2)}, 1, 2) == pytest.approx(0.75)
    assert verdict_probability({1: -1000.0, 2: 0.0}, 1, 2) == 0.0
    with pytest.raises(KeyError):
        verdict_probability({1: 0.0}, 1, 2)


def test_thinkprm_chain_scores_at_the_verdict_positions():
    tok = WordTok()
    parsed = parse_output(THINKPRM, TEXT, 2)
    gen = chain(tok, TEXT, [0.8, 0.3])
    cs = score_chain(THINKPRM, parsed, gen, tokenizer=tok)
    assert [s.p_correct for s in cs.steps] == pytest.approx([0.8, 0.3])
    assert [s.source for s in cs.steps] == ["logprobs", "logprobs"]
    # the located token is the verdict token itself
    c, i = THINKPRM.verdict_token_ids(tok)
    assert gen.token_ids[cs.steps[0].token_index] == c and gen.token_ids[cs.steps[1].token_index] == i
    assert cs.counts == {"correct": 1, "incorrect": 1, "unscored": 0}


def test_missing_malformed_truncated_are_counted_not_scored():
    tok = WordTok()
    text = ("Step 1: fine. The step is \\boxed{correct}\nStep 2: hmm. The step is \\boxed{maybe}\n"
            "Step 3: The step is \\boxed{corr")
    parsed = parse_output(THINKPRM, text, 4, finished=False)
    cs = score_chain(THINKPRM, parsed, chain(tok, text, [0.9, 0.5]), tokenizer=tok)
    assert [s.p_correct for s in cs.steps] == [pytest.approx(0.9), None, None, None]
    assert [s.status for s in cs.steps] == ["correct", "malformed", "truncated", "missing"]
    assert cs.counts["unscored"] == 3
    # even with use_verdict_text, only parsed verdicts get a value
    cs2 = score_chain(THINKPRM, parsed, None, use_verdict_text=True)
    assert [s.p_correct for s in cs2.steps] == [1.0, None, None, None]
    assert cs2.steps[0].source == "verdict_text"


def test_unreadable_verdict_token_is_reported():
    tok = WordTok()
    parsed = parse_output(THINKPRM, TEXT, 2)
    gen = chain(tok, TEXT, [0.8, 0.3])
    no_lp = Generated(gen.token_ids, None)
    cs = score_chain(THINKPRM, parsed, no_lp, tokenizer=tok)
    assert [s.p_correct for s in cs.steps] == [None, None]
    assert "no log-probabilities" in cs.steps[0].note
    # offsets that put the verdict inside a token (merged "{correct") cannot be scored
    offs = token_char_offsets(gen.token_ids, tok)
    j = offs.index(parsed.steps[0].char_offset)
    merged = list(offs)
    merged[j] = merged[j] - 1
    cs = score_chain(THINKPRM, parsed, Generated(gen.token_ids, gen.token_logprobs, offsets=merged), tokenizer=tok)
    assert cs.steps[0].p_correct is None and "inside token" in cs.steps[0].note
    assert cs.steps[1].p_correct == pytest.approx(0.3)


def test_text_start_offsets_a_generated_suffix():
    tok = WordTok()
    prefix = "[Code Output]\n\n```\n12\n```\n</verify>\n"
    final = "<output>\n**Judgement**: $\\boxed{No}$\n</output>\n"
    turn = prefix + final
    parsed = parse_output(GENPRM, [turn], 1)
    c, i = GENPRM.verdict_token_ids(tok)
    ids = tok.encode(final)
    lps = [{c: math.log(0.2), i: math.log(0.6)} if t in (c, i) else {c: -20.0, i: -20.0} for t in ids]
    cs = score_chain(GENPRM, parsed, [Generated(ids, lps, text_start=len(prefix))], tokenizer=tok)
    assert cs.steps[0].p_correct == pytest.approx(0.25) and cs.steps[0].status == "incorrect"


def test_critic_scores_from_the_verdict_text():
    parsed = parse_output(CRITIC, "\\boxed{1}", 3)
    cs = score_chain(CRITIC, parsed, None)
    assert [s.p_correct for s in cs.steps] == [1.0, 0.0, None]


def test_aggregate_over_k_chains_with_coverage():
    tok = WordTok()
    t_full = TEXT
    t_cut = "Step 1: fine. The step is \\boxed{correct}\nStep 2: The step is \\boxed{inc"
    chains = [
        score_chain(THINKPRM, parse_output(THINKPRM, t_full, 2), chain(tok, t_full, [0.9, 0.2]), tokenizer=tok),
        score_chain(THINKPRM, parse_output(THINKPRM, t_full, 2), chain(tok, t_full, [0.7, 0.4]), tokenizer=tok),
        score_chain(THINKPRM, parse_output(THINKPRM, t_cut, 2, finished=False), chain(tok, t_cut, [0.5, 0.5]),
                    tokenizer=tok),
    ]
    agg = aggregate(chains, 2, method="min", threshold=0.5)
    assert agg.steps[0].score == pytest.approx((0.9 + 0.7 + 0.5) / 3) and agg.steps[0].coverage == 1.0
    assert agg.steps[1].score == pytest.approx(0.3) and agg.steps[1].coverage == pytest.approx(2 / 3)
    assert agg.steps[1].counts == {"incorrect": 2, "truncated": 1}
    assert agg.score == pytest.approx(0.3) and agg.earliest_error == 1
    assert agg.counts["truncated"] == 1 and agg.counts["unscored"] == 1 and agg.num_chains == 3
    assert aggregate(chains, 3).unscored_steps == [2]  # a step no chain reached


def test_solution_score_methods_and_earliest_error():
    xs = [0.9, None, 0.5, 0.8]
    assert solution_score(xs, "min") == 0.5
    assert solution_score(xs, "last") == 0.8
    assert solution_score(xs, "mean") == pytest.approx((0.9 + 0.5 + 0.8) / 3)
    assert solution_score(xs, "product") == pytest.approx(0.9 * 0.5 * 0.8)
    assert solution_score([None], "min") is None
    # One rule for unscored steps: an unscored step before any error makes the answer unknown (not "no error").
    assert earliest_error(xs) is None and earliest_error(xs, 0.6) is None and earliest_error([0.2]) == 0
    assert earliest_error([0.9, 0.2, None]) == 1  # a judged error before the unscored step stands
    assert earliest_error([0.9, 0.7, 0.8]) == -1 and earliest_error([None, 0.1]) is None
    with pytest.raises(ValueError):
        solution_score(xs, "median")
    with pytest.raises(ValueError):
        earliest_error(xs, 1.5)


def test_offsets_with_a_real_byte_level_bpe(tmp_path):
    tiny = pytest.importorskip("prmkern.tiny")
    from transformers import AutoTokenizer
    tiny.build_tokenizer(str(tmp_path), 2048)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    text = "Step 1: é ≤ 3. The step is \\boxed{correct}\nStep 2: The step is \\boxed{incorrect}"
    ids = tok.encode(text, add_special_tokens=False)
    offs = token_char_offsets(ids, tok)
    assert len(offs) == len(ids) and offs == sorted(offs)
    # Where a prefix does not end inside a character, its decoded length is the offset.
    for j in range(len(ids)):
        prefix = tok.decode(ids[:j])
        if "\ufffd" not in prefix:
            assert len(prefix) == offs[j], j
    c, i = THINKPRM.verdict_token_ids(tok)
    lps = [{c: math.log(0.3), i: math.log(0.1)} for _ in ids]
    cs = score_chain(THINKPRM, parse_output(THINKPRM, text, 2), Generated(ids, lps), tokenizer=tok)
    assert [s.p_correct for s in cs.steps] == pytest.approx([0.75, 0.75])


def test_bad_inputs():
    with pytest.raises(ValueError):
        Generated([1, 2], [{}])
    with pytest.raises(ValueError):
        aggregate([], 2)
    with pytest.raises(ValueError):
        score_chain(THINKPRM, parse_output(THINKPRM, TEXT, 2), Generated([1], [{}]))  # no ids, no tokenizer
