"""Writing output files safely: nothing overwritten, nothing half-written, nothing failing silently.

Every output (videos, images, kept latents) is written to a hidden ``.name.<random>.partial`` file next to
the target, flushed to disk, then published under the target name, or under a numbered sibling
(``clip.mp4`` -> ``clip_00001.mp4``) when that name exists. A failure or an interrupt removes the partial
file. Operating-system failures (disk full, permissions, read-only disks, vanished folders) and encoder
failures surface as one exception type, :class:`WriteError`, whose message names the path, the reason in
plain words and the fix.
"""
from __future__ import annotations

import contextlib
import errno as _errno
import os
import secrets
import stat
import sys
from pathlib import Path
from typing import Callable, Iterator

__all__ = [
    "WriteError", "as_write_error", "check_writable", "output_path", "publish", "reserve_temp", "write_atomically",
]

_MAX_COUNTER = 99999
_PROBE_BYTES = 4096  # check_writable writes this much, so a completely full disk is caught up front

_SPACE_FIX = "free some space or choose another output folder"
_PERMISSION_FIX = "choose a folder you can write to, or change its permissions"
# errno -> (reason in plain words, fix)
_REASONS: dict[int, tuple[str, str]] = {
    _errno.ENOSPC: ("no space left on device", _SPACE_FIX),
    _errno.EACCES: ("permission denied", _PERMISSION_FIX),
    _errno.EPERM: ("operation not permitted", _PERMISSION_FIX),
    _errno.EROFS: ("the file system is read-only", "choose a folder on a writable disk"),
    _errno.ENOENT: ("its folder does not exist (any more)", "create the folder or choose an existing one"),
    _errno.ENOTDIR: ("a part of the path is not a folder", "choose an existing folder"),
    _errno.EISDIR: ("that name is a folder", "give a file name inside the folder"),
    _errno.ENAMETOOLONG: ("the file name is too long", "choose a shorter name or folder"),
    _errno.EFBIG: ("the file is too large for this file system", "choose a folder on another disk (FAT32 stops at 4 GiB)"),
    _errno.EIO: ("an input/output error (failing disk or lost network drive)", "check the disk or choose another output folder"),
    _errno.EMFILE: ("too many open files", "close other programs or raise the open-file limit (ulimit -n)"),
    _errno.ENFILE: ("too many open files in the system", "close other programs and try again"),
}
if hasattr(_errno, "EDQUOT"):  # not on Windows
    _REASONS[_errno.EDQUOT] = ("the disk quota is exceeded", _SPACE_FIX)


class WriteError(OSError):
    """Writing an output file failed for an operating-system or encoder reason.

    ``str(error)`` is ``"cannot write <path>: <reason>; <fix>"``; ``errno`` is the OS error number when there is
    one (``errno.ENOSPC``...), ``path`` the file that was to be written; the original exception is ``__cause__``.
    """

    def __init__(self, path: str | os.PathLike, reason: str, fix: str, errno: int | None = None):
        message = f"cannot write {path}: {reason}; {fix}"
        super().__init__(message)
        self.errno = errno
        self.strerror = reason
        self.filename = str(path)
        self.path = Path(path)
        self.reason = reason
        self.fix = fix
        self._message = message

    def __str__(self) -> str:
        return self._message

    def __reduce__(self):
        return (type(self), (self.path, self.reason, self.fix, self.errno))

    @classmethod
    def from_exception(cls, path: str | os.PathLike, exc: BaseException, *, what: str = "file") -> "WriteError":
        """The WriteError for ``exc`` (an ``OSError`` or an encoder error) raised while writing ``path``."""
        code = _os_errno(exc)
        if code in _REASONS:
            reason, fix = _REASONS[code]
        elif code is not None:
            detail = getattr(exc, "strerror", None) or os.strerror(code)
            reason, fix = str(detail)[:1].lower() + str(detail)[1:], "check the output folder or choose another one"
        else:  # no OS error number: an encoder/muxer failure (PyAV, Pillow)
            detail = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            reason = f"the {what} encoder failed ({detail})"
            fix = "try another format, or reinstall PyAV/Pillow (pip install --force-reinstall av pillow)"
        return cls(path, reason, fix, code)


def _os_errno(exc: BaseException) -> int | None:
    """The OS error number of ``exc``, or of the exception it wraps (PyAV re-raises callback errors)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        code = getattr(current, "errno", None) if isinstance(current, OSError) else None
        if isinstance(code, int) and code > 0 and code in _errno.errorcode:
            return code
        current = current.__cause__ or current.__context__
    return None


def _is_write_failure(exc: BaseException) -> bool:
    """OS errors and encoder errors become WriteError; user input errors, cancels and interrupts pass unchanged.

    ``FileExistsError`` passes too: the writers raise it themselves when every numbered name is taken.
    """
    if isinstance(exc, FileExistsError):
        return False
    if isinstance(exc, OSError):
        return True
    av = sys.modules.get("av")  # only when PyAV is in use; never imported here
    ffmpeg_error = getattr(getattr(av, "error", None), "FFmpegError", None)
    return ffmpeg_error is not None and isinstance(exc, ffmpeg_error)


# ---------------------------------------------------------------------------------------------
# Checks


def output_path(path: str | os.PathLike, *, example: str = "output.mp4") -> Path:
    """``path`` expanded and made absolute, after checking it names a file in an existing folder.

    Raises ``ValueError`` when ``path`` is a folder (``example`` is the file name suggested instead),
    ``FileNotFoundError`` when its folder does not exist, :class:`WriteError` when the folder cannot be used
    (a file stands in its place, no permission to look into it).
    """
    target = Path(path).expanduser()
    is_dir = False
    if target.name:
        with contextlib.suppress(OSError):  # an unreadable folder is reported below
            is_dir = target.is_dir()
    if target.name in ("", ".", "..") or is_dir:
        raise ValueError(f"{str(path)!r} is a folder; pass a file name such as {str(Path(path) / example)!r}")
    folder = target.parent
    try:
        mode = os.stat(folder).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(
            f"output folder does not exist: {folder} (create it first or choose an existing folder)"
        ) from None
    except NotADirectoryError as exc:
        raise WriteError(target, "a part of its folder path is a file, not a folder", "choose an existing folder",
                         _errno.ENOTDIR) from exc
    except OSError as exc:
        raise WriteError.from_exception(target, exc) from exc
    if not stat.S_ISDIR(mode):
        raise WriteError(target, f"{folder} is a file, not a folder", "choose an existing folder", _errno.ENOTDIR)
    return folder.resolve() / target.name  # the name itself stays as given, even when it is a link


def check_writable(path: str | os.PathLike) -> None:
    """Check, before any long work, that the file ``path`` can be written: its folder exists, is a folder,
    and takes the writers' temporary file (created, written a little, removed; nothing else is touched).

    Raises ``FileNotFoundError`` (missing folder), ``ValueError`` (``path`` is a folder) or :class:`WriteError`
    with the reason and the fix, e.g. ``cannot write /data/out.mp4: permission denied; choose a folder you can
    write to, or change its permissions``.
    """
    target = output_path(path)
    try:
        tmp = _reserve_temp(target)
    except FileExistsError:
        raise
    except OSError as exc:
        raise WriteError.from_exception(target, exc) from exc
    try:
        with open(tmp, "wb") as handle:
            handle.write(bytes(_PROBE_BYTES))
    except OSError as exc:
        raise WriteError.from_exception(target, exc) from exc
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Writing


def write_atomically(
    target: Path, write: Callable[[Path], None], *, overwrite: bool = False, what: str = "file"
) -> Path:
    """Run ``write(tmp)`` on a fresh temporary file next to ``target``, flush it to disk and publish it.

    Returns the path written: ``target``, or its first free numbered sibling (``overwrite=True`` replaces
    ``target`` instead). On any exception, ``KeyboardInterrupt`` included, the temporary file is removed; OS and
    encoder errors are raised as :class:`WriteError` (``what`` names the encoder in its message), anything else
    unchanged. ``FileExistsError`` when ``target`` and all its numbered siblings exist.
    """
    try:
        tmp = _reserve_temp(target)
    except FileExistsError:
        raise
    except OSError as exc:
        raise WriteError.from_exception(target, exc, what=what) from exc
    try:
        write(tmp)
        _sync(tmp)
        return _publish(tmp, target, overwrite)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if _is_write_failure(exc):
            raise WriteError.from_exception(target, exc, what=what) from exc
        raise


def _reserve_temp(target: Path) -> Path:
    """Create an empty hidden ``.name.<random>.partial`` file next to ``target`` (normal umask permissions)."""
    for _ in range(100):
        tmp = target.with_name(f".{target.stem}.{secrets.token_hex(4)}.partial")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"could not create a temporary file in {target.parent}")


def _sync(path: Path) -> None:
    """Flush ``path`` to the disk, so a late write error (full network drive, quota) shows before publishing."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (_errno.EINVAL, getattr(_errno, "ENOTSUP", -1), getattr(_errno, "EOPNOTSUPP", -1)):
            raise  # fsync unsupported by this file system: nothing to flush
    finally:
        os.close(fd)


def reserve_temp(target: Path) -> Path:
    """The writers' hidden temporary file next to `target` (created empty); publish it with `publish`."""
    return _reserve_temp(target)


def publish(tmp: Path, target: Path, overwrite: bool = False) -> Path:
    """Flush a finished temporary file to disk and move it into place (never replacing a file unless
    `overwrite`); returns the path written."""
    _sync(tmp)
    return _publish(tmp, target, overwrite)


def as_write_error(target: Path, exc: BaseException, *, what: str = "file") -> BaseException:
    """`exc` as a `WriteError` when it is an OS or encoder failure; otherwise `exc` itself."""
    return WriteError.from_exception(target, exc, what=what) if _is_write_failure(exc) else exc


def _candidates(target: Path) -> Iterator[Path]:
    yield target
    for i in range(1, _MAX_COUNTER + 1):
        yield target.with_name(f"{target.stem}_{i:05d}{target.suffix}")


def _publish(tmp: Path, target: Path, overwrite: bool) -> Path:
    """Move the finished temporary file into place without ever replacing an existing file."""
    if overwrite:
        os.replace(tmp, target)
        return target
    for candidate in _candidates(target):
        try:
            os.link(tmp, candidate)  # atomic "create if absent"
        except FileExistsError:
            continue
        except OSError:  # no hard links on this filesystem: check, then rename (Windows rename refuses to replace)
            if candidate.exists():
                continue
            try:
                os.rename(tmp, candidate)
            except FileExistsError:
                continue
            return candidate
        tmp.unlink()
        return candidate
    raise FileExistsError(f"{target.name} and its {_MAX_COUNTER} numbered variants all exist; choose another name")
