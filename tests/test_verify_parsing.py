"""Formats and parsing over hand-written verifier outputs: right, wrong, missing, malformed, truncated."""
import json

import pytest

from prmkern.verify import CRITIC, FORMATS, GENPRM, THINKPRM, VerifierFormat, get_format, load_formats, parse_output
from prmkern.verify.formats import render_messages

STEPS = ["Add: 2 + 2 = 4.", "Multiply: 4 * 3 = 13.", "So the answer is 13."]


def statuses(parsed):
    return [s.status for s in parsed.steps]


# -- ThinkPRM -----------------------------------------------------------------------------------------------

THINK_RIGHT = (
    "Let's verify step by step:\nStep 1: 2 + 2 = 4 holds. The step is \\boxed{correct}\n"
    "Step 2: 4 * 3 is 12, not 13. The step is \\boxed{incorrect}\n"
    "Step 3: it carries the wrong value. The step is \\boxed{incorrect}\n"
    "Is the solution correct? No"
)


def test_thinkprm_all_steps_judged():
    p = parse_output(THINKPRM, THINK_RIGHT, 3)
    assert statuses(p) == ["correct", "incorrect", "incorrect"]
    assert p.final == "incorrect"
    off = p.steps[0].char_offset
    assert THINK_RIGHT[off:off + len("correct")] == "correct"
    assert THINK_RIGHT[p.steps[1].char_offset:].startswith("incorrect}")
    assert p.counts == {"correct": 1, "incorrect": 2}


def test_thinkprm_missing_malformed_truncated():
    text = ("Step 1: fine. The step is \\boxed{correct}\n"
            "Step 2: hmm. The step is \\boxed{maybe}\n"
            "Step 3: the answer follows. The step is \\boxed{corr")
    p = parse_output("thinkprm", text, 4, finished=False)
    assert statuses(p) == ["correct", "malformed", "truncated", "missing"]
    assert p.final is None and p.steps[2].verdict_text == "corr"


def test_thinkprm_cut_inside_the_boxed_command_and_before_any_verdict():
    p = parse_output("thinkprm", "Step 1: ok. The step is \\boxed{correct}\nStep 2: The step is \\box", 2,
                     finished=False)
    assert statuses(p) == ["correct", "truncated"]
    p = parse_output("thinkprm", "Step 1: ok. The step is \\boxed{correct}\nStep 2: 4 * 3 is", 2, finished=False)
    assert statuses(p) == ["correct", "truncated"]
    # The same text, but generation ended on its own: step 2 was simply never judged.
    p = parse_output("thinkprm", "Step 1: ok. The step is \\boxed{correct}\nStep 2: 4 * 3 is", 2, finished=True)
    assert statuses(p) == ["correct", "missing"]


def test_thinkprm_revisited_step_keeps_the_last_complete_verdict_and_ignores_out_of_range():
    text = ("Step 1: The step is \\boxed{incorrect}\nStep 1: On reflection, The step is \\boxed{correct}\n"
            "Step 7: nothing. The step is \\boxed{correct}\nStep 2: The step is \\boxed{Correct}\n"
            "Is the solution correct? Yes")
    p = parse_output(THINKPRM, text, 2)
    assert statuses(p) == ["correct", "correct"]  # case-insensitive for thinkprm
    assert p.final == "correct"


def test_thinkprm_unclosed_box_in_the_middle_is_malformed():
    text = "Step 1: The step is \\boxed{correct\nStep 2: The step is \\boxed{correct}"
    assert statuses(parse_output(THINKPRM, text, 2)) == ["malformed", "correct"]


# -- GenPRM -------------------------------------------------------------------------------------------------

def genprm_turn(verdict: str, code_output: str = "12") -> str:
    return ("<analyze>\nLet's analyze the Paragraph 2 step by step: 4 * 3 should be 12.\n</analyze>\n"
            "<verify>\nLet's use python code to find any potential error:\n```python\nprint(4 * 3)\n```\n"
            f"[Code Output]\n\n```\n{code_output}\n```\n</verify>\n"
            f"<output>\n**Judgement**: $\\boxed{{{verdict}}}$\n</output>\n")


def test_genprm_turns():
    turns = [genprm_turn("Yes"), genprm_turn("No"), genprm_turn("Maybe")]
    p = parse_output(GENPRM, turns, 3)
    assert statuses(p) == ["correct", "incorrect", "malformed"]
    assert [s.chunk for s in p.steps] == [0, 1, 2]
    t = turns[1]
    assert t[p.steps[1].char_offset:].startswith("No}$")


def test_genprm_missing_truncated_and_case():
    cut = genprm_turn("Yes").split("**Judgement**")[0] + "**Judgement**: $\\boxed{Ye"
    turns = [genprm_turn("yes"), cut, None]
    p = parse_output(GENPRM, turns, 4, finished=[True, False, True])
    # GenPRM is case-sensitive: its verdict tokens are "Yes" and "No".
    assert statuses(p) == ["malformed", "truncated", "missing", "missing"]
    # A turn that ended without any judgement.
    p = parse_output(GENPRM, ["<analyze>\nonly analysis\n</analyze>\n"], 1)
    assert statuses(p) == ["missing"]
    p = parse_output(GENPRM, ["<analyze>\nonly analy"], 1, finished=False)
    assert statuses(p) == ["truncated"]


def test_genprm_code_regex_extracts_the_code():
    import re
    m = re.findall(GENPRM.code_regex, genprm_turn("Yes"), re.DOTALL)  # GenPRM's CodeExecutor: the last block
    assert m[-1].strip() == "print(4 * 3)"
    assert GENPRM.code_output_template.format(output="12") == "[Code Output]\n\n```\n12\n```\n"


# -- ProcessBench critic ---------------------------------------------------------------------------------------

def test_critic_outputs():
    p = parse_output(CRITIC, "Paragraph 1 multiplies wrongly. \\boxed{1}", 3)
    assert p.earliest_error == 1 and statuses(p) == ["correct", "incorrect", "missing"]
    p = parse_output(CRITIC, "All fine. \\boxed{-1}", 3)
    assert p.earliest_error == -1 and statuses(p) == ["correct"] * 3
    assert statuses(parse_output(CRITIC, "no idea", 3)) == ["missing"] * 3
    assert statuses(parse_output(CRITIC, "hmm \\boxed{two}", 3)) == ["malformed"] * 3
    assert statuses(parse_output(CRITIC, "out of range \\boxed{5}", 3)) == ["malformed"] * 3
    assert statuses(parse_output(CRITIC, "so the index is \\boxed{", 3, finished=False)) == ["truncated"] * 3


# -- formats: rendering, registry, config -------------------------------------------------------------------

class ChatTok:
    chat_template = "x"

    eos_token = "</s>"

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        assert not tokenize
        return "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages) + (
            "<assistant>" if add_generation_prompt else "</s>\n")


def test_rendering_through_a_chat_template_and_plain():
    s = THINKPRM.render("What is (2+2)*3?", STEPS, ChatTok())
    assert s.startswith("<user>") and "Step 2: Multiply: 4 * 3 = 13." in s
    assert s.endswith("<assistant>\nLet's verify step by step:")
    plain = THINKPRM.render("What is (2+2)*3?", STEPS)
    assert plain.startswith("user: ") and "Step 3: So the answer is 13." in plain
    c = CRITIC.render("Q", STEPS)
    assert "<paragraph_0>\nAdd: 2 + 2 = 4.\n</paragraph_0>" in c and "\\boxed{}" in c


def test_genprm_conversation_has_one_turn_per_paragraph():
    msgs = GENPRM.messages("What is (2+2)*3?", STEPS, paragraph=2, history=["A1", "A2"])
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert msgs[1]["content"] == "What is (2+2)*3?\nAdd: 2 + 2 = 4."
    assert msgs[-1]["content"] == "So the answer is 13."
    # As GenPRM's build_prompt: no generation prompt, a trailing EOS + "\n" cut, then the forced opener.
    assert GENPRM.render("P", STEPS, ChatTok(), paragraph=2, history=["A1", "A2"]).endswith(
        "<user>So the answer is 13.</user><analyze>\nLet's analyze the Paragraph 3 step by step: ")
    with pytest.raises(ValueError):
        GENPRM.messages("P", STEPS, paragraph=2, history=["only one"])
    with pytest.raises(ValueError):
        GENPRM.messages("P", STEPS, paragraph=3, history=["a", "b", "c"])


def test_tiny_bpe_tokenizer_chat_template_and_verdict_ids(tmp_path):
    tiny = pytest.importorskip("prmkern.tiny")
    from transformers import AutoTokenizer
    tiny.build_tokenizer(str(tmp_path), 2048)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    s = THINKPRM.render("What is 2+2?", ["2+2=4"], tok)
    assert "<|im_start|>user" in s and s.endswith("<|im_start|>assistant\n\nLet's verify step by step:")
    c, i = THINKPRM.verdict_token_ids(tok)
    assert tok.decode([c]) == "correct" and tok.decode([i]).startswith("inc")


def test_registry_and_json_config(tmp_path):
    assert set(FORMATS) >= {"thinkprm", "genprm", "critic"}
    cfg = [{"base": "thinkprm", "name": "thinkprm-short", "generation_prefix": "\nChecking:"},
           {"name": "judge", "kind": "per_step", "user_template": "{problem}\n{solution}",
            "correct_text": "right", "incorrect_text": "wrong", "stop": ["</judge>"]}]
    path = tmp_path / "formats.json"
    path.write_text(json.dumps(cfg))
    loaded = load_formats(path)
    assert [f.name for f in loaded] == ["thinkprm-short", "judge"]
    assert get_format("thinkprm-short").generation_prefix == "\nChecking:"
    assert get_format("thinkprm-short").final_regex == THINKPRM.final_regex
    judge = get_format("judge")
    assert judge.stop == ("</judge>",)
    p = parse_output(judge, "Step 1: The step is \\boxed{right}\nStep 2: The step is \\boxed{wrong}", 2)
    assert statuses(p) == ["correct", "incorrect"]
    with pytest.raises(ValueError):
        load_formats(path)  # already registered
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "x", "kind": "per_step", "user_template": "", "colour": "red"}))
    with pytest.raises(ValueError, match="colour"):
        load_formats(bad)
    for name in ("thinkprm-short", "judge"):
        FORMATS.pop(name)


def test_bad_inputs():
    with pytest.raises(ValueError):
        VerifierFormat(name="x", kind="sideways", user_template="")
    with pytest.raises(ValueError):
        VerifierFormat(name="x", kind="per_step", user_template="", correct_text="a", incorrect_text="a")
    with pytest.raises(ValueError):
        get_format("nope")
    with pytest.raises(TypeError):
        parse_output(THINKPRM, ["list"], 1)
    with pytest.raises(TypeError):
        parse_output(GENPRM, "one string", 1)
    with pytest.raises(ValueError):
        parse_output(THINKPRM, "x", 0)
    with pytest.raises(TypeError):
        THINKPRM.render("p", "not a list")
    with pytest.raises(ValueError):
        THINKPRM.messages("p", [])
    assert render_messages([{"role": "user", "content": "hi"}]) == "user: hi\n\nassistant: "
