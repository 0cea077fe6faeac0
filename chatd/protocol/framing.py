"""Line splitting with a discard mode (wire contract, "Framing").

A line longer than ``max_frame`` bytes (terminator not counted) is reported once as
``TOO_LARGE`` and the rest of it is dropped as it arrives, so memory never grows with
the length of a line and the tail of a long line is never taken for a new frame.
"""

from __future__ import annotations

from typing import Final


class _TooLarge:
    __slots__ = ()

    def __repr__(self) -> str:
        return "TOO_LARGE"


TOO_LARGE: Final = _TooLarge()


class LineSplitter:
    """Feed bytes, get back complete lines (without terminator) or ``TOO_LARGE``.

    Blank lines are dropped. A trailing ``\\r`` is stripped (CRLF tolerated). What is
    left in the buffer at EOF is a partial frame and is simply never returned.
    """

    __slots__ = ("_buf", "_discarding", "max_frame")

    def __init__(self, max_frame: int) -> None:
        self.max_frame = max_frame
        # Only the unfinished line is kept; new data is searched, never the old, so a
        # line that arrives a byte at a time still costs O(n).
        self._buf = bytearray()
        self._discarding = False

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes | _TooLarge]:
        out: list[bytes | _TooLarge] = []
        nl = data.find(b"\n")
        if self._discarding:
            if nl < 0:
                return out
            self._discarding = False
            data = data[nl + 1 :]
            nl = data.find(b"\n")
        if self._buf:
            if nl < 0:
                self._buf += data
                self._check_tail(self._buf, out)
                return out
            first = bytes(self._buf) + data[:nl]
            self._buf.clear()
            self._emit(first, out)
            data = data[nl + 1 :]
        parts = data.split(b"\n")
        tail = parts.pop()
        for line in parts:
            self._emit(line, out)
        if tail:
            self._buf += tail
            self._check_tail(self._buf, out)
        return out

    def _emit(self, line: bytes, out: list[bytes | _TooLarge]) -> None:
        n = len(line)
        if n and line[-1] == 13:  # CRLF tolerated
            line = line[:-1]
            n -= 1
        if n > self.max_frame:
            out.append(TOO_LARGE)
        elif n and not line.isspace():
            out.append(line)

    def _check_tail(self, buf: bytearray, out: list[bytes | _TooLarge]) -> None:
        # max_frame bytes of content plus a "\r" may still be waiting for the "\n".
        if len(buf) > self.max_frame + 1:
            buf.clear()
            out.append(TOO_LARGE)
            self._discarding = True
