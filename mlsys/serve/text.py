"""Token ids → text while they are generated: what may be sent so far, and where a stop string ends it.

The whole continuation is decoded again at every token (a few hundred tokens at most: microseconds) because a token
alone need not be valid text: byte-level BPE splits a character's UTF-8 bytes over tokens, and the decoder shows
an unfinished one as U+FFFD. Text that could still become a stop string, or an unfinished character, is held back
until the next token settles it, so a streamed client never receives text that the final answer does not have."""


class TextStream:
    def __init__(self, decode, stop: tuple[str, ...] = ()):
        self.decode, self.stop = decode, stop
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already handed out
        self.text = ""  # the final text once stopped

    def push(self, token: int) -> tuple[str, bool]:
        """Add one token; returns (new text to send, whether a stop string was reached)."""
        self.ids.append(token)
        full = self.decode(self.ids)
        if self.stop:
            start = max(0, self.sent - max(map(len, self.stop)))  # a stop string may straddle what was sent
            hits = [i for i in (full.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                end = min(hits)
                delta = full[self.sent:end] if end > self.sent else ""
                self.text, self.sent = full[:max(end, self.sent)], max(end, self.sent)
                return delta, True
        safe = len(full) - self._held(full)
        delta = full[self.sent:safe] if safe > self.sent else ""
        self.sent = max(self.sent, safe)
        self.text = full
        return delta, False

    def finish(self) -> str:
        """The text not sent yet once generation ended without a stop string (what was held back)."""
        full = self.decode(self.ids)
        delta, self.sent, self.text = full[self.sent:], len(full), full
        return delta

    def _held(self, full: str) -> int:
        """Characters at the end that must wait: an unfinished character, or a prefix of a stop string."""
        held = len(full) - len(full.rstrip("\ufffd"))
        for s in self.stop:
            for n in range(min(len(s) - 1, len(full)), 0, -1):
                if full.endswith(s[:n]):
                    held = max(held, n)
                    break
        return held
