"""The GPU check script (bench/gpu_check.sh) runs end to end on a CPU in its small mode, so that
a session lent a GPU spends its minutes measuring, not debugging: every check writes its figures.
bench/quality.py says which of the quality bar's conditions hold, from its rows."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_script_runs_every_check_small(tiny_model, tmp_path):
    env = {**os.environ, "GPU_CHECK_SMALL": "1", "MODEL": str(tiny_model), "OUT": str(tmp_path),
           "PY": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    distill = json.loads((tmp_path / "distill.json").read_text())
    assert all(0 < run["mfu"] for run in distill["runs"])
    serve = json.loads((tmp_path / "serve.json").read_text())
    step = serve["baselines"]["icl_decode_step"]
    assert step["step_ms"] > 0 and step["bound_ms"] > 0 and step["x_bound"] == pytest.approx(
        step["step_ms"] / step["bound_ms"])
    assert serve["baselines"]["generate_icl"]["tokens"] == 2 * 4  # users x --max-tokens
    assert serve["throughput_ratio"] > 0
    memory = json.loads((tmp_path / "memory.json").read_text())
    assert memory["memory"]["icl_users"] >= 1 and memory["memory"]["cartridge_users"] >= 1


def test_gpu_check_script_refuses_an_unknown_check(tmp_path):
    env = {**os.environ, "GPU_CHECK_SMALL": "1", "OUT": str(tmp_path), "PY": sys.executable}
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "sreve"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().endswith("gpu_check.sh: unknown check 'sreve' (distill, serve, memory)")


def _quality_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "bench" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    path = list(sys.path)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = path  # the script puts examples/ first for its own imports
    return module


def _method(method, kind, source, correct, nll, gap, kv_bytes, seconds=40.0, questions=40):
    return {"method": method, "kind": kind, "source": source, "score": correct / questions,
            "correct": correct, "questions": questions, "answer_nll": nll, "nll_gap_closed": gap,
            "kv_bytes": kv_bytes, "seconds": seconds}


def test_quality_conditions_name_what_holds_and_what_does_not():
    quality = _quality_module()
    methods = [_method("no context", "none", None, 0, 4.590, 0.0, 0),
               _method("ICL", "icl", "corpus.md", 13, 2.116, 1.0, 155 << 20, seconds=120.0),
               _method("ICL first 128", "truncate", None, 1, 4.106, 0.2, 7 << 20),
               _method("am", "cartridge", "/x/am.safetensors", 2, 2.650, 0.78, 5 << 20),
               _method("ss-am", "cartridge", "/x/ss-am.safetensors", 6, 2.200, 0.97, 5 << 20)]
    rows = quality.describe("meridian", methods, {"am": 69.4, "ss-am": 424.0})
    assert quality.conditions_text(rows).splitlines() == [
        "meridian yes  the default pipeline: >= 20x less KV than ICL and >= 90% of the gap: 31.0x, 97%",
        "meridian NO   the default pipeline answers at least as many questions as ICL: 6/40 vs ICL 13/40",
        "meridian yes  corpus -> cartridge <= 600 s: 424 s",
        "meridian NO   compaction alone: >= 70% of the gap in <= 60 s: 78% in 69 s",
        "meridian yes  the default pipeline beats truncation at equal memory (NLL and score): "
        "NLL 2.200 vs 4.106, answered 6/40 vs 1/40"]
    # the needle variant: a lower bar on the gap, no compaction-time condition
    needle = quality.describe("needle", methods, {"am": 69.4, "ss-am": 424.0})
    assert [text for text, _, _ in quality.conditions(needle)][0].endswith(">= 60% of the gap")
    assert not any(text.startswith("compaction alone") for text, _, _ in quality.conditions(needle))
    # long: measured against the part that fits, only the truncation condition; a tie in score
    # does not beat truncation
    tie = [dict(m, correct=0, score=0.0) if m["kind"] != "none" else m for m in methods]
    long = quality.conditions(quality.describe("long", tie, {"am": 262.0, "ss-am": 620.0}))
    assert [(text[:36], met) for text, met, _ in long] == [
        ("the default pipeline beats truncatio", False)]
