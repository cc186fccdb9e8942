"""``sandbox run --timeline``: the file a real run writes is a valid Chrome
trace-event document (checked by :func:`validate` against the format's fields
and ordering rules), with one hypervisor span per #VMEXIT named as the APM
names it, a guest span per stretch of guest execution, and instants for the
events injected and the TLB flushes."""
from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sandbox.debug.timeline import validate

ROOT = Path(__file__).resolve().parents[2]
TIMER_HOOKS = Path(__file__).resolve().parent / "data" / "timer_hooks.py"


def run(tmp_path: Path, image: str, *flags: str) -> tuple[dict, str]:
    out = tmp_path / "t.json"
    p = subprocess.run([sys.executable, "-m", "sandbox.cli", "run", str(ROOT / "guest_images" / image), "--json",
                        "--timeline", str(out), *flags], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                       capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr
    final = json.loads(p.stdout.strip().splitlines()[-1])
    return json.loads(out.read_text()), final


@pytest.mark.parametrize("image, flags, injects, flushes, intr", [
    ("kernel.S", ("--hooks", str(TIMER_HOOKS)), False, True, True),   # guest INVLPG/MOV CR3; a timer
    ("svm_insns.S", (), True, False, False),                          # #UD injected for SVM instructions
])
def test_timeline_of_a_real_run(tmp_path, image, flags, injects, flushes, intr):
    doc, final = run(tmp_path, image, *flags)
    assert validate(doc) == []
    ev = doc["traceEvents"]
    tracks = {e["args"]["name"]: e["tid"] for e in ev if e["ph"] == "M" and e["name"] == "thread_name"}
    exits = [e for e in ev if e["ph"] == "X" and e["tid"] == tracks["hypervisor"]]
    guest = [e for e in ev if e["ph"] == "X" and e["tid"] == tracks["guest"]]
    assert len(exits) == final["exits"] == sum(final["counts"].values())
    assert collections.Counter(e["name"] for e in exits) == collections.Counter(final["counts"])
    assert len(guest) == len(exits)                       # each exit ends a stretch of guest execution
    assert all(re.fullmatch(r"0x[0-9a-f]+", e["args"]["rip"]) for e in exits)
    # spans alternate: every exit starts where its guest span ended
    spans = sorted(exits + guest, key=lambda e: (e["ts"], e["tid"] == tracks["hypervisor"]))
    assert [e["tid"] for e in spans[:6]] == [tracks["guest"], tracks["hypervisor"]] * 3
    cats = collections.Counter(e.get("cat") for e in ev if e["ph"] == "i")
    assert bool(cats["inject"]) == injects and bool(cats["tlb"]) == flushes
    assert ("INTR" in final["counts"]) == intr
    assert ev[-1]["name"] == "run ended: guest-exit" or ev[-1]["name"].startswith("run ended:")
    assert any(e["ph"] == "C" and e["name"] == "exits/s" for e in ev)
