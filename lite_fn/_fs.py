"""File-system hygiene shared by both on-disk formats (lite_fn checkpoints and peft directories).

One job: put bytes on disk so that a reader sees either the old content or the complete new one,
also after a crash, and read back only regular files.

* Writing a file: a temp file ``.{name}.{pid}.{random}.lite_fn-tmp`` next to the target, written,
  flushed and fsynced, then ``os.replace``d over the target, then the directory fsynced.
* Writing a directory: the same with a temp directory, renamed into place; an existing directory is
  swapped atomically with ``renameat2(RENAME_EXCHANGE)`` on Linux (elsewhere it is moved aside and
  the new one moved in: a short window without either).
* Temp entries of the same target left by writers that are no longer alive on this machine
  (``os.kill(pid, 0)`` fails with ProcessLookupError) are removed first; those of live writers are
  never touched. A writer on another host sharing the directory may lose its temp entry, and then
  its save fails; the target stays whole.
* Modes: a replaced entry keeps its mode; a new one gets ``0o666 & ~umask`` (``0o777`` for
  directories), the umask read without changing it where the platform allows.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import secrets
import shutil
import stat
import sys
import threading

TMP_SUFFIX = ".lite_fn-tmp"
TMP_NAME_MAX = 200  # characters of the target's name kept in a temp name (NAME_MAX is 255)
_UMASK_LOCK = threading.Lock()


class NotAFile(ValueError):
    """The path exists but is not a regular file; ``kind`` says what it is ("a directory", …)."""

    def __init__(self, path: str, kind: str):
        super().__init__(f"{path!r} is {kind}, not a regular file")
        self.kind = kind


def umask() -> int:
    """The process umask, read without changing it (Linux: /proc/self/status); elsewhere set and
    restored under a lock (other threads creating files meanwhile could see umask 0o22)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        old = os.umask(0o022)
        os.umask(old)
    return old


def file_kind(mode: int) -> str:
    """What a non-regular ``st_mode`` is, for messages ("a directory", "a FIFO (named pipe)", …)."""
    for test, kind in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return kind
    return "not a regular file"


def read_regular(path: str) -> bytes:
    """The bytes of the regular file at ``path``. Raises FileNotFoundError (or NotADirectoryError) when
    it does not exist and NotAFile for anything else — checked before opening and again on the open
    descriptor (opened non-blocking, so a path that became a FIFO meanwhile cannot hang the read)."""
    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode):
        raise NotAFile(path, file_kind(info.st_mode))
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise NotAFile(path, file_kind(info.st_mode))
        return f.read()


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate JSON key {k!r}")
        out[k] = v
    return out


def _no_constant(name):
    raise ValueError(f"{name} is not JSON")


def strict_json(text: str):
    """json.loads refusing duplicate keys and the non-JSON constants NaN / Infinity."""
    return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)


def fsync_dir(folder: str) -> None:
    """fsync a directory (its entries), where the platform can; a no-op elsewhere."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _temp_path(folder: str, base: str) -> str:
    return os.path.join(folder, f".{base[:TMP_NAME_MAX]}.{os.getpid()}.{secrets.token_hex(6)}{TMP_SUFFIX}")


def _pid_alive(pid: int) -> bool:
    """False only when no process ``pid`` exists on this machine; any doubt counts as alive."""
    if pid == os.getpid():
        return True  # another thread of this process may be writing it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError, ValueError):
        return True  # e.g. PermissionError: it exists but belongs to another user
    return True


def remove_dead_writers_temps(folder: str, base: str) -> None:
    """Delete ``base``'s temp files and directories in ``folder`` whose writer process is dead (killed
    mid-save). Best effort; symlinks and entries of live writers are never touched."""
    if os.name != "posix":
        return  # os.kill(pid, 0) is not a liveness probe on Windows
    pattern = re.compile(re.escape(f".{base[:TMP_NAME_MAX]}.") + r"(\d+)\.[0-9a-f]+" + re.escape(TMP_SUFFIX))
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        m = pattern.fullmatch(name)
        if m is None or _pid_alive(int(m.group(1))):
            continue
        stale = os.path.join(folder, name)
        try:
            mode = os.lstat(stale).st_mode
            if stat.S_ISREG(mode):
                os.unlink(stale)
            elif stat.S_ISDIR(mode):
                shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            pass  # gone already, or not ours to delete


def _write_new(file: str, data: bytes, mode: int) -> None:
    fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0), 0o600)
    with os.fdopen(fd, "wb") as f:
        if hasattr(os, "fchmod"):
            os.fchmod(f.fileno(), mode)
        else:
            os.chmod(file, mode)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def replace_file(target: str, data: bytes, mode: int) -> None:
    """Atomically make the file ``target`` (a resolved path whose folder exists) hold ``data``."""
    folder, base = os.path.split(target)
    remove_dead_writers_temps(folder, base)
    tmp = _temp_path(folder, base)
    try:
        _write_new(tmp, data, mode)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(folder)


def exchange(a: str, b: str) -> bool:
    """Atomically swap two existing paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, f"renameat2(RENAME_EXCHANGE) of {a!r} and {b!r} failed: {os.strerror(err)}")


def replace_dir(target: str, files: dict[str, bytes], *, file_mode: int, dir_mode: int, exists: bool) -> None:
    """Atomically make the directory ``target`` (a resolved path whose folder exists) hold exactly
    ``files`` ({name: bytes}). ``exists``: whether ``target`` is an existing directory to replace (the
    caller has checked that it may be replaced)."""
    folder, base = os.path.split(target)
    remove_dead_writers_temps(folder, base)
    tmp = _temp_path(folder, base)
    os.mkdir(tmp, 0o700)
    try:
        for name, data in files.items():
            _write_new(os.path.join(tmp, name), data, file_mode)
        os.chmod(tmp, dir_mode)
        fsync_dir(tmp)
        if not exists:
            os.rename(tmp, target)  # atomic; fails if a non-empty directory appeared meanwhile
        elif exchange(tmp, target):
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old directory
        else:  # no atomic exchange here: move the old one aside, then the new one in
            old = _temp_path(folder, base)
            os.rename(target, old)
            try:
                os.rename(tmp, target)
            except BaseException:
                os.rename(old, target)
                raise
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(folder)
