"""Job defaults from ``ROOT/etc/vzdump.conf``, as vzdump reads them.

The file has ``key: value`` lines and ``#`` comments. The keys read here are the
ones of live backups: ``mode`` (snapshot/suspend/stop), ``stopwait`` (minutes) and
``fleecing`` (``storage=ID``, optionally with ``enabled=1``, as Proxmox VE writes
it). Other keys are vzdump's and ignored. A command line option wins over the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pvebackup.api.errors import ConfigError, UnsafeStorageError
from pvebackup.kit import safefs

from .guests import NodeRoot

__all__ = ["JobDefaults", "read_job_defaults"]

_MODES = ("snapshot", "suspend", "stop")


@dataclass(frozen=True)
class JobDefaults:
    mode: str | None = None
    stop_wait: float | None = None  # minutes
    fleecing_storage: str | None = None


def defaults_path(root: NodeRoot) -> Path:
    return root.root / "etc" / "vzdump.conf"


def read_job_defaults(root: NodeRoot) -> JobDefaults:
    """The defaults in ``ROOT/etc/vzdump.conf`` (all None when there is none).

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
    values: dict[str, str] = {}
    for n, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise ConfigError(f"cannot parse line {line[:80]!r}", path=str(path), line=n)
        key, value = key.strip(), value.strip()
        if key == "mode" and value not in _MODES:
            raise ConfigError(
                f"mode {value[:40]!r} is not one of {', '.join(_MODES)}", path=str(path), line=n
            )
        if key == "stopwait":
            try:
                if not 0 < float(value) < 10**6:
                    raise ValueError(value)
            except ValueError:
                raise ConfigError(
                    f"stopwait {value[:40]!r} is not a positive number of minutes",
                    path=str(path),
                    line=n,
                ) from None
        values[key] = value
    return JobDefaults(
        mode=values.get("mode"),
        stop_wait=float(values["stopwait"]) if "stopwait" in values else None,
        fleecing_storage=_fleecing(values.get("fleecing"), path),
    )


def _fleecing(value: str | None, path: Path) -> str | None:
    if value is None:
        return None
    opts = dict(part.partition("=")[::2] for part in value.split(","))
    if opts.get("enabled", "1") in ("0", "no", "off", "false"):
        return None
    storage = opts.get("storage")
    if not storage:
        raise ConfigError(f"fleecing {value[:60]!r} names no storage=ID", path=str(path))
    return storage
