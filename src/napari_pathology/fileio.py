"""One home for writing files safely and for checking what comes in.

Every file the plugin writes (results, checkpoints, masks, annotations, CSVs)
goes through :func:`atomic_write` or :func:`atomic_path`: the bytes go to a
temporary file in the destination folder, are flushed to disk and then moved
over the destination with :func:`os.replace`, so a crash, a kill or a full
disk leaves either the old file or the new one, never a torn one. New files
get the permissions the user's umask allows (``0o666 & ~umask``), not the
private ``0o600`` of :func:`tempfile.mkstemp`.

Output folders are checked with :func:`ensure_writable_dir` *before* long work
starts, and errors of the file system (full disk, read-only disk, no
permission) become an :class:`OutputError` whose message is one line naming
the folder. :func:`keep_aside` renames a file that must not be overwritten
(a refused autosave) to a timestamped name. :func:`safe_name` makes any text
a safe single path component. :func:`require_regular_file` refuses FIFOs,
devices and folders before anything opens them.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

__all__ = [
    "OutputError",
    "atomic_path",
    "atomic_write",
    "default_file_mode",
    "default_folder_mode",
    "ensure_writable_dir",
    "keep_aside",
    "output_error",
    "read_json_file",
    "read_text_file",
    "require_finite",
    "require_regular_file",
    "safe_name",
]

_UMASK_LOCK = threading.Lock()

_FS_CAUSES = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the disk is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
}


class OutputError(OSError):
    """Writing an output failed or cannot succeed; the message is one line naming the place."""

    def __str__(self) -> str:
        return str(self.strerror)


def _umask() -> int:
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def default_file_mode() -> int:
    """Permissions a new file gets under the current umask (``0o666 & ~umask``)."""
    return 0o666 & ~_umask()


def default_folder_mode() -> int:
    """Permissions a new folder gets under the current umask (``0o777 & ~umask``)."""
    return 0o777 & ~_umask()


def output_error(error: OSError, where: str | os.PathLike[str]) -> OutputError:
    """An :class:`OutputError` saying in one line why writing to ``where`` failed."""
    if isinstance(error, OutputError):
        return error
    cause = _FS_CAUSES.get(error.errno or 0, error.strerror or str(error))
    return OutputError(error.errno or 0, f"cannot write to {where}: {cause}")


def ensure_writable_dir(folder: str | os.PathLike[str]) -> Path:
    """Create ``folder`` if needed and prove that a file can be written in it.

    Call this before long work so that a read-only or missing output disk is
    reported at once, not after hours of computation.

    Raises
    ------
    OutputError
        When the folder cannot be created or written to (one line, naming it).

    """
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise OutputError(errno.ENOTDIR, f"cannot write to {folder}: it is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".napari-pathology-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        with open(probe, "wb") as fh:
            fh.write(b"\0" * 4096)
            fh.flush()
            os.fsync(fh.fileno())
        probe.unlink()
    except OSError as error:
        raise output_error(error, folder) from error
    return folder


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temporary_sibling(path: Path, suffix: str = ".tmp") -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{suffix}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, suffix: str = "") -> Iterator[Path]:
    """A temporary path beside ``path`` that replaces it only if the block succeeds.

    For libraries that write to a path themselves (``torch.save``, PIL,
    zarr stores, tifffile). A file or a folder written there is moved over
    ``path`` with :func:`os.replace` when the block ends without an error
    (a folder replaces an existing folder: the old one is removed only after
    the new one is in place). On any error or interrupt the temporary is
    removed and ``path`` is untouched.

    Parameters
    ----------
    path : path-like
        The destination.
    suffix : str
        Extension the temporary must end with (some writers choose the format
        from it, e.g. ``".png"``).

    Raises
    ------
    OutputError
        When the file system refuses the write (full, read-only, no permission).

    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise output_error(error, path.parent) from error
    tmp = _temporary_sibling(path, ".tmp" + suffix)
    try:
        yield tmp
        if tmp.is_dir():
            _replace_folder(tmp, path)
        else:
            if tmp.exists():
                with contextlib.suppress(OSError):
                    os.chmod(tmp, default_file_mode())
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as error:
        raise output_error(error, path.parent) from error
    finally:
        _remove(tmp)


def _replace_folder(new: Path, path: Path) -> None:
    import shutil

    if path.is_dir() and not path.is_symlink():
        old = _temporary_sibling(path, ".old")
        os.replace(path, old)
        try:
            os.replace(new, path)
        except BaseException:
            os.replace(old, path)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, path)


def _remove(tmp: Path) -> None:
    import shutil

    if tmp.is_dir() and not tmp.is_symlink():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            tmp.unlink()


def atomic_write(
    path: str | os.PathLike[str],
    data: bytes | str | Callable[[IO[Any]], None],
    *,
    text: bool | None = None,
    encoding: str = "utf-8",
) -> Path:
    """Write ``data`` to ``path`` so that a crash mid-write leaves the previous file intact.

    Parameters
    ----------
    path : path-like
        Destination file; its folder is created.
    data : bytes, str or callable
        The content, or a function that writes it to the open file object
        (text mode when ``text`` is true or ``data`` is a str, else binary).
    text : bool, optional
        Open the temporary in text mode (``newline=""``) for a writer callable.
    encoding : str
        Encoding of text content.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    OutputError
        When the file system refuses the write (one line naming the folder).

    """
    path = Path(path)
    as_text = isinstance(data, str) if text is None else text
    with atomic_path(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
        mode = "w" if as_text else "wb"
        kwargs: dict[str, Any] = {"newline": "", "encoding": encoding} if as_text else {}
        with os.fdopen(fd, mode, **kwargs) as fh:
            if callable(data):
                data(fh)
            else:
                fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    return path


def keep_aside(path: str | os.PathLike[str], reason: str = "refused") -> Path:
    """Rename ``path`` to ``<name>.<reason>-<YYYYmmdd-HHMMSS><suffix>`` beside it and return the new path.

    Used for files the plugin refused to read (a corrupt autosave) so that
    writing a new one never destroys what was in them.
    """
    path = Path(path)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for attempt in range(1000):
        extra = f"-{attempt}" if attempt else ""
        target = path.with_name(f"{path.stem}.{reason}-{stamp}{extra}{path.suffix}")
        if not target.exists():
            break
    try:
        os.replace(path, target)
    except OSError as error:
        raise output_error(error, path.parent) from error
    return target


_UNSAFE = re.compile(r"[^A-Za-z0-9._+@=-]+")


def safe_name(text: str, fallback: str = "unnamed", max_length: int = 120) -> str:
    """``text`` as one safe path component: no separators, no ``.``/``..``, no leading dot.

    Characters other than letters, digits and ``._+@=-`` become ``_``; the
    result is never empty, never a dot name and at most ``max_length`` long.
    """
    cleaned = _UNSAFE.sub("_", str(text)).strip("._ ")
    cleaned = cleaned[:max_length].rstrip("._ ")
    return cleaned or fallback


def require_regular_file(path: str | os.PathLike[str], what: str = "file") -> Path:
    """``path`` if it is an existing regular file (after symlinks).

    FIFOs, sockets, devices and folders are refused before anything opens
    them (opening a FIFO blocks forever).

    Raises
    ------
    FileNotFoundError
        When nothing is there.
    ValueError
        When it is not a regular file.

    """
    path = Path(path).expanduser()
    try:
        st = path.stat()
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except OSError as error:
        raise ValueError(f"cannot read {what} {path}: {error.strerror or error}") from error
    import stat

    if stat.S_ISDIR(st.st_mode):
        raise ValueError(f"{path} is a folder, not a {what}")
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{path} is not a regular file (a pipe, socket or device); not read")
    return path


def require_finite(value: Any, name: str, *, minimum: float | None = None, maximum: float | None = None,
                   inclusive: bool = True) -> float:  # fmt: skip
    """``value`` as a finite float within ``[minimum, maximum]``.

    Raises
    ------
    ValueError
        Naming ``name`` and the value when it is not a finite number in range.

    """
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    low_bad = minimum is not None and (number < minimum if inclusive else number <= minimum)
    high_bad = maximum is not None and (number > maximum if inclusive else number >= maximum)
    if low_bad or high_bad:
        low = "-inf" if minimum is None else f"{minimum:g}"
        high = "inf" if maximum is None else f"{maximum:g}"
        brackets = "[]" if inclusive else "()"
        raise ValueError(f"{name} must be in {brackets[0]}{low}, {high}{brackets[1]}, got {value!r}")
    return number


#: Largest JSON / text input read whole (annotations, tables, result files).
MAX_TEXT_BYTES = 512 * 1024 * 1024


def read_text_file(path: str | os.PathLike[str], what: str = "file", max_bytes: int = MAX_TEXT_BYTES) -> str:
    """The UTF-8 text of a regular file, refused with a message naming it when it is not one.

    Raises
    ------
    FileNotFoundError
        When nothing is there.
    ValueError
        Not a regular file, larger than ``max_bytes``, or not UTF-8 text.

    """
    path = require_regular_file(path, what)
    size = path.stat().st_size
    if size > max_bytes:
        raise ValueError(
            f"{what} {path} is {size / 2**20:.0f} MiB; more than the {max_bytes / 2**20:.0f} MiB read"
        )
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(f"{what} {path} is not UTF-8 text (byte {error.start}); save it as UTF-8") from None
    except OSError as error:
        raise ValueError(f"cannot read {what} {path}: {error.strerror or error}") from error


def read_json_file(path: str | os.PathLike[str], what: str = "JSON file") -> Any:
    """Parse a JSON file; any failure is a ValueError that names the file and the cause.

    Too deeply nested documents (``RecursionError`` in the parser), bad UTF-8,
    syntax errors, NaN/Infinity constants and non-regular files are all
    refused with one line.
    """
    import json

    text = read_text_file(path, what)

    def refuse_constant(name: str) -> Any:
        raise ValueError(f"{what} {path} holds {name}, which is not valid JSON")

    try:
        return json.loads(text, parse_constant=refuse_constant)
    except RecursionError:
        raise ValueError(f"{what} {path} is nested too deeply to be read") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{what} {path} is not valid JSON: {error.msg} at line {error.lineno}") from None
