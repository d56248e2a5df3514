"""Prompt inputs in vLLM's forms -> token ids: a string, a list of token ids, a TextPrompt {"prompt": str} or a
TokensPrompt {"prompt_token_ids": [...]} dict. A dict is never iterated into its keys; unknown keys are an error.

Text is tokenized with a bound: text longer than the context could hold even at the tokenizer's longest token is
judged on a prefix, so a huge prompt is rejected without tokenizing all of it.
"""
from __future__ import annotations

import numbers
from typing import Any, TypedDict

from typing_extensions import NotRequired


class TextPrompt(TypedDict):
    """vLLM's TextPrompt: {"prompt": text}."""
    prompt: str


class TokensPrompt(TypedDict):
    """vLLM's TokensPrompt: {"prompt_token_ids": [...]} (an optional "prompt" text is kept, not re-encoded)."""
    prompt_token_ids: list[int]
    prompt: NotRequired[str]

TEXT_PROMPT_KEYS = {"prompt"}
TOKENS_PROMPT_KEYS = {"prompt_token_ids", "prompt"}  # vLLM lets a TokensPrompt carry its text too (not re-encoded)


class MissingTokenizerError(ValueError):
    pass


def _is_token_list(x: Any) -> bool:
    return isinstance(x, (list, tuple)) and all(isinstance(t, numbers.Integral) and not isinstance(t, bool)
                                                for t in x)


def split_prompt(prompt: Any) -> tuple[str | None, list[int] | None]:
    """(text, token_ids) of one prompt; exactly one is used to build the token ids (token ids win when given)."""
    if isinstance(prompt, str):
        return prompt, None
    if isinstance(prompt, dict):
        keys = set(prompt)
        if "prompt_token_ids" in prompt:
            unknown = keys - TOKENS_PROMPT_KEYS
            if unknown:
                raise ValueError(f"a TokensPrompt dict accepts the keys {sorted(TOKENS_PROMPT_KEYS)}; got unknown "
                                 f"{sorted(map(str, unknown))} (multi-modal inputs are not supported)")
            ids = prompt["prompt_token_ids"]
            if not _is_token_list(ids):
                raise TypeError(f"TokensPrompt['prompt_token_ids'] must be a list of int token ids, got "
                                f"{type(ids).__name__}")
            text = prompt.get("prompt")
            return (text if isinstance(text, str) else None), [int(t) for t in ids]
        if "prompt" in prompt:
            unknown = keys - TEXT_PROMPT_KEYS
            if unknown:
                raise ValueError(f"a TextPrompt dict accepts the key 'prompt'; got unknown "
                                 f"{sorted(map(str, unknown))} (multi-modal inputs are not supported)")
            if not isinstance(prompt["prompt"], str):
                raise TypeError(f"TextPrompt['prompt'] must be a str, got {type(prompt['prompt']).__name__}")
            return prompt["prompt"], None
        raise ValueError(f"a prompt dict needs 'prompt' (TextPrompt) or 'prompt_token_ids' (TokensPrompt); got keys "
                         f"{sorted(map(str, keys))}")
    if _is_token_list(prompt):
        return None, [int(t) for t in prompt]
    raise TypeError(f"a prompt must be a string, a list of int token ids, a TextPrompt {{'prompt': str}} or a "
                    f"TokensPrompt {{'prompt_token_ids': [...]}} dict; got {type(prompt).__name__}")


def max_token_chars(tokenizer) -> int:
    """Longest vocabulary entry in characters: no token decodes to more characters than its vocabulary string
    (byte-level BPE: one character per byte; SentencePiece: the piece itself)."""
    return max((len(t) for t in tokenizer.get_vocab()), default=1) or 1


def encode_bounded(tokenizer, text: str, max_tokens: int, chars_per_token: int) -> list[int]:
    """Token ids of `text` (no special tokens added), or ValueError when it has more than `max_tokens` tokens. Text
    long enough that its first max_tokens * chars_per_token characters alone may already exceed the limit is checked
    on that prefix first, so a huge prompt costs a bounded tokenization."""
    bound = max_tokens * chars_per_token + 16
    if len(text) > bound:
        head = tokenizer.encode(text[:bound], add_special_tokens=False)
        if len(head) > max_tokens:
            raise ValueError(f"prompt text of {len(text)} characters has more than {max_tokens} tokens (its first "
                             f"{bound} characters alone give {len(head)}): at most {max_tokens} prompt tokens fit "
                             f"max_model_len")
    token_ids = tokenizer.encode(text, add_special_tokens=False)
    if len(token_ids) > max_tokens:
        raise ValueError(f"prompt has {len(token_ids)} tokens but at most {max_tokens} prompt tokens fit "
                         f"max_model_len")
    return token_ids
