"""The layering of docs/architecture.md holds: import-linter's contracts (pyproject.toml) pass.

Each contract forbids a dependency, indirect chains included: the pipeline is pure (it reads
slides and runs models only through ``glio_node.ports``), the status page reads the store and
opens no receiver or runtime, nor any connection to a PACS (``send/echo`` probes, the page reads
the board), the worker's steps (``glio_node.worker``) import no receiver, poller or status page
and the poller no scheduler, the service never imports ``training``, and wsidicom and Keras stay
in their one corner.  The last two tests break a copy of the tree on purpose, so a
contract that no longer checks anything shows up as a failure too.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _lint(root: Path) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("lint-imports")
    if not exe.exists():
        pytest.fail(f"import-linter is not installed next to {sys.executable}: pip install -e '.[test]'")
    return subprocess.run(
        [str(exe), "--no-cache", "--config", str(root / "pyproject.toml")],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},  # this tree's packages, not an installed copy
        capture_output=True,
        text=True,
        timeout=300,
    )


def _contracts() -> list[dict]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def test_every_import_contract_of_the_architecture_is_kept():
    result = _lint(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    kept = re.search(r"Contracts: (\d+) kept, 0 broken\.", result.stdout)
    assert kept and int(kept.group(1)) == len(_contracts()) >= 5, result.stdout


def test_docs_architecture_names_every_contract():
    docs = " ".join((REPO / "docs" / "architecture.md").read_text().split())
    missing = [c["name"] for c in _contracts() if c["name"] not in docs]
    assert missing == [], f"docs/architecture.md's Contracts section lacks {missing}"


def _copy_tree(tmp_path: Path) -> None:
    for name in ("glio_node", "training"):
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(REPO / "pyproject.toml", tmp_path / "pyproject.toml")


def test_a_worker_step_reaching_for_the_receiver_or_a_poller_importing_the_scheduler_is_caught(
    tmp_path: Path,
):
    _copy_tree(tmp_path)
    with (tmp_path / "glio_node" / "worker" / "purge.py").open("a") as f:
        # The spool object itself instead of the folders the scheduler passes in.
        f.write("\ndef _spool():\n    from glio_node.receive.spool import Spool  # noqa\n")
    with (tmp_path / "glio_node" / "pull" / "poller.py").open("a") as f:
        f.write("\nfrom glio_node.scheduler import default_owner  # noqa\n")

    result = _lint(tmp_path)
    assert result.returncode != 0
    assert "glio_node.worker is not allowed to import glio_node.receive" in result.stdout
    assert "glio_node.pull is not allowed to import glio_node.scheduler" in result.stdout
    assert f"Contracts: {len(_contracts()) - 2} kept, 2 broken." in result.stdout, result.stdout


def test_a_pipeline_module_importing_the_store_or_runtime_is_caught(tmp_path: Path):
    for name in ("glio_node", "training"):
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    with (tmp_path / "glio_node" / "pipeline" / "stitch.py").open("a") as f:
        f.write("\nfrom glio_node.store import queue  # noqa\n")
    with (tmp_path / "glio_node" / "web" / "chart.py").open("a") as f:
        f.write("\ndef _late():\n    from glio_node.runtime import keras_runner  # noqa\n")
    with (tmp_path / "glio_node" / "web" / "routes" / "status.py").open("a") as f:
        # The page checking a destination itself, as it once did: a C-ECHO per refresh.
        f.write("\ndef _echo_now(d):\n    from glio_node.send.echo import check  # noqa\n")

    result = _lint(tmp_path)
    assert result.returncode != 0
    assert "glio_node.pipeline is not allowed to import glio_node.store" in result.stdout
    assert "glio_node.web is not allowed to import glio_node.runtime" in result.stdout
    assert "glio_node.web is not allowed to import glio_node.send" in result.stdout
    assert f"Contracts: {len(_contracts()) - 3} kept, 3 broken." in result.stdout, result.stdout
