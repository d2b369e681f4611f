"""Output files: checked before a run, the mode open() gives, errors naming the user's path, one
writer a path (two real processes), stale temporaries of dead writers only, RFC 8259 JSON."""

import errno
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

import gpubackprop as gb
from gpubackprop.checkpoint import Checkpointer, load_checkpoint, save_checkpoint
from gpubackprop.outputs import (
    OutputLocked,
    atomic_write,
    check_output_path,
    json_text,
    lock_output,
    write_json,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_model():
    model = gb.Sequential([gb.Dense(3, 4, activation="tanh"), gb.Dense(4, 2)], device="cpu",
                          kernels="reference", seed=0)
    return model, gb.SoftmaxCrossEntropy(), gb.Adam(0.01)


def temporaries(folder, name):
    return sorted(p for p in os.listdir(folder) if p.startswith(f".{name}.") and p.endswith(".tmp"))


@pytest.fixture
def umask():
    """Set the process umask for a test; the old one is put back."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda mask: os.umask(mask)
    os.umask(old)


# ---- the mode open() gives --------------------------------------------------------------------
@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_new_files_get_the_mode_open_gives(tmp_path, umask, mask):
    umask(mask)
    expected = 0o666 & ~mask  # mkstemp gave 0o600 whatever the umask
    model, loss, opt = small_model()
    atomic_write(tmp_path / "a.bin", lambda f: f.write(b"x"))
    save_checkpoint(tmp_path / "c.npz", model, opt, loss)
    write_json(tmp_path / "m.json", {"a": 1})
    with open(tmp_path / "plain", "w"):
        pass
    for name in ("a.bin", "c.npz", "m.json", "plain"):
        assert (tmp_path / name).stat().st_mode & 0o777 == expected, name


def test_plots_get_the_mode_open_gives(tmp_path, umask):
    pytest.importorskip("matplotlib")
    from gpubackprop.plotting import plot_history

    umask(0o027)
    plot_history([{"epoch": 1, "train_loss": 1.0}, {"epoch": 2, "train_loss": 0.5}],
                 tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_mode & 0o777 == 0o640


def test_a_replaced_file_keeps_its_own_mode(tmp_path, umask):
    umask(0o022)
    path = tmp_path / "m.json"
    path.write_text("{}")
    os.chmod(path, 0o640)  # made private by its owner: a rewrite must not widen it
    write_json(path, {"a": 1})
    assert path.stat().st_mode & 0o777 == 0o640


def test_a_symbolic_link_is_written_through(tmp_path):
    real = tmp_path / "real.json"
    real.write_text("{}")
    link = tmp_path / "link.json"
    link.symlink_to(real)
    write_json(link, {"a": 1})
    assert link.is_symlink() and json.loads(real.read_text()) == {"a": 1}


# ---- errors name the user's path --------------------------------------------------------------
def _fail_with(code):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))
    return fail


@pytest.mark.parametrize("where", ["fsync", "write"])
def test_a_full_disk_names_the_users_path_and_keeps_the_old_file(tmp_path, monkeypatch, where):
    path = tmp_path / "c.npz"
    model, loss, opt = small_model()
    save_checkpoint(path, model, opt, loss)
    before = path.read_bytes()
    if where == "fsync":
        monkeypatch.setattr(os, "fsync", _fail_with(errno.ENOSPC))
        write = lambda f: f.write(b"new")  # noqa: E731
    else:
        write = _fail_with(errno.ENOSPC)
    with pytest.raises(OSError) as e:
        atomic_write(path, write)
    monkeypatch.undo()
    assert e.value.errno == errno.ENOSPC
    assert str(e.value) == f"no space left on device writing {path}"  # not the hidden .tmp name
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["c.npz"]
    load_checkpoint(path)


@pytest.mark.parametrize("code,phrase", [(errno.EACCES, "permission denied"),
                                         (errno.EROFS, "read-only file system")])
def test_an_unwritable_folder_names_the_users_path(tmp_path, monkeypatch, code, phrase):
    # Root may write a chmod'ed folder, so the creation of the temporary file is made to fail.
    real_open = os.open

    def refuse(path, flags, *args, **kwargs):
        if str(path).endswith(".tmp"):
            raise OSError(code, os.strerror(code), path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse)
    path = tmp_path / "m.json"
    with pytest.raises(OSError, match=rf"^{phrase} writing {path}$") as e:
        write_json(path, {"a": 1})
    assert e.value.errno == code and isinstance(e.value, PermissionError) == (code == errno.EACCES)
    with pytest.raises(ValueError, match=rf"^metrics-json: cannot write {path}: {phrase}$"):
        check_output_path(path, "metrics-json")


def test_errors_of_the_writer_about_other_files_are_its_own(tmp_path):
    def write(f):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "/elsewhere/input.csv")

    with pytest.raises(FileNotFoundError, match="/elsewhere/input.csv"):
        atomic_write(tmp_path / "out.csv", write)
    assert os.listdir(tmp_path) == []


# ---- checked before a run ---------------------------------------------------------------------
def test_check_output_path_accepts_a_new_or_an_existing_file_and_leaves_nothing(tmp_path):
    assert check_output_path(tmp_path / "new.npz", "checkpoint") == str(tmp_path / "new.npz")
    (tmp_path / "old.json").write_text("{}")
    check_output_path(tmp_path / "old.json", "metrics-json")
    assert os.listdir(tmp_path) == ["old.json"]
    assert (tmp_path / "old.json").read_text() == "{}"


def test_check_output_path_names_the_argument_and_the_problem(tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("")
    (tmp_path / "adir").mkdir()
    cases = [
        (tmp_path / "no" / "m.json", rf"plot: the folder {tmp_path / 'no'} of .* does not exist"),
        (tmp_path / "afile" / "m.json", rf"plot: {tmp_path / 'afile'} \(in .*\) is a file, not a "
                                        rf"folder"),
        (tmp_path / "adir", rf"plot: {tmp_path / 'adir'} is a folder, expected a file path"),
        ("", r"plot: expected a file path, got ''"),
    ]
    if os.path.exists("/dev/null"):
        cases.append(("/dev/null", r"plot: /dev/null is not a regular file"))
    for path, pattern in cases:
        with pytest.raises(ValueError, match=f"^{pattern}"):
            check_output_path(path, "plot")
    # A read-only file (root may write one, so os.access is asked to say no), also for the write.
    ro = tmp_path / "ro.json"
    ro.write_text("{}")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if os.fspath(p) == str(ro)
                        else real_access(p, mode, **kw))
    with pytest.raises(ValueError, match=rf"^output: {ro} is read-only"):
        check_output_path(ro, "output")
    with pytest.raises(PermissionError, match=rf"^{ro} is read-only"):
        write_json(ro, {})
    assert ro.read_text() == "{}"


def test_check_output_path_finds_a_full_disk(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "fsync", _fail_with(errno.ENOSPC))
    path = tmp_path / "c.npz"
    with pytest.raises(ValueError, match=rf"^checkpoint: cannot write {path}: no space left on "
                                         rf"device$"):
        check_output_path(path, "checkpoint")
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(not os.path.isdir("/sys/kernel"), reason="needs Linux's sysfs")
def test_check_output_path_in_a_folder_no_one_may_write():
    # sysfs refuses new files even to root: a real unwritable folder whoever runs the tests.
    with pytest.raises(ValueError, match=r"^checkpoint: cannot write /sys/c.npz: "):
        check_output_path("/sys/c.npz", "checkpoint")


# ---- two processes, one path ------------------------------------------------------------------
def child(code, *args):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


HOLD_LOCK = """
import sys
from gpubackprop.outputs import lock_output
lock = lock_output(sys.argv[1], "checkpoint")
print("locked", flush=True)
sys.stdin.readline()
"""

WRITE_SLOWLY = """
import sys
from gpubackprop.outputs import atomic_write
def write(f):
    f.write(b"from the child")
    f.flush()
    print("writing", flush=True)
    sys.stdin.readline()
atomic_write(sys.argv[1], write)
print("done", flush=True)
"""


def test_a_second_writer_of_a_checkpoint_fails_naming_it_and_a_dead_ones_lock_does_not_block(
        tmp_path):
    path = tmp_path / "same.npz"
    other = child(HOLD_LOCK, path)
    try:
        assert other.stdout.readline() == "locked\n", other.stderr.read()
        model, loss, opt = small_model()
        ck = Checkpointer(path, model, opt, loss)
        with pytest.raises(OutputLocked, match=rf"^checkpoint {path}: another process \(pid "
                                               rf"{other.pid}\) is writing it"):
            ck.lock()
        X, y = np.zeros((4, 3)), np.array([0, 1, 0, 1])
        with pytest.raises(OutputLocked):  # fit's first save, before anything is written
            gb.fit(model, loss, opt, X, y, epochs=1, progress=False, on_checkpoint=ck)
        assert not path.exists()
    finally:
        other.kill()
        other.wait()
    assert (tmp_path / "same.npz.lock").exists()  # left by the killed process; it blocks nothing
    with Checkpointer(path, model, opt, loss) as ck:
        gb.fit(model, loss, opt, X, y, epochs=1, progress=False, on_checkpoint=ck)
    assert load_checkpoint(path).training_state().epoch == 1
    assert os.listdir(tmp_path) == ["same.npz"]  # the lock file goes with the lock


def test_a_lock_this_process_holds_can_be_taken_again(tmp_path):
    path = tmp_path / "c.npz"
    outer = lock_output(path, "checkpoint")  # the command line's, for the whole run
    model, loss, opt = small_model()
    with Checkpointer(path, model, opt, loss):  # and its Checkpointer's
        pass
    assert (tmp_path / "c.npz.lock").exists()  # still held by the outer one
    outer.release()
    assert not (tmp_path / "c.npz.lock").exists()


def test_writing_a_path_keeps_the_temporary_file_another_process_is_writing(tmp_path):
    path = tmp_path / "same.npz"
    other = child(WRITE_SLOWLY, path)
    try:
        assert other.stdout.readline() == "writing\n", other.stderr.read()
        (theirs,) = temporaries(tmp_path, "same.npz")
        atomic_write(path, lambda f: f.write(b"from the parent"))  # its cleanup ran here
        assert temporaries(tmp_path, "same.npz") == [theirs]
        out, err = other.communicate("\n", timeout=30)
    finally:
        other.kill()
    assert other.returncode == 0 and out == "done\n", err  # its rename found its file
    assert path.read_bytes() == b"from the child"


def test_the_temporary_file_of_a_killed_writer_is_removed(tmp_path):
    path = tmp_path / "same.npz"
    other = child(WRITE_SLOWLY, path)
    try:
        assert other.stdout.readline() == "writing\n", other.stderr.read()
    finally:
        other.send_signal(signal.SIGKILL)
        other.wait()
    assert len(temporaries(tmp_path, "same.npz")) == 1
    host = temporaries(tmp_path, "same.npz")[0].split(".")[3]
    kept = sorted([f".same.npz.{host}.{os.getpid()}.00ff.tmp",  # a live writer's
                   f".same.npz.otherhost.{other.pid}.00ff.tmp"])  # another host's: not known dead
    for name in kept:
        (tmp_path / name).write_bytes(b"")
    atomic_write(path, lambda f: f.write(b"new"))
    assert temporaries(tmp_path, "same.npz") == kept
    assert path.read_bytes() == b"new"


# ---- JSON -------------------------------------------------------------------------------------
def test_json_has_no_nan_or_infinity():
    obj = {"loss": float("nan"), "accuracy": np.float32(0.5), "big": -np.inf, "n": np.int64(3),
           "curve": np.array([1.0, np.nan]), "ok": np.bool_(True), "name": "x"}
    text = json_text(obj)

    def reject(constant):
        raise AssertionError(f"{constant} is not JSON")

    assert json.loads(text, parse_constant=reject) == {
        "loss": None, "accuracy": 0.5, "big": None, "n": 3, "curve": [1.0, None], "ok": True,
        "name": "x"}
