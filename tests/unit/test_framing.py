"""LineSplitter without sockets (wire contract, "Framing"; limits.md, input memory)."""

from __future__ import annotations

import itertools

import pytest

from chatd.protocol.framing import TOO_LARGE, LineSplitter

MAX = 65_536


def feed_all(sp: LineSplitter, chunks: list[bytes]) -> list[object]:
    out: list[object] = []
    for chunk in chunks:
        out.extend(sp.feed(chunk))
    return out


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def test_lines_come_back_without_terminator() -> None:
    sp = LineSplitter(MAX)
    assert sp.feed(b'{"cmd":"ping"}\n{"cmd":"help"}\n') == [b'{"cmd":"ping"}', b'{"cmd":"help"}']
    assert sp.buffered == 0


def test_crlf_is_accepted() -> None:
    sp = LineSplitter(MAX)
    assert sp.feed(b"a\r\nb\r\n") == [b"a", b"b"]


def test_crlf_split_between_feeds() -> None:
    sp = LineSplitter(MAX)
    assert sp.feed(b"abc\r") == []
    assert sp.feed(b"\ndef") == [b"abc"]
    assert sp.feed(b"\r\n") == [b"def"]


def test_blank_and_whitespace_lines_are_ignored() -> None:
    sp = LineSplitter(MAX)
    assert sp.feed(b"\n\r\n   \n\t \r\nx\n \n") == [b"x"]


def test_a_partial_line_is_kept_until_its_newline() -> None:
    sp = LineSplitter(MAX)
    assert sp.feed(b'{"cmd":') == []
    assert sp.buffered == 7
    assert sp.feed(b'"ping"}') == []
    assert sp.feed(b"\n") == [b'{"cmd":"ping"}']
    assert sp.buffered == 0


def test_a_partial_line_is_never_returned() -> None:
    # What is left at EOF is never handed out; nothing flushes it.
    sp = LineSplitter(MAX)
    assert sp.feed(b'{"cmd":"login","user":"ghost"}') == []
    assert not hasattr(sp, "flush") and not hasattr(sp, "close")


@pytest.mark.parametrize("terminator", [b"\n", b"\r\n"])
def test_line_of_exactly_max_frame_is_accepted(terminator: bytes) -> None:
    line = b"x" * MAX
    assert LineSplitter(MAX).feed(line + terminator) == [line]
    assert feed_all(LineSplitter(MAX), [line[:1000], line[1000:], terminator]) == [line]
    # Byte by byte, "\r" included: max_frame plus a pending "\r" is not yet too large.
    assert feed_all(LineSplitter(MAX), bytewise(line + terminator)) == [line]


@pytest.mark.parametrize("terminator", [b"\n", b"\r\n"])
def test_line_of_max_frame_plus_one_is_too_large(terminator: bytes) -> None:
    line = b"x" * (MAX + 1)
    assert LineSplitter(MAX).feed(line + terminator + b"ok\n") == [TOO_LARGE, b"ok"]
    sp = LineSplitter(MAX)
    assert feed_all(sp, [line, terminator, b"ok\n"]) == [TOO_LARGE, b"ok"]
    sp = LineSplitter(MAX)
    assert feed_all(sp, [*bytewise(line + terminator), b"ok\n"]) == [TOO_LARGE, b"ok"]


def test_small_max_frame_boundaries() -> None:
    sp = LineSplitter(4)
    assert sp.feed(b"abcd\nabcde\nab\r\nabcd\r\n") == [b"abcd", TOO_LARGE, b"ab", b"abcd"]
    # "abcd\r" then more than a "\n": the line is too long after all.
    assert feed_all(sp, [b"abcd\r", b"x\n", b"y\n"]) == [TOO_LARGE, b"y"]


_SIZES = [1, 2, 3, 7, 1000, 4095, 65_535, 65_536, 65_537, 1 << 20, 1, 1]


def _long_line_chunks(total: int, sizes: list[int]) -> list[bytes]:
    # The tail of the line looks like a command: it must never come out.
    body = b'{"cmd":"ping","pad":"' + b"x" * total + b'"}{"cmd":"msg.send","text":"smuggled"}'
    chunks = []
    pos = 0
    for size in itertools.cycle(sizes):
        if pos >= len(body):
            break
        chunks.append(body[pos : pos + size])
        pos += size
    return chunks


@pytest.mark.parametrize(
    "sizes", [_SIZES, [1 << 20], [65_537], [4096, 1]], ids=["mixed", "1MiB", "65537", "4096+1"]
)
def test_ten_megabyte_line_keeps_memory_bounded_and_never_yields_its_tail(
    sizes: list[int],
) -> None:
    sp = LineSplitter(MAX)
    out: list[object] = []
    chunks = _long_line_chunks(10 * 1024 * 1024, sizes)
    for chunk in chunks:
        out.extend(sp.feed(chunk))
        # Input memory per connection: at most max frame (plus a "\r") once a feed returns.
        assert sp.buffered <= MAX + 1
    assert out == [TOO_LARGE]
    # Discard mode ends at the newline; the next line is served normally.
    assert sp.feed(b'\n{"cmd":"ping","id":"after"}\n') == [b'{"cmd":"ping","id":"after"}']
    assert sp.buffered == 0


def test_discard_mode_ends_at_the_newline_in_the_same_chunk() -> None:
    sp = LineSplitter(8)
    assert sp.feed(b"0123456789") == [TOO_LARGE]
    assert sp.feed(b"more junk") == []
    assert sp.feed(b"still junk\nnext\n") == [b"next"]
    assert sp.feed(b"again\n") == [b"again"]


def test_discard_mode_byte_by_byte() -> None:
    sp = LineSplitter(8)
    out = feed_all(sp, bytewise(b"x" * 100 + b'{"cmd":"ping"}\n' + b"ok\n"))
    assert out == [TOO_LARGE, b"ok"]


def test_too_large_is_reported_once_per_line() -> None:
    sp = LineSplitter(8)
    out = feed_all(sp, [b"x" * 20, b"x" * 20, b"x" * 20, b"\n", b"y" * 9 + b"\n", b"z\n"])
    assert out == [TOO_LARGE, TOO_LARGE, b"z"]


def test_too_large_in_one_chunk_does_not_discard_the_next_line() -> None:
    sp = LineSplitter(8)
    assert sp.feed(b"x" * 50 + b"\nok\n") == [TOO_LARGE, b"ok"]


# Linearity is counted, not timed (STYLE 14): `work` is the bytes the splitter searched.
# A splitter that rescans its buffer on every byte does ~n²/2 of it (2 GB for 64 KiB).


def test_sixty_four_kib_line_fed_byte_by_byte_is_searched_once() -> None:
    line = b"x" * MAX
    chunks = bytewise(line + b"\n")
    sp = LineSplitter(MAX)
    out = feed_all(sp, chunks)
    assert out == [line]
    assert sp.work <= len(line) + 1


def test_long_discarded_line_byte_by_byte_is_searched_once() -> None:
    sp = LineSplitter(1024)
    data = b"x" * 200_000 + b"\nok\n"
    out = feed_all(sp, bytewise(data))
    assert out == [TOO_LARGE, b"ok"]
    assert sp.work <= len(data)


def test_lines_straddling_chunks_are_searched_once() -> None:
    sp = LineSplitter(MAX)
    # Each chunk ends one line and starts the next: consumed bytes are dropped as new
    # ones arrive, and the partial line is never searched twice.
    data = b"".join(b'{"cmd":"ping","id":%d}\n' % i for i in range(5000))
    out = feed_all(sp, [data[i : i + 7] for i in range(0, len(data), 7)])
    assert len(out) == 5000 and out[-1] == b'{"cmd":"ping","id":4999}'
    assert sp.work <= len(data)
    assert sp.buffered == 0


def test_frames_are_split_out_only_when_taken() -> None:
    # Issue 13, item 3: a read chunk of tiny frames must not become one object per frame
    # before the connection is ready to run them.
    sp = LineSplitter(MAX)
    chunk = b"{}\n" * 87_381  # one 256 KiB read
    sp.push(chunk)
    assert sp.work == 0 and sp.buffered == len(chunk)
    assert sp.next() == b"{}" and sp.work == 3
    assert sp.next() == b"{}" and sp.work == 6
    assert sp.buffered == len(chunk) - 6
    taken = 2
    while sp.next() is not None:
        taken += 1
    assert taken == 87_381 and sp.buffered == 0 and sp.work == len(chunk)


def test_pushing_after_taking_keeps_only_what_is_left() -> None:
    sp = LineSplitter(MAX)
    sp.push(b"a\nb\nc")
    assert sp.next() == b"a"
    sp.push(b"d\ne")  # "a\n" is gone before "d\ne" comes in
    assert sp.buffered == len(b"b\ncd\ne")
    assert [sp.next(), sp.next(), sp.next()] == [b"b", b"cd", None]
    assert sp.buffered == 1


def test_clear_forgets_frames_and_discard_mode() -> None:
    sp = LineSplitter(8)
    sp.push(b"one\ntwo\n" + b"x" * 20)
    assert sp.next() == b"one"
    sp.clear()
    assert sp.buffered == 0 and sp.next() is None
    assert sp.feed(b"x" * 20) == [TOO_LARGE]
    sp.clear()  # a discarded line's tail is not waited for after clear
    assert sp.feed(b"ok\n") == [b"ok"]
