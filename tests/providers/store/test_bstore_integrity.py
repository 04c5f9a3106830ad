"""backup-store: encryption, wrong and missing keys, corrupt chunks, concurrency, bandwidth."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from bstore_support import CHUNK, FakeHost, MiB, compare, mixed_image, run, stored_task_log

from pvebackup.api.errors import CorruptChunkError, MissingKeyError, WrongKeyError
from pvebackup.api.types import BitmapMode
from pvebackup.store.formats import BLOB_FLAG_ENCRYPTED
from pvebackup.store.keys import create_key_file
from pvebackup.store.pack import pack_key

pytestmark = pytest.mark.e2e


def _encrypted_host(tmp_path: Path, passphrase: str | None = None) -> FakeHost:
    key = tmp_path / "store.key"
    create_key_file(key, passphrase, scrypt_n=2**10)
    scfg = {"type": "backup-store", "path": str(tmp_path / "store"),
            "chunk-size": str(CHUNK), "encryption-key": str(key)}  # fmt: skip
    if passphrase is not None:
        pw = tmp_path / "pw"
        pw.write_text(passphrase + "\n")
        pw.chmod(0o600)
        scfg["encryption-passphrase-file"] = str(pw)
    return FakeHost(tmp_path, scfg)


def test_encrypted_round_trip_with_passphrase_key(tmp_path: Path) -> None:
    host = _encrypted_host(tmp_path, "pass phrase")
    src = mixed_image(tmp_path / "src.qcow2")
    volname, _ = host.backup(src)
    store = host.provider().store()
    packs = store.pack_names()
    assert packs
    # Every blob carries the encrypted flag (header byte 8, BLOB_FLAG_ENCRYPTED),
    # and the pack's description is one encrypted blob too.
    located = store.rebuild_index_from_packs().values()
    assert located and all(
        store.backend.get_range(pack_key(loc.pack), loc.offset, 9)[8] & BLOB_FLAG_ENCRYPTED
        for loc in located
    )
    out = tmp_path / "out.qcow2"
    host.restore(volname, out)
    assert compare(src, out).returncode == 0
    assert stored_task_log(host.provider(), volname) == "task log line\n"
    assert "pass phrase" not in host.log.text()


def test_wrong_key_and_missing_key_fail_before_anything(tmp_path: Path) -> None:
    host = _encrypted_host(tmp_path)
    src = mixed_image(tmp_path / "src.qcow2")
    host.backup(src)
    before = sorted(p.name for p in (tmp_path / "store").rglob("*"))
    other = tmp_path / "other.key"
    create_key_file(other, None)
    wrong = FakeHost(tmp_path, {**host.scfg, "encryption-key": str(other)})
    with pytest.raises(WrongKeyError):
        wrong.provider().job_start(int(time.time()))
    missing = {k: v for k, v in host.scfg.items() if k != "encryption-key"}
    with pytest.raises(MissingKeyError):
        FakeHost(tmp_path, missing).provider().job_start(int(time.time()))
    # listing needs no key (as PBS): names and sizes, contents untouched
    (listed,) = FakeHost(tmp_path, missing).plugin.list_volumes(missing, "store1")
    assert "listed without the key" in (listed.comment or "")
    assert sorted(p.name for p in (tmp_path / "store").rglob("*")) == before


def test_corrupt_chunk_fails_restore_naming_snapshot_and_chunk(
    host: FakeHost, tmp_path: Path
) -> None:
    src = mixed_image(tmp_path / "src.qcow2")
    volname, _ = host.backup(src)
    store = host.provider().store()
    sid = store.list_snapshots()[0]
    index = store.open_snapshot(sid).open_index("drive-scsi0")
    victim = index.digest(5)
    loc = store.locate_chunk(victim)
    assert loc is not None
    path = tmp_path / "store" / pack_key(loc.pack)
    data = bytearray(path.read_bytes())
    data[loc.offset + loc.length - 1] ^= 0x01
    path.write_bytes(bytes(data))
    out = tmp_path / "out.qcow2"
    # qemu-img sees only EIO; the cleanup names the chunk and exits with code 5
    with pytest.raises(CorruptChunkError) as failed:
        host.restore(volname, out)
    assert "qemu-img" in str(failed.value.__context__)
    message = str(failed.value)
    assert str(sid) in message and "chunk 5" in message and victim.hex() in message
    assert failed.value.exit_code == 5
    errors = [m for lv, m in host.log.lines if lv == "err"]
    assert errors, host.log.text()
    assert str(sid) in errors[0] and "chunk 5" in errors[0] and victim.hex() in errors[0]
    with pytest.raises(CorruptChunkError):
        store.read_chunk(victim)


def test_restore_server_is_stopped_after_a_failed_convert(host: FakeHost, tmp_path: Path) -> None:
    src = mixed_image(tmp_path / "src.qcow2")
    volname, _ = host.backup(src)
    p = host.provider()
    p.restore_qemu_img_init(volname, "store1", "drive-scsi0")
    server = p._restores[(volname, "drive-scsi0")]
    pid, workdir = server.pid, server.workdir
    assert pid is not None and workdir.exists()
    p.restore_qemu_img_cleanup(volname, "store1", "drive-scsi0")
    assert not workdir.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_two_concurrent_backups_into_one_store(host: FakeHost, tmp_path: Path) -> None:
    srcs = [mixed_image(tmp_path / f"src{i}.qcow2", seed=i % 2) for i in range(2)]
    host.backup(srcs[0], vmid=99)  # creates the store
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            results[i], _ = host.backup(srcs[i], vmid=200 + i)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i in range(2):
        out = tmp_path / f"out{i}.qcow2"
        host.restore(results[i], out)
        assert compare(srcs[i], out).returncode == 0


@pytest.mark.slow
@pytest.mark.serial
def test_bandwidth_limit_roughly_holds(host: FakeHost, tmp_path: Path) -> None:
    src = tmp_path / "src.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(src), str(4 * MiB))
    run("qemu-io", "-f", "qcow2", "-c", f"write -P 7 0 {3 * MiB}", str(src))
    start = time.monotonic()
    host.backup(src, BitmapMode.NONE, bandwidth=1 * MiB)
    elapsed = time.monotonic() - start
    # 3 MiB at 1 MiB/s with a quarter second of burst: about 2.75 s.
    assert 2.4 <= elapsed <= 6.0
