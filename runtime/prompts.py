"""Request validation and prompt -> token ids (raw prompt, chat messages or ids)."""

from __future__ import annotations

from jinja2 import TemplateError

from . import tool_calls
from .errors import InvalidRequestError
from .sampling import check_token_ids, validate_sampling
from .types import GenerationRequest

CHAT_ROLES = ("system", "user", "assistant", "tool")


class PromptEncoder:
    """Turns a GenerationRequest into prompt token ids, or raises InvalidRequestError naming the field."""

    def __init__(self, tokenizer, vocab_size: int, max_prompt_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_prompt_tokens = max_prompt_tokens
        self.longest_token = max((len(token) for token in tokenizer.get_vocab()), default=1)
        # No token covers more characters than its vocabulary string has (byte-level BPE and
        # SentencePiece tokens spell at least the bytes they stand for), so a longer text cannot
        # fit, whatever it says; four times that, so that a normalizer folding characters (NFKC,
        # accents) can never get a fitting text refused.
        self.max_chars = 4 * self.longest_token * max_prompt_tokens
        self.renders_tools = tool_calls.renders_tools(getattr(tokenizer, "chat_template", None))

    def encode(self, req: GenerationRequest) -> list[int]:
        validate_sampling(req.sampling)
        check_token_ids(req.sampling, self.vocab_size)
        tool_calls.check(req)
        given = [name for name, value in (("prompt", req.prompt), ("messages", req.messages),
                                          ("prompt_token_ids", req.prompt_token_ids))
                 if value is not None and value != ()]
        if len(given) != 1:
            raise InvalidRequestError(
                "prompt: give exactly one of prompt, messages, prompt_token_ids"
                + (f" (got {', '.join(given)})" if given else " (got none)")
            )
        chars = (len(req.prompt or "") + sum(len(m.content) for m in req.messages or () if isinstance(m.content, str))
                 + sum(len(c.arguments) for m in req.messages for c in m.tool_calls)
                 + sum(len(t.description) + len(t.parameters) for t in req.tools))
        if chars > self.max_chars:  # refused before tokenizing: a huge text costs seconds to tokenize
            raise InvalidRequestError(
                f"prompt: {chars} characters cannot fit max_prompt_tokens={self.max_prompt_tokens} "
                f"(no token of this tokenizer spells more than {self.longest_token} characters)")
        if req.prompt is not None:
            if not req.prompt:
                raise InvalidRequestError("prompt: must not be empty")
            ids = list(self.tokenizer.encode(req.prompt))
        elif req.messages:
            ids = self._chat_ids(req)
        else:
            ids = list(req.prompt_token_ids or ())
            bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < self.vocab_size]
            if bad:
                raise InvalidRequestError(
                    f"prompt_token_ids: {bad[:5]} not in the vocabulary [0, {self.vocab_size})"
                )
        if not ids:
            raise InvalidRequestError("prompt: encodes to zero tokens")
        if len(ids) > self.max_prompt_tokens:
            raise InvalidRequestError(
                f"prompt: {len(ids)} tokens exceeds max_prompt_tokens={self.max_prompt_tokens}"
            )
        return ids

    def _chat_ids(self, req: GenerationRequest) -> list[int]:
        for i, m in enumerate(req.messages):
            if m.role not in CHAT_ROLES:
                raise InvalidRequestError(
                    f"messages[{i}].role: {m.role!r} is not one of {', '.join(CHAT_ROLES)}"
                )
            if not isinstance(m.content, str):
                raise InvalidRequestError(f"messages[{i}].content: must be a string")
            if m.tool_calls and m.role != "assistant":
                raise InvalidRequestError(f"messages[{i}].tool_calls: only an assistant's message calls tools")
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequestError("messages: the base model has no chat template; send a raw prompt instead")
        messages, tools = tool_calls.template_inputs(req.messages, req.tools, self.renders_tools)
        try:
            text = self.tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                                      add_generation_prompt=True)
        except TemplateError as e:  # the template's own checks (raise_exception): role order, tool ids
            raise InvalidRequestError(f"messages: the base's chat template refused them: {e}") from None
        return list(self.tokenizer.encode(text, add_special_tokens=False))
