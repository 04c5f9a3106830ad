"""The job summary by mail, as vzdump's ``mailto``/``mailnotification`` send it.

vzdump (``PVE::VZDump::send_notification``) mails when addresses are configured
and the notification mode is ``auto`` or ``legacy-sendmail``; with
``mailnotification: failure`` only when a guest or the job failed. The message
follows its ``vzdump-subject``/``vzdump-body`` templates: the subject
``vzdump backup status (HOST): backup successful|failed``, a table of the guests,
the total time and size, then every guest's task log, each line prefixed with its
VMID (at most 1 MiB of logs, as vzdump). It is handed to the local ``sendmail``
(``sendmail -i -- ADDRESS...``); without one a note is logged and nothing is sent.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate
from pathlib import Path

from pvebackup.api.errors import ExternalToolError, PveBackupError
from pvebackup.api.types import GuestType
from pvebackup.kit import proc
from pvebackup.kit.units import format_bytes

from .guests import NodeRoot
from .job import JobResult

__all__ = ["MailSettings", "find_sendmail", "guest_names", "job_message", "send_job_mail"]

MAX_LOG_SIZE = 1024 * 1024  # vzdump's MAX_LOG_SIZE
_SBIN = ("/usr/sbin", "/usr/lib", "/sbin")


@dataclass(frozen=True)
class MailSettings:
    mailto: tuple[str, ...]
    policy: str = "always"  # always|failure
    mode: str = "auto"  # auto|legacy-sendmail|notification-system


def find_sendmail() -> str | None:
    """``sendmail`` on ``$PATH``, then where MTAs install it (cron's PATH lacks /usr/sbin)."""
    path = os.environ.get("PATH", os.defpath)
    return shutil.which("sendmail", path=os.pathsep.join([path, *_SBIN]))


def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h {s % 3600 // 60}m {s % 60}s" if s >= 3600 else (
        f"{s // 60}m {s % 60}s" if s >= 60 else f"{s}s"
    )


def guest_names(root: NodeRoot, result: JobResult) -> dict[int, str]:
    """The mail's "Name" column as vzdump fills it: a VM's ``name``, a container's
    ``hostname`` (``VM <vmid>``/``CT<vmid>`` without one); unreadable configs are left out."""
    names: dict[int, str] = {}
    for g in result.guests:
        try:
            config = root.load_guest(g.vmid, g.vmtype)
        except PveBackupError:
            continue  # gone since, or broken: the table falls back to the type and VMID
        if config.vmtype == GuestType.QEMU:
            names[g.vmid] = config.get("name") or f"VM {g.vmid}"
        else:
            names[g.vmid] = config.get("hostname") or f"CT{g.vmid}"
    return names


def job_message(
    result: JobResult,
    total_seconds: float,
    cmdline: str,
    host: str,
    error: str | None = None,
    names: Mapping[int, str] | None = None,
) -> EmailMessage:
    """The summary mail of one job (no recipients set); ``error``: the job's own failure;
    ``names``: VMID -> guest name (:func:`guest_names`)."""
    names = names or {}
    failed = bool(result.failed) or error is not None
    status = "backup failed" if failed else "backup successful"
    if error is not None:
        status += f": {error.splitlines()[0][:200]}" if error else ""
    rows = [("VMID", "Name", "Status", "Time", "Size", "Filename")]
    total = 0
    for g in result.guests:
        size = g.size or 0 if g.ok else 0
        total += size
        rows.append(
            (
                str(g.vmid),
                names.get(g.vmid) or f"{g.vmtype or 'guest'} {g.vmid}",
                "ok" if g.ok else "err",
                _duration(g.seconds),
                format_bytes(size),
                (g.target or "unknown") if g.ok else "",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    table = "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )
    errors = "".join(f"{g.vmid}: {g.error}\n" for g in result.failed)
    if error:
        errors = f"{error}\n{errors}"
    logs = f"{cmdline}\n\n" + "".join(_guest_log(g.vmid, g.log_path) for g in result.guests)
    if len(logs) > MAX_LOG_SIZE:
        logs = "Log output was too long to be sent. See the task logs for details!\n"
    body = (
        f"{errors}Details\n=======\n{table}\n\n"
        f"Total running time: {_duration(total_seconds)}\n"
        f"Total size: {format_bytes(total)}\n\nLogs\n====\n{logs}"
    )
    msg = EmailMessage()
    msg["Subject"] = f"vzdump backup status ({host}): {status}"
    msg["From"] = f"vzdump backup tool <root@{host}>"
    msg["Date"] = formatdate(localtime=True)
    msg.set_content(body)
    return msg


def _guest_log(vmid: int, path: Path | None) -> str:
    if path is None:
        return f"{vmid}: no log available\n\n"
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return f"{vmid}: Could not open log file\n\n"
    return "".join(f"{vmid}: {line}\n" for line in text.splitlines()) + "\n"


def send_job_mail(
    settings: MailSettings,
    result: JobResult,
    *,
    total_seconds: float,
    cmdline: str,
    log: Callable[[str, str], None],
    sendmail: str | None | Callable[[], str | None] = find_sendmail,
    error: str | None = None,
    root: NodeRoot | None = None,
) -> bool:
    """Mail the summary of ``result`` if vzdump would; returns whether it was sent.

    Never raises for a mail problem: the backups are done, and a failing MTA is
    logged (level ``err``) rather than turned into a failed job.
    """
    if not settings.mailto:
        return False
    if settings.mode == "notification-system":
        log("info", "notification-mode notification-system: no mail sent (pvebackup mails"
            " only through sendmail; set notification-mode to auto or legacy-sendmail)")
        return False
    if settings.policy == "failure" and not result.failed and error is None:
        return False
    program = sendmail() if callable(sendmail) else sendmail
    recipients = ", ".join(settings.mailto)
    if program is None:
        log("warn", f"no sendmail on this node: the job summary was not mailed to {recipients}")
        return False
    host = socket.getfqdn() or "localhost"
    names = guest_names(root, result) if root is not None else None
    msg = job_message(result, total_seconds, cmdline, host, error, names)
    msg["To"] = recipients
    argv: Sequence[str] = [program, "-i", "--", *settings.mailto]
    try:
        res = proc.run(argv, input=bytes(msg), timeout=120)
    except ExternalToolError as exc:
        log("err", f"mailing the job summary to {recipients} failed: {exc}")
        return False
    if res.returncode != 0:
        log("err", f"mailing the job summary to {recipients} failed: sendmail exited"
            f" {res.returncode}: {res.err[:200]}")
        return False
    log("info", f"job summary mailed to {recipients} at {time.strftime('%H:%M:%S')}")
    return True
