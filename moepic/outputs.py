"""Files moepic writes: all or nothing. Side effects: the file system, nothing else.

Every output (traces, predictors, profiles, configs, synthetic traces, results, token logs) is
written to a hidden temporary name in its target folder and renamed over the target only once it
is complete, so a failure part way (a full disk, Ctrl-C, a crash) leaves the old file as it was and
no partial new one. A rename within one folder is atomic on POSIX file systems, which is why the
temporary file lives beside the target and not in /tmp (possibly another file system).

    check_writable(path, what)        before the work: the folder exists and takes a new file
    with atomic_output(path, what) as f:   f.write(...)      # renamed over `path` on success
    with atomic_folder(path, what) as tmp: write files into tmp   # tmp renamed to `path` on success
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from moepic.errors import MoepicError


class OutputError(MoepicError):
    """An output that cannot be written: the message names the file, what it is and why."""


def _reason(e: OSError) -> str:
    return e.strerror or str(e)


def check_writable(path: str | Path, what: str) -> None:
    """Fail now, naming `path`, if a file could not be created there later (before any work is spent).

    Tries a real file in the folder rather than asking os.access, which says yes to root even on a
    read-only mount.
    """
    path = Path(path)
    folder = path.parent
    if path.is_dir():
        raise OutputError(f"{path}: cannot write the {what} (it is a folder)")
    if not folder.is_dir():
        raise OutputError(f"{path}: cannot write the {what} (folder {folder} does not exist)")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"{path}: cannot write the {what} ({_reason(e)})") from None


@contextlib.contextmanager
def atomic_output(path: str | Path, what: str, *, text: bool = False) -> Iterator[IO]:
    """A file object to write `path`'s new content into; on success it replaces `path` whole.

    On any failure (an exception, KeyboardInterrupt included) the temporary file is removed, the old
    `path` is untouched, and an OSError becomes an OutputError naming `path` and `what`.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    except OSError as e:
        raise OutputError(f"{path}: cannot write the {what} ({_reason(e)})") from None
    try:
        with os.fdopen(fd, "w" if text else "wb", **({"encoding": "utf-8"} if text else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a normal file is what users expect
        os.replace(tmp, path)
    except OSError as e:
        _remove(tmp)
        raise OutputError(f"{path}: cannot write the {what} ({_reason(e)})") from None
    except BaseException:
        _remove(tmp)
        raise


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
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent))
    except OSError as e:
        raise OutputError(f"{path}: cannot write the {what} ({_reason(e)})") from None
    try:
        yield tmp
        for child in tmp.iterdir():  # fsync each file: the rename must not expose empty ones
            with open(child, "rb") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o777 & ~_umask())
        _swap_in(tmp, path)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(f"{path}: cannot write the {what} ({_reason(e)})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_in(new: Path, path: Path) -> None:
    """Rename the folder `new` to `path`, an existing `path` moved aside and restored if that fails."""
    if not path.exists():
        os.replace(new, path)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
    os.replace(path, aside / path.name)
    try:
        os.replace(new, path)
    except BaseException:
        os.replace(aside / path.name, path)
        raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it; set it straight back
    os.umask(mask)
    return mask
