"""What an administrator copies from deploy/ works as shipped.

The example configs load with the node's own loader (no unknown key, no bad value), say what
they claim (SQLite for one node, PostgreSQL and a shared spool for several), and the systemd
unit parses cleanly with systemd-analyze.  The Containerfile cannot be built here (no
container engine); its COPY sources and command are checked instead.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from glio_node.config import load_settings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
REPO = DEPLOY.parent


def test_the_single_node_example_config_loads_and_uses_sqlite():
    settings = load_settings(DEPLOY / "glio-node.toml", environ={})
    assert settings.storage.database_url.startswith("sqlite:///")
    assert settings.destinations and settings.node.allowed_calling_ae_titles


def test_the_multinode_example_config_loads_with_postgresql_and_an_absolute_shared_spool():
    settings = load_settings(DEPLOY / "glio-node-multinode.toml", environ={})
    assert settings.storage.database_url.startswith("postgresql+psycopg://")
    assert settings.storage.spool_dir.is_absolute()
    assert settings.worker.shutdown_grace_seconds < systemd_stop_timeout()


def test_the_database_password_can_come_from_the_environment_as_the_multinode_config_says():
    url = "postgresql+psycopg://glio:secret@db.example.org/glio"
    settings = load_settings(DEPLOY / "glio-node-multinode.toml", environ={"GLIO_STORAGE_DATABASE_URL": url})
    assert settings.storage.database_url == url


def systemd_stop_timeout() -> float:
    text = (DEPLOY / "glio-node.service").read_text()
    return float(re.search(r"^TimeoutStopSec=(\d+)$", text, re.MULTILINE).group(1))


def test_systemd_waits_longer_than_the_nodes_shutdown_grace_period():
    settings = load_settings(DEPLOY / "glio-node.toml", environ={})
    assert settings.worker.shutdown_grace_seconds < systemd_stop_timeout()


@pytest.mark.needs("systemd-analyze")
def test_the_systemd_unit_parses_without_a_warning(tmp_path):
    # ExecStart must exist for verify: point it at this environment's glio-node.
    text = (DEPLOY / "glio-node.service").read_text()
    here = Path(sys.executable).parent / "glio-node"
    assert "/opt/glio-node/venv/bin/glio-node " in text
    unit = tmp_path / "glio-node.service"
    unit.write_text(text.replace("/opt/glio-node/venv/bin/glio-node ", f"{here if here.exists() else '/bin/true'} "))
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True,
                          check=False, timeout=60)
    assert done.returncode == 0, done.stderr
    assert str(unit) not in done.stderr, done.stderr  # unknown keys are only warnings


def test_the_containerfile_copies_what_exists_and_serves_the_shipped_config():
    text = (DEPLOY / "Containerfile").read_text()
    for source in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", text, re.MULTILINE):
        for path in source.split():
            assert (REPO / path).exists(), path
    assert re.search(r"^FROM python:3\.11-slim$", text, re.MULTILINE)
    assert re.search(r"^USER glio-node$", text, re.MULTILINE)
    assert re.search(r"^EXPOSE 11112 8080$", text, re.MULTILINE)
    assert 'CMD ["glio-node", "serve", "--config", "/etc/glio-node/glio-node.toml"]' in text
