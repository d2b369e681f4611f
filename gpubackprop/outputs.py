"""Output files (checkpoints, metrics, plots, predictions): checked before a run, written atomically.

``check_output_path`` finds an output that cannot be written before any training is spent on it.
``atomic_write`` writes a temporary file in the same folder (flushed, fsynced) and renames it over
the old file with ``os.replace``, then fsyncs the folder: a process killed at any moment leaves the
old or the new file, whole. The new file gets the mode a plain ``open()`` would give (an existing
file's own, else 0o666 less the umask), and every error names the user's path, never the temporary
one. ``lock_output`` holds a file for one writing process; ``write_json``/``json_text`` write JSON
as RFC 8259 defines it.

Temporary files are named ``.{name}.{host}.{pid}.{random}.tmp``: the writer's host and process id
in the name let a later write remove only the temporaries of dead processes (left by a kill
mid-write), never those of a process still writing them.
"""

import errno
import json
import math
import os
import re
import signal
import socket
import stat
import threading

import numpy as np

try:
    import fcntl
except ImportError:  # Windows: no flock; outputs are not locked there
    fcntl = None

# Test-only fault injection (the CLI tests set it): "kill-in-checkpoint-write:N" sends SIGKILL to
# this process after the N-th checkpoint's temporary file is written and fsynced, before the rename;
# "kill-after-step:K" (checked by the command line) after training step K.
FAULT_ENV = "GPUBACKPROP_TEST_FAULT"
_writes = {"checkpoint": 0}
_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:32] or "host"


def fault_point(name, count):
    """Test-only: SIGKILL this process when GPUBACKPROP_TEST_FAULT is "{name}:{count}"."""
    spec = os.environ.get(FAULT_ENV, "")
    fault, _, at = spec.partition(":")
    if fault == name and at.isdigit() and int(at) == count:
        os.kill(os.getpid(), signal.SIGKILL)


# ---- what is wrong with a path ----------------------------------------------------------------
def _target(path):
    """The file a write of ``path`` changes: through a symbolic link, as ``open()`` writes."""
    return os.path.realpath(path) if os.path.islink(path) else path


def _path_problem(path):
    """(OSError class, errno, text) of why ``path`` cannot be written as a file, or None."""
    target = _target(path)
    folder = os.path.dirname(os.path.abspath(target))
    if not os.path.isdir(folder):
        if os.path.exists(folder):
            return NotADirectoryError, errno.ENOTDIR, f"{folder} (in {path}) is a file, not a folder"
        return FileNotFoundError, errno.ENOENT, f"the folder {folder} of {path} does not exist"
    if os.path.isdir(target):
        return IsADirectoryError, errno.EISDIR, f"{path} is a folder, expected a file path"
    if os.path.exists(target):
        if not stat.S_ISREG(os.stat(target).st_mode):
            # os.replace would put a regular file in place of a device, pipe or socket.
            return OSError, errno.EINVAL, (f"{path} is not a regular file (a device, pipe or "
                                           f"socket), expected a file path")
        if not os.access(target, os.W_OK):
            return PermissionError, errno.EACCES, f"{path} is read-only (no write permission)"
    return None


def _reason(e):
    """An OSError's reason as a phrase: "no space left on device", "permission denied", ..."""
    if e.strerror:
        return e.strerror[:1].lower() + e.strerror[1:]
    return str(e) or type(e).__name__


def _naming(e, path, doing="writing"):
    """``e`` again, of the same class and errno, its message naming the user's ``path``."""
    try:
        named = type(e)(f"{_reason(e)} {doing} {path}")
    except TypeError:  # a subclass with another constructor
        named = OSError(f"{_reason(e)} {doing} {path}")
    named.errno = e.errno
    return named


def check_output_path(path, name):
    """Raise ``ValueError`` naming the argument ``name`` unless ``path`` can be written as a file.

    For a run's outputs, before the run: the folder exists and is a folder, ``path`` is not a
    folder, a device or a read-only file, and a file can be created, written and synced in the
    folder (a read-only or full file system fails here, not after the last epoch).
    """
    path = os.fspath(path)
    if not path:
        raise ValueError(f"{name}: expected a file path, got ''")
    problem = _path_problem(path)
    if problem is not None:
        raise ValueError(f"{name}: {problem[2]}")
    target = _target(path)
    folder = os.path.dirname(os.path.abspath(target))
    try:
        fd, probe = _create_temporary(folder, os.path.basename(target))
        try:
            os.write(fd, b"\0")  # a full disk can still create empty files
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise ValueError(f"{name}: cannot write {path}: {_reason(e)}") from None
    return path


# ---- temporary files --------------------------------------------------------------------------
def _create_temporary(folder, base):
    """(fd, path) of a new temporary file for ``base`` in ``folder``, named after this process.

    Created by ``os.open`` with mode 0o666, so that the kernel applies the umask (and a default
    ACL) as for ``open()``: ``tempfile.mkstemp`` makes 0o600 files, and reading the umask means
    setting it, which races with other threads creating files.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = os.path.join(folder, f".{base}.{_HOST}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no unused temporary file name", tmp)


def _alive(pid):
    """Whether process ``pid`` of this host may still be running (True when it cannot be told)."""
    if pid <= 0 or os.name == "nt":  # kill(0) signals the group; Windows' kill terminates
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        return True
    return True


def _remove_stale_temporaries(folder, base):
    """Remove the temporaries of ``base`` whose writer is dead: a kill mid-write leaves them.

    A temporary of a live process (another run writing the same path) is kept: removing it made
    that run's rename fail. So is one of another host (its pid means nothing here), and one whose
    pid was reused (harmless: a later write removes it). Names without a pid, left by versions
    before pids were recorded, are removed as those versions did.
    """
    ours = re.compile(rf"\.{re.escape(base)}\.([A-Za-z0-9-]+)\.(\d+)\.[0-9a-f]+\.tmp")
    old = re.compile(rf"\.{re.escape(base)}\.[A-Za-z0-9_]+\.tmp")
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for entry in names:
        m = ours.fullmatch(entry)
        if m is not None:
            if m.group(1) != _HOST or _alive(int(m.group(2))):
                continue
        elif old.fullmatch(entry) is None:
            continue
        try:
            os.unlink(os.path.join(folder, entry))
        except OSError:
            pass


# ---- atomic writes ----------------------------------------------------------------------------
def atomic_write(path, write, binary=True, kind=None):
    """Write a file through ``write(f)`` so that ``path`` is always either the old or the new file.

    The data goes to a temporary file in the same folder (flushed, fsynced), which then replaces
    ``path`` (``os.replace``; through a symbolic link, the file it points to); the folder is
    fsynced so the rename itself survives a power cut. The file gets the mode ``open()`` would
    give. On any error the temporary file is removed, ``path`` is untouched, and an ``OSError``
    (same class and errno) names ``path``: "no space left on device writing PATH".
    """
    path = os.fspath(path)
    problem = _path_problem(path)
    if problem is not None:
        cls, code, text = problem
        e = cls(text)
        e.errno = code
        raise e
    target = _target(path)
    folder = os.path.dirname(os.path.abspath(target))
    base = os.path.basename(target)
    # A replaced file keeps its own mode, as when open() truncates it.
    mode = stat.S_IMODE(os.stat(target).st_mode) if os.path.exists(target) else None
    _remove_stale_temporaries(folder, base)
    try:
        fd, tmp = _create_temporary(folder, base)
    except OSError as e:
        raise _naming(e, path) from e
    try:
        if mode is not None:
            os.chmod(tmp, mode)
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if kind is not None:
            _writes[kind] = _writes.get(kind, 0) + 1
            fault_point(f"kill-in-{kind}-write", _writes[kind])
        os.replace(tmp, target)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        # Errors of the destination (write, fsync, close, rename: no file name, or the temporary
        # one) name the user's path; an error about some other file is the writer's own.
        if isinstance(e, OSError) and e.filename in (None, tmp, target, path):
            raise _naming(e, path) from e
        raise
    _fsync_dir(folder)


def _fsync_dir(folder):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows: folders cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---- JSON -------------------------------------------------------------------------------------
def finite_json(obj):
    """``obj`` with NumPy values as Python ones and NaN/±Inf as None, for ``json.dumps``.

    RFC 8259 JSON has no NaN or Infinity (Python's ``json`` writes them, and most readers then
    fail); a non-finite number becomes ``null``, as JavaScript's ``JSON.stringify`` writes it, so
    that a diverged loss is still reported, as "no value", in a file every reader can parse.
    """
    if isinstance(obj, dict):
        return {str(k): finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return finite_json(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def json_text(obj, indent=None):
    """``obj`` as RFC 8259 JSON text: non-finite numbers as ``null`` (see ``finite_json``)."""
    return json.dumps(finite_json(obj), indent=indent, allow_nan=False)


def write_json(path, obj, indent=2):
    """Write ``obj`` to ``path`` as RFC 8259 JSON (non-finite numbers as ``null``), atomically."""
    text = json_text(obj, indent) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


# ---- one writer a path ------------------------------------------------------------------------
class OutputLocked(OSError):
    """Another process holds the lock of an output path: it is writing the same file."""


# flock locks an open file, so a second flock of the same lock file from this process (another
# open()) would fail against this process's own lock: a process takes each lock once and counts
# the holders.
_held = {}  # lock file (real path) -> [fd, holders]
_held_guard = threading.Lock()


def _take(lock_path, path, name):
    """The fd of ``lock_path`` with an exclusive flock; ``OutputLocked`` if another process has it."""
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 200, 0).decode(errors="replace").split()
            os.close(fd)
            who = "another process"
            if owner and owner[0].isdigit():
                who += f" (pid {owner[0]}" + (f" on {owner[1]})" if owner[1:] and owner[1] != _HOST
                                              else ")")
            e = OutputLocked(f"{name} {path}: {who} is writing it (it holds {lock_path}); wait for "
                             f"it to finish or write to another path")
            e.errno = errno.EWOULDBLOCK
            raise e from None
        except BaseException:
            os.close(fd)
            raise
        # The holder before us removes the file as it lets go: had it done so between our open and
        # our flock, we would hold a file no one else sees. Lock the one at the path then.
        try:
            current = os.stat(lock_path)
        except FileNotFoundError:
            current = None
        if current is not None and os.path.samestat(os.fstat(fd), current):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {_HOST}\n".encode(), 0)
            return fd
        os.close(fd)


class OutputLock:
    """An exclusive lock on an output path for this process, held in ``{path}.lock`` by ``flock``.

    A second process asking for it gets ``OutputLocked`` naming the path and the holder's pid. The
    lock ends with ``release()``, the ``with`` block, or this object; it dies with the process, so
    a lock file left by a killed run never blocks the next one. Taking a lock this process already
    holds (e.g. the command line's lock, then its Checkpointer's) counts one more holder.
    """

    def __init__(self, path, name="output"):
        self.path, self.name = os.fspath(path), name
        self.lock_path = os.path.realpath(self.path) + ".lock"
        self._pid = None
        if fcntl is None:
            return
        with _held_guard:
            entry = _held.get(self.lock_path)
            if entry is None:
                try:
                    fd = _take(self.lock_path, self.path, name)
                except OutputLocked:
                    raise
                except OSError as e:
                    raise _naming(e, self.path, "locking") from e
                entry = _held[self.lock_path] = [fd, 0]
            entry[1] += 1
        self._pid = os.getpid()

    def __repr__(self):
        return f"OutputLock({self.path!r}, held={self.held})"

    @property
    def held(self):
        return self._pid is not None

    def release(self):
        # After a fork the child shares the parent's lock: only the process that took it lets go.
        if self._pid is None or self._pid != os.getpid():
            self._pid = None
            return
        self._pid = None
        with _held_guard:
            entry = _held[self.lock_path]
            entry[1] -= 1
            if entry[1]:
                return
            del _held[self.lock_path]
            try:  # removed while still locked, so no one can lock the file once it is gone
                os.unlink(self.lock_path)
            except OSError:
                pass
            os.close(entry[0])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

    def __del__(self):
        try:
            self.release()
        except Exception:  # at interpreter exit; the lock dies with the process anyway
            pass


def lock_output(path, name="output"):
    """``OutputLock(path, name)``: hold ``path`` for this process's writes, or fail naming it."""
    return OutputLock(path, name)
