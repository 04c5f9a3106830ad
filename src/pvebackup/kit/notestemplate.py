"""``backup --notes-template``: Proxmox VE's notes template, with its exact rules.

As pve-manager's ``PVE/VZDump.pm`` (``$verify_notes_template`` and
``$generate_notes``):

- The template is one line (a line feed is refused); at most 1024 characters.
- Escapes: ``\\n`` is a newline, ``\\\\`` a backslash; any other backslash
  sequence is refused ("escape sequence '\\x' at char N").
- Variables: ``{{cluster}}``, ``{{guestname}}``, ``{{node}}``, ``{{vmid}}``.
  Any other ``{{NAME}}`` (NAME without space or braces) is refused ("variable
  'NAME' at char N"); text that is not of that shape (``{{a b}}``, ``{single}``)
  stays as it is.
- Escapes are replaced first, then the variables, once, left to right: a value
  is never expanded again (a guest named ``{{node}}`` stays so).
- Values: ``cluster`` the cluster's name, else ``standalone node``;
  ``guestname`` a VM's ``name`` (else ``VM <vmid>``), a container's ``hostname``
  (else ``CT<vmid>``); ``node`` the node's short host name; ``vmid``.

Pure: the caller gathers the values.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

__all__ = ["MAX_TEMPLATE", "VARIABLES", "check_template", "render_template"]

MAX_TEMPLATE = 1024
VARIABLES = ("cluster", "guestname", "node", "vmid")

_ESCAPE = re.compile(r"\\(.)")
_ANY_VARIABLE = re.compile(r"\{\{([^\s{}]+)\}\}")
_VARIABLE = re.compile(r"\{\{(" + "|".join(VARIABLES) + r")\}\}")


def check_template(template: str) -> None:
    """Refuse a template Proxmox VE refuses; ``ValueError`` with PVE's message."""
    if len(template) > MAX_TEMPLATE:
        raise ValueError(f"longer than {MAX_TEMPLATE} characters")
    if "\n" in template:
        raise ValueError("contains a line feed")
    problems = [
        f"escape sequence '\\{m.group(1)}' at char {m.start()}"
        for m in _ESCAPE.finditer(template)
        if m.group(1) not in ("n", "\\")
    ]
    problems += [
        # PVE's position: pos() after the match less the name's length
        f"variable '{m.group(1)}' at char {m.end() - len(m.group(1))}"
        for m in _ANY_VARIABLE.finditer(template)
        if m.group(1) not in VARIABLES
    ]
    if problems:
        raise ValueError("found unknown: " + ", ".join(problems))


def render_template(template: str, values: Mapping[str, str]) -> str:
    """The notes ``template`` gives with ``values`` (one per :data:`VARIABLES`).

    :raises ValueError: the template is refused (see :func:`check_template`).
    """
    check_template(template)
    unescaped = _ESCAPE.sub(lambda m: "\n" if m.group(1) == "n" else "\\", template)
    return _VARIABLE.sub(lambda m: values[m.group(1)], unescaped)
