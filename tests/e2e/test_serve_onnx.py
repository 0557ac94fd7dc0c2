"""``glio-node serve`` with a bundle of ONNX networks: storescu -> the node -> Orthanc.

The bundle is models/glio-demo exported by ``python -m training export-onnx``, so this is the
path a hospital's own ONNX networks take in production: scheduler, BundleCache, ONNX Runtime,
writers, sender.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from node_process import BUNDLE, assert_results_in_orthanc, wait_for

from glio_node.bundle import load_manifest
from glio_node.store.models import JobState

REPO = Path(__file__).resolve().parents[2]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.needs("orthanc", "storescu"),
]


@pytest.fixture(scope="module")
def onnx_demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "glio-demo-onnx"
    done = subprocess.run(
        [sys.executable, "-m", "training", "export-onnx", "--bundle", str(BUNDLE), "--out", str(out)],
        cwd=REPO, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_a_slide_analysed_by_onnx_networks_comes_back_to_orthanc(orthanc, make_node, slide, onnx_demo):
    node = make_node(orthanc.dicom_port)
    node.config.write_text(node.config.read_text().replace(f'dir = "{BUNDLE}"', f'dir = "{onnx_demo}"'))
    assert str(onnx_demo) in node.config.read_text()
    node.start()
    node.send(slide)
    wait_for(node.all_delivered, 60, "the results to be delivered", node)
    assert_results_in_orthanc(orthanc, node, slide)
    [job] = node.jobs()
    assert job.state == JobState.DONE and job.bundle_name == "glio-demo-onnx"
    assert node.stop() == 0
    assert f"bundle glio-demo-onnx {load_manifest(BUNDLE).version}" in node.log()
