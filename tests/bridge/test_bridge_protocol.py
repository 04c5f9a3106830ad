"""The helper over its pipes: framing, hello/bye, typed errors, EOF abort."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from typing import Any

import pytest
from bridge_client import BridgeError, Helper

from pvebackup.bridge.framing import MAX_LINE


def test_hello_bye(spawn: Callable[..., Helper], dir_store: dict[str, Any]) -> None:
    helper = spawn()
    welcome = helper.hello(**dir_store)
    assert welcome["protocol"] == 1 and isinstance(welcome["helper-version"], str)
    assert helper.call("provider_name") == "backup-dir"
    assert helper.bye() == 0


def test_request_before_hello_and_second_hello(
    spawn: Callable[..., Helper], dir_store: dict[str, Any]
) -> None:
    helper = spawn()
    with pytest.raises(BridgeError) as err:
        helper.call("job_init", start_time=1)
    assert (err.value.type, err.value.exit) == ("UsageError", 2)
    assert "before hello" in err.value.message
    helper.hello(**dir_store)
    with pytest.raises(BridgeError, match="already"):
        helper.hello(**dir_store)
    with pytest.raises(BridgeError, match="protocol 2"):
        spawn().call("hello", protocol=2)


@pytest.mark.parametrize(
    ("line", "why"),
    [
        (b"garbage", "not JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b'{"id": true, "method": "provider_name"}', "integer or string 'id'"),
        (b'{"method": "provider_name"}', "integer or string 'id'"),
        (b'{"id": 7, "method": 5}', "string 'method'"),
        (b'{"id": 7, "method": "provider_name", "params": [1]}', "params must be an object"),
    ],
)
def test_malformed_lines_are_answered_and_the_helper_reads_on(
    spawn: Callable[..., Helper], dir_store: dict[str, Any], line: bytes, why: str
) -> None:
    helper = spawn()
    helper.hello(**dir_store)
    helper.send_raw(line + b"\n")
    answer = helper.read()
    assert answer["error"]["type"] == "UsageError" and why in answer["error"]["message"]
    assert answer["id"] in (None, 7)
    assert helper.call("provider_name") == "backup-dir"  # still in step
    assert helper.bye() == 0


def test_oversized_line_is_refused_and_skipped(
    spawn: Callable[..., Helper], dir_store: dict[str, Any]
) -> None:
    helper = spawn()
    helper.hello(**dir_store)
    big = json.dumps({"id": 9, "method": "job_init", "params": {"pad": "x" * MAX_LINE}})
    helper.send_raw(big.encode() + b"\n")
    answer = helper.read()
    assert answer["id"] is None
    assert answer["error"]["type"] == "UsageError"
    assert "longer than" in answer["error"]["message"]
    # the rest of the long line was dropped, not taken as the next request
    assert helper.call("provider_name") == "backup-dir"
    assert not helper.logs  # job_init never ran
    assert helper.bye() == 0


def test_unknown_method(spawn: Callable[..., Helper], dir_store: dict[str, Any]) -> None:
    helper = spawn()
    helper.hello(**dir_store)
    with pytest.raises(BridgeError) as err:
        helper.call("backup_everything", vmid=1)
    assert err.value.type == "UsageError" and "backup_everything" in err.value.message


def test_errors_keep_their_class_and_exit_code(
    spawn: Callable[..., Helper], dir_store: dict[str, Any]
) -> None:
    helper = spawn()
    helper.hello(**dir_store)
    with pytest.raises(BridgeError) as err:
        helper.call("restore_get_mechanism", volname="qemu-100-nothing-here")
    assert err.value.type == "VolumeNotFoundError" and err.value.exit == 3
    with pytest.raises(BridgeError) as err:
        helper.call("job_init", start_time="soon")
    assert err.value.type == "UsageError" and "'start_time'" in err.value.message
    with pytest.raises(BridgeError) as err:
        helper.call("backup_vm", vmid=100, guest_config="", volumes={}, info={})
    assert err.value.type == "UsageError" and "backup_start was not called" in err.value.message
    with pytest.raises(BridgeError) as err:
        helper.call("restore_get_mechanism", volname="x", storeid="other")
    assert "is not this helper's" in err.value.message
    assert helper.bye() == 0


def test_eof_aborts_the_open_guest_and_job(
    spawn: Callable[..., Helper], dir_store: dict[str, Any]
) -> None:
    helper = spawn()
    helper.hello(**dir_store)
    helper.call("job_init", start_time=1700000000)
    target = helper.call("backup_init", vmid=100, vmtype="qemu", start_time=1700000000)
    assert target["archive-name"]
    rc = helper.eof()
    assert rc == 1
    text = helper.log_text()
    assert "job aborted" in text, text
    # nothing of the aborted backup is listed afterwards
    again = spawn()
    again.hello(**dir_store)
    assert again.call("pvebackup_list_volumes") == []
    # and the guest was aborted before the job: a fresh job works at once
    again.call("job_init", start_time=1700000001)
    again.call("job_cleanup")
    assert again.bye() == 0


def test_eof_without_work_exits_zero(
    spawn: Callable[..., Helper], dir_store: dict[str, Any]
) -> None:
    helper = spawn()
    helper.hello(**dir_store)
    assert helper.eof() == 0
    assert spawn().eof() == 0  # not even greeted


def test_hello_refuses_bad_scfg(spawn: Callable[..., Helper], dir_store: dict[str, Any]) -> None:
    helper = spawn()
    with pytest.raises(BridgeError, match="scfg type"):
        helper.hello(**{**dir_store, "scfg": {"type": "backup-store", "path": "/x"}})
    with pytest.raises(BridgeError, match="must be a string or number"):
        helper.hello(**{**dir_store, "scfg": {"path": ["/x"]}})
    with pytest.raises(BridgeError) as err:
        helper.hello(**{**dir_store, "plugin-type": "no-such-type"})
    assert err.value.type == "PluginNotFoundError"


def test_sigterm_aborts_and_exits_130(
    spawn: Callable[..., Helper], dir_store: dict[str, Any]
) -> None:
    helper = spawn()
    helper.hello(**dir_store)
    helper.call("job_init", start_time=1700000000)
    helper.call("backup_init", vmid=100, vmtype="qemu", start_time=1700000000)
    helper.proc.send_signal(signal.SIGTERM)
    assert helper.proc.wait(60) == 130
    assert helper.eof() == 130
    assert "job aborted" in helper.log_text()
