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
    # issue 11's rows: each figure beside a floor measured in the same run
    assert data["cpuid"]["bare_world_switch"]["median"] > 0 and data["cpuid"]["floor_ratio"] > 0
    assert data["out"]["sandbox"]["median"] > 0 and data["out"]["floor_ratio"] > 0
    touch = data["cold_touch"]
    assert touch["sandbox_us"] > 0 and touch["floor_us"] > 0 and touch["table_refs_per_walk"] == 24
    assert set(data["targets"]) >= {"cpuid_floor_ratio", "out_floor_ratio", "cold_touch_us", "sev_ratio"}
