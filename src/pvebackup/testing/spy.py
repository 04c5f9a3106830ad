"""Watching a provider from outside: every seed call the host makes, in order.

:class:`ProviderSpy` wraps the storage plugin's ``new_backup_provider`` so that each
provider it returns has its seed methods wrapped on the instance. The provider's
code is untouched; the host calls it as always. A test may inject a failure or a
signal *after* a real call (``after``), which is how the suite makes a guest fail
or a job abort at a realistic point, with the provider's data already written.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from pvebackup.api.provider import BackupProvider
from pvebackup.api.types import LogFunction
from pvebackup.storage import registry

__all__ = ["SEED_METHODS", "Call", "ProviderSpy"]

SEED_METHODS = tuple(
    name
    for name in vars(BackupProvider)
    if not name.startswith("_") and name not in ("log", "provider_name")
)
"""Every method of the seed's provider API (what the host may call), in source order."""


@dataclass
class Call:
    """One seed call: its name, arguments, and what it returned or raised."""

    name: str
    args: tuple[Any, ...]
    result: Any = None
    error: BaseException | None = None
    note: Any = None  # e.g. the log file's text at the time of the call
    seconds: float = 0.0  # how long the call took


After = Callable[["Call"], None]


@dataclass
class ProviderSpy:
    """The calls of every provider made while :meth:`watching` is active."""

    calls: list[Call] = field(default_factory=list)
    after: dict[str, After] = field(default_factory=dict)
    providers: list[BackupProvider] = field(default_factory=list)
    _depth: int = 0

    def names(self) -> list[str]:
        return [c.name for c in self.calls]

    def of(self, name: str) -> list[Call]:
        return [c for c in self.calls if c.name == name]

    def clear(self) -> None:
        self.calls.clear()
        self.after.clear()

    @contextmanager
    def watching(self, storage_type: str) -> Iterator[ProviderSpy]:
        """Wrap the plugin of ``storage_type`` (the registry's one instance)."""
        plugin = registry.lookup(storage_type)
        real = plugin.new_backup_provider

        @functools.wraps(real)
        def new_backup_provider(
            scfg: Mapping[str, str], storeid: str, log_function: LogFunction
        ) -> BackupProvider | None:
            provider = real(scfg, storeid, log_function)
            if provider is not None:
                self._wrap(provider)
            return provider

        plugin.new_backup_provider = new_backup_provider  # type: ignore[method-assign]
        try:
            yield self
        finally:
            del plugin.new_backup_provider

    def _wrap(self, provider: BackupProvider) -> None:
        self.providers.append(provider)
        for name in SEED_METHODS:
            setattr(provider, name, self._spy(name, getattr(provider, name)))

    def _spy(self, name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def spy(*args: Any) -> Any:
            if self._depth:
                # A provider calling its own seed method (e.g. a cleanup from its
                # init) is not a call of the host: not recorded.
                return method(*args)
            call = Call(name, args)
            if name == "backup_handle_log_file":
                call.note = _read_text(args[1])
            self.calls.append(call)
            self._depth += 1
            start = time.monotonic()
            try:
                call.result = method(*args)
            except BaseException as exc:
                call.error = exc
                raise
            finally:
                self._depth -= 1
                call.seconds = time.monotonic() - start
            hook = self.after.get(name)
            if hook is not None:
                hook(call)
            return call.result

        return spy


def _read_text(path: object) -> str | None:
    try:
        with open(str(path), encoding="utf-8", errors="replace") as fh:
            return fh.read()
    except OSError:
        return None
