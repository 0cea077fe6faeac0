"""_ShmWatch.check: called at once by the writer thread, the reader threads and the loop,
and on a file system whose stat may fail now and then."""

from __future__ import annotations

import errno
import os

from chatd.store.sqlite.store import _ShmWatch

KIB = 1024


def _stat_result(size: int) -> os.stat_result:
    # mode, ino, dev, nlink, uid, gid, size, atime, mtime, ctime
    return os.stat_result((0o100600, 7, 3, 1, 0, 0, size, 0, 0, 0))


def test_a_stale_stat_from_another_thread_is_not_a_truncation() -> None:
    """A reader stats the file at 32 KiB; before it compares, the writer sees it grown to
    64 KiB and stores that. The reader's older stat must not read as a truncation."""
    sizes = iter([32 * KIB])  # arm
    reader_inside_stat = False
    watch: _ShmWatch

    def stat(path: str) -> os.stat_result:
        nonlocal reader_inside_stat, sizes
        size = next(sizes)
        if size == 32 * KIB and reader_inside_stat:
            # The "writer" checks while the reader is between its stat and its compare.
            reader_inside_stat = False
            sizes = iter([64 * KIB])
            assert watch.check() is None
            assert watch.size == 64 * KIB
        return _stat_result(size)

    watch = _ShmWatch("/db-shm", stat=stat)
    watch.arm()
    sizes = iter([32 * KIB])
    reader_inside_stat = True
    assert watch.check() is None  # before: "was truncated (65536 to 32768 bytes)"
    assert watch.size == 64 * KIB  # the larger size stays known
    # A real truncation is still seen.
    sizes = iter([16 * KIB])
    assert watch.check() == f"was truncated ({64 * KIB} to {16 * KIB} bytes)"


def test_a_passing_stat_error_is_looked_at_again() -> None:
    results: list[os.stat_result | OSError] = [_stat_result(32 * KIB)]

    def stat(path: str) -> os.stat_result:
        r = results.pop(0)
        if isinstance(r, OSError):
            raise r
        return r

    watch = _ShmWatch("/db-shm", stat=stat)
    watch.arm()
    eio = OSError(errno.EIO, os.strerror(errno.EIO))
    # Two failures, then a good stat: the count starts again.
    results += [eio, eio, _stat_result(32 * KIB), eio, eio]
    assert [watch.check() for _ in range(5)] == [None] * 5  # before: stopped at the first
    # The third failure in a row stops.
    results.append(OSError(errno.ESTALE, os.strerror(errno.ESTALE)))
    what = watch.check()
    assert what is not None and what.startswith("cannot be checked") and "3 times in a row" in what
    # A removed file stops at once.
    results.append(FileNotFoundError(errno.ENOENT, "gone"))
    assert watch.check() == "was removed"
