"""Job defaults from ``ROOT/etc/vzdump.conf``, as vzdump reads them.

The syntax is Proxmox VE's (``PVE::JSONSchema::parse_config`` with vzdump's schema,
``PVE::VZDump::read_vzdump_defaults``): ``key: value`` lines, ``#`` comments,
surrounding blanks ignored; ``exclude-path`` may be given on several lines, each
split with shell quoting (``split_args``); ``mailto`` is a list split at commas,
semicolons and blanks (``split_list``); ``fleecing`` and ``performance`` are property
strings (``fleecing``'s default key is ``enabled``, which defaults to 0, so
``fleecing: storage=X`` alone leaves fleecing off, as in Proxmox VE).

Keys applied: ``storage``, ``mode``, ``stopwait``, ``bwlimit`` (KiB/s, 0: none),
``exclude-path``, ``stdexcludes`` (default 1), ``prune-backups`` (below the
storage's own property, as vzdump), ``notes-template``, ``mailto``,
``mailnotification``, ``notification-mode``,
``fleecing``; ``performance`` is checked and reported as not applicable. Other
vzdump keys are accepted and ignored (``script`` and ``dumpdir`` with a warning,
they change what a job does); unknown keys warn, as Proxmox VE warns. Unlike
Proxmox VE, which drops a malformed value with a warning and runs the job without
it, a malformed value is a :class:`ConfigError` naming the line: a cron job that
silently backs up to the wrong place, or without its bandwidth limit, is worse
than one that fails loudly. A command line option wins over the file.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from pvebackup.api.errors import ConfigError, UnsafeStorageError
from pvebackup.kit import safefs
from pvebackup.kit.notestemplate import check_template
from pvebackup.kit.prune import format_keep_options, parse_keep_options

from .guests import NodeRoot

__all__ = [
    "MAIL_POLICIES",
    "STD_EXCLUDES",
    "JobDefaults",
    "defaults_path",
    "read_job_defaults",
]

_MODES = ("snapshot", "suspend", "stop")
MAIL_POLICIES = ("always", "failure")
STD_EXCLUDES = ("/tmp/?*", "/var/tmp/?*", "/var/run/?*.pid")
"""What ``stdexcludes`` (on by default) leaves out of a container backup: vzdump's
list (PVE/VZDump.pm), after the ``exclude-path`` patterns."""
_NOTIFICATION_MODES = ("auto", "legacy-sendmail", "notification-system")

# vzdump's other keys (pve-guest-common PVE/VZDump/Common.pm): valid in the file,
# without meaning for a backup provider job.
_IGNORED = frozenset(
    (
        "tmpdir", "compress", "pigz", "zstd", "ionice", "lockwait", "quiet",
        "remove", "pool", "protected", "pbs-change-detection-mode", "node", "stop",
        "exclude", "all", "vmid", "stdout", "notification-policy", "notification-target",
    )
)
_WARNED = {
    "script": "hook scripts are not run by pvebackup",
    "dumpdir": "pvebackup backs up to a storage only (give 'storage:')",
}
# pve-storage-id: PVE's format (PVE::JSONSchema::parse_storage_id).
_STORAGE_ID = re.compile(r"^[a-z][a-z0-9\-_.]*[a-z0-9]$", re.IGNORECASE)
# email-or-username: no blanks or list separators; never a leading '-', so that an
# address can never be read as an option by sendmail.
_ADDRESS = re.compile(r"^[^\s,;\-@][^\s,;@]*(@[^\s,;@]+)?$")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_NOTES_MAX = 1024  # PVE's maxLength of notes-template


@dataclass(frozen=True)
class JobDefaults:
    mode: str | None = None
    stop_wait: float | None = None  # minutes
    fleecing_storage: str | None = None
    storage: str | None = None
    bwlimit_kib: int | None = None  # 0: explicitly unlimited
    exclude_paths: tuple[str, ...] = ()
    stdexcludes: bool | None = None  # None: on, as vzdump
    prune_backups: str | None = None  # normalised keep options
    notes_template: str | None = None
    mailto: tuple[str, ...] = ()
    mail_policy: str | None = None  # always|failure (None: always)
    notification_mode: str | None = None  # None: auto
    max_workers: int | None = None
    pbs_entries_max: int | None = None
    warnings: tuple[str, ...] = field(default=(), compare=False)
    notes: tuple[str, ...] = field(default=(), compare=False)  # info, not warnings


def defaults_path(root: NodeRoot) -> Path:
    return root.root / "etc" / "vzdump.conf"


def read_job_defaults(root: NodeRoot) -> JobDefaults:
    """The defaults in ``ROOT/etc/vzdump.conf`` (all unset when there is none).

    :attr:`JobDefaults.warnings` lists unknown keys and ignored keys that change
    what a job does, :attr:`JobDefaults.notes` valid settings without effect; the
    caller logs them.

    :raises ConfigError: a malformed line or value, naming the file and line.
    """
    path = defaults_path(root)
    try:
        data = safefs.read_file_path(path, limit=safefs.MAX_CONFIG_FILE_SIZE)
        text = data.decode("utf-8")
    except FileNotFoundError:
        return JobDefaults()
    except (OSError, UnicodeDecodeError, UnsafeStorageError) as exc:
        raise ConfigError(f"cannot read: {exc}", path=str(path)) from exc
    return _Parser(str(path)).parse(text)


class _Parser:
    def __init__(self, path: str) -> None:
        self.path = path
        self.values: dict[str, object] = {}
        self.excludes: list[str] = []
        self.warnings: list[str] = []
        self.notes: list[str] = []
        self.line = 0

    def error(self, message: str) -> ConfigError:
        return ConfigError(message, path=self.path, line=self.line)

    def parse(self, text: str) -> JobDefaults:
        for n, raw in enumerate(text.splitlines(), start=1):
            self.line = n
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            # parse_config's ^(\S+?):\s*(.*)$ : the key ends at the first colon.
            m = re.fullmatch(r"(\S+?):\s*(.*)", line)
            if m is None:
                raise self.error(f"cannot parse line {line[:80]!r}")
            self.key(m.group(1), m.group(2))
        v = self.values
        prune = v.get("prune-backups")
        if prune is None and "maxfiles" in v:
            prune = f"keep-last={v['maxfiles']}" if v["maxfiles"] else None
        return JobDefaults(
            mode=_opt_str(v.get("mode")),
            stop_wait=_opt_float(v.get("stopwait")),
            fleecing_storage=_opt_str(v.get("fleecing")),
            storage=_opt_str(v.get("storage")),
            bwlimit_kib=_opt_int(v.get("bwlimit")),
            exclude_paths=tuple(self.excludes),
            stdexcludes=_opt_bool(v.get("stdexcludes")),
            prune_backups=_opt_str(prune),
            notes_template=_opt_str(v.get("notes-template")),
            mailto=tuple(str(a) for a in _opt_list(v.get("mailto"))),
            mail_policy=_opt_str(v.get("mailnotification")),
            notification_mode=_opt_str(v.get("notification-mode")),
            max_workers=_opt_int(v.get("max-workers")),
            pbs_entries_max=_opt_int(v.get("pbs-entries-max")),
            warnings=tuple(self.warnings),
            notes=tuple(self.notes),
        )

    def key(self, key: str, value: str) -> None:
        where = f"{self.path}:{self.line}"
        if key == "exclude-path":
            try:
                self.excludes.extend(shlex.split(value))
            except ValueError as exc:
                raise self.error(f"exclude-path {value[:60]!r}: {exc}") from None
            return
        if key in self.values:
            # parse_config keeps the last one; say so rather than guess silently.
            self.warnings.append(f"{where}: '{key}' given again; the last one is used")
        if key == "mode":
            self.values[key] = self.choice(key, value, _MODES)
        elif key == "stopwait":
            try:
                if not 0 < float(value) < 10**6:
                    raise ValueError(value)
            except ValueError:
                raise self.error(
                    f"stopwait {value[:40]!r} is not a positive number of minutes"
                ) from None
            self.values[key] = float(value)
        elif key == "storage":
            if not _STORAGE_ID.match(value):
                raise self.error(f"storage {value[:40]!r} is not a storage ID")
            self.values[key] = value
        elif key in ("bwlimit", "maxfiles"):
            self.values[key] = self.integer(key, value, 0, 2**53)
            if key == "maxfiles":
                self.warnings.append(
                    f"{where}: 'maxfiles' is deprecated; use 'prune-backups: keep-last=N'"
                )
        elif key == "prune-backups":
            try:
                self.values[key] = format_keep_options(parse_keep_options(value)) or "keep-all=1"
            except ValueError as exc:
                raise self.error(f"prune-backups: {exc}") from None
        elif key == "notes-template":
            if len(value) > _NOTES_MAX:
                raise self.error(f"notes-template is longer than {_NOTES_MAX} characters")
            try:
                check_template(value)
            except ValueError as exc:
                raise self.error(f"notes-template: {exc}") from None
            self.values[key] = value
        elif key == "mailto":
            self.values[key] = self.addresses(value)
        elif key == "stdexcludes":
            if value.lower() not in _TRUE + _FALSE:
                raise self.error(f"stdexcludes {value[:40]!r} is not a boolean")
            self.values[key] = value.lower() in _TRUE
        elif key == "mailnotification":
            self.values[key] = self.choice(key, value, MAIL_POLICIES)
        elif key == "notification-mode":
            self.values[key] = self.choice(key, value, _NOTIFICATION_MODES)
        elif key == "fleecing":
            self.values[key] = self.fleecing(value)
        elif key == "performance":
            self.performance(value)
        elif key in _WARNED:
            self.warnings.append(f"{where}: '{key}' ignored: {_WARNED[key]}")
        elif key not in _IGNORED:
            self.warnings.append(f"{where}: unknown key '{key[:40]}' ignored")

    def choice(self, key: str, value: str, allowed: tuple[str, ...]) -> str:
        if value not in allowed:
            raise self.error(f"{key} {value[:40]!r} is not one of {', '.join(allowed)}")
        return value

    def integer(self, key: str, value: str, low: int, high: int) -> int:
        if not re.fullmatch(r"[0-9]{1,16}", value) or not low <= int(value) <= high:
            raise self.error(f"{key} {value[:40]!r} is not an integer {low}..{high}")
        return int(value)

    def addresses(self, value: str) -> list[str]:
        # split_list: commas, semicolons and blanks separate.
        found = [a for a in re.split(r"[\s,;]+", value) if a]
        for address in found:
            if not _ADDRESS.match(address):
                raise self.error(f"mailto: {address[:60]!r} is no mail address or user name")
        return found

    def properties(self, key: str, value: str, default_key: str | None) -> dict[str, str]:
        opts: dict[str, str] = {}
        for part in filter(None, value.split(",")):
            name, sep, val = part.partition("=")
            if not sep:
                if default_key is None or default_key in opts:
                    raise self.error(f"{key}: {part[:40]!r} is not name=value")
                name, val = default_key, part
            if name in opts:
                raise self.error(f"{key}: '{name[:40]}' given twice")
            opts[name.strip()] = val.strip()
        return opts

    def fleecing(self, value: str) -> str | None:
        opts = self.properties("fleecing", value, "enabled")
        for name in opts:
            if name not in ("enabled", "storage"):
                raise self.error(f"fleecing: unknown property '{name[:40]}'")
        enabled = opts.get("enabled", "0").lower()
        if enabled not in _TRUE + _FALSE:
            raise self.error(f"fleecing: enabled={enabled[:20]!r} is not a boolean")
        storage = opts.get("storage")
        if storage is not None and not _STORAGE_ID.match(storage):
            raise self.error(f"fleecing: storage {storage[:40]!r} is not a storage ID")
        if enabled in _FALSE:
            if storage:
                self.warnings.append(
                    f"{self.path}:{self.line}: fleecing names storage {storage} but is not"
                    " enabled (add enabled=1): fleecing stays off, as in Proxmox VE"
                )
            return None
        if not storage:
            raise self.error(f"fleecing {value[:60]!r} names no storage=ID")
        return storage

    def performance(self, value: str) -> None:
        opts = self.properties("performance", value, None)
        limits = {"max-workers": (1, 256), "pbs-entries-max": (1, 2**53)}
        for name, val in opts.items():
            if name not in limits:
                raise self.error(f"performance: unknown property '{name[:40]}'")
            self.values[name] = self.integer(f"performance: {name}", val, *limits[name])
        # Neither maps: the provider reads its NBD export at its own pace, and
        # pbs-entries-max is for containers sent to a Proxmox Backup Server.
        self.notes.append(
            f"{self.path}:{self.line}: performance ({value[:60]}) accepted; it has no"
            " effect on backup provider jobs"
        )


def _opt_str(value: object) -> str | None:
    return None if value is None else str(value)


def _opt_list(value: object) -> list[object]:
    return list(value) if isinstance(value, list) else []


def _opt_int(value: object) -> int | None:
    return value if isinstance(value, int) else None


def _opt_bool(value: object) -> bool | None:
    return value if isinstance(value, bool) else None


def _opt_float(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) else None
