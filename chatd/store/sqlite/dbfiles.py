"""The files that make up one SQLite database, known by what they are, not how they are spelled.

A database named ``chatd.db`` is also ``./chatd.db``, ``//dir/chatd.db``, a symlink to it,
a path through a symlinked directory, or a hard link: any of these spellings must count as
the same database. So identity here is the real path (``os.path.realpath``) *and* the inode
(``os.stat``), never the ``--db`` string (issue: a backup renamed over the live database
under another spelling destroyed it; a second server through a link ran beside the first).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat

# Every file SQLite and chatd keep beside the database (SQLite: WAL, shared memory, rollback
# journal; chatd: the server's lock and the secret).
SIDECARS = ("", "-wal", "-shm", "-journal", ".lock", ".secret")


class DatabaseFileError(Exception):
    """A file operation on the database was refused; the message says why, for an operator."""


def _names(db: str) -> set[str]:
    """Every absolute name by which the database or one of its sidecars can be reached:
    beside the path as given and beside the file it resolves to (SQLite names its WAL
    after the resolved file)."""
    bases = {os.path.abspath(db), os.path.realpath(db)}
    return {os.path.realpath(base + suffix) for base in bases for suffix in SIDECARS}


def _identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _slot(path: str) -> tuple[tuple[int, int], str] | None:
    """The (directory inode, file name) a path names, whether the file exists or not: two
    spellings of a name in one directory (a bind mount, a hard-linked parent) agree on it."""
    directory = _identity(os.path.dirname(os.path.abspath(path)) or ".")
    return None if directory is None else (directory, os.path.basename(path))


def is_part_of(db: str, target: str) -> bool:
    """Whether writing ``target`` would write the database ``db`` or one of its sidecars,
    however either is spelled: the same real path, the same inode, or the same name in
    the same directory (checked through the target's directory when it does not exist)."""
    target_real = os.path.realpath(target)
    names = _names(db)
    if target_real in names:
        return True
    target_id = _identity(target_real)
    target_slot = _slot(target_real)
    for name in names:
        if target_id is not None and _identity(name) == target_id:
            return True
        if target_slot is not None and _slot(name) == target_slot:
            return True
    return False


def held_by_a_server(path: str) -> bool:
    """Whether a running chatd server holds ``path`` as its database (ServerLock's flock
    on the file, however the path is spelled: the lock is on the inode)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return False  # no such file (or unreadable: then nobody's database we can see)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # the shared lock, if taken, goes with it
    return False


def create_private(path: str) -> None:
    """Create an empty database file with mode 0600 if there is none (it will hold password
    hashes and direct messages; SQLite gives its -wal and -shm the same mode). A planted
    symlink in place of a missing file is not followed."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        return
    os.close(fd)


class ServerLock:
    """The one-server-per-database lock, held from open to close.

    Two locks, both flock (the kernel drops them when the holder dies, so a crash never
    blocks the next start; flock does not interact with SQLite's own fcntl locks):
    - on the database file itself, so every spelling (symlink, hard link) meets the same
      inode lock;
    - on ``<real path>.lock``, which holds the holder's pid for the error message. It is
      opened with O_NOFOLLOW so a planted symlink cannot redirect the write.
    """

    def __init__(self, db: str) -> None:
        self.db = db
        self.lock_file = os.path.realpath(db) + ".lock"
        self._fds: list[int] = []
        self._created = False  # this lock made the lock file (removed again if refused)

    def acquire(self) -> None:
        """Raise DatabaseFileError when another server holds the database, or a file cannot
        be opened. The database file must exist (see create_private)."""
        try:
            db_fd = os.open(self.db, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise DatabaseFileError(f"cannot open {self.db}: {exc.strerror}") from None
        self._fds.append(db_fd)
        try:
            if not stat.S_ISREG(os.fstat(db_fd).st_mode):
                raise DatabaseFileError(f"{self.db} is not a regular file")
            flags = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW
            try:
                try:
                    fd = os.open(self.lock_file, flags | os.O_CREAT | os.O_EXCL, 0o600)
                    self._created = True
                except FileExistsError:
                    fd = os.open(self.lock_file, flags)
            except OSError as exc:
                raise DatabaseFileError(
                    f"cannot create the lock file {self.lock_file}: {exc.strerror}"
                ) from None
            self._fds.append(fd)
            for lock_fd in (fd, db_fd):
                try:
                    fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
                    pid = f" (pid {holder})" if holder.isdigit() else ""
                    raise DatabaseFileError(
                        f"it is in use by another chatd server{pid}; stop that one first"
                        f" (lock file {self.lock_file})"
                    ) from None
                except OSError as exc:
                    raise DatabaseFileError(f"cannot lock {self.db}: {exc.strerror}") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            self.release()
            raise

    def release(self, *, remove_created: bool = False) -> None:
        """Closing the descriptors releases the flocks. Called only after SQLite's own
        connections are closed: closing a descriptor of the database file would otherwise
        drop SQLite's fcntl locks in this process (POSIX advisory-lock semantics). With
        ``remove_created`` (a refused start), a lock file this lock created is removed
        first, while still held."""
        if remove_created and self._created and self._fds:
            with contextlib.suppress(OSError):
                os.unlink(self.lock_file)
        while self._fds:
            os.close(self._fds.pop())
