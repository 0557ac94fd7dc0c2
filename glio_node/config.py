"""Typed settings for the worker service: one TOML file, every key overridable from the environment.

``load_settings(path, environ)`` reads the file (or nothing: the embedded single-node defaults,
SQLite and local folders), applies ``GLIO_<SECTION>_<KEY>`` environment variables on top, and
returns a frozen :class:`Settings`.  Every value is checked once, here; a bad value raises
:class:`ConfigError` with the key, the value and what is allowed, e.g.
``[node] port = 70000 (from GLIO_NODE_PORT): must be between 1 and 65535``.

Environment values are strings coerced to the key's type: integers may use ``_`` separators,
booleans are ``true/false/yes/no/1/0``, lists are comma-separated (``ORTHANC,DCM4CHEE``) or a
TOML array (``["ORTHANC", "DCM4CHEE"]``); an empty string is the empty list.
``[[destinations]]`` entries are addressed by their 0-based position:
``GLIO_DESTINATIONS_0_HOST=pacs.example.org``; the next free position adds a destination.
``[[sources]]`` (DICOMweb servers the node polls) work the same way: ``GLIO_SOURCES_0_PASSWORD``
keeps a secret out of the file.

Relative paths (spool, models, a SQLite database) are relative to the service's working
directory.  Nothing is read at import time (style item 9): the entry point calls
``load_settings`` and passes the result down.
"""

from __future__ import annotations

import os
import re
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from glio_node.errors import ConfigError
from glio_node.pipeline.qc import QcThresholds

ENV_PREFIX = "GLIO_"


# ------------------------------------------------------------------------------------------
# Sections


@dataclass(frozen=True)
class NodeSettings:
    """The DICOM node (C-STORE / C-ECHO SCP) the PACS sends slides to."""

    ae_title: str = "GLIONODE"  # our AE title: the PACS's "called AE"
    host: str = "0.0.0.0"  # address to listen on
    port: int = 11112  # TCP port to listen on
    allowed_calling_ae_titles: tuple[str, ...] = ()  # empty: accept any calling AE

    def __post_init__(self) -> None:
        _check_ae_title("node", "ae_title", self.ae_title)
        _check_host("node", "host", self.host)
        _check_port("node", "port", self.port)
        for title in self.allowed_calling_ae_titles:
            _check_ae_title("node", "allowed_calling_ae_titles", title)


@dataclass(frozen=True)
class StorageSettings:
    """Where received instances, results and the job queue live."""

    spool_dir: Path = Path("var/spool")  # received instances and results; one filesystem
    database_url: str = "sqlite:///var/glio-node.db"  # or postgresql+psycopg://user@host/db
    min_free_bytes: int = 5_000_000_000  # refuse instances (0xA700) below this much free disk
    retention_seconds: float = 86400.0  # keep a slide and its results this long after delivery

    def __post_init__(self) -> None:
        if not str(self.spool_dir).strip():
            raise ConfigError("[storage] spool_dir is empty: give a folder for received slides")
        _check_database_url(self.database_url)
        if self.min_free_bytes < 0:
            raise ConfigError(
                f"[storage] min_free_bytes = {self.min_free_bytes}: must be 0 or more bytes"
            )
        if self.retention_seconds < 0:
            raise ConfigError(
                f"[storage] retention_seconds = {self.retention_seconds}: must be 0 or more seconds"
            )


@dataclass(frozen=True)
class SeriesSettings:
    """When a received series becomes a job."""

    quiet_seconds: float = 30.0  # no new instance for this long: the series is considered sent
    incomplete_wait_seconds: float = 600.0  # quiet but incomplete: wait this long, then run anyway

    def __post_init__(self) -> None:
        _check_positive("series", "quiet_seconds", self.quiet_seconds)
        if self.incomplete_wait_seconds < 0:
            raise ConfigError(
                f"[series] incomplete_wait_seconds = {self.incomplete_wait_seconds}: "
                "must be 0 or more seconds"
            )


@dataclass(frozen=True)
class ModelsSettings:
    """The model bundles."""

    dir: Path = Path("models")  # folder holding one sub-folder per bundle

    def __post_init__(self) -> None:
        if not str(self.dir).strip():
            raise ConfigError("[models] dir is empty: give the folder that holds the model bundles")


DESTINATION_TYPES = ("dimse", "dicomweb", "geojson")


@dataclass(frozen=True)
class Destination:
    """One place results are sent to: C-STORE (``type = "dimse"``), STOW-RS (``"dicomweb"``),
    or, for ``"geojson"``, each job's QuPath GeoJSON by HTTP POST (no DICOM objects)."""

    name: str  # short unique name, used in delivery records and the audit trail
    ae_title: str = ""  # dimse: the destination's AE title (our "called AE")
    host: str = ""  # dimse
    port: int = 0  # dimse
    type: str = "dimse"  # "dimse" (C-STORE SCU), "dicomweb" (STOW-RS) or "geojson" (HTTP POST)
    url: str = ""  # dicomweb: the DICOMweb root, e.g. http://pacs:8042/dicom-web; geojson: the endpoint
    username: str = ""  # dicomweb: HTTP basic auth user (with password)
    # Secrets stay out of repr(): settings objects end up in tracebacks and debug logs.
    password: str = field(default="", repr=False)  # dicomweb: HTTP basic auth password
    bearer_token: str = field(default="", repr=False)  # dicomweb: "Authorization: Bearer <token>"
    storage_commitment: bool = False  # dimse: ask for Storage Commitment; purge only once confirmed
    commitment_timeout_seconds: float = 600.0  # no N-EVENT-REPORT this long after asking: ask again

    @staticmethod
    def _required_keys(values: Mapping[str, Any]) -> tuple[str, ...]:
        """The keys a destination must set, which depend on its type."""
        if str(values.get("type", "dimse")).strip() in ("dicomweb", "geojson"):
            return ("name", "url")
        return ("name", "ae_title", "host", "port")

    def __post_init__(self) -> None:
        where = f"[[destinations]] {self.name!r}"
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", self.name):
            raise ConfigError(
                f"{where} name = {self.name!r}: use 1-64 letters, digits, '_', '.' or '-', "
                "starting with a letter or digit"
            )
        if self.type not in DESTINATION_TYPES:
            raise ConfigError(
                f"{where} type = {self.type!r}: use \"dimse\", \"dicomweb\" or \"geojson\""
            )
        if not self.commitment_timeout_seconds > 0:
            raise ConfigError(
                f"{where} commitment_timeout_seconds = {self.commitment_timeout_seconds}: "
                "must be more than 0"
            )
        if self.type == "dimse":
            _check_ae_title(where, "ae_title", self.ae_title)
            _check_host(where, "host", self.host)
            _check_port(where, "port", self.port)
            return
        if self.storage_commitment:
            raise ConfigError(
                f"{where} storage_commitment = true: Storage Commitment is a DIMSE service; "
                f"a {self.type} destination cannot confirm storage, set it to false"
            )
        if not re.fullmatch(r"https?://[^\s/]+(/\S*)?", self.url):
            what = "the DICOMweb root" if self.type == "dicomweb" else "the endpoint GeoJSON is POSTed to"
            raise ConfigError(f"{where} url = {self.url!r}: give {what} as http(s)://host[:port]/path")
        if self.bearer_token and (self.username or self.password):
            raise ConfigError(f"{where}: set bearer_token or username/password, not both")
        if bool(self.username) != bool(self.password):
            raise ConfigError(f"{where}: basic auth needs both username and password")


SOURCE_TYPES = ("dicomweb",)
SOURCE_AUTH = ("none", "basic", "bearer")


@dataclass(frozen=True)
class Source:
    """A DICOMweb server the node polls for new series (QIDO-RS) and retrieves them from (WADO-RS).

    For sites that cannot send by C-STORE.  What was already taken is kept in the store
    (``pull_series``), so a restart fetches nothing twice.  ``password`` and ``token`` are kept
    out of ``repr`` and every log line; set them from the environment
    (``GLIO_SOURCES_<n>_PASSWORD``, ``GLIO_SOURCES_<n>_TOKEN``) to keep them out of the file.
    """

    name: str  # short unique name (1-16 chars): the "calling AE" of pulled instances in the audit trail
    url: str = ""  # the DICOMweb root, e.g. https://pacs.example.org/dicom-web
    type: str = "dicomweb"  # the only kind of source so far
    auth: str = "none"  # none, basic (username + password) or bearer (token)
    username: str = ""  # basic auth
    password: str = field(default="", repr=False)  # basic auth
    token: str = field(default="", repr=False)  # bearer: "Authorization: Bearer <token>"
    poll_seconds: float = 60.0  # how often to ask for new series
    modality: str = "SM"  # QIDO-RS Modality= of the series to take
    first_poll_lookback_days: int = -1  # first poll: take only series with StudyDate this recent (-1: all)
    timeout_seconds: float = 120.0  # one HTTP request (a WADO-RS response is streamed, per read)

    @staticmethod
    def _required_keys(values: Mapping[str, Any]) -> tuple[str, ...]:
        return ("name", "url")

    def __post_init__(self) -> None:
        where = f"[[sources]] {self.name!r}"
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,15}", self.name):
            raise ConfigError(
                f"{where} name = {self.name!r}: use 1-16 letters, digits, '_', '.' or '-', "
                "starting with a letter or digit"
            )
        if self.type not in SOURCE_TYPES:
            raise ConfigError(f"{where} type = {self.type!r}: use \"dicomweb\"")
        if not re.fullmatch(r"https?://[^\s/]+(/\S*)?", self.url):
            what = "the DICOMweb root" if self.type == "dicomweb" else "the endpoint GeoJSON is POSTed to"
            raise ConfigError(f"{where} url = {self.url!r}: give {what} as http(s)://host[:port]/path")
        if self.auth not in SOURCE_AUTH:
            raise ConfigError(f"{where} auth = {self.auth!r}: use none, basic or bearer")
        if self.auth == "basic" and not (self.username and self.password):
            raise ConfigError(
                f"{where} auth = \"basic\" needs username and password "
                "(the password may come from GLIO_SOURCES_<n>_PASSWORD)"
            )
        if self.auth == "bearer" and not self.token:
            raise ConfigError(
                f"{where} auth = \"bearer\" needs token (or GLIO_SOURCES_<n>_TOKEN)"
            )
        unused = [
            k for k, allowed in (("username", "basic"), ("password", "basic"), ("token", "bearer"))
            if getattr(self, k) and self.auth != allowed
        ]
        if unused:
            raise ConfigError(
                f"{where} sets {', '.join(unused)} but auth = {self.auth!r}: "
                f"set auth = \"{'bearer' if unused == ['token'] else 'basic'}\" or remove them"
            )
        if self.poll_seconds < 1:
            raise ConfigError(f"{where} poll_seconds = {self.poll_seconds}: must be at least 1 second")
        if not self.timeout_seconds > 0:
            raise ConfigError(f"{where} timeout_seconds = {self.timeout_seconds}: must be more than 0")
        if not re.fullmatch(r"[A-Z0-9_ ]{1,16}", self.modality):
            raise ConfigError(
                f"{where} modality = {self.modality!r}: a DICOM modality code, e.g. \"SM\""
            )
        if self.first_poll_lookback_days < -1:
            raise ConfigError(
                f"{where} first_poll_lookback_days = {self.first_poll_lookback_days}: "
                "use -1 (take every series found) or 0 or more days"
            )


# Tokens copied from examples and docs; refused when the page listens beyond this machine.
EXAMPLE_TOKENS = frozenset({"change-me", "changeme", "example", "secret", "token", "password"})
MIN_TOKEN_CHARS = 16


@dataclass(frozen=True)
class StatusSettings:
    """The status page, JSON API and /metrics (served by ``serve`` and ``status-page``)."""

    enabled: bool = True  # serve the page beside the SCP in `glio-node serve`
    host: str = "127.0.0.1"  # beyond loopback a token is required
    port: int = 8080
    token: str = field(default="", repr=False)  # bearer token (or basic-auth password); required unless host is loopback
    show_patient_data: bool = False  # show patient name and ID (read from the spooled slide)
    refresh_seconds: int = 10  # the page reloads itself this often
    echo_cache_seconds: float = 60.0  # destinations are C-ECHOed (or HTTP-checked) this often, in the background

    def __post_init__(self) -> None:
        _check_host("status", "host", self.host)
        _check_port("status", "port", self.port)
        if self.refresh_seconds < 1:
            raise ConfigError(f"[status] refresh_seconds = {self.refresh_seconds}: must be at least 1")
        if self.echo_cache_seconds < 0:
            raise ConfigError(
                f"[status] echo_cache_seconds = {self.echo_cache_seconds}: must be 0 or more seconds"
            )
        if self.token and (
            self.token.strip().lower() in EXAMPLE_TOKENS or len(self.token) < MIN_TOKEN_CHARS
        ):
            raise ConfigError(
                f"[status] token is an example value or shorter than {MIN_TOKEN_CHARS} characters: "
                "generate one, e.g. `python3 -c 'import secrets; print(secrets.token_urlsafe(32))'`"
            )
        if not self.token and not self.is_loopback:
            raise ConfigError(
                f"[status] host = {self.host!r} listens beyond this machine but token is empty: "
                "set [status] token (or GLIO_STATUS_TOKEN) to a long random value, or use "
                "host = \"127.0.0.1\""
            )

    @property
    def is_loopback(self) -> bool:
        """Whether only this machine can reach the page (127.0.0.0/8, ::1, localhost)."""
        import ipaddress

        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


MIN_NODE_SILENT_SECONDS = 15.0  # three of store.nodes.HEARTBEAT_SECONDS


@dataclass(frozen=True)
class WorkerSettings:
    """Job execution: how many at once, leases, retries."""

    concurrency: int = 1  # jobs run at once on this node (one per GPU)
    max_attempts: int = 3  # a job is tried at most this often, then fails permanently
    lease_seconds: float = 300.0  # a running job's lease; renewed while working
    backoff_base_seconds: float = 30.0  # first retry delay after a transient error; doubles
    backoff_max_seconds: float = 3600.0  # cap on the retry delay
    delivery_max_attempts: int = 100  # sends of one result to one destination, then failed
    device: str = "auto"  # where the networks run: auto, cpu or gpu
    shutdown_grace_seconds: float = 60.0  # on SIGTERM, wait this long for running jobs
    # A node whose heartbeat (every 5 s) is older than this is taken to be dead: another node
    # takes back its running jobs and claimed deliveries without waiting for lease_seconds.
    node_silent_seconds: float = 30.0

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cpu", "gpu"):
            raise ConfigError(f"[worker] device = {self.device!r}: use auto, cpu or gpu")
        if self.shutdown_grace_seconds < 0:
            raise ConfigError(
                f"[worker] shutdown_grace_seconds = {self.shutdown_grace_seconds}: "
                "must be 0 or more seconds"
            )
        for key in ("concurrency", "max_attempts", "delivery_max_attempts"):
            value = getattr(self, key)
            if value < 1:
                raise ConfigError(f"[worker] {key} = {value}: must be at least 1")
        for key in ("lease_seconds", "backoff_base_seconds", "backoff_max_seconds"):
            _check_positive("worker", key, getattr(self, key))
        if self.node_silent_seconds < MIN_NODE_SILENT_SECONDS:
            raise ConfigError(
                f"[worker] node_silent_seconds = {self.node_silent_seconds}: must be at least "
                f"{MIN_NODE_SILENT_SECONDS:g} s (three heartbeats), or a live node that is late "
                "with one heartbeat would lose its jobs"
            )
        if self.backoff_max_seconds < self.backoff_base_seconds:
            raise ConfigError(
                f"[worker] backoff_max_seconds = {self.backoff_max_seconds} is smaller than "
                f"backoff_base_seconds = {self.backoff_base_seconds}: the cap must be at least "
                "the first delay"
            )


@dataclass(frozen=True)
class GeoJSONSettings:
    """Where ``serve`` puts each job's QuPath GeoJSON, beside sending the DICOM objects."""

    folder: str = ""  # deliver each job's GeoJSON into this folder (atomic write); empty: off

    def __post_init__(self) -> None:
        if self.folder != self.folder.strip():
            raise ConfigError(
                f"[geojson] folder = {self.folder!r}: remove the leading/trailing spaces"
            )

    @property
    def folder_path(self) -> Path | None:
        """The folder, or None when folder delivery is off."""
        return Path(self.folder) if self.folder else None


@dataclass(frozen=True)
class QcSettings(QcThresholds):
    """Slide QC thresholds: the fields and defaults of ``pipeline.qc.QcThresholds`` (each
    explained there and in docs/configuration.md), checked as a ``[qc]`` section."""

    def __post_init__(self) -> None:
        try:
            super().__post_init__()
        except ValueError as exc:
            raise ConfigError(f"[qc] {exc}") from None

    def thresholds(self) -> QcThresholds:
        """The plain thresholds the pipeline takes (``AnalysisOptions.qc``)."""
        return QcThresholds(**{f.name: getattr(self, f.name) for f in fields(QcThresholds)})


@dataclass(frozen=True)
class Settings:
    """Everything the worker service is configured with; valid once built."""

    node: NodeSettings = field(default_factory=NodeSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    series: SeriesSettings = field(default_factory=SeriesSettings)
    models: ModelsSettings = field(default_factory=ModelsSettings)
    destinations: tuple[Destination, ...] = ()
    sources: tuple[Source, ...] = ()  # DICOMweb servers polled for new series (pull mode)
    status: StatusSettings = field(default_factory=StatusSettings)
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    geojson: GeoJSONSettings = field(default_factory=GeoJSONSettings)
    qc: QcSettings = field(default_factory=QcSettings)
    source: Path | None = None  # the TOML file these came from; None: defaults and environment

    def __post_init__(self) -> None:
        names: set[str] = set()
        for dest in self.destinations:
            if dest.name in names:
                raise ConfigError(
                    f"[[destinations]] name {dest.name!r} appears twice: names must be unique"
                )
            names.add(dest.name)
        source_names: set[str] = set()
        for src in self.sources:
            if src.name in source_names:
                raise ConfigError(
                    f"[[sources]] name {src.name!r} appears twice: names must be unique"
                )
            source_names.add(src.name)


_SECTIONS: dict[str, type] = {
    "node": NodeSettings,
    "storage": StorageSettings,
    "series": SeriesSettings,
    "models": ModelsSettings,
    "status": StatusSettings,
    "worker": WorkerSettings,
    "geojson": GeoJSONSettings,
    "qc": QcSettings,
}


# ------------------------------------------------------------------------------------------
# Loading


def load_settings(
    path: Path | str | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Settings from the TOML file at ``path`` (None: defaults only) and ``GLIO_*`` variables.

    ``environ`` defaults to ``os.environ``; tests pass their own mapping.  Raises
    :class:`ConfigError` for a missing or unparsable file, an unknown section or key, a value of
    the wrong type, or a value outside what is allowed.
    """
    environ = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    source = None
    if path is not None:
        source = Path(path)
        try:
            with source.open("rb") as f:
                raw = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file {source} does not exist: check --config") from None
        except OSError as exc:
            raise ConfigError(f"config file {source} cannot be read: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {source} is not valid TOML: {exc}") from None

    unknown = sorted(set(raw) - set(_SECTIONS) - {"destinations", "sources"})
    if unknown:
        raise ConfigError(
            f"unknown section [{unknown[0]}] in {source}: allowed sections are "
            + ", ".join(f"[{s}]" for s in (*_SECTIONS, "[destinations]", "[sources]"))
        )

    # Merge: file values as "typed" values, environment values as strings (coerced below).
    sections: dict[str, dict[str, tuple[Any, str]]] = {}
    for name, cls in _SECTIONS.items():
        table = raw.get(name, {})
        if not isinstance(table, dict):
            raise ConfigError(f"[{name}] in {source} must be a table, not {type(table).__name__}")
        sections[name] = {k: (v, "file") for k, v in table.items()}
    dests_raw = raw.get("destinations", [])
    if not isinstance(dests_raw, list) or not all(isinstance(d, dict) for d in dests_raw):
        raise ConfigError(f"destinations in {source} must be written as [[destinations]] tables")
    destinations: list[dict[str, tuple[Any, str]]] = [
        {k: (v, "file") for k, v in d.items()} for d in dests_raw
    ]

    sources_raw = raw.get("sources", [])
    if not isinstance(sources_raw, list) or not all(isinstance(d, dict) for d in sources_raw):
        raise ConfigError(f"sources in {source} must be written as [[sources]] tables")
    pull_sources: list[dict[str, tuple[Any, str]]] = [
        {k: (v, "file") for k, v in d.items()} for d in sources_raw
    ]
    source_vars: list[tuple[int, str, str]] = []

    destination_vars: list[tuple[int, str, str]] = []
    for var in sorted(environ):
        if not var.startswith(ENV_PREFIX):
            continue
        section, _, key = var[len(ENV_PREFIX) :].partition("_")
        section = section.lower()
        if section == "destinations":
            index_text, _, dkey = key.partition("_")
            if not index_text.isdigit() or not dkey:
                raise ConfigError(
                    f"{var}: destination variables are GLIO_DESTINATIONS_<index>_<KEY>, "
                    "e.g. GLIO_DESTINATIONS_0_HOST"
                )
            destination_vars.append((int(index_text), dkey.lower(), var))
        elif section == "sources":
            index_text, _, skey = key.partition("_")
            if not index_text.isdigit() or not skey:
                raise ConfigError(
                    f"{var}: source variables are GLIO_SOURCES_<index>_<KEY>, "
                    "e.g. GLIO_SOURCES_0_PASSWORD"
                )
            source_vars.append((int(index_text), skey.lower(), var))
        elif section in _SECTIONS:
            sections[section][key.lower()] = (environ[var], var)
        # Other GLIO_* variables (e.g. GLIO_CONFIG) are not settings.
    for index, dkey, var in sorted(destination_vars):
        if index > len(destinations):
            raise ConfigError(
                f"{var}: destination #{index} does not exist and is not the next one "
                f"(#{len(destinations)}); number destinations without gaps"
            )
        if index == len(destinations):
            destinations.append({})
        destinations[index][dkey] = (environ[var], var)
    for index, skey, var in sorted(source_vars):
        if index > len(pull_sources):
            raise ConfigError(
                f"{var}: source #{index} does not exist and is not the next one "
                f"(#{len(pull_sources)}); number sources without gaps"
            )
        if index == len(pull_sources):
            pull_sources.append({})
        pull_sources[index][skey] = (environ[var], var)

    built = {name: _build(cls, f"[{name}]", sections[name]) for name, cls in _SECTIONS.items()}
    dests = tuple(
        _build(Destination, f"[[destinations]] #{i}", d) for i, d in enumerate(destinations)
    )
    srcs = tuple(_build(Source, f"[[sources]] #{i}", d) for i, d in enumerate(pull_sources))
    return Settings(**built, destinations=dests, sources=srcs, source=source)


def _build(cls: type, where: str, values: dict[str, tuple[Any, str]]) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, (value, origin) in values.items():
        if key not in known:
            raise ConfigError(
                f"unknown key {where} {key} ({_origin(origin)}): allowed keys are "
                + ", ".join(sorted(known))
            )
        kwargs[key] = _coerce(hints[key], value, f"{where} {key}", origin)
    required = getattr(cls, "_required_keys", None)
    missing = (
        [k for k in required(kwargs) if k not in kwargs]
        if required is not None
        else [
            f.name
            for f in fields(cls)
            if f.name not in kwargs and f.default is MISSING and f.default_factory is MISSING
        ]
    )
    if missing:
        noun = "source" if where.startswith("[[sources]]") else "destination"
        raise ConfigError(f"{where} is missing {', '.join(missing)}: every {noun} needs them")
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        # A check names "<key> = <value>"; say so when that value came from the environment.
        env = [o for k, (_, o) in values.items() if o != "file" and f" {k} =" in str(exc)]
        if env:
            raise ConfigError(f"{exc} (from {env[0]})") from None
        raise


def _origin(origin: str) -> str:
    return "in the config file" if origin == "file" else f"from {origin}"


def _coerce(hint: Any, value: Any, key: str, origin: str) -> Any:
    """``value`` (TOML-typed from the file, a string from the environment) as type ``hint``."""
    from_env = origin != "file"
    where = f"{key} = {value!r} ({_origin(origin)})"
    if hint is bool:
        if isinstance(value, bool):
            return value
        if from_env and value.strip().lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.strip().lower() in ("true", "yes", "1")
        raise ConfigError(f"{where}: must be true or false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if from_env:
            try:
                return int(value.strip().replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"{where}: must be a whole number")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if from_env:
            try:
                return float(value.strip().replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"{where}: must be a number")
    if hint is str:
        if isinstance(value, str):
            return value.strip() if from_env else value
        raise ConfigError(f"{where}: must be a string")
    if hint is Path:
        if isinstance(value, str):
            return Path(value.strip() if from_env else value)
        raise ConfigError(f"{where}: must be a path (a string)")
    if typing.get_origin(hint) is tuple:
        items: Any = value
        if from_env:
            text = value.strip()
            if text.startswith("["):
                try:
                    items = tomllib.loads(f"v = {text}")["v"]
                except tomllib.TOMLDecodeError:
                    raise ConfigError(f"{where}: not a valid TOML array") from None
            else:
                items = [s.strip() for s in text.split(",") if s.strip()]
        if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
            raise ConfigError(f"{where}: must be a list of strings")
        return tuple(items)
    raise TypeError(f"no coercion for {hint!r} ({key})")  # a bug in this module, not in a config


# ------------------------------------------------------------------------------------------
# Checks shared by sections

_AE_TITLE = re.compile(r"[\x20-\x5b\x5d-\x7e]{1,16}")  # printable ASCII without backslash


def _check_ae_title(section: str, key: str, value: str) -> None:
    where = section if section.startswith("[") else f"[{section}]"
    if not _AE_TITLE.fullmatch(value) or not value.strip():
        raise ConfigError(
            f"{where} {key} = {value!r}: an AE title is 1-16 printable ASCII characters, "
            "no backslash, not only spaces"
        )


def _check_host(section: str, key: str, value: str) -> None:
    where = section if section.startswith("[") else f"[{section}]"
    if not value or any(c.isspace() for c in value):
        raise ConfigError(f"{where} {key} = {value!r}: give a host name or IP address")


def _check_port(section: str, key: str, value: int) -> None:
    where = section if section.startswith("[") else f"[{section}]"
    if not 1 <= value <= 65535:
        raise ConfigError(f"{where} {key} = {value}: must be between 1 and 65535")


def _check_positive(section: str, key: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"[{section}] {key} = {value}: must be more than 0")


def _check_database_url(url: str) -> None:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError(
            f"[storage] database_url = {url!r}: not a database URL; use "
            "sqlite:///path/to/glio-node.db or postgresql+psycopg://user@host/dbname"
        ) from None
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise ConfigError(
            f"[storage] database_url uses {parsed.get_backend_name()!r}: only sqlite and "
            "postgresql (postgresql+psycopg://...) are supported"
        )
    if parsed.get_backend_name() == "postgresql" and parsed.drivername not in (
        "postgresql",
        "postgresql+psycopg",
    ):
        raise ConfigError(
            f"[storage] database_url driver {parsed.drivername!r}: use postgresql+psycopg://"
        )
    if parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:"):
        raise ConfigError(
            "[storage] database_url is an in-memory SQLite database: the queue and audit trail "
            "would vanish at exit; give a file, e.g. sqlite:///var/glio-node.db"
        )
