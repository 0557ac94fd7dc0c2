"""The real programs the tests talk to, and the one rule for a missing one.

A test that needs a peer says so, ``@pytest.mark.needs("orthanc", "storescu")`` (checked by the
hooks below, which tests/conftest.py installs, before the test's fixtures are set up), or calls
:func:`require` where it uses it.  A missing peer skips the test with what to install, so a
developer's partial machine still runs the rest; under CI (``CI`` set, as ``./run test`` sets it)
it fails the test instead, because a suite that goes green by skipping what it was meant to check
proves nothing.  ``./run test`` installs every peer below, so there an absence is a broken setup.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest

ORTHANC_PLUGINS = Path("/usr/share/orthanc/plugins")


@dataclass(frozen=True)
class Peer:
    """A program (or plugin, or package) a test needs, how to find it and how to install it."""

    find: Callable[[], str | None]  # its path (or module name) when present, else None
    install: str  # what to install, as the operator would type or read it


def _command(name: str, *fallbacks: str) -> Callable[[], str | None]:
    """On PATH, or at one of ``fallbacks`` (Orthanc lives in /usr/sbin, often not on PATH)."""
    return lambda: shutil.which(name) or next((f for f in fallbacks if Path(f).is_file()), None)


def _file(path: Path) -> Callable[[], str | None]:
    return lambda: str(path) if path.is_file() else None


def _module(name: str) -> Callable[[], str | None]:
    def find() -> str | None:
        try:
            __import__(name)
        except ImportError:
            return None
        return name

    return find


def _dcmtk(name: str) -> Peer:
    return Peer(_command(name), "Debian package dcmtk")


PEERS: dict[str, Peer] = {
    "orthanc": Peer(_command("Orthanc", "/usr/sbin/Orthanc"), "Debian package orthanc"),
    "orthanc-dicomweb": Peer(
        _file(ORTHANC_PLUGINS / "libOrthancDicomWeb.so"), "Debian package orthanc-dicomweb"
    ),
    "orthanc-serve-folders": Peer(
        _file(ORTHANC_PLUGINS / "libServeFolders.so"), "Debian package orthanc (ships ServeFolders)"
    ),
    "OrthancWSIDicomizer": Peer(_command("OrthancWSIDicomizer"), "Debian package orthanc-wsi"),
    "storescu": _dcmtk("storescu"),
    "storescp": _dcmtk("storescp"),
    "echoscu": _dcmtk("echoscu"),
    "dciodvfy": Peer(_command("dciodvfy"), "Debian package dicom3tools"),
    "chromium": Peer(_command("chromium", "/usr/bin/chromium"), "Debian package chromium"),
    "playwright": Peer(_module("playwright"), "pip install -e '.[test]' (./run test does)"),
    "systemd-analyze": Peer(_command("systemd-analyze"), "Debian package systemd"),
    "npm": Peer(_command("npm"), "Debian package npm"),
}


def strict() -> bool:
    """Whether a missing peer fails the test: ``CI`` is set to anything but empty/0/false/no."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def absent(message: str) -> NoReturn:
    """Fail under CI, skip elsewhere: ``message`` says what is missing and how to get it."""
    if strict():
        pytest.fail(
            f"{message} (CI is set: a missing peer is a failure, not a skip; ./run test installs it)",
            pytrace=False,
        )
    pytest.skip(message)


def require(name: str, reason: str | None = None) -> str:
    """The path (a module's name, for Python packages) of peer ``name``; :func:`absent` if missing.

    ``name`` is a key of :data:`PEERS`, or any other command looked up on PATH.  ``reason``,
    when given, says what the test needs it for.
    """
    peer = PEERS.get(name) or Peer(_command(name), "a command on PATH")
    found = peer.find()
    if found is None:
        absent(f"{name} is not installed ({peer.install})" + (f": {reason}" if reason else ""))
    return found


# -- the ``needs`` marker (pytest hooks; tests/conftest.py imports them) ----------------------


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "needs(*names): the real peers (tests/peers.py PEERS) the test talks to"
    )


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Before any fixture is set up: every peer of the test's ``needs`` marks is there."""
    for mark in item.iter_markers("needs"):
        for name in mark.args:
            require(name)
