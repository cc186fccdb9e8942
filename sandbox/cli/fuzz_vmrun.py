"""``sandbox fuzz --target vmrun`` and the replay of a saved VMRUN state."""
from __future__ import annotations

import argparse
import json

from rich.live import Live
from rich.table import Table

from ..fuzz import vmrun_campaign as V
from ..fuzz.vmrun_state import StateError, VmrunState
from ..svm.exitcodes import exit_name
from .console import Console
from .errors import CliError

TARGETS = ("intercepts", "vmrun", "vmrun-nested")


def check_target(a: argparse.Namespace) -> None:
    """One line for a target this build does not have, or options it cannot honour."""
    if a.target not in TARGETS:
        raise CliError(f"--target {a.target}: unknown target; known: {', '.join(TARGETS)}")
    if a.target.startswith("vmrun") and getattr(a, "ray", None) is not None:
        raise CliError("--ray applies to --target intercepts")
    if a.target.startswith("vmrun") and a.jobs != 1:
        raise CliError("--target vmrun runs in one process: use --jobs 1")
    if a.target.startswith("vmrun") and getattr(a, "hooks", None) is not None:
        raise CliError("--hooks applies to --target intercepts (VMRUN states run no handler)")
    if a.target.startswith("vmrun") and getattr(a, "coverage_report", None) is not None:
        raise CliError("--coverage-report applies to --target intercepts (VMRUN states run no handler)")
    if a.target.startswith("vmrun") and a.corpus is not None:
        raise CliError("--target vmrun keeps its corpus in memory: --corpus applies to --target intercepts")


def _table(st: V.VmrunStats, secs: float) -> Table:
    t = Table(title="sandbox fuzz --target vmrun[-nested]", show_header=False, box=None)
    rate = st.execs / secs if secs > 0 else 0.0
    t.add_row("VMRUNs", f"{st.execs} ({rate:.0f}/s; {st.invalid} VMEXIT_INVALID, {st.entered} entered, "
                        f"{st.differential} compared with QEMU)")
    t.add_row("coverage", f"{len(st.coverage)} (perturbed fields, outcome) keys; corpus {st.corpus}")
    fields_ = {}
    for lbl, n in st.labels.items():
        f = lbl.split(":", 1)[0]
        fields_[f] = fields_.get(f, 0) + n
    t.add_row("fields", ", ".join(f"{k} {v}" for k, v in sorted(fields_.items())) or "-")
    t.add_row("findings", str(len(st.findings)))
    for f, _ in list(st.findings.values())[-5:]:
        t.add_row("", f"[red]{f.kind}[/red] {f.message[:100]}")
    return t


def cmd_fuzz_vmrun(a: argparse.Namespace, patch=None) -> int:
    opts = V.VmrunOptions(seed=a.seed, seconds=a.seconds, cases=a.cases, crashes=a.crashes,
                          differential_every=a.differential_every, minimize=not a.no_minimize,
                          stop_on_finding=a.stop_on_finding, nested=a.target == "vmrun-nested")
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        if a.no_status or a.json or not err.is_terminal:
            st, secs, interrupted = V.run(opts, None, patch)
        else:
            with Live(_table(V.VmrunStats(), 1.0), console=err, refresh_per_second=4) as live:
                st, secs, interrupted = V.run(opts, lambda s, t: live.update(_table(s, t)), patch)
    except OSError as e:
        raise CliError(f"crash directory {a.crashes}: {e.strerror or e}") from None
    summary = {"target": a.target, "seed": a.seed, "execs": st.execs, "seconds": round(secs, 2),
               "execs_per_s": round(st.execs / secs, 1) if secs else 0.0, "interrupted": interrupted,
               "invalid": st.invalid, "entered": st.entered, "differential": st.differential,
               "coverage": len(st.coverage), "corpus_added": st.corpus,
               "findings": [{"kind": f.kind, "message": f.message, "file": p} for f, p in st.findings.values()]}
    if a.json:
        print(json.dumps(summary))
    else:
        err.print(_table(st, secs))
        err.print(f"{'interrupted; ' if interrupted else ''}{st.execs} VMRUNs in {secs:.1f} s "
                  f"({summary['execs_per_s']}/s), {len(st.findings)} finding(s)")
        for f in summary["findings"]:
            err.print(f"  [red]{f['kind']}[/red] {f['message']}" + (f"\n    saved: {f['file']}" if f["file"] else ""))
    if interrupted:
        return 130
    return 1 if st.findings else 0


def replay_state(a: argparse.Namespace) -> int:
    """``sandbox run FILE.case`` for a saved VMRUN state: the same oracles as the campaign."""
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        s = VmrunState.load(a.image)
    except StateError as e:
        raise CliError(str(e)) from None
    out, fs = V.replay(s)
    e = out.first
    what = ("VMEXIT_INVALID: " + out.reason) if out.invalid else (
        f"entered; first exit {exit_name(e.exitcode)} at {e.rip:#x}" if e is not None else "no exit")
    if a.json:
        print(json.dumps({"final": True, "vmrun": what, "crash": out.crash,
                          "findings": [{"kind": f.kind, "message": f.message} for f in fs]}))
    else:
        err.print(f"VMRUN: {what}" + (f" ({out.crash})" if out.crash else ""))
        for f in fs:
            err.print(f"[red]{f.kind}[/red]: {f.message}")
        if not fs:
            err.print("[green]no oracle findings[/green]")
    return 1 if fs else 0
