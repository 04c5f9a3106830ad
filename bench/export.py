"""Keep a provider's restore export up while the benchmark times ``qemu-img convert``.

``python -m bench.export ROOT STOREID VOLNAME`` reads ``ROOT/etc/pve/storage.cfg``,
asks the storage's provider for the first disk of ``VOLNAME``
(``restore_qemu_get_device_info``, then ``restore_qemu_img_init``), prints one JSON
line ``{"uri": ..., "device": ..., "size": ...}`` and waits until stdin is closed;
then it calls ``restore_qemu_img_cleanup``. Provider log lines go to stderr.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _log(level: str, message: str) -> None:
    print(f"{level}: {message}", file=sys.stderr, flush=True)


def main(argv: list[str]) -> int:
    root, storeid, volname = argv
    from pvebackup.storage.config import read_storage_config, storage_config
    from pvebackup.storage.registry import lookup

    cfg = read_storage_config(Path(root) / "etc/pve/storage.cfg")
    scfg = storage_config(cfg, storeid)
    provider = lookup(scfg["type"]).new_backup_provider(scfg, storeid, _log)
    if provider is None:
        raise SystemExit(f"storage {storeid} has no backup provider")
    devices = provider.restore_qemu_get_device_info(volname, storeid)
    device = sorted(devices)[0]
    uri = provider.restore_qemu_img_init(volname, storeid, device)
    try:
        print(json.dumps({"uri": uri, "device": device, "size": devices[device]["size"]}),
              flush=True)
        sys.stdin.read()
    finally:
        provider.restore_qemu_img_cleanup(volname, storeid, device)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
