"""Settings: TOML file, GLIO_* environment overrides, validation messages an operator can act on."""

from __future__ import annotations

from pathlib import Path

import pytest

from glio_node.config import ConfigError, Destination, Settings, load_settings

EXAMPLE = Path(__file__).parents[2] / "deploy" / "glio-node.toml"


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "glio-node.toml"
    p.write_text(text)
    return p


def test_defaults_are_an_embedded_single_node():
    s = load_settings(None, {})
    assert s == Settings()
    assert s.storage.database_url.startswith("sqlite:///")
    assert s.node.allowed_calling_ae_titles == ()
    assert s.destinations == ()
    assert s.source is None


def test_example_config_loads_with_every_section():
    s = load_settings(EXAMPLE, {})
    assert s.node.ae_title == "GLIONODE"
    assert s.node.allowed_calling_ae_titles == ("ORTHANC",)
    assert s.storage.min_free_bytes == 5_000_000_000
    assert s.destinations == (Destination("pacs", "ORTHANC", "127.0.0.1", 4242),)
    assert s.worker.max_attempts == 3
    assert s.source == EXAMPLE


def test_example_config_sets_every_key():
    """The deploy example documents every key: none of them is left to its default."""
    import tomllib
    from dataclasses import fields

    raw = tomllib.loads(EXAMPLE.read_text())
    s = Settings()
    for section in ("node", "storage", "series", "models", "status", "worker", "geojson", "qc"):
        names = {f.name for f in fields(getattr(s, section))}
        assert set(raw[section]) == names, section
    assert set(raw["destinations"][0]) == {f.name for f in fields(Destination)}


def test_docs_name_every_key_and_variable():
    from dataclasses import fields

    doc = (Path(__file__).parents[2] / "docs" / "configuration.md").read_text()
    s = Settings()
    for section in ("node", "storage", "series", "models", "status", "worker", "geojson", "qc"):
        for f in fields(getattr(s, section)):
            assert f"GLIO_{section.upper()}_{f.name.upper()}" in doc
    assert "GLIO_DESTINATIONS_0_HOST" in doc


def test_environment_overrides_file_with_coercion(tmp_path):
    p = write(tmp_path, '[node]\nport = 11112\n[worker]\nlease_seconds = 60\n')
    s = load_settings(
        p,
        {
            "GLIO_NODE_PORT": "104",
            "GLIO_NODE_ALLOWED_CALLING_AE_TITLES": "ORTHANC, DCM4CHEE",
            "GLIO_STORAGE_MIN_FREE_BYTES": "1_000_000",
            "GLIO_STORAGE_SPOOL_DIR": "/srv/spool",
            "GLIO_WORKER_LEASE_SECONDS": "90.5",
            "GLIO_CONFIG": "ignored: not a setting",
            "PATH": "/usr/bin",
        },
    )
    assert s.node.port == 104
    assert s.node.allowed_calling_ae_titles == ("ORTHANC", "DCM4CHEE")
    assert s.storage.min_free_bytes == 1_000_000
    assert s.storage.spool_dir == Path("/srv/spool")
    assert s.worker.lease_seconds == 90.5


def test_environment_lists_as_toml_array_or_empty():
    s = load_settings(None, {"GLIO_NODE_ALLOWED_CALLING_AE_TITLES": '["A", "B C"]'})
    assert s.node.allowed_calling_ae_titles == ("A", "B C")
    s = load_settings(EXAMPLE, {"GLIO_NODE_ALLOWED_CALLING_AE_TITLES": ""})
    assert s.node.allowed_calling_ae_titles == ()


def test_destinations_from_environment():
    s = load_settings(EXAMPLE, {"GLIO_DESTINATIONS_0_HOST": "pacs.example.org"})
    assert s.destinations[0].host == "pacs.example.org"
    s = load_settings(
        None,
        {
            "GLIO_DESTINATIONS_0_NAME": "archive",
            "GLIO_DESTINATIONS_0_AE_TITLE": "ARCH",
            "GLIO_DESTINATIONS_0_HOST": "10.0.0.5",
            "GLIO_DESTINATIONS_0_PORT": "104",
        },
    )
    assert s.destinations == (Destination("archive", "ARCH", "10.0.0.5", 104),)
    s = load_settings(EXAMPLE, {"GLIO_DESTINATIONS_0_STORAGE_COMMITMENT": "yes"})
    assert s.destinations[0].storage_commitment is True


@pytest.mark.parametrize(
    "env, match",
    [
        ({"GLIO_NODE_PORT": "70000"}, r"\[node\] port = 70000: must be between 1 and 65535 \(from GLIO_NODE_PORT\)"),
        ({"GLIO_NODE_PORT": "eleven"}, r"\[node\] port = 'eleven' \(from GLIO_NODE_PORT\): must be a whole number"),
        ({"GLIO_NODE_PROT": "1"}, r"unknown key \[node\] prot \(from GLIO_NODE_PROT\): allowed keys are"),
        ({"GLIO_NODE_AE_TITLE": "A" * 17}, r"\[node\] ae_title = 'A{17}': an AE title is 1-16"),
        ({"GLIO_STORAGE_DATABASE_URL": "mysql://h/db"}, r"uses 'mysql': only sqlite and postgresql"),
        ({"GLIO_STORAGE_DATABASE_URL": "sqlite://"}, r"in-memory SQLite database"),
        ({"GLIO_STORAGE_DATABASE_URL": "not a url"}, r"not a database URL"),
        ({"GLIO_STORAGE_MIN_FREE_BYTES": "-1"}, r"min_free_bytes = -1: must be 0 or more"),
        ({"GLIO_WORKER_CONCURRENCY": "0"}, r"\[worker\] concurrency = 0: must be at least 1"),
        (
            {"GLIO_WORKER_BACKOFF_MAX_SECONDS": "5"},
            r"backoff_max_seconds = 5.0 is smaller than backoff_base_seconds = 30.0",
        ),
        (
            {"GLIO_WORKER_NODE_SILENT_SECONDS": "10"},
            r"node_silent_seconds = 10.0: must be at least 15 s \(three heartbeats\)",
        ),
        ({"GLIO_SERIES_QUIET_SECONDS": "0"}, r"\[series\] quiet_seconds = 0.0: must be more than 0"),
        ({"GLIO_DESTINATIONS_2_HOST": "x"}, r"destination #2 does not exist and is not the next one \(#1\)"),
        ({"GLIO_DESTINATIONS_1_HOST": "x"}, r"\[\[destinations\]\] #1 is missing name, ae_title, port"),
        ({"GLIO_DESTINATIONS_X_HOST": "x"}, r"GLIO_DESTINATIONS_<index>_<KEY>"),
    ],
)
def test_bad_values_name_the_key_value_and_fix(env, match):
    with pytest.raises(ConfigError, match=match):
        load_settings(EXAMPLE, env)


@pytest.mark.parametrize(
    "text, match",
    [
        ("[node]\nport = '11112'\n", r"\[node\] port = '11112' \(in the config file\): must be a whole number"),
        ("[node]\nport = true\n", r"must be a whole number"),
        ("[node]\nallowed_calling_ae_titles = 'ORTHANC'\n", r"must be a list of strings"),
        ("[nodes]\nport = 1\n", r"unknown section \[nodes\]"),
        ("[node]\nport = \n", r"is not valid TOML"),
        ("[storage]\nspool = 'x'\n", r"unknown key \[storage\] spool \(in the config file\)"),
        (
            "[[destinations]]\nname='a'\nae_title='A'\nhost='h'\nport=1\n"
            "[[destinations]]\nname='a'\nae_title='B'\nhost='h'\nport=2\n",
            r"name 'a' appears twice",
        ),
        ("[[destinations]]\nname='a b'\nae_title='A'\nhost='h'\nport=1\n", r"name = 'a b': use 1-64"),
        (
            "[[destinations]]\nname='web'\ntype='dicomweb'\nurl='http://h/dicom-web'\n"
            "storage_commitment=true\n",
            r"'web' storage_commitment = true: Storage Commitment is a DIMSE service",
        ),
        (
            "[[destinations]]\nname='a'\nae_title='A'\nhost='h'\nport=1\n"
            "commitment_timeout_seconds=0\n",
            r"'a' commitment_timeout_seconds = 0.0: must be more than 0",
        ),
    ],
)
def test_bad_files_name_the_problem(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        load_settings(write(tmp_path, text), {})


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"does not exist: check --config"):
        load_settings(tmp_path / "nope.toml", {})


def test_settings_are_frozen():
    s = Settings()
    with pytest.raises(AttributeError):
        s.node.port = 1  # type: ignore[misc]


def test_destination_secrets_stay_out_of_repr():
    settings = load_settings(None, {
        "GLIO_DESTINATIONS_0_NAME": "web", "GLIO_DESTINATIONS_0_TYPE": "dicomweb",
        "GLIO_DESTINATIONS_0_URL": "http://pacs:8042/dicom-web",
        "GLIO_DESTINATIONS_0_USERNAME": "glio", "GLIO_DESTINATIONS_0_PASSWORD": "s3cret-pw",
    })
    assert settings.destinations[0].password == "s3cret-pw"
    assert "s3cret-pw" not in repr(settings)


def test_the_status_page_token_stays_out_of_repr():
    settings = load_settings(None, {"GLIO_STATUS_TOKEN": "a-long-status-token-0123"})
    assert settings.status.token == "a-long-status-token-0123"
    assert "a-long-status-token-0123" not in repr(settings)


def test_the_silent_node_minimum_is_three_heartbeats():
    from glio_node.config import MIN_NODE_SILENT_SECONDS
    from glio_node.store.nodes import HEARTBEAT_SECONDS

    assert MIN_NODE_SILENT_SECONDS == 3 * HEARTBEAT_SECONDS


def test_a_geojson_destination_needs_an_http_url_and_cannot_commit(tmp_path):
    p = write(tmp_path, '[[destinations]]\nname = "vendor"\ntype = "geojson"\nurl = "https://ai.example.org/glio"\n')
    [vendor] = load_settings(p, {}).destinations
    assert (vendor.type, vendor.url) == ("geojson", "https://ai.example.org/glio")
    with pytest.raises(ConfigError, match=r"\[\[destinations\]\] #1 is missing url"):
        load_settings(p, {"GLIO_DESTINATIONS_1_NAME": "other", "GLIO_DESTINATIONS_1_TYPE": "geojson"})
    with pytest.raises(ConfigError, match=r"url = 'ai.example.org': give the endpoint GeoJSON is POSTed to as http"):
        load_settings(p, {"GLIO_DESTINATIONS_0_URL": "ai.example.org"})
    with pytest.raises(ConfigError, match=r"a geojson destination cannot confirm storage"):
        load_settings(p, {"GLIO_DESTINATIONS_0_STORAGE_COMMITMENT": "true"})


def test_the_geojson_folder_comes_from_the_file_or_the_environment(tmp_path):
    assert load_settings(None, {}).geojson.folder_path is None
    s = load_settings(write(tmp_path, '[geojson]\nfolder = "/srv/qupath"\n'), {})
    assert s.geojson.folder_path == Path("/srv/qupath")
    assert load_settings(None, {"GLIO_GEOJSON_FOLDER": "/mnt/share"}).geojson.folder_path == Path("/mnt/share")
    with pytest.raises(ConfigError, match=r"\[geojson\] folder = ' /x': remove the leading/trailing spaces"):
        load_settings(write(tmp_path, '[geojson]\nfolder = " /x"\n'), {})
