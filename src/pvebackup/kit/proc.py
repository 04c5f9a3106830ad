"""Supervised child processes: every external tool we start goes through here.

A backup that is killed with SIGKILL runs no ``finally`` block. Whatever it
started must then go away by itself, or an orphaned ``qemu-storage-daemon`` keeps
the guest's image open (every later backup fails with "Failed to get shared write
lock"), an orphaned ``qemu-nbd`` keeps writing, an ``rsync`` keeps copying.

- **Die with the parent.** Every child asks the kernel for SIGKILL when its parent
  dies (``prctl(PR_SET_PDEATHSIG, SIGKILL)``, kept across ``execve``), then checks
  that the parent is still the one that forked it: a parent killed between
  ``fork`` and ``prctl`` is caught by that check, so there is no window.
- **Stopped by PID, always reaped.** :meth:`Child.stop` sends SIGTERM, waits,
  then SIGKILL, and waits again; it also removes the child's private run
  directory. A child is a context manager; :func:`run` kills and reaps its child
  when an exception (SIGTERM turned into ``AbortedError``) leaves it.
- **Private run directory.** :func:`private_dir` makes a fresh 0700 directory for
  a child's sockets, pid and log files (nobody else can connect to a socket in it
  or swap a file there); handed to ``spawn(run_dir=)``, the child owns it and
  :meth:`Child.stop` removes it.
- **Observable.** Inside :func:`observe_children`, every start and end of a child
  is reported (PID, kernel start time, program, run dir), and every private
  directory *before* it is created, so that the host can
  record them in a guest's run state and a later run can find what a crashed run
  left (see ``pvebackup.host.runstate``). :func:`process_alive` and
  :func:`kill_verified` check ``/proc/PID`` start time and program first, so a
  recycled PID is never signalled.

**Why ``preexec_fn`` is acceptable here.** Python warns that ``preexec_fn`` may
deadlock in a threaded program: after ``fork`` only the forking thread exists,
and a lock another thread held stays locked forever in the child. The function
here takes no Python-level lock, does not import, and calls only ``prctl`` and
``getppid`` (async-signal-safe system calls) through a ctypes function pointer
resolved at import; CPython re-initialises the GIL and its own locks in the child
before calling it, and glibc's ``malloc`` is fork-safe. The alternative, an exec
wrapper such as ``setpriv --pdeathsig KILL``, cannot do the parent check and so
leaves the fork/prctl window open.

**Which thread spawns.** PDEATHSIG fires when the *thread* that forked the child
exits, not only the process. Every child here is started from the thread that
runs the job (the main thread of the CLI) and stopped before that thread leaves
the call that started it; a helper thread that starts a long-lived child must
outlive it too.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Protocol

from pvebackup.api.errors import ExternalToolError

__all__ = [
    "Child",
    "ChildInfo",
    "ChildObserver",
    "Result",
    "kill_verified",
    "observe_children",
    "process_alive",
    "private_dir",
    "process_start_time",
    "run",
    "spawn",
]

_PR_SET_PDEATHSIG = 1
_SIGKILL = int(signal.SIGKILL)
_libc = ctypes.CDLL(None, use_errno=True)
_prctl = _libc.prctl
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_prctl.restype = ctypes.c_int
_getppid = os.getppid
_exit = os._exit

STOP_TIMEOUT = 5.0
"""Seconds :meth:`Child.stop` waits after SIGTERM (and again after SIGKILL)."""


def _die_with(parent: int) -> Callable[[], None]:
    """The ``preexec_fn`` of every child: SIGKILL when ``parent`` dies."""

    def preexec() -> None:
        # Runs in the child between fork and exec: system calls only (see module doc).
        if _prctl(_PR_SET_PDEATHSIG, _SIGKILL, 0, 0, 0) != 0:
            _exit(126)
        if _getppid() != parent:
            _exit(126)  # the parent died before prctl: nobody would stop us

    return preexec


# -- identity of a process ----------------------------------------------------------


def process_start_time(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), None if gone.

    With the PID it names one process for the life of the system: a recycled PID
    has a later start time. A zombie counts as gone.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # comm (field 2) may contain spaces and parentheses: split after the last ")".
    fields = stat[stat.rfind(b")") + 2 :].split()
    if not fields or fields[0] == b"Z" or len(fields) < 20:
        return None
    return int(fields[19])


def _program(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv0 = f.read().split(b"\0", 1)[0]
    except OSError:
        return None
    return os.path.basename(argv0.decode(errors="replace"))


def process_alive(pid: int, start_time: int, program: str) -> bool:
    """True if ``pid`` is still the process started at ``start_time`` running ``program``.

    ``program`` is compared with the base name of ``argv[0]``.
    """
    if pid <= 1 or process_start_time(pid) != start_time:
        return False
    return _program(pid) == os.path.basename(program)


def kill_verified(pid: int, start_time: int, program: str, *, timeout: float = 5.0) -> bool:
    """SIGKILL ``pid`` if it is the process described; wait until it is gone.

    Returns True if it was found and killed, False if it was already gone (or
    the PID now belongs to another process, which is left alone).

    A process that is exiting (killed with its parent a moment ago) has an empty
    command line while it still holds its files, an image's write lock among
    them: with the right start time it is waited for, not taken for another one.
    """
    if pid <= 1 or process_start_time(pid) != start_time:
        return False
    name = _program(pid)
    found = name == os.path.basename(program)
    if found:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return False
    elif name != "":
        return False  # the PID was recycled: another process, left alone
    deadline = time.monotonic() + timeout
    while process_start_time(pid) == start_time and time.monotonic() < deadline:
        time.sleep(0.01)
    return found


# -- observers ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChildInfo:
    """What identifies a child process later, also from another process."""

    pid: int
    start_time: int
    program: str
    """``argv[0]`` as given (its base name is checked against ``/proc/PID/cmdline``)."""
    run_dir: str | None


class ChildObserver(Protocol):
    """Told about every child started or ended inside :func:`observe_children`."""

    def child_started(self, info: ChildInfo) -> None: ...

    def child_ended(self, info: ChildInfo) -> None: ...

    def dir_planned(self, path: str) -> None:
        """``path`` is about to be created by :func:`private_dir` (it does not exist yet)."""


_observers: list[ChildObserver] = []
_observers_lock = threading.Lock()


@contextmanager
def observe_children(observer: ChildObserver) -> Iterator[None]:
    """Within the block, report every child started or stopped to ``observer``."""
    with _observers_lock:
        _observers.append(observer)
    try:
        yield
    finally:
        with _observers_lock:
            _observers.remove(observer)


def _notify(event: str, info: ChildInfo | str) -> None:
    with _observers_lock:
        observers = list(_observers)
    for observer in observers:
        getattr(observer, event)(info)


# -- private directories ----------------------------------------------------------------


def private_dir(prefix: str, parent: str | os.PathLike[str] | None = None) -> Path:
    """Create a fresh 0700 directory ``<parent>/<prefix><random>`` (``mkdtemp``'s job).

    Observers hear of the name *before* it is created, so that a run killed at any
    moment has recorded every directory it may have left.
    """
    base = Path(parent) if parent is not None else Path(tempfile.gettempdir())
    for _ in range(100):
        path = base / f"{prefix}{secrets.token_hex(4)}"
        _notify("dir_planned", str(path))
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            continue
        os.chmod(path, 0o700)  # mkdir's mode is masked by the umask
        return path
    raise FileExistsError(f"no free name for {prefix}* in {base}")


# -- children -------------------------------------------------------------------------


class Child:
    """A running child process started by :func:`spawn`; stop it with :meth:`stop`."""

    def __init__(self, popen: subprocess.Popen[bytes], info: ChildInfo) -> None:
        self.popen = popen
        self.info = info
        self._stopped = False

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def run_dir(self) -> Path:
        """The child's private 0700 directory (only if ``spawn`` got one)."""
        if self.info.run_dir is None:
            raise RuntimeError(f"{self.info.program} was started without a run directory")
        return Path(self.info.run_dir)

    @property
    def stdin(self) -> IO[bytes] | None:
        return self.popen.stdin

    @property
    def stdout(self) -> IO[bytes] | None:
        return self.popen.stdout

    @property
    def stderr(self) -> IO[bytes] | None:
        return self.popen.stderr

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def poll(self) -> int | None:
        """The exit status, or None while it runs (a dead child is reaped here)."""
        return self.popen.poll()

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the exit; :class:`subprocess.TimeoutExpired` after ``timeout``."""
        return self.popen.wait(timeout)

    def signal(self, sig: int) -> None:
        """Send ``sig`` unless the child was reaped already."""
        if self.popen.poll() is None:
            try:
                os.kill(self.popen.pid, sig)
            except ProcessLookupError:
                pass

    def stop(self, timeout: float = STOP_TIMEOUT, *, remove_run_dir: bool = True) -> int:
        """SIGTERM, wait, SIGKILL, wait; reap; remove the run dir. Idempotent.

        Returns the exit status (negative: killed by that signal).
        """
        try:
            if self.popen.poll() is None:
                self.signal(signal.SIGTERM)
                try:
                    self.popen.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.signal(signal.SIGKILL)
                    self.popen.wait()  # SIGKILL cannot be ignored: this returns
            return self.popen.returncode
        finally:
            for stream in (self.popen.stdin, self.popen.stdout, self.popen.stderr):
                if stream is not None:
                    stream.close()
            if remove_run_dir:
                self.remove_run_dir()
            if not self._stopped:
                self._stopped = True
                _notify("child_ended", self.info)

    def remove_run_dir(self) -> None:
        """Remove the private run directory (after the child is gone)."""
        if self.info.run_dir is not None:
            shutil.rmtree(self.info.run_dir, ignore_errors=True)

    def __enter__(self) -> Child:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def spawn(
    argv: Sequence[str],
    *,
    run_dir: Path | None = None,
    stdin: int | IO[Any] | None = subprocess.DEVNULL,
    stdout: int | IO[Any] | None = None,
    stderr: int | IO[Any] | None = None,
    env: Mapping[str, str] | None = None,
    pass_fds: Sequence[int] = (),
    new_session: bool = False,
    cwd: str | os.PathLike[str] | None = None,
) -> Child:
    """Start ``argv`` as a child that dies with us.

    :param run_dir: the child's private directory (made with :func:`private_dir`);
        from now on the child owns it: :meth:`Child.stop` removes it, also when the
        start fails.
    :param new_session: ``setsid`` (a Ctrl-C on the terminal then reaches only us).
    :raises ExternalToolError: the program cannot be started.
    """
    try:
        popen = subprocess.Popen(
            list(argv),
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            env=dict(env) if env is not None else None,
            pass_fds=tuple(pass_fds),
            start_new_session=new_session,
            cwd=cwd,
            preexec_fn=_die_with(os.getpid()),
        )
    except BaseException as exc:
        if run_dir is not None:
            shutil.rmtree(run_dir, ignore_errors=True)
        if isinstance(exc, OSError):
            raise ExternalToolError(f"cannot run {argv[0]}: {exc.strerror or exc}") from exc
        raise
    start = process_start_time(popen.pid)
    info = ChildInfo(
        popen.pid,
        start if start is not None else -1,
        argv[0],
        str(run_dir) if run_dir is not None else None,
    )
    child = Child(popen, info)
    try:
        _notify("child_started", info)
    except BaseException:
        child.stop(0)
        raise
    return child


@dataclass(frozen=True, slots=True)
class Result:
    """A finished :func:`run`."""

    argv: tuple[str, ...]
    returncode: int
    stdout: bytes
    stderr: bytes

    @property
    def out(self) -> str:
        """stdout decoded (UTF-8, bad bytes replaced)."""
        return self.stdout.decode(errors="replace")

    @property
    def err(self) -> str:
        """stderr decoded and stripped, for error messages."""
        return self.stderr.decode(errors="replace").strip()


def run(
    argv: Sequence[str],
    *,
    input: bytes | None = None,
    env: Mapping[str, str] | None = None,
    pass_fds: Sequence[int] = (),
    timeout: float | None = None,
) -> Result:
    """Run ``argv`` to its end and capture stdout and stderr (a supervised ``subprocess.run``).

    An exception while waiting (SIGTERM as ``AbortedError``, ``timeout``) kills and
    reaps the child before it propagates.

    :raises ExternalToolError: it cannot be started, or ``timeout`` passed.
    """
    child = spawn(
        argv,
        stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        pass_fds=pass_fds,
    )
    try:
        out, err = child.popen.communicate(input, timeout)
    except subprocess.TimeoutExpired as exc:
        child.stop(0)
        raise ExternalToolError(f"{argv[0]} did not finish in {timeout:g} s") from exc
    except BaseException:
        child.stop(0)
        raise
    code = child.stop()
    return Result(tuple(argv), code, out, err)
