"""Where configs, data and checkpoints live."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Union

from villa.core.errors import VillaError

PathLike = Union[str, os.PathLike]


# --- atomic outputs ---------------------------------------------------------------------------------------------
# Every output file or folder is written under a hidden temporary name beside it, ".<name>.tmp-<pid>-<token>", and
# renamed into place when complete: a crash never leaves a half-written output. A process killed with SIGKILL
# cannot clean up, so the next write of the same output removes the temporaries of processes that are gone.


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def remove_stale_temporaries(final: PathLike) -> list[Path]:
    """Remove ``final``'s temporaries (``.<name>.tmp-<pid>-*`` / ``.<name>.old-<pid>-*``) left by dead processes."""
    final = Path(final)
    removed = []
    if not final.parent.is_dir():
        return removed
    for kind in ("tmp", "old"):
        for cand in final.parent.glob(f".{final.name}.{kind}-*"):
            pid = cand.name[len(f".{final.name}.{kind}-") :].split("-")[0]
            if not pid.isdigit() or int(pid) == os.getpid() or pid_alive(int(pid)):
                continue
            if cand.is_dir() and not cand.is_symlink():
                shutil.rmtree(cand, ignore_errors=True)
            else:
                cand.unlink(missing_ok=True)
            removed.append(cand)
    return removed


def check_writable(folder: PathLike) -> Path:
    """Check, without creating anything, that ``folder`` can be created or written; return its nearest existing
    ancestor (or itself). One VillaError line when an ancestor is a file or the folder is not writable."""
    folder = Path(folder)
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise VillaError(f"cannot write {folder}: {probe} is a file, not a folder; choose another output folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise VillaError(f"cannot write {folder}: {probe} is not writable; choose another output folder")
    return probe


def disk_full(e: BaseException, folder: Path) -> bool:
    """Whether ``e`` means the device ran out of space: ENOSPC / EDQUOT, or any writer's own error (torch's
    "PytorchStreamWriter failed writing file", numpy's short write, safetensors' SafetensorError) while the folder's
    device has no room left."""
    import errno

    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if isinstance(e, Exception) and not isinstance(e, VillaError):
        try:
            return shutil.disk_usage(folder).free < (1 << 20)
        except OSError:
            return False
    return False


def _disk_full_error(final: Path, e: BaseException) -> VillaError:
    return VillaError(
        f"no space left on the device writing {final}; free space there or choose another folder "
        f"(nothing was left half-written)"
    )


def _temporary_name(final: Path, kind: str = "tmp") -> Path:
    return final.with_name(f".{final.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def ensure_writable_parent(final: Path) -> None:
    """Create ``final``'s folder if needed; one VillaError line if it is a file or not writable."""
    parent = final.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:
        raise VillaError(f"cannot write {final}: {parent} is a file, not a folder; choose another output folder") from e
    except PermissionError as e:
        raise VillaError(f"cannot write {final}: no permission to create {parent}; choose another output folder") from e
    if not os.access(parent, os.W_OK | os.X_OK):
        raise VillaError(f"cannot write {final}: {parent} is not writable; choose another output folder")


@contextmanager
def atomic_file(final: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; write it; on success it replaces ``final`` (else it is removed)."""
    final = Path(final)
    ensure_writable_parent(final)
    remove_stale_temporaries(final)
    tmp = _temporary_name(final)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if not isinstance(e, VillaError) and disk_full(e, final.parent):
            raise _disk_full_error(final, e) from e
        raise


@contextmanager
def atomic_dir(final: PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a new temporary folder beside ``final`` (permissions as the umask says); on success it is renamed to
    ``final``. Without ``overwrite``, a ``final`` that appeared meanwhile (another process won) is a VillaError."""
    final = Path(final)
    ensure_writable_parent(final)
    remove_stale_temporaries(final)
    tmp = _temporary_name(final)
    tmp.mkdir(mode=0o777)  # the umask applies (mkdtemp would make it 0700)
    try:
        yield tmp
        if final.exists():
            if not overwrite:
                raise VillaError(
                    f"{final} was created by another process while this one ran; pass --overwrite to replace it "
                    "or choose another output folder"
                )
            old = _temporary_name(final, "old")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(e, VillaError) and disk_full(e, final.parent):
            raise _disk_full_error(final, e) from e
        raise


def write_text_atomic(final: PathLike, text: str) -> Path:
    with atomic_file(final) as tmp:
        Path(tmp).write_text(text)
    return Path(final)


def write_json_atomic(final: PathLike, obj: Any) -> Path:
    return write_text_atomic(final, json.dumps(obj, indent=2) + "\n")


def read_text(path: PathLike, encoding: str = "utf-8", fix: str = "re-save it as UTF-8") -> str:
    """A text file's contents; bytes that are not ``encoding`` are one line naming the file, the line and the byte
    offset (never a UnicodeDecodeError traceback). ``fix``: what the user can do (e.g. pass ``--encoding``)."""
    import codecs

    path = Path(path)
    raw = path.read_bytes()
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise VillaError(f"encoding {encoding!r} is not one Python knows; use e.g. utf-8, latin-1 or cp1252") from None
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise VillaError(
            f"{path}:{line}: byte 0x{raw[e.start]:02x} at byte offset {e.start} is not valid {encoding}; {fix}"
        ) from None
