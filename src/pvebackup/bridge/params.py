"""Typed access to a request's ``params``: every mistake is a ``UsageError``.

The Perl plugin is trusted (root on the same node), but a wrong shape must end
as a clear typed error naming the parameter, never as a ``KeyError`` deep in a
provider.
"""

from __future__ import annotations

import re
from typing import Any, Final

from pvebackup.api.errors import UsageError
from pvebackup.api.types import GuestType

__all__ = ["Params", "bandwidth", "device_name"]

_DEVICE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")
_MAX_INT: Final = 2**63 - 1


class Params:
    """The ``params`` object of one request of method ``method``."""

    def __init__(self, method: str, raw: object) -> None:
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise UsageError(f"{method}: params must be an object")
        self.method = method
        self.raw: dict[str, Any] = raw

    def _fail(self, name: str, what: str) -> UsageError:
        return UsageError(f"{self.method}: parameter '{name}' {what}")

    def has(self, name: str) -> bool:
        return self.raw.get(name) is not None

    def num(self, name: str, *, default: int | None = None, minimum: int = 0) -> int:
        value = self.raw.get(name)
        if value is None:
            if default is None:
                raise self._fail(name, "is missing")
            return default
        # Perl may send numbers as strings ("100"): accept decimal strings.
        if isinstance(value, str) and value.isascii() and value.isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._fail(name, f"must be an integer, not {value!r:.40}")
        if not minimum <= value <= _MAX_INT:
            raise self._fail(name, f"is out of range: {value}")
        return value

    def text(self, name: str, *, optional: bool = False) -> str:
        value = self.raw.get(name)
        if value is None and optional:
            return ""
        if not isinstance(value, str):
            raise self._fail(name, "is missing" if value is None else "must be a string")
        if "\0" in value:
            raise self._fail(name, "must not contain NUL")
        return value

    def opt_text(self, name: str) -> str | None:
        return self.text(name) if self.raw.get(name) is not None else None

    def vmtype(self, name: str = "vmtype") -> GuestType:
        value = self.text(name)
        try:
            return GuestType(value)
        except ValueError:
            raise self._fail(name, f"must be qemu or lxc, not {value!r:.40}") from None

    def obj(self, name: str, *, optional: bool = False) -> dict[str, Any]:
        value = self.raw.get(name)
        if value is None and optional:
            return {}
        if not isinstance(value, dict):
            raise self._fail(name, "must be an object")
        return value

    def texts(self, name: str) -> list[str]:
        value = self.raw.get(name)
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self._fail(name, "must be a list of strings")
        return list(value)

    def flag(self, name: str) -> bool:
        value = self.raw.get(name)
        if isinstance(value, bool):
            return value
        if value in (0, 1, "0", "1", "", None):
            return value in (1, "1")
        raise self._fail(name, "must be a boolean (0/1)")

    def sub(self, name: str, value: object) -> Params:
        """Params of a nested object (``info``, one volume) for the same method."""
        return Params(self.method, value if value is not None else {})


def device_name(method: str, name: str) -> str:
    """A device name (NBD export name, restore key) as qemu-server gives them."""
    if not _DEVICE.fullmatch(name):
        raise UsageError(f"{method}: invalid device name {name!r:.80}")
    return name


def bandwidth(info: Params) -> int | None:
    """``bandwidth-limit`` in bytes/s; ``0``, missing or ``undef`` mean unlimited."""
    limit = info.num("bandwidth-limit", default=0)
    return limit or None
