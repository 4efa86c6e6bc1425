"""Incremental detokenisation with stop strings.

Text is emitted only once it decodes cleanly: byte-level BPE splits multi-byte
characters over several tokens, and a partial character decodes to U+FFFD, so we
wait until the decoded tail no longer ends with it. Stop strings are matched on
the text, across token boundaries: any tail that could still become a stop string
is held back, and the stop string itself is never emitted.
"""

from __future__ import annotations

from collections.abc import Sequence

REPLACEMENT = "\ufffd"


class IncrementalDecoder:
    """Token ids in, newly completed text out (the prefix/read offset scheme of TGI and vLLM).

    Two `tokenizer.decode` calls per token in Python: the reference, and the path for slow
    (Python-only) tokenizers. `incremental_decoder` picks the Rust tokenizer's own stream when
    there is one: the same text per token (tests/runtime/test_text.py) at ~1/8 of the host time.
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # start of the window decoded for context
        self._read = 0  # end of the text already emitted

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if len(after) > len(before) and not after.endswith(REPLACEMENT):
            self._prefix, self._read = self._read, len(self.ids)
            return after[len(before):]
        return ""


class RustStreamDecoder:
    """`tokenizers`' DecodeStream over a fast tokenizer's Rust backend: one call per token, the
    same buffering of partial characters, special tokens skipped."""

    def __init__(self, backend) -> None:
        from tokenizers.decoders import DecodeStream

        self._backend = backend
        self._stream = DecodeStream(skip_special_tokens=True)

    def add(self, token_id: int) -> str:
        return self._stream.step(self._backend, token_id) or ""


def incremental_decoder(tokenizer) -> IncrementalDecoder | RustStreamDecoder:
    """The fastest decoder `tokenizer` allows."""
    backend = getattr(tokenizer, "_tokenizer", None)  # a fast tokenizer's `tokenizers.Tokenizer`
    try:
        return RustStreamDecoder(backend) if backend is not None else IncrementalDecoder(tokenizer)
    except ImportError:  # a tokenizers release without DecodeStream
        return IncrementalDecoder(tokenizer)


class StopMatcher:
    """Cuts streamed text at the first stop string; holds back possible stop-string prefixes."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self._pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Text that can be emitted now (never part of a stop string)."""
        if self.stopped:
            return ""
        buf = self._pending + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            self._pending = ""
            return buf[:min(hits)]
        keep = self._held_back(buf)
        self._pending = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep]

    def _held_back(self, buf: str) -> int:
        """Length of the longest tail of `buf` that is a proper prefix of some stop string."""
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(buf)), best, -1):
                if buf.endswith(stop[:n]):
                    best = n
                    break
        return best

    def flush(self) -> str:
        """At the end of generation, what was held back is ordinary text."""
        out, self._pending = self._pending, ""
        return "" if self.stopped else out


class TextStream:
    """One request's output text: decoder + stop matcher."""

    def __init__(self, tokenizer, stops: Sequence[str]) -> None:
        self.decoder = incremental_decoder(tokenizer)
        self.matcher = StopMatcher(stops)
        self.text = ""

    def add(self, token_id: int) -> str:
        out = self.matcher.feed(self.decoder.add(token_id))
        self.text += out
        return out

    @property
    def stopped(self) -> bool:
        return self.matcher.stopped

    def finish(self) -> str:
        out = self.matcher.flush()
        self.text += out
        return out
