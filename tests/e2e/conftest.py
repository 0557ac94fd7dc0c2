"""Fixtures for the end-to-end tests: a real Orthanc and ``glio-node serve`` subprocesses."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from node_process import SERVE_SPEC, Node, node_config
from orthanc_peer import Orthanc, free_port

from glio_node.store.db import upgrade
from glio_node.synthetic.slide import SyntheticSlide, write_synthetic_slide


@pytest.fixture(scope="session")
def slide(tmp_path_factory: pytest.TempPathFactory) -> SyntheticSlide:
    """The slide most end-to-end tests send (``SERVE_SPEC``), written once per session."""
    return write_synthetic_slide(SERVE_SPEC, tmp_path_factory.mktemp("serve-slide"))


@pytest.fixture
def make_node(tmp_path: Path) -> Iterator[Callable[..., Node]]:
    """Make (not start) nodes; every node still running at teardown is killed."""
    nodes: list[Node] = []

    def make(destination_port: int | None, *, lease_seconds: float = 30, database_url: str | None = None,
             folder: Path | None = None, spool: Path | None = None, grace_seconds: float = 30,
             extra_toml: str = "") -> Node:
        folder = folder or tmp_path / f"node{len(nodes)}"
        folder.mkdir(parents=True, exist_ok=True)
        port = free_port()
        url = database_url or f"sqlite:///{folder / 'glio.db'}"
        config = folder / "glio-node.toml"
        config.write_text(node_config(
            folder, port, url, destination_port=destination_port, lease_seconds=lease_seconds,
            spool=spool, grace_seconds=grace_seconds, extra_toml=extra_toml,
        ))
        if database_url is None:
            upgrade(url)
        node = Node(folder, port, config, url)
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        node.close()


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    peer = Orthanc(tmp_path / "orthanc", free_port(), free_port()).start()
    yield peer
    peer.stop()
