"""Structured outputs: a request's answer held to a JSON schema, any JSON object, a regular
expression, a choice of strings or an EBNF grammar, by masking the tokens that would leave it.

xgrammar compiles each constraint once (its compiler caches by constraint) into a matcher per
request; each step fills the allowed-token bitmask of every constrained request in the batch in
one call and applies it to their logits rows in place, before sampling (so in a mixed batch the
other requests' rows are untouched). Chosen over llguidance by measurement
(`benchmarks/grammar_masks.py`, docs/architecture.md "Structured outputs"). JSON is compact: no
whitespace between tokens, which small models would otherwise fill without end.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Sequence

import torch

from .errors import InvalidRequestError
from .transfer import to_device
from .types import StructuredOutput


def _xgrammar():
    import xgrammar  # imported on first use: the engine starts without it

    return xgrammar


class Grammars:
    """Compiles constraints for one tokenizer and hands out per-request matchers."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids: Iterable[int]) -> None:
        self._tokenizer, self.vocab_size, self._stop_ids = tokenizer, vocab_size, sorted(stop_ids)
        self._compiler = None
        self._lock = threading.Lock()  # the compiler is built once, by whichever request comes first

    def _get_compiler(self):
        with self._lock:
            if self._compiler is None:
                xgr = _xgrammar()
                info = xgr.TokenizerInfo.from_huggingface(self._tokenizer, vocab_size=self.vocab_size,
                                                          stop_token_ids=self._stop_ids)
                self._compiler = xgr.GrammarCompiler(info, max_threads=1)
            return self._compiler

    def matcher(self, constraint: StructuredOutput):
        """A fresh matcher for `constraint`; InvalidRequestError says what is wrong with it."""
        compiler = self._get_compiler()
        try:
            compiled = self._compile(compiler, constraint)
        except (ValueError, RuntimeError, TypeError) as e:  # xgrammar's errors for bad schemas/grammars
            raise InvalidRequestError(f"sampling.structured: invalid {constraint.kind}: {e}") from None
        return _xgrammar().GrammarMatcher(compiled)

    @staticmethod
    def _compile(compiler, c: StructuredOutput):
        if c.kind == "json_schema":
            return compiler.compile_json_schema(c.value, any_whitespace=False, strict_mode=True)
        if c.kind == "json_object":
            return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
        if c.kind == "regex":
            return compiler.compile_regex(c.value)
        if c.kind == "choice":
            return compiler.compile_grammar("root ::= " + " | ".join(json.dumps(s) for s in c.value))
        return compiler.compile_grammar(c.value)  # "grammar": EBNF (GBNF), root rule `root`


@torch.inference_mode()  # the step's logits are inference tensors
def mask_rows(logits: torch.Tensor, rows: Sequence[int], matchers: Sequence) -> None:
    """Set the logits of tokens each matcher forbids to -inf, in rows `rows` of `logits`, in place."""
    xgr = _xgrammar()
    rows = list(rows)
    bitmask = xgr.allocate_token_bitmask(logits.shape[0], logits.shape[-1])  # row i masks logits row i
    xgr.BatchGrammarMatcher().batch_fill_next_token_bitmask(list(matchers), bitmask, indices=rows)
    xgr.apply_token_bitmask_inplace(logits, to_device(bitmask, logits.device), indices=rows)
