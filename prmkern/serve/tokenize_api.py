"""vLLM's utility routes: /ping, /version, /tokenize and /detokenize, with vLLM's request and response shapes.

/tokenize takes a completion-style `prompt` or chat `messages` (rendered by the chat template, as /v1/chat/completions
renders them) and answers {count, max_model_len, tokens[, token_strs]}; /detokenize takes {tokens} and answers
{prompt}. They run in a worker thread (a prompt of a megabyte, under --max-request-bytes, takes seconds to tokenize:
not on the event loop, which would stall every other client), not the engine.
"""
from __future__ import annotations

from typing import Any

from pydantic import Field, StrictBool, StrictInt, StrictStr

from prmkern import __version__
from prmkern.serve.protocol import BadRequest, ChatMessage, _Request


class TokenizeRequest(_Request):
    model: StrictStr | None = None
    prompt: StrictStr | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: StrictBool = True
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False
    return_token_strs: StrictBool = False


class DetokenizeRequest(_Request):
    model: StrictStr | None = None
    tokens: list[StrictInt] = Field(min_length=0)


def version() -> dict[str, str]:
    return {"version": __version__}


def tokenize(state: Any, req: TokenizeRequest) -> dict[str, Any]:
    tok = _tokenizer(state)
    if (req.prompt is None) == (req.messages is None):
        raise BadRequest("give exactly one of prompt (a string) or messages (a chat)", "prompt")
    if req.prompt is not None:
        ids = tok.encode(req.prompt, add_special_tokens=req.add_special_tokens)
    else:
        if not (state.chat_template or getattr(tok, "chat_template", None)):
            raise BadRequest("this model has no chat template; accepted: prompt", "messages")
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            text = tok.apply_chat_template(messages, tokenize=False, chat_template=state.chat_template,
                                           add_generation_prompt=req.add_generation_prompt,
                                           continue_final_message=req.continue_final_message)
        except Exception as e:  # noqa: BLE001 - a template that rejects these messages: the client's
            raise BadRequest(f"the chat template rejected these messages: {e}", "messages") from e
        ids = tok.encode(text, add_special_tokens=False)
    out: dict[str, Any] = {"count": len(ids), "max_model_len": state.max_model_len, "tokens": ids}
    if req.return_token_strs:
        out["token_strs"] = tok.convert_ids_to_tokens(ids)
    return out


def detokenize(state: Any, req: DetokenizeRequest) -> dict[str, str]:
    tok = _tokenizer(state)
    bad = [t for t in req.tokens if not 0 <= t < state.vocab_size]
    if bad:
        raise BadRequest(f"tokens has ids {bad[:5]} outside this model's vocabulary; accepted: ids in "
                         f"[0, {state.vocab_size})", "tokens")
    return {"prompt": tok.decode(req.tokens)}


def _tokenizer(state: Any) -> Any:
    if state.tokenizer is None:
        raise BadRequest("this model has no tokenizer", None)
    return state.tokenizer
