"""Safe writes: outputs go to a temporary sibling and are renamed into place.

Every temporary is named `.{name}.{tmp|old|probe}-p{pid}s{start}h{host}-{random}` beside the
output `name`: the writing process's pid, its start time (clock ticks since boot, 0 where /proc is
missing: it tells a reused pid from the writer) and a hash of the host name. A writer killed with
SIGKILL (or a power cut) leaves its temporary behind; the next write to the same output removes
every temporary of that output whose writer is no longer running on this host (`clean_stale`).
Temporaries written by another host (a shared folder) are left alone: their writer may be alive.

Replacing an existing folder swaps the two atomically (Linux renameat2 RENAME_EXCHANGE), so a
reader sees the old folder or the new one, never neither; where the swap is not available the old
folder is first moved to a `.old-` sibling, and a writer killed between the two renames is rolled
back (the old folder put back) by the next write.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import shutil
import socket
import sys
import tempfile
from pathlib import Path

from fastforget.errors import OutputExistsError, OutputPathError

log = logging.getLogger("fastforget")

_HOST = hashlib.sha1(socket.gethostname().encode(errors="replace")).hexdigest()[:6]
_STALE = re.compile(r"^\.(?P<tag>.+)\.(?P<kind>tmp|old|probe)-p(?P<pid>\d+)s(?P<start>\d+)h(?P<host>[0-9a-f]{6})-")


# ---------------------------------------------------------------- temporaries and their owners
def _proc_stat(pid: int):
    """(state, start time) of a process from /proc, or None where /proc cannot tell."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode(errors="replace")
    except FileNotFoundError:
        return ("X", 0) if os.path.isdir("/proc/self") else None
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2:].split()  # after "pid (comm) ": state is field 3, starttime field 22
    try:
        return fields[0], int(fields[19])
    except (IndexError, ValueError):
        return None


def _start_time(pid: int) -> int:
    st = _proc_stat(pid)
    return st[1] if st else 0


def _alive(pid: int, start: int) -> bool:
    """Is the process that wrote a temporary still running? Zombies and reused pids count as gone."""
    if pid <= 0:
        return False
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process there: never judge, keep the temporary
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, another user's
    except OSError:
        return True  # cannot tell: keep the temporary
    st = _proc_stat(pid)
    if st is None:
        return True
    state, started = st
    if state in ("Z", "X", "x"):
        return False
    return not (start and started and started != start)


def _tag(name: str) -> str:
    """The output's name as it appears in its temporaries' names (long names shortened + hashed)."""
    if len(name) <= 100:
        return name
    return name[:80] + "~" + hashlib.sha1(name.encode(errors="surrogateescape")).hexdigest()[:12]


def _prefix(final: Path, kind: str) -> str:
    pid = os.getpid()
    return f".{_tag(final.name)}.{kind}-p{pid}s{_start_time(pid)}h{_HOST}-"


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            p.unlink()


def clean_stale(path) -> list[Path]:
    """Remove the temporaries a killed writer left beside `path` (see the module docstring); put
    back an old folder a killed writer had moved aside and not yet replaced. Returns what it removed."""
    final = Path(path)
    tag, removed = _tag(final.name), []
    try:
        entries = list(os.scandir(final.parent))
    except OSError:
        return removed
    stale = []
    for e in entries:
        m = _STALE.match(e.name)
        if not m or m["tag"] != tag or m["host"] != _HOST:
            continue
        if _alive(int(m["pid"]), int(m["start"])):
            continue
        stale.append((m["kind"], final.parent / e.name))
    for kind, p in sorted(stale, key=lambda s: s[0] != "old"):  # roll back first, then delete
        held = p / "x"
        if kind == "old" and not (final.exists() or final.is_symlink()) and (held.exists() or held.is_symlink()):
            try:
                os.rename(held, final)
                log.warning("%s: restored the previous version, which an interrupted write had moved to %s",
                            final, p.name)
            except OSError:
                continue  # leave it: it holds the only copy of the old output
        _remove(p)
        removed.append(p)
    return removed


# ---------------------------------------------------------------- up-front checks
def _protected(p: Path) -> str | None:
    """Why replacing the existing `p` as a whole must be refused, or None."""
    if p == Path(p.anchor):
        return "it is a file-system root"
    with contextlib.suppress(RuntimeError, KeyError):
        if p == Path.home().resolve():
            return "it is the home folder"
    with contextlib.suppress(OSError):
        cwd = Path.cwd().resolve()
        if cwd == p or p in cwd.parents:
            return "it holds the current working directory"
    return None


def check_output_path(path, overwrite: bool = False, name: str = "output", *, kind: str = "dir",
                      into: bool = False, keep=()) -> Path:
    """Refuse a bad output before any work is done; returns the resolved path.

    kind: "dir" (a folder written as a whole) or "file". into=True: files are written inside the
    folder `path` (it may exist already; nothing else in it is touched), so it only has to be a
    folder, or creatable, and writable. Otherwise an existing `path` raises OutputExistsError unless
    overwrite=True, and may not be a file-system root, the home folder, hold the working directory
    or hold any of `keep` (e.g. the input model's folder). OutputPathError when the parent cannot be
    created or written (probed by creating and removing a file in the nearest existing folder).
    Stale temporaries of this output (a killed writer's) are removed first."""
    raw = path
    p = Path(os.path.expanduser(os.fspath(path))).resolve()
    clean_stale(p)
    exists = p.exists() or p.is_symlink()
    if into:
        if exists and not p.is_dir():
            raise OutputPathError(f"{name}: {raw} exists and is not a folder")
    elif exists:
        if not overwrite:
            raise OutputExistsError(f"{name}: {raw} exists (pass overwrite=True / --overwrite to replace it)")
        if kind == "file" and p.is_dir():
            raise OutputPathError(f"{name}: {raw} is a folder; a file is written here")
        why = _protected(p)
        if why is None:
            for k in keep:
                k = Path(k).resolve()
                if k == p or p in k.parents:
                    why = f"it holds the input {k}"
                    break
        if why:
            raise OutputPathError(f"{name}: refusing to replace {raw}: {why}")
    probe_dir = p if into and exists else p.parent
    while not (probe_dir.exists() or probe_dir.is_symlink()):
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise OutputPathError(f"{name}: cannot create {raw}: {probe_dir} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=_prefix(p, "probe"), dir=probe_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputPathError(f"{name}: cannot write {raw}: {probe_dir} is not writable "
                              f"({exc.strerror or exc})") from None
    return p


# ---------------------------------------------------------------- atomic writes
def _fsync(path: Path, directory: bool = False) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            _fsync(Path(dirpath) / f)
        _fsync(Path(dirpath), directory=True)


_RENAMEAT2 = None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically (Linux renameat2 RENAME_EXCHANGE). False where unsupported."""
    global _RENAMEAT2
    if not sys.platform.startswith("linux"):
        return False
    if _RENAMEAT2 is None:
        import ctypes

        try:
            fn = ctypes.CDLL(None, use_errno=True).renameat2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            fn.restype = ctypes.c_int
            _RENAMEAT2 = (fn, ctypes)
        except (AttributeError, OSError):
            _RENAMEAT2 = False
    if not _RENAMEAT2:
        return False
    fn, ctypes = _RENAMEAT2
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _mkparent(final: Path, name: str, raw) -> None:
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputPathError(f"{name}: cannot create the folder of {raw} ({exc.strerror or exc})") from None


@contextlib.contextmanager
def atomic_directory(directory, overwrite: bool = False, *, name: str = "output"):
    """Yield a fresh temporary folder beside `directory`; on success it replaces `directory`.
    An existing `directory` is kept unless overwrite=True; on error nothing is left behind, and
    what a killed writer left is removed by the next write here."""
    final = check_output_path(directory, overwrite, name)
    _mkparent(final, name, directory)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=_prefix(final, "tmp"), dir=final.parent))
    except OSError as exc:
        raise OutputPathError(f"{name}: cannot write beside {directory} ({exc.strerror or exc})") from None
    try:
        yield tmp
        _fsync_tree(tmp)
        if final.exists() or final.is_symlink():
            if not overwrite:  # appeared while we worked
                raise OutputExistsError(f"{name}: {directory} appeared while it was being written; not replaced")
            if _exchange(tmp, final):
                shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old version
            else:
                old = Path(tempfile.mkdtemp(prefix=_prefix(final, "old"), dir=final.parent))
                os.replace(final, old / "x")
                try:
                    os.replace(tmp, final)
                except BaseException:
                    os.replace(old / "x", final)
                    raise
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync(final.parent, directory=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path, overwrite: bool = False, *, name: str = "output"):
    """Yield a temporary file (binary, open for writing) beside `path`; on success it is flushed to disk
    and renamed into place. Without overwrite the final step is a hard link, which fails if `path`
    appeared meanwhile. On error nothing is left behind. For outputs written piece by piece."""
    final = check_output_path(path, overwrite, name, kind="file")
    _mkparent(final, name, path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=_prefix(final, "tmp"), dir=final.parent)
    except OSError as exc:
        raise OutputPathError(f"{name}: cannot write beside {path} ({exc.strerror or exc})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, final)
        else:
            try:
                os.link(tmp, final)
            except FileExistsError:
                raise OutputExistsError(f"{name}: {path} appeared while it was being written; not replaced") from None
            except OSError:  # no hard links here (some network / FAT file systems)
                if final.exists():
                    raise OutputExistsError(f"{name}: {path} exists (pass overwrite=True to replace it)") from None
                os.replace(tmp, final)
            else:
                os.unlink(tmp)
        _fsync(final.parent, directory=True)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path, data: bytes, overwrite: bool = False, *, name: str = "output") -> Path:
    """Write `data` to a temporary file beside `path`, flush it to disk, rename it into place (atomic_file)."""
    with atomic_file(path, overwrite, name=name) as f:
        f.write(data)
    return Path(path)


def read_fastforget_safetensors(path, fmt: str, what: str, missing: str | None = None):
    """(header, tensors) of a safetensors file fastforget wrote with a JSON header under metadata key
    "fastforget" whose "format" is `fmt` (patches, batch statistics); ModelLoadError naming the file when it
    is missing (`missing`: the message), unreadable or another format."""
    import json

    from safetensors import safe_open

    from fastforget.errors import ModelLoadError

    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(missing or f"{what} file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = json.loads((f.metadata() or {}).get("fastforget", "{}"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise ModelLoadError(f"{path}: not a readable {what} file ({str(exc)[:200]})") from None
    if header.get("format") != fmt:
        raise ModelLoadError(f"{path}: not a fastforget {what} (format {header.get('format')!r})")
    return header, tensors
