"""``--notes-template`` with Proxmox VE's rules (pve-manager PVE/VZDump.pm)."""

from __future__ import annotations

import pytest

from pvebackup.kit.notestemplate import check_template, render_template

VALUES = {"cluster": "prod", "guestname": "web01", "node": "pve1", "vmid": "100"}


@pytest.mark.parametrize(
    ("template", "notes"),
    [
        ("{{guestname}}", "web01"),
        ("{{vmid}} on {{node}} ({{cluster}})", "100 on pve1 (prod)"),
        ("line1\\nline2", "line1\nline2"),
        ("back\\\\slash", "back\\slash"),
        ("\\\\n", "\\n"),  # an escaped backslash, then a plain n
        ("{{ vmid }} {single} {{}} {{a b}}", "{{ vmid }} {single} {{}} {{a b}}"),
        ("{{{{vmid}}}}", "{{100}}"),
        ("\\\\{{vmid}}", "\\100"),
        ("", ""),
    ],
)
def test_render_as_pve(template: str, notes: str) -> None:
    assert render_template(template, VALUES) == notes


def test_values_are_not_expanded_again() -> None:
    values = {**VALUES, "guestname": "{{node}}\\n"}
    assert render_template("{{guestname}}", values) == "{{node}}\\n"


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("a\nb", "contains a line feed"),
        ("\\t", "found unknown: escape sequence '\\t' at char 0"),
        # PVE reports pos() after the match less the name's length, kept as is
        ("ab{{foo}}", "found unknown: variable 'foo' at char 6"),
        (
            "x\\q {{vmid}} {{bar}}",
            "found unknown: escape sequence '\\q' at char 1, variable 'bar' at char 17",
        ),
        ("x" * 1025, "longer than 1024"),
    ],
)
def test_refused_as_pve(template: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        check_template(template)
    assert str(info.value) == message or message in str(info.value)
    with pytest.raises(ValueError):
        render_template(template, VALUES)
