"""``sandbox experiment`` end to end: listing, bad input (exit 2, one line),
--json, files in --out, and Ctrl-C (exit 130, finished experiments' files
kept, nothing half-written)."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from sandbox.experiments.registry import EXPERIMENTS

ROOT = Path(__file__).resolve().parents[2]


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "sandbox.cli", "experiment", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=timeout)


def test_list_one_line_each():
    p = cli("--list")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert [ln.split()[0] for ln in lines] == list(EXPERIMENTS)
    assert {"msr-bitmap", "virtio", "io-dirty", "walk-refs", "asid-flush", "exit-model"} <= set(EXPERIMENTS)


def test_list_as_json_lines():
    p = cli("--list", "--json")
    assert p.returncode == 0, p.stderr
    docs = [json.loads(ln) for ln in p.stdout.splitlines()]
    assert [d["name"] for d in docs] == list(EXPERIMENTS)
    assert all(d["title"] and d["source"] for d in docs)


def test_list_with_a_name_or_run_options_is_refused():
    for extra, what in ((("msr-bitmap",), "an experiment name"), (("--quick",), "--quick"),
                        (("--out", "somewhere"), "--out")):
        p = cli("--list", *extra)
        assert p.returncode == 2 and p.stdout == ""
        assert p.stderr.count("\n") == 1 and what in p.stderr and "runs none" in p.stderr


def test_unknown_experiment_is_a_one_line_error():
    p = cli("no-such-experiment", "--quick")
    assert p.returncode == 2
    assert p.stderr.count("\n") == 1 and "unknown experiment 'no-such-experiment'" in p.stderr
    assert p.stdout == ""


def test_no_name_is_an_error():
    p = cli()
    assert p.returncode == 2 and "experiment name" in p.stderr


def test_unwritable_out_is_a_one_line_error_before_any_run(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    t0 = time.monotonic()
    p = cli("msr-bitmap", "--quick", "--out", str(blocker / "sub"))
    assert p.returncode == 2, p.stderr
    assert p.stderr.count("\n") == 1 and "cannot write to --out directory" in p.stderr
    assert time.monotonic() - t0 < 60                     # refused up front, not after the experiment
    p = cli("all", "--quick", "--out", str(blocker))
    assert p.returncode == 2 and "cannot write" in p.stderr


def test_json_and_files(tmp_path):
    p = cli("msr-bitmap", "--quick", "--json", "--out", str(tmp_path))
    assert p.returncode == 0, p.stderr
    docs = [json.loads(ln) for ln in p.stdout.splitlines()]
    assert len(docs) == 1 and docs[0]["experiment"] == "msr-bitmap" and docs[0]["ok"]
    assert (tmp_path / "msr-bitmap.json").is_file() and (tmp_path / "msr-bitmap.png").is_file()
    assert json.loads((tmp_path / "msr-bitmap.json").read_text())["data"] == docs[0]["data"]
    assert p.stderr == ""                                  # no progress bar when not on a terminal


def test_table_output_has_seed_and_measured_columns(tmp_path):
    p = cli("walk-refs", "--quick", "--out", str(tmp_path))
    assert p.returncode == 0, p.stderr
    assert "seed" in p.stdout and "sandbox" in p.stdout and "24" in p.stdout
    assert f"{tmp_path / 'walk-refs.png'}" in p.stdout


def test_ctrl_c_keeps_finished_experiments(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "sandbox.cli", "experiment", "all", "--quick", "--out",
                             str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = tmp_path / "msr-bitmap" / "msr-bitmap.json"
    deadline = time.monotonic() + 240
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert first.exists(), proc.communicate()
    proc.send_signal(signal.SIGINT)                        # during the second experiment (virtio)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert json.loads(first.read_text())["ok"] is True
    assert (tmp_path / "msr-bitmap" / "msr-bitmap.png").is_file()
    assert not list(tmp_path.rglob("*partial*"))
    last = list(EXPERIMENTS)[-1]
    assert not (tmp_path / last / f"{last}.json").exists()
