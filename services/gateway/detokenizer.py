"""Incremental detokenization with stop strings, one request at a time.

Decoding the whole output every token is quadratic, so text is decoded from a short window
(`prefix_offset`..end) and the new part is what extends the window's previous text (the vLLM
method). Text that could still become a stop string, or an incomplete UTF-8 character (decoded as
U+FFFD), is held back until the next token decides it.
"""
from __future__ import annotations


class Detokenizer:
    def __init__(self, tokenizer, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.token_ids: list[int] = []
        self.text = ""                 # decoded so far (may end with held-back text)
        self.emitted = 0               # characters of `text` already returned
        self._prefix_offset = 0
        self._read_offset = 0
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token_ids: tuple[int, ...] | list[int], final: bool = False) -> str:
        """New text to send for these tokens (everything left, on the final call)."""
        for token in token_ids:
            self.token_ids.append(token)
            prefix = self._decode(self.token_ids[self._prefix_offset:self._read_offset])
            window = self._decode(self.token_ids[self._prefix_offset:])
            if len(window) > len(prefix) and not window.endswith("\ufffd"):
                self.text += window[len(prefix):]
                self._prefix_offset, self._read_offset = self._read_offset, len(self.token_ids)
        if final and self._read_offset < len(self.token_ids):
            self.text += self._decode(self.token_ids[self._prefix_offset:])[
                len(self._decode(self.token_ids[self._prefix_offset:self._read_offset])):]
            self._read_offset = len(self.token_ids)
        return self._release(final)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        limit = len(self.text)
        for s in self.stop:
            at = self.text.find(s, max(0, self.emitted - len(s) + 1))
            if at != -1 and at < limit:
                limit, self.stopped = at, True
        if not self.stopped and not final and self.stop:
            hold = max(len(s) for s in self.stop) - 1
            limit = max(self.emitted, len(self.text) - hold)
        out = self.text[self.emitted:limit]
        self.emitted = limit
        return out
