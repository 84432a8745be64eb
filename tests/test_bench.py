"""The GPU check script (bench/gpu_check.sh) runs end to end on a CPU in its small mode, so that
a session lent a GPU spends its minutes measuring, not debugging: every check writes its figures."""

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
