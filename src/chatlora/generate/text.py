"""Token ids -> text deltas, one token at a time, cut at stop strings: the one incremental
detokenizer, used by chat's streamed replies and by every row of the engine (serve, web).

Decoding each new token alone is wrong for most tokenizers (SentencePiece drops the leading space,
a multi-byte character spans several byte tokens), so new text is the difference between decoding
a short window with and without the newest tokens, as text-generation-inference does: time linear
in the reply's length. Text that ends inside a multi-byte character (a byte-level token can hold half
of a Chinese character's UTF-8 bytes, which decodes to U+FFFD) waits for the rest, and text that
could still turn out to be the start of a stop string is held back until it cannot. Leading
whitespace is dropped, as in Reply.text.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"  # what decode gives for an incomplete UTF-8 sequence: wait for more tokens


class TextStream:
    """Feeds generated token ids, hands out the text that is safe to show."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.prefix = 0  # the window decoded for context starts here...
        self.read = 0  # ...and the text of tokens before this index is already in self.text
        self.text = ""
        """Decoded text so far, leading whitespace removed (replies start with the first visible character)."""
        self.sent = 0
        """Characters of self.text already handed out."""
        self.stopped = False
        """A stop string was found; self.text ends before it."""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        """Add one token; returns the text that became safe to show (often "")."""
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith(REPLACEMENT):
            new = after[len(before) :]
            self.prefix, self.read = self.read, len(self.ids)
            self.text = (self.text + new).lstrip() if not self.text else self.text + new
        return self._release(final=False)

    def finish(self) -> str:
        """The reply ended (stop token or length): hand out whatever was held back."""
        if self.read < len(self.ids) and not self.stopped:  # an unfinished character at the very end
            tail = self._decode(self.ids[self.prefix :])[len(self._decode(self.ids[self.prefix : self.read])) :]
            self.text = (self.text + tail).lstrip() if not self.text else self.text + tail
            self.read = len(self.ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        if self.stop:
            # A stop string can only begin in text not yet handed out, or in the held-back tail of it.
            start = max(0, self.sent - max(map(len, self.stop)) + 1)
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True
                return self._take(len(self.text))
        safe = len(self.text) if final else len(self.text) - self._held_back()
        return self._take(safe)

    def _held_back(self) -> int:
        """Length of the longest end of the text that is the start of a stop string."""
        longest = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), longest, -1):
                if self.text.endswith(s[:k]):
                    longest = k
                    break
        return longest

    def _take(self, upto: int) -> str:
        upto = max(upto, self.sent)
        out = self.text[self.sent : upto]
        self.sent = upto
        return out
