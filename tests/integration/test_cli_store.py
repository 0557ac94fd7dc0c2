"""Hospital IT runs the deploy step and exports the audit trail from the command line."""

from __future__ import annotations

import json

from glio_node.cli import main


def test_db_upgrade_then_audit_export(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GLIO_STORAGE_DATABASE_URL", f"sqlite:///{tmp_path}/state/glio.db")
    assert main(["db", "upgrade"]) == 0
    assert "schema revision" in capsys.readouterr().out
    assert (tmp_path / "state" / "glio.db").is_file()
    assert main(["db", "upgrade"]) == 0  # idempotent
    capsys.readouterr()
    assert main(["audit", "export", "--format", "json", "--since", "2026-01-01T00:00:00Z"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_audit_export_refuses_a_time_without_zone(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GLIO_STORAGE_DATABASE_URL", f"sqlite:///{tmp_path}/glio.db")
    assert main(["audit", "export", "--since", "2026-01-01T00:00:00"]) == 2
    assert "no time zone" in capsys.readouterr().err


def test_a_bad_config_value_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GLIO_STORAGE_DATABASE_URL", "mysql://nope")
    assert main(["db", "upgrade"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "database_url" in err[0]
