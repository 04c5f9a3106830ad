"""The helper's request loop: hello, merged-API methods, bye; EOF aborts.

See docs/bridge-protocol.md for the protocol. One :class:`Server` per process;
requests are strictly sequential. Everything the provider logs while a request
runs goes out as ``{"log": ...}`` lines before that request's response.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Mapping
from importlib import metadata
from typing import IO, Any, Final

from pvebackup.api.errors import AbortedError, PluginError, PveBackupError, UsageError
from pvebackup.bridge.adapter import MergedAdapter
from pvebackup.bridge.attach import AttachListener, attach_client
from pvebackup.bridge.framing import (
    MAX_LINE,
    Oversized,
    Scrubber,
    Writer,
    decode,
    error_body,
    read_line,
)
from pvebackup.bridge.params import Params
from pvebackup.kit.hoststate import STATE_DIR_ENV, HostState, default_state_dir
from pvebackup.kit.passphrase import set_process_passphrase
from pvebackup.storage import registry

__all__ = ["PROTOCOL", "Server"]

PROTOCOL: Final = 1
_LEVELS: Final = ("info", "warn", "err")


class Server:
    """Serves one job or one restore (or, attached, one ``backup_container``)."""

    def __init__(
        self,
        stdin: IO[bytes],
        stdout: IO[bytes],
        stderr: IO[str] | None = None,
        *,
        limit: int = MAX_LINE,
    ) -> None:
        self.stdin = stdin
        self.scrub = Scrubber()
        self.out = Writer(stdout, self.scrub)
        self.sink = self.out
        """Where provider log lines go: stdout, or an attached helper's socket."""
        self.stderr = stderr or sys.stderr
        self.limit = limit
        self.adapter: MergedAdapter | None = None
        self.attach: AttachListener | None = None
        self.attached: tuple[Any, Any, Writer] | None = None
        self.greeted = False

    # -- logging ---------------------------------------------------------------------

    def log(self, level: str, message: str) -> None:
        level = level if level in _LEVELS else "info"
        try:
            self.sink.send({"log": {"level": level, "message": str(message)}})
        except OSError:
            # Perl is gone (EPIPE): the log line goes to stderr, and the provider's
            # cleanup that logged it still runs.
            self.diag(f"{level}: {message}")

    def diag(self, text: str) -> None:
        """Diagnostics for stderr (tracebacks), scrubbed like everything else."""
        print(self.scrub(text), file=self.stderr, flush=True)

    # -- loop ------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until ``bye`` (exit 0) or EOF (abort what is open; exit 0 if
        nothing was, else 1). An :class:`AbortedError` (SIGTERM, SIGINT, SIGHUP
        turned into one by ``__main__``) aborts what is open and exits 130."""
        try:
            while True:
                line = read_line(self.stdin, self.limit)
                if line is None:
                    return self._eof()
                try:
                    done = self._one(line)
                except BrokenPipeError:
                    return self._eof()  # nobody reads our answers any more: as EOF
                if done:
                    return 0
        except AbortedError as exc:
            self._finish_attach()
            if self.adapter is not None:
                self.adapter.abort_all(str(exc))
            return AbortedError.exit_code
        finally:
            self._finish_attach()
            if self.adapter is not None:
                self.adapter.close()
            if self.attached is not None:
                self.attached[0].close()

    def _one(self, line: bytes | Oversized) -> bool:
        if isinstance(line, Oversized):
            self._error(
                None,
                UsageError(f"bridge: line of {line.length} bytes is longer than {self.limit}"),
            )
            return False
        try:
            msg = decode(line)
        except UsageError as exc:
            self._error(None, exc)
            return False
        return self._handle(msg)

    def _handle(self, msg: Mapping[str, Any]) -> bool:
        """Answer one request; True after a successful ``bye``."""
        rid = msg.get("id")
        if isinstance(rid, bool) or not isinstance(rid, int | str):
            self._error(None, UsageError("bridge: a request needs an integer or string 'id'"))
            return False
        method = msg.get("method")
        if not isinstance(method, str):
            self._error(rid, UsageError("bridge: a request needs a string 'method'"))
            return False
        try:
            params = Params(method, msg.get("params"))
            result = self._dispatch(method, params)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a response
            if not isinstance(exc, PveBackupError):
                self.diag(traceback.format_exc())
            self._error(rid, exc)
            if isinstance(exc, AbortedError):
                raise  # interrupted: abort everything, do not wait for more requests
            return False
        self.out.send({"id": rid, "result": result})
        return method == "bye"

    def _error(self, rid: object, exc: BaseException) -> None:
        self.out.send({"id": rid, "error": error_body(exc)})

    def _dispatch(self, method: str, params: Params) -> Any:
        if method == "hello":
            return self._hello(params)
        if not self.greeted:
            raise UsageError(f"bridge: '{method}' before hello")
        if method == "bye":
            return self._bye()
        if self.attached is not None:
            return self._forward(method, params)
        self._finish_attach()
        adapter = self.adapter
        assert adapter is not None
        extra = self._extensions(adapter)
        if method in extra:
            return extra[method](params)
        handler = adapter.methods().get(method)
        if handler is None:
            raise UsageError(f"bridge: unknown method '{method}'")
        result = handler(params)
        if method == "backup_container_prepare":
            result = self._prepare_attach(adapter, params)
        return result

    def _eof(self) -> int:
        if self.adapter is None:
            return 0
        self._finish_attach()
        return 1 if self.adapter.abort_all("the bridge helper's input closed (EOF)") else 0

    def _bye(self) -> dict[str, Any]:
        if self.adapter is not None:
            self._finish_attach()
            if self.adapter.abort_all("bye before the job or restore ended"):
                self.log("warn", "bye came while work was open: it was aborted")
        return {}

    # -- hello -----------------------------------------------------------------------

    def _hello(self, params: Params) -> dict[str, Any]:
        if self.greeted:
            raise UsageError("bridge: hello was already received")
        version = params.num("protocol")
        if version != PROTOCOL:
            raise UsageError(f"bridge: protocol {version} is not supported (only {PROTOCOL})")
        secrets = params.obj("secrets", optional=True)
        passphrase = secrets.get("passphrase")
        if passphrase is not None:
            if not isinstance(passphrase, str) or not passphrase:
                raise UsageError("hello: secrets.passphrase must be a non-empty string")
            self.scrub.add(passphrase)
            set_process_passphrase(passphrase)
        if params.has("attach"):
            self.attached = attach_client(params.raw["attach"])
            self.greeted = True
            return self._welcome()
        storeid = params.text("storeid")
        plugin_type = params.text("plugin-type")
        scfg = _scfg(params, plugin_type)
        state_dir = params.opt_text("state-dir")
        if state_dir is not None:
            # Providers find their host state through this (kit.hoststate); it
            # names a directory, nothing secret.
            os.environ[STATE_DIR_ENV] = state_dir
        plugin = registry.lookup(plugin_type)
        provider = plugin.new_backup_provider(scfg, storeid, self.log)
        if provider is None:
            raise PluginError(f"storage type {plugin_type} has no backup provider")
        self.adapter = MergedAdapter(
            provider,
            storeid,
            self.log,
            state=HostState("bridge", storeid, state_dir or default_state_dir()),
            vm_mechanism=params.opt_text("vm-mechanism") or "nbd",
        )
        self.greeted = True
        return self._welcome()

    def _welcome(self) -> dict[str, Any]:
        try:
            version = metadata.version("pvebackup")
        except metadata.PackageNotFoundError:
            version = "unknown"
        return {"protocol": PROTOCOL, "helper-version": version}

    # -- extensions (additive, see the protocol) ---------------------------------------

    def _extensions(self, adapter: MergedAdapter) -> dict[str, Callable[[Params], Any]]:
        plugin = adapter.provider.storage_plugin
        scfg, storeid = adapter.provider.scfg, adapter.storeid

        def list_volumes(params: Params) -> list[dict[str, Any]]:
            vmid = params.num("vmid", default=-1)
            volumes = plugin.list_volumes(scfg, storeid)  # type: ignore[attr-defined]
            return [v.to_json() for v in volumes if vmid < 0 or v.vmid == vmid]

        def free_volume(params: Params) -> None:
            plugin.free_volume(scfg, storeid, params.text("volname"))  # type: ignore[attr-defined]

        def get_attribute(params: Params) -> Any:
            return plugin.get_volume_attribute(  # type: ignore[attr-defined]
                scfg, storeid, params.text("volname"), params.text("attribute")
            )

        def update_attribute(params: Params) -> None:
            value = params.raw.get("value")
            if not isinstance(value, str | bool):
                raise UsageError("update_volume_attribute: value must be a string or bool")
            plugin.update_volume_attribute(  # type: ignore[attr-defined]
                scfg, storeid, params.text("volname"), params.text("attribute"), value
            )

        def bitmap_id(params: Params) -> dict[str, str | None]:
            guest = adapter.guests.get(params.num("vmid"))
            return {"bitmap-id": None if guest is None else guest.bitmap_id}

        return {
            "pvebackup_list_volumes": list_volumes,
            "pvebackup_free_volume": free_volume,
            "pvebackup_bitmap_id": bitmap_id,
            "pvebackup_get_volume_attribute": get_attribute,
            "pvebackup_update_volume_attribute": update_attribute,
        }

    # -- the user-namespace step ---------------------------------------------------------

    def _prepare_attach(self, adapter: MergedAdapter, params: Params) -> dict[str, Any]:
        info = params.sub("info", params.raw.get("info"))
        uid = info.num("backup-user-id", default=0)

        def run(request: dict[str, Any], writer: Writer) -> Any:
            self.sink = writer
            try:
                return adapter.m_backup_container(Params("backup_container", request))
            finally:
                self.sink = self.out

        self._finish_attach()
        self.attach = AttachListener(uid, run, self.scrub)
        return {"attach": self.attach.token()}

    def _finish_attach(self) -> None:
        if self.attach is not None:
            self.attach.finish()
            self.attach = None

    def _forward(self, method: str, params: Params) -> Any:
        """An attached helper: relay ``backup_container`` to the job helper."""
        assert self.attached is not None
        _sock, reader, writer = self.attached
        if method != "backup_container":
            raise UsageError(f"bridge: an attached helper serves only backup_container: {method}")
        try:
            writer.send({"id": 1, "method": method, "params": params.raw})
        except OSError:
            pass  # the job helper refused us and hung up: its answer is still to be read
        while True:
            line = read_line(reader, self.limit)
            if line is None or isinstance(line, Oversized):
                raise PluginError("the job helper closed the attach connection")
            msg = decode(line)
            if "log" in msg:
                self.out.send({"log": msg["log"]})
                continue
            if "error" in msg:
                err = msg["error"] if isinstance(msg["error"], dict) else {}
                raise _Relayed(err)
            return msg.get("result")


class _Relayed(PveBackupError):
    """An error response of the job helper, passed on unchanged."""

    def __init__(self, body: Mapping[str, Any]) -> None:
        super().__init__(str(body.get("message", "backup_container failed")))
        exit_code = body.get("exit")
        self.exit_code = exit_code if isinstance(exit_code, int) else 1
        self.type_name = str(body.get("type", "PveBackupError"))


def _scfg(params: Params, plugin_type: str) -> dict[str, str]:
    """storage.cfg's section as the seed passes it: every value a string."""
    raw = params.obj("scfg")
    scfg: dict[str, str] = {}
    for key, value in raw.items():
        if isinstance(value, bool):
            value = "1" if value else "0"
        if not isinstance(value, str | int):
            raise UsageError(f"hello: scfg property {key!r:.40} must be a string or number")
        scfg[str(key)] = str(value)
    given = scfg.setdefault("type", plugin_type)
    if given != plugin_type:
        raise UsageError(f"hello: scfg type {given!r} is not plugin-type {plugin_type!r}")
    return scfg

