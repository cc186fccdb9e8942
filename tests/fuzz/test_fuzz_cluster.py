"""`sandbox fuzz --ray`: workers as Ray actors, the corpus shared and the findings
de-duplicated through the driver, distinct seeds, Ctrl-C, and the bad-input errors.
The cluster tests need Ray (pip install -e '.[cluster]') and skip without it."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sandbox.fuzz import campaign as C
from sandbox.fuzz.cluster import FuzzActor, run_ray

ROOT = Path(__file__).resolve().parents[2]


def cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "sandbox.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_workers_have_distinct_seeds():
    opts = C.Options(seed=4, audit_every=0, differential_every=0, arcs=False)
    a, b = FuzzActor(opts, 0), FuzzActor(opts, 1)
    ca = [c["code"] for c in a.chunk([], 8)[1]]
    cb = [c["code"] for c in b.chunk([], 8)[1]]
    assert ca and cb and not set(ca) & set(cb)
    again = [c["code"] for c in FuzzActor(opts, 0).chunk([], 8)[1]]
    assert again == ca                                  # and each is reproducible


def test_without_ray_one_line_error():
    code = ("import sys; sys.modules['ray'] = None\n"
            "from sandbox.cli import main\nsys.exit(main(['fuzz', '--cases', '5', '--ray']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2 and "pip install -e '.[cluster]'" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("addr,msg", [("127.0.0.1:1", "cannot reach"), ("nonsense", "HOST:PORT")])
def test_unreachable_or_malformed_address(addr, msg):
    pytest.importorskip("ray")
    t = time.monotonic()
    r = cli("fuzz", "--cases", "5", "--ray", addr)
    assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert time.monotonic() - t < 60


def test_local_two_worker_cluster_shares_corpus_and_dedups_findings(tmp_path):
    """Both workers fuzz hooks/buggy_handlers.py, whose CPUID handler raises on most
    leaves: each worker reports that finding, the driver keeps and saves it once; and
    each worker takes in corpus cases the other found."""
    pytest.importorskip("ray")
    # seed 8: each worker's own stream reaches a raising CPUID leaf within its first dozen
    # cases (its first chunk, before any corpus is exchanged), so both report the finding;
    # a case quota, not a time limit, so a loaded machine takes longer instead of cutting
    # the campaign short (20 s once ended before seed 2's worker 0 got to its 211th case,
    # and with both cores busy before any corpus crossed)
    opts = C.Options(seed=8, seconds=None, cases=3000, jobs=2, audit_every=0, minimize=False, differential_every=0,
                     crashes=tmp_path / "crashes", hooks=ROOT / "hooks" / "buggy_handlers.py")
    stats, secs, interrupted, info = run_ray(opts, None)
    assert info["workers"] == 2 and not interrupted
    assert stats.execs == 3000                                   # --cases over all workers, not whole chunks
    assert all(n > 0 for n in info["received"]), info          # the corpus crossed between workers
    assert info["corpus"] == stats.corpus > 0
    raised = [f for f, _ in stats.findings.values() if f.kind == "hook-raised"]
    assert len(raised) == 1 and info["reported"] > len(stats.findings), info
    assert len(list((tmp_path / "crashes").glob("*.case"))) == len(stats.findings)


def test_ctrl_c_keeps_findings(tmp_path):
    pytest.importorskip("ray")
    crashes = tmp_path / "crashes"
    p = subprocess.Popen([sys.executable, "-m", "sandbox.cli", "fuzz", "--seconds", "600", "--jobs", "2", "--ray",
                          "--json", "--audit", "--crashes", str(crashes)], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(30)                          # Ray's start, then a few chunks of cases
        os.kill(p.pid, signal.SIGINT)
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    d = json.loads(out.strip().splitlines()[-1])
    assert d["interrupted"] and d["execs"] > 0 and "Traceback" not in err
    assert len(d["findings"]) == len(list(crashes.glob("*.case")))
