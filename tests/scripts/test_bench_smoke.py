"""The benchmark script runs and its correctness checks pass (no timing is asserted)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_runs_and_reports(tmp_path):
    out = tmp_path / "bench.json"
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--iters", "200000",
                        "--cpuids", "2000", "--rounds", "1", "--fuzz-cases", "60", "--fuzz-seconds", "3",
                        "--paired-rounds", "2", "--exit-rounds", "2", "--json", str(out)],
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
    # the rest of the rows (bench_extra), each beside its own peer
    tsc = data["rdtsc"]
    assert tsc["sandbox_ns"] > 0 and tsc["bare_ns"] > 0 and tsc["ratio"] > 0
    mem = data["memory"]
    assert mem["warm_4m"]["bytes"] == 4 << 20 and mem["warm_64m"]["bytes"] == 64 << 20
    assert mem["warm_64m"]["warm_walks_per_access"] == 0       # the tagged TLB holds 16,384 pages
    tr = data["trace"]
    assert len(tr["traced_s"]) == len(tr["quiet_s"]) == 1 and tr["us_per_line"] == tr["us_per_line"]
    assert {"rdtsc_ratio", "warm_4m_ratio", "warm_64m_walks_per_access", "trace_us_per_line"} <= set(data["targets"])
    if (os.cpu_count() or 1) >= 2:          # --jobs 2 paired with each --jobs 1 round
        assert len(f["jobs2_rounds"]) == len(f["campaign_rounds"]) == 1 and f["jobs2_rounds"][0]["cases"] > 0
        assert "fuzz_jobs2_scaling" in data["targets"]
