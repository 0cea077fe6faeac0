"""Line splitting with a discard mode (wire contract, "Framing"; protocol.md Limits, input memory).

Bytes are pushed in as they arrive and frames are taken out one at a time, only when the
connection is ready to run one: nothing is split ahead of need, so a read chunk full of
tiny frames costs the chunk's bytes, not one object per frame (issue 13, item 3).

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
    """``push`` bytes, take complete lines (without terminator) or ``TOO_LARGE`` with
    ``next``; ``feed`` does both at once.

    Blank lines are dropped. A trailing ``\\r`` is stripped (CRLF tolerated). What is
    left in the buffer at EOF is a partial frame and is simply never returned.

    A reader may do ``push``'s usual case itself (chatd.connection does, per read chunk):
    while ``buf`` is empty and not ``discarding``, a ``bytes`` chunk may be stored as
    ``buf`` unchanged.

    Memory: the unconsumed bytes pushed so far. A reader that calls ``next`` until it
    returns None after every ``push`` (or stops reading while frames remain) holds at most
    one partial line (≤ max_frame + 1 bytes) plus one pushed chunk.
    """

    __slots__ = ("_pos", "_scan", "buf", "discarding", "max_frame", "work")

    def __init__(self, max_frame: int) -> None:
        self.max_frame = max_frame
        # The read chunk itself while it is being consumed (no copy), a bytearray only
        # while a partial line grows across reads; b"" exactly when nothing is buffered
        # (so a reader's loop can test it instead of calling ``next`` once more).
        self.buf: bytes | bytearray = b""
        self._pos = 0  # the first byte not yet returned
        # Bytes before _scan hold no newline: a line that arrives a byte at a time is
        # searched once, so it costs O(n), not O(n²) (h11's lesson).
        self._scan = 0
        self.discarding = False
        # Bytes searched so far: tests count it to show the splitter is linear.
        self.work = 0

    @property
    def buffered(self) -> int:
        """Bytes pushed and not yet returned (complete frames and a partial line)."""
        return len(self.buf) - self._pos

    def clear(self) -> None:
        """Forget everything buffered (the connection is gone: its input is freed)."""
        self.buf = b""
        self._pos = self._scan = 0
        self.discarding = False

    def push(self, data: bytes) -> None:
        buf = self.buf
        if not buf and type(data) is bytes and not self.discarding:
            self.buf = data  # nothing left over (the usual case): work on the chunk itself
            return
        if self.discarding:
            nl = data.find(b"\n")
            self.work += len(data) if nl < 0 else nl + 1
            if nl < 0:
                return
            self.discarding = False
            data = data[nl + 1 :]
        if type(data) is not bytes:
            data = bytes(data)  # kept as is below: never a buffer the caller reuses
        if not buf:
            self.buf = data
            return
        # Consumed bytes go before new ones come in; what is left is a partial line or
        # frames not yet taken, and grows in a bytearray (appending is amortized O(1)).
        pos = self._pos
        if isinstance(buf, bytes):
            buf = self.buf = bytearray(memoryview(buf)[pos:])
        elif pos:
            del buf[:pos]  # cheap in CPython: the start moves, nothing is copied
        self._scan -= pos
        self._pos = 0
        buf += data

    def next(self) -> bytes | _TooLarge | None:
        """The next complete frame, TOO_LARGE once for an over-long line, or None when
        no complete frame is buffered."""
        # Invariant: ``buf`` is b"" (and _pos, _scan are 0) exactly when every byte pushed
        # was taken; otherwise _pos < len(buf).
        while True:
            buf = self.buf
            if not buf:
                return None  # drained
            pos = self._pos
            start = self._scan  # never before pos
            nl = buf.find(b"\n", start)
            if nl < 0:
                end = len(buf)
                self.work += end - start
                if end - pos > self.max_frame + 1:  # max_frame bytes and a "\r" may wait
                    self.clear()
                    self.discarding = True
                    return TOO_LARGE
                self._scan = end
                return None
            end = nl + 1
            self.work += end - start
            if end == len(buf):  # the last byte: let the read chunk go
                self.buf = b""
                if pos:
                    self._pos = self._scan = 0
                elif start:
                    self._scan = 0
            else:
                self._pos = self._scan = end
            if buf[nl - 1] == 13 and nl > pos:  # (the usual byte there is "}": one test)
                nl -= 1  # CRLF tolerated
            if nl > pos:
                if nl - pos > self.max_frame:
                    return TOO_LARGE
                line = buf[pos:nl]
                if line[0] == 123 or not line.isspace():  # "{": the usual frame
                    return line if type(line) is bytes else bytes(line)

    def feed(self, data: bytes) -> list[bytes | _TooLarge]:
        """Push ``data`` and take every complete frame it finishes."""
        self.push(data)
        out: list[bytes | _TooLarge] = []
        while (item := self.next()) is not None:
            out.append(item)
        return out
