"""Argument types shared by the commands."""

from __future__ import annotations

import argparse

__all__ = ["VMID_MAX", "VMID_MIN", "vmid_arg"]

VMID_MIN = 100
VMID_MAX = 999_999_999


def vmid_arg(text: str) -> int:
    """argparse type for a guest id: an integer 100..999999999, as Proxmox VE."""
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid VMID {text!r}: not a number") from None
    if not VMID_MIN <= value <= VMID_MAX:
        raise argparse.ArgumentTypeError(
            f"invalid VMID {value}: must be between {VMID_MIN} and {VMID_MAX}"
        )
    return value
