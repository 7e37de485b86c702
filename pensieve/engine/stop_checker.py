"""Stop sequences over streamed text: find them, and never release a partial match."""

from __future__ import annotations


class StopChecker:
    """Feed text pieces; get back what is safe to show, and the stop string once one matches.

    Text that could still grow into a stop sequence is held back. On a match the text
    before it is released and the stop string itself never is.
    """

    def __init__(self, stop_sequences: tuple[str, ...]) -> None:
        self._stops = tuple(s for s in stop_sequences if s)
        self._held = ""
        self.matched: str | None = None

    def feed(self, text: str) -> str:
        if not self._stops:
            return text
        buf = self._held + text
        hit = self._earliest_match(buf)
        if hit is not None:
            pos, stop = hit
            self.matched = stop
            self._held = ""
            return buf[:pos]
        keep = self._longest_partial_suffix(buf)
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        """Release held-back text when generation ends for another reason."""
        out, self._held = self._held, ""
        return out

    def _earliest_match(self, buf: str) -> tuple[int, str] | None:
        best: tuple[int, str] | None = None
        for stop in self._stops:
            pos = buf.find(stop)
            if pos >= 0 and (best is None or pos < best[0]):
                best = (pos, stop)
        return best

    def _longest_partial_suffix(self, buf: str) -> int:
        longest = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(buf)), longest, -1):
                if buf.endswith(stop[:n]):
                    longest = n
                    break
        return longest
