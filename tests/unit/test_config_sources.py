"""[[sources]]: the DICOMweb pull mode's settings, the adapter's example and its documentation."""

from __future__ import annotations

import tomllib
from dataclasses import fields
from pathlib import Path

import pytest

from glio_node.config import ConfigError, Source, load_settings

REPO = Path(__file__).parents[2]
EXAMPLE = REPO / "adapters" / "dicomweb" / "glio-node-pull.toml"
SECRETS = {"GLIO_SOURCES_0_PASSWORD": "s3cret-pw", "GLIO_DESTINATIONS_0_PASSWORD": "stow-pw"}


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "glio-node.toml"
    p.write_text(text)
    return p


def test_the_adapter_example_loads_with_its_secrets_from_the_environment():
    s = load_settings(EXAMPLE, SECRETS)
    [source] = s.sources
    assert (source.name, source.auth, source.username) == ("pacs-web", "basic", "glio-node")
    assert source.password == "s3cret-pw"
    assert source.first_poll_lookback_days == 7
    assert s.destinations[0].type == "dicomweb" and s.destinations[0].password == "stow-pw"
    assert "s3cret-pw" not in repr(s)  # settings may be logged; secrets must not be


def test_the_adapter_example_without_its_password_says_where_to_put_it():
    with pytest.raises(ConfigError, match=r"needs username and password .*GLIO_SOURCES_<n>_PASSWORD"):
        load_settings(EXAMPLE, {"GLIO_DESTINATIONS_0_PASSWORD": "x"})


def test_the_example_sets_and_the_docs_name_every_key():
    raw = tomllib.loads(EXAMPLE.read_text())
    names = {f.name for f in fields(Source)}
    assert set(raw["sources"][0]) == names
    doc = (REPO / "docs" / "configuration.md").read_text()
    for name in names:
        assert f"GLIO_SOURCES_0_{name.upper()}" in doc


def test_a_node_without_sources_has_none():
    assert load_settings(None, {}).sources == ()


def test_sources_come_from_the_environment_alone():
    s = load_settings(None, {"GLIO_SOURCES_0_NAME": "web", "GLIO_SOURCES_0_URL": "http://pacs/dicom-web",
                             "GLIO_SOURCES_0_AUTH": "bearer", "GLIO_SOURCES_0_TOKEN": "t",
                             "GLIO_SOURCES_0_POLL_SECONDS": "5"})
    assert s.sources == (Source("web", url="http://pacs/dicom-web", auth="bearer", token="t", poll_seconds=5.0),)


@pytest.mark.parametrize(
    "env, match",
    [
        ({"GLIO_SOURCES_0_NAME": "web"}, r"\[\[sources\]\] #0 is missing url: every source needs them"),
        ({"GLIO_SOURCES_1_URL": "http://x"}, r"source #1 does not exist and is not the next one \(#0\)"),
        ({"GLIO_SOURCES_X_URL": "http://x"}, r"GLIO_SOURCES_<index>_<KEY>"),
    ],
)
def test_bad_environment_names_the_variable(env, match):
    with pytest.raises(ConfigError, match=match):
        load_settings(None, env)


BASE = "[[sources]]\nname = 'web'\nurl = 'http://pacs:8042/dicom-web'\n"


@pytest.mark.parametrize(
    "extra, match",
    [
        ("auth = 'digest'\n", r"auth = 'digest': use none, basic or bearer"),
        ("auth = 'bearer'\n", r"auth = \"bearer\" needs token"),
        ("auth = 'basic'\nusername = 'u'\n", r"auth = \"basic\" needs username and password"),
        ("password = 'p'\n", r"sets password but auth = 'none': set auth = \"basic\""),
        ("token = 't'\n", r"sets token but auth = 'none': set auth = \"bearer\""),
        ("poll_seconds = 0.5\n", r"poll_seconds = 0.5: must be at least 1 second"),
        ("first_poll_lookback_days = -2\n", r"first_poll_lookback_days = -2: use -1"),
        ("modality = 'sm'\n", r"modality = 'sm': a DICOM modality code"),
        ("type = 'dimse'\n", r"type = 'dimse': use \"dicomweb\""),
        ("timeout_seconds = 0\n", r"timeout_seconds = 0.0: must be more than 0"),
    ],
)
def test_bad_sources_name_the_key_value_and_fix(tmp_path, extra, match):
    with pytest.raises(ConfigError, match=match):
        load_settings(write(tmp_path, BASE + extra), {})


@pytest.mark.parametrize(
    "text, match",
    [
        ("[[sources]]\nname = 'web'\nurl = 'pacs:8042'\n", r"url = 'pacs:8042': give the DICOMweb root"),
        ("[[sources]]\nname = 'a-very-long-source-name'\nurl = 'http://p'\n", r"use 1-16 letters"),
        (BASE + BASE, r"\[\[sources\]\] name 'web' appears twice"),
        ("[sources]\nname = 'web'\n", r"must be written as \[\[sources\]\] tables"),
    ],
)
def test_bad_source_tables_name_the_problem(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        load_settings(write(tmp_path, text), {})
