"""Atomic saving of a folder, and recovery of a save that was interrupted.

``renameat2(RENAME_EXCHANGE)`` is called through ``ctypes``: neither the standard library (``os.replace`` cannot swap
two folders) nor a maintained package offers it, and it is what makes the destination always hold a complete bank.

**Saving is atomic.** ``save_pretrained`` writes the whole bank into a hidden sibling folder
``.<name>.tmp-<host>-<pid>-<random>`` (``<host>``: a short hash of this machine's name), fsyncs every file and the
folder, then swaps it into place:

* on Linux with one ``renameat2(RENAME_EXCHANGE)`` call: the destination always holds a complete bank, old or new.
  The old bank, now under the temporary name, is deleted afterwards; a crash before that leaves a hidden
  ``.tmp-`` sibling that the next save or load deletes.
* elsewhere (or where the filesystem refuses the exchange) with two renames: ``<name>`` -> ``.<name>.old-<token>``,
  then ``.<name>.tmp-<token>`` -> ``<name>``. A crash between them leaves no ``<name>``, but two complete banks;
  :func:`recover_bank` (run by every save and load of that path) renames the new one into place: the temporary folder
  is complete and fsynced before the first rename, and both siblings share the token.

Recovery touches ASR banks only: a folder (or a leftover) whose ``adapter_config.json`` is not an ASR bank's is left
alone, and a leftover is deleted only when it was written on this machine by a process that is gone (a process id
means nothing on another host sharing the filesystem). Leftovers of another host, or without a host (earlier
versions), are never deleted.

Files in the destination that the bank does not own (a tokenizer, a Trainer checkpoint's other files) are carried
over into the new folder as hard links, so they survive the swap.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import re
import secrets
import shutil
import socket
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

from ..tuner.errors import BankError
from .files import CARD_FILE, is_asr_folder

__all__ = ["atomic_save", "recover_bank", "host_id"]

# False forces the two-rename swap (used on systems without renameat2, and by the tests of that path)
USE_EXCHANGE = sys.platform.startswith("linux")


def host_id() -> str:
    """This machine, in a form a folder name can carry: ``h`` + 8 hex digits of a hash of the host name."""
    return "h" + hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def _sibling_pattern(target: Path) -> re.Pattern:
    # the host part is absent in leftovers of earlier versions
    return re.compile(rf"^\.{re.escape(target.name)}\.(tmp|old)-(?:(h[0-9a-f]{{8}})-)?(\d+)-([0-9a-f]+)$")


def _siblings(target: Path) -> list[tuple[str, Optional[str], int, str, Path]]:
    """Leftovers of interrupted saves of ``target``: (kind, host or None, pid, token, path)."""
    pattern = _sibling_pattern(target)
    try:
        names = os.listdir(target.parent)
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        match = pattern.match(name)
        if match:
            token = "-".join(part for part in (match[2], match[3], match[4]) if part)  # never split the folder name
            found.append((match[1], match[2], int(match[3]), token, target.parent / name))
    return found


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True  # another thread of this process may be saving right now
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # directories cannot be opened on some platforms (Windows): nothing to sync there
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file, then every folder (deepest first), so the data is on disk before the swap renames it."""
    for folder, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            path = os.path.join(folder, name)
            if os.path.islink(path):
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(folder))


def recover_bank(path) -> bool:
    """Finish a save of ``path`` that was interrupted between its two renames; returns True when it did.

    Only the two-rename swap (see the module docstring) can leave ``path`` missing, and only then do
    ``.<name>.old-<token>`` (the previous bank) and ``.<name>.tmp-<token>`` (the new one) exist together: the
    temporary folder is complete and fsynced before the first rename, so it is renamed into place, provided it is an
    ASR bank. Any other leftover (a half-written or half-deleted folder) is never promoted; those written on this
    machine by processes that are gone are deleted, and only next to an ASR bank. Folders that are not ASR banks,
    and leftovers of other hosts, are left alone.
    """
    target = Path(os.path.abspath(os.fspath(path)))
    recovered = False
    if not os.path.lexists(target):
        leftovers = _siblings(target)
        olds = {token for kind, _, _, token, _ in leftovers if kind == "old"}
        pairs = sorted((p.stat().st_mtime_ns, p) for kind, _, _, token, p in leftovers
                       if kind == "tmp" and token in olds and is_asr_folder(p))
        if pairs:
            os.rename(pairs[-1][1], target)
            _fsync_dir(target.parent)
            recovered = True
    if os.path.isdir(target) and is_asr_folder(target):
        here = host_id()
        for _, host, pid, _, leftover in _siblings(target):
            if host == here and not _alive(pid):
                shutil.rmtree(leftover, ignore_errors=True)
    return recovered


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2``); False when the system or filesystem cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(code, f"cannot swap {a} and {b}: {os.strerror(code)}")


def _carry_over(old: Path, new: Path, dropped: set[str]) -> None:
    """Hard-link into ``new`` every entry of ``old`` that the new save did not write (files the bank does not own)."""
    for entry in os.scandir(old):
        dest = new / entry.name
        if entry.name in dropped:
            continue
        if entry.is_dir(follow_symlinks=False):
            if not dest.exists():
                dest.mkdir()
            if dest.is_dir() and not dest.is_symlink():
                _carry_over(Path(entry.path), dest, set())
        elif not os.path.lexists(dest):
            if entry.is_symlink():
                os.symlink(os.readlink(entry.path), dest)
                continue
            try:
                os.link(entry.path, dest)
            except OSError:
                shutil.copy2(entry.path, dest)


def _swappable(target: Path) -> bool:
    """False for folders that cannot be renamed away: a mount point, or the working directory (or a parent of it)."""
    if not target.is_dir():
        return True
    if os.path.ismount(target):
        return False
    cwd = Path(os.getcwd()).resolve()
    resolved = target.resolve()
    return not (cwd == resolved or resolved in cwd.parents)


def atomic_save(save_directory, write: Callable[[str], Any], dropped: Optional[set[str]] = None) -> Any:
    """Run ``write(folder)`` into a fresh hidden sibling of ``save_directory``, then swap it into place atomically.

    ``dropped``: names at the top of ``save_directory`` that must not be carried over from the previous content (bank
    files this save deliberately leaves out). Returns what ``write`` returned. See the module docstring.
    """
    if not isinstance(save_directory, (str, os.PathLike)):
        raise BankError(f"`save_directory` must be a path (str or os.PathLike), got {type(save_directory).__name__}.")
    target = Path(os.path.abspath(os.fspath(save_directory)))
    if os.path.lexists(target) and not target.is_dir():
        raise BankError(f"{target} exists and is not a folder; choose a folder to save the bank in.")
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_bank(target)
    if not _swappable(target):
        warnings.warn(f"{target} is a mount point or the working directory: the bank is written in place, not "
                      "atomically. Save into a sub-folder to get atomic saves.", stacklevel=3)
        return write(str(target))
    token = f"{host_id()}-{os.getpid()}-{secrets.token_hex(6)}"
    tmp = target.parent / f".{target.name}.tmp-{token}"
    old = target.parent / f".{target.name}.old-{token}"
    tmp.mkdir()
    swapped = False
    try:
        if target.is_dir() and (target / CARD_FILE).is_file():
            shutil.copy2(target / CARD_FILE, tmp / CARD_FILE)  # PEFT and `write_card` update the card, as before
        result = write(str(tmp))
        if target.is_dir():
            _carry_over(target, tmp, dropped or set())
            os.chmod(tmp, target.stat().st_mode & 0o7777)  # an existing bank keeps its permissions
        else:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o777 & ~umask)  # what a plain mkdir would give, not mkdtemp's 0o700
        _fsync_tree(tmp)
        if not os.path.lexists(target):
            os.rename(tmp, target)
        elif USE_EXCHANGE and _exchange(tmp, target):
            os.rename(tmp, old)  # `tmp` held the previous bank since the exchange
        else:
            os.rename(target, old)
            os.rename(tmp, target)  # a crash right before this line is what `recover_bank` repairs
        swapped = True
        _fsync_dir(target.parent)
    finally:
        if not swapped:
            if not os.path.lexists(target) and os.path.isdir(old):
                os.rename(old, target)  # the second rename failed: put the previous bank back
            shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    return result
