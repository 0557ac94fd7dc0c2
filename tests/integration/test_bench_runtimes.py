"""The benchmark puts Keras and ONNX Runtime side by side on the same networks (issue 13).

An operator choosing between a bundle's Keras networks and their ONNX export wants tiles/s of
both on the same slide, and proof that they compute the same thing.  The suite runs the
comparison mode end to end on a tiny slide with the demo bundle (its real export route,
``python -m training export-onnx``) and checks that it writes its section into an existing
page without losing the rest of it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # about 25 CPU seconds (export, slide, five pipeline passes per runtime); over a minute on a busy machine
def test_runtime_comparison_reports_both_runtimes_on_the_same_tiles_and_keeps_the_page(tmp_path):
    page = tmp_path / "benchmarks.md"
    page.write_text("# Benchmarks\n\nearlier figures\n\n## Analysis\n\n<!-- analysis:begin -->\nmine\n<!-- analysis:end -->\n")
    out = tmp_path / "rt.json"
    cmd = [
        sys.executable, str(REPO / "bench" / "pipeline.py"), "--quick", "--runtimes", "keras,onnx",
        "--cache", str(tmp_path / "cache" / "bench-slides"), "--out", str(page), "--json", str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]

    (c,) = json.loads(out.read_text())["runtime_comparisons"]
    (run,) = c["runs"]
    assert run["same_tiles"] and set(run["model_runs"]) == set(run["pipeline_runs"]) == {"keras", "onnx"}
    for rt in ("keras", "onnx"):
        for net in c["networks"]:
            alone = run["model_runs"][rt][0]["networks"][net]
            assert alone["tiles"] == run["tiles"][net] > 0 and alone["wall"] > 0
            assert run["pipeline_runs"][rt][0]["tiles_inferred"][net] == run["tiles"][net]
    agree = run["agreement"]
    assert agree["regions"]["segmentation"]["label_agreement"] >= 0.999
    assert all(a["max_probability_difference"] < 1e-4 for a in agree["molecular"].values())
    assert {t: v["call"] for t, v in run["slide_calls"]["keras"].items()} == {
        t: v["call"] for t, v in run["slide_calls"]["onnx"].items()
    }
    assert [v["intra_op_threads"] for v in run["onnx_thread_variants"]] == [0, 0, 1, c["hardware"]["usable_cpus"]]

    text = page.read_text()
    assert text.startswith("# Benchmarks\n\nearlier figures") and "mine" in text  # the rest of the page kept
    assert text.index("<!-- runtimes:begin -->") < text.index("## Analysis")
    assert "ONNX tiles/s alone" in text and "shared with other work" in text and "Load average" in text


def test_a_new_comparison_replaces_the_old_section_in_place():
    from bench.runtimes import SECTION_BEGIN, SECTION_END, previous_section, with_section

    page = f"# B\n\n{SECTION_BEGIN}\nold\n{SECTION_END}\n\n## Analysis\n\nx\n"
    new = with_section(page, f"{SECTION_BEGIN}\nnew\n{SECTION_END}")
    assert previous_section(new) == f"{SECTION_BEGIN}\nnew\n{SECTION_END}"
    assert "old" not in new and new.endswith("## Analysis\n\nx\n")


@pytest.mark.parametrize("bad", ["onnx,tf", "torch"])
def test_an_unknown_runtime_is_refused_in_one_line(bad):
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "pipeline.py"), "--quick", "--runtimes", bad],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    assert proc.returncode == 2
    assert f"--runtimes {bad!r}: use keras or keras,onnx" in proc.stderr
