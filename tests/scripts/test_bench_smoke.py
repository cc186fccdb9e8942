"""The benchmark script runs and its correctness checks pass (no timing is asserted)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_runs_and_reports(tmp_path):
    out = tmp_path / "bench.json"
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--iters", "200000",
                        "--cpuids", "2000", "--rounds", "1", "--fuzz-cases", "60", "--json", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    data = json.loads(out.read_text())
    text = json.dumps(data)
    assert "ratio" in text and "median" in text and data["fuzz"]["fast"]["execs_per_s"] > 0
    f = data["fuzz"]
    assert f["floor"]["execs_per_s"] > f["campaign_loop"]["execs_per_s"] > 0 and 0 < f["ratio_to_floor"] < 1
    sev = data["sev"]          # the SEV section ran and its checksums matched
    assert sev["exits"] > 1 and sev["plain_s"] > 0 and sev["sev_s"] > 0 and sev["aes"]["encrypt_MB_s"] > 0
