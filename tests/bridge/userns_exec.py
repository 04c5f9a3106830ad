"""``python3 userns_exec.py HOSTUID COUNT -- CMD...``: run CMD as root of a new
user namespace mapping 0..COUNT-1 to HOSTUID.. (uids and gids).

What ``PVE::LXC::Namespaces::run_in_userns`` does for vzdump's
``backup_container``: fork, the child ``unshare(CLONE_NEWUSER)``s, the parent
(root of the initial namespace) writes the maps, the child becomes the
namespace's root. ``unshare --map-users`` would need ``newuidmap`` (package
uidmap), which a Proxmox VE node need not have. stdin/stdout/stderr are the
child's: the bridge helper started by CMD speaks over them.
"""

from __future__ import annotations

import ctypes
import os
import sys

CLONE_NEWUSER = 0x10000000


def main() -> int:
    host, count = int(sys.argv[1]), int(sys.argv[2])
    assert sys.argv[3] == "--"
    cmd = sys.argv[4:]
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(ready_r)
        os.close(go_w)
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(CLONE_NEWUSER) != 0:
            os._exit(120)
        os.write(ready_w, b"u")
        if os.read(go_r, 1) != b"g":
            os._exit(121)
        os.setgroups([])
        os.setresgid(0, 0, 0)
        os.setresuid(0, 0, 0)
        os.execvp(cmd[0], cmd)
    os.close(ready_w)
    os.close(go_r)
    if os.read(ready_r, 1) != b"u":
        os.waitpid(pid, 0)
        return 122
    for kind in ("uid_map", "gid_map"):
        with open(f"/proc/{pid}/{kind}", "w") as f:
            f.write(f"0 {host} {count}\n")
    os.write(go_w, b"g")
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


if __name__ == "__main__":
    sys.exit(main())
