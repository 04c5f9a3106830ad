"""The storage API version rule: APIVER - APIAGE <= v <= APIVER."""

from __future__ import annotations

import pytest

from pvebackup.api.errors import PluginError, PluginVersionError
from pvebackup.storage import APIAGE, APIVER, check_api_version
from pvebackup.storage.version import min_api_version


def test_constants_are_the_seeds() -> None:
    assert (APIVER, APIAGE) == (11, 2)
    assert min_api_version() == 9


@pytest.mark.parametrize("version", [9, 10, 11])
def test_accepted_range(version: int) -> None:
    check_api_version("acme", version)


def test_too_old_is_refused_with_name_version_and_range() -> None:
    with pytest.raises(PluginVersionError) as info:
        check_api_version("acme (acme.Plugin)", 8)
    msg = str(info.value)
    assert "acme (acme.Plugin)" in msg
    assert "version 8" in msg
    assert "9..11" in msg
    assert "too old" in msg
    assert isinstance(info.value, PluginError)


def test_too_new_is_refused_too() -> None:
    with pytest.raises(PluginVersionError) as info:
        check_api_version("future", 12)
    msg = str(info.value)
    assert "future" in msg and "version 12" in msg and "9..11" in msg
    assert "newer" in msg


@pytest.mark.parametrize("bad", [True, "11", 11.0, None])
def test_non_int_versions_are_refused(bad: object) -> None:
    with pytest.raises(PluginVersionError, match="must be an int"):
        check_api_version("odd", bad)  # type: ignore[arg-type]
