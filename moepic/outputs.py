"""Files moepic writes: all or nothing. Side effects: the file system, nothing else.

Every output (traces, predictors, profiles, configs, synthetic traces, results, token logs) is
written to a hidden temporary name in its target folder and renamed over the target only once it
is complete, so a failure part way (a full disk, Ctrl-C, a crash) leaves the old file as it was and
no partial new one. A rename within one folder is atomic on POSIX file systems, which is why the
temporary file lives beside the target and not in /tmp (possibly another file system).

    check_writable(path, what)        before the work: the folder exists and takes a new file
    make_folder(folder, what)         a folder to write into, created if missing
    with atomic_output(path, what) as f:   f.write(...)      # renamed over `path` on success
    with PendingOutput(path, what) as out: out.write(...)   # the same, for a file filled over a long
                                                             # piece of work (the token log)
    with atomic_folder(path, what) as tmp: write files into tmp   # tmp renamed to `path` on success
    with atomic_files(folder, what) as tmp: write files into tmp    # each renamed into `folder` on success
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from moepic.errors import MoepicError


class OutputError(MoepicError):
    """An output that cannot be written: the message names the file, what it is and why."""


def _error(path: Path, what: str, e: OSError) -> OutputError:
    return OutputError(f"{path}: cannot write the {what} ({e.strerror or e})")


def _check_folder(path: Path, what: str) -> None:
    """`path`'s folder exists (a temporary file there would only say "No such file or directory")."""
    if not path.parent.is_dir():
        raise OutputError(f"{path}: cannot write the {what} (folder {path.parent} does not exist)")


def check_writable(path: str | Path, what: str) -> None:
    """Fail now, naming `path`, if a file could not be created there later (before any work is spent).

    Tries a real file in the folder rather than asking os.access, which says yes to root even on a
    read-only mount.
    """
    path = Path(path)
    folder = path.parent
    if path.is_dir():
        raise OutputError(f"{path}: cannot write the {what} (it is a folder)")
    _check_folder(path, what)
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise _error(path, what, e) from None
    if _disk_full(folder):  # an empty probe file fits on a full disk; the output would not
        raise _error(path, what, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))


def _disk_full(folder: Path) -> bool:
    """No free block left for this user (root may use the blocks reserved for it)."""
    try:
        stat = os.statvfs(folder)
    except (OSError, AttributeError):  # no statvfs (Windows) or a file system without it: try anyway
        return False
    free = stat.f_bfree if hasattr(os, "geteuid") and os.geteuid() == 0 else stat.f_bavail
    return free == 0


def make_folder(folder: str | Path, what: str) -> Path:
    """`folder` and any missing parents, or one error naming it (a file in the way, a read-only disk)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder}: cannot write the {what} (a file of that name exists)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _error(folder, what, e) from None
    return folder


class PendingOutput:
    """A new file for `path`, open under a temporary name until `commit` renames it over `path`.

    For a file written over a longer piece of work than one `with` block should span (the token
    log, a line per generated token). `write` failures are OutputErrors naming `path`; `discard`
    (a no-op after `commit`) removes the temporary file and leaves the old `path` as it was. As a
    context manager: committed on success, discarded on any exception (KeyboardInterrupt included).
    """

    def __init__(self, path: str | Path, what: str, *, text: bool = False) -> None:
        self.path, self.what = Path(path), what
        _check_folder(self.path, what)
        try:
            fd, self._tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".part", dir=self.path.parent)
        except OSError as e:
            raise _error(self.path, what, e) from None
        try:
            self.file: IO = os.fdopen(fd, "w" if text else "wb", **({"encoding": "utf-8", "newline": ""} if text else {}))
        except BaseException:
            os.close(fd)
            _remove(self._tmp)
            raise
        self._done = False

    def error(self, e: OSError) -> OutputError:
        return _error(self.path, self.what, e)

    def write(self, data) -> None:
        try:
            self.file.write(data)
        except OSError as e:
            raise self.error(e) from None

    def commit(self) -> None:
        """Make the written bytes `path`'s content, whole; on failure the old `path` stays."""
        try:
            self.file.flush()
            os.fsync(self.file.fileno())  # the bytes are on disk before the name points at them
            self.file.close()
            os.chmod(self._tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a normal file is what users expect
            os.replace(self._tmp, self.path)
        except OSError as e:
            self.discard()
            raise self.error(e) from None
        except BaseException:
            self.discard()
            raise
        self._done = True

    def discard(self) -> None:
        if self._done:
            return
        self._done = True
        # Unwritten buffered bytes may fail to flush (a full disk): that must not replace the
        # exception being handled (a Ctrl-C would become a write error).
        with contextlib.suppress(OSError):
            self.file.close()
        _remove(self._tmp)

    def __enter__(self) -> PendingOutput:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.commit()
        else:
            self.discard()


@contextlib.contextmanager
def atomic_output(path: str | Path, what: str, *, text: bool = False) -> Iterator[IO]:
    """A file object to write `path`'s new content into; on success it replaces `path` whole.

    On any failure (an exception, KeyboardInterrupt included) the temporary file is removed, the old
    `path` is untouched, and an OSError becomes an OutputError naming `path` and `what`.
    """
    pending = PendingOutput(path, what, text=text)
    try:
        yield pending.file
    except OSError as e:
        pending.discard()
        raise pending.error(e) from None
    except BaseException:
        pending.discard()
        raise
    pending.commit()


def write_text_atomic(path: str | Path, what: str, content: str) -> None:
    with atomic_output(path, what, text=True) as f:
        f.write(content)


@contextlib.contextmanager
def atomic_folder(path: str | Path, what: str) -> Iterator[Path]:
    """A fresh temporary folder beside `path` to fill; on success it becomes `path`.

    An existing `path` folder is moved aside first and deleted only once the new one is in place, so
    a failure at any point leaves either the old folder or the new one, never a mix or an empty one.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{path}: cannot write the {what} (a file of that name exists)")
    _check_folder(path, what)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent))
    except OSError as e:
        raise _error(path, what, e) from None
    try:
        yield tmp
        for folder, _, files in os.walk(tmp):  # fsync each file: the rename must not expose empty ones
            for name in files:
                with open(os.path.join(folder, name), "rb") as f:
                    os.fsync(f.fileno())
        os.chmod(tmp, 0o777 & ~_umask())
        _swap_in(tmp, path)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _error(path, what, e) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_files(folder: str | Path, what: str) -> Iterator[Path]:
    """A hidden staging folder inside `folder` to write a set of files into (an ablation's results,
    table and figures); on success each is renamed to its name in `folder`, replacing an older one.

    On any failure none is, so `folder` keeps the previous set whole rather than a mix of old and new;
    files in `folder` that the set does not name are left alone (unlike atomic_folder, which replaces
    the whole folder).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise OutputError(f"{folder}: cannot write the {what} (no such folder)")
    try:
        staging = Path(tempfile.mkdtemp(prefix=".", suffix=".part", dir=folder))
    except OSError as e:
        raise _error(folder, what, e) from None
    try:
        yield staging
        names = [Path(root, name).relative_to(staging) for root, _, files in os.walk(staging) for name in files]
        for name in names:  # on disk before any name points at them, as in atomic_output
            with open(staging / name, "rb") as f:
                os.fsync(f.fileno())
        for name in names:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / name, folder / name)
    except OutputError as e:  # a writer in the set named its staging path; the user knows the target
        raise OutputError(str(e).replace(str(staging), str(folder))) from None
    except OSError as e:
        raise _error(folder, what, e) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _swap_in(new: Path, path: Path) -> None:
    """Rename the folder `new` to `path`, an existing `path` moved aside and restored if that fails."""
    if not path.exists():
        os.replace(new, path)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
    try:
        os.replace(path, aside / path.name)
    except BaseException:
        aside.rmdir()  # still empty: the old folder never moved
        raise
    try:
        os.replace(new, path)
    except BaseException:
        os.replace(aside / path.name, path)  # if this fails too, the old folder stays in `aside`, not deleted
        aside.rmdir()
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _umask() -> int:
    # Linux reports it; elsewhere the only way to read it is to set it and set it straight back,
    # which for that instant gives files other threads create (the copy engine's) no umask.
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0)
    os.umask(mask)
    return mask
