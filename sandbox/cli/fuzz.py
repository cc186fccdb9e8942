"""``sandbox fuzz`` and the replay of a saved case by ``sandbox run FILE.case``."""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
from pathlib import Path

from rich.live import Live
from rich.table import Table

from ..fuzz import campaign as C
from ..fuzz.case import CODE_WINDOW, Case, CaseError
from ..fuzz.differential import differential
from ..fuzz.uncounted import UncountedReference
from ..fuzz.oracle import Finding, findings
from ..fuzz.snapshot import Harness
from ..hypervisor.machine import PAGING_MODES
from ..svm.exitcodes import exit_name
from ..fuzz.arcs import ReportError, arc_count, html_report
from ..fuzz.cluster import ray_module, run_ray
from ..fuzz.hooks_fuzz import HookGuard, check_hooks
from ..fuzz.vmrun_state import is_state_file
from ..hypervisor.hooks_loader import HooksError
from .console import Console
from .errors import CliError
from .fuzz_vmrun import check_target, cmd_fuzz_vmrun, replay_state
from .helpfmt import HelpFormatter

FUZZ_EPILOG = """\
examples:
  sandbox fuzz --seconds 60 --seed 1
  sandbox fuzz --cases 20000 --jobs 2 --corpus corpus/ --crashes crashes/
  sandbox fuzz --seconds 30 --audit            # audit every case (slower)
  sandbox fuzz --seconds 60 --paging shadow     # the hypervisor's shadow tables instead of nested paging
  sandbox fuzz --seconds 60 --sev               # an SEV guest (encrypted RAM)
  sandbox run crashes/missed-0123456789ab.case --audit   # replay a finding
  sandbox fuzz --target vmrun --seconds 30 --crashes crashes/   # VMCB states at VMRUN's checks
  sandbox fuzz --seconds 60 --hooks hooks/buggy_handlers.py --crashes crashes/   # your handlers
  sandbox fuzz --seconds 60 --jobs 2 --ray --coverage-report cov/   # Ray actors; handler arcs as HTML
"""


def add_parser(sub) -> None:
    f = sub.add_parser("fuzz", help="fuzz the intercept logic and the handlers", epilog=FUZZ_EPILOG,
                       formatter_class=HelpFormatter)
    f.add_argument("--seconds", type=float, metavar="S", help="stop after S seconds (finite, > 0)")
    f.add_argument("--cases", type=int, metavar="N", help="stop after N cases (over all jobs)")
    f.add_argument("--seed", type=int, default=0, help="campaign seed (with --jobs 1 the case sequence is reproducible)")
    f.add_argument("--jobs", type=int, default=1, metavar="N", help="worker processes (at most the core count)")
    f.add_argument("--corpus", type=Path, metavar="DIR", help="corpus directory (read at start, new coverage written)")
    f.add_argument("--crashes", type=Path, metavar="DIR", help="where findings are saved as minimized .case files")
    f.add_argument("--audit", action="store_true", help="soundness-audit every case (slow)")
    f.add_argument("--audit-every", type=int, default=None, metavar="N",
                   help="in fast mode, audit one case in N (0: never; default 8)")
    f.add_argument("--differential-every", type=int, default=16, metavar="N",
                   help="compare one case in N with Unicorn's bundled QEMU SVM (0: never; default 16)")
    f.add_argument("--uncounted-every", type=int, default=0, metavar="N",
                   help="run one case in N again without the instruction budget's counting, which must not "
                        "change how it ends (0: never, the default; 1: every case)")
    f.add_argument("--insns", type=int, default=64, metavar="N", help="instructions per generated case (1-%d)" % (CODE_WINDOW // 16))
    f.add_argument("--paging", choices=PAGING_MODES, default="nested",
                   help="how the hypervisor virtualizes guest memory: nested paging or shadow tables (default nested)")
    f.add_argument("--sev", action="store_true",
                   help="launch the guest with SEV: its RAM encrypted in DRAM, its tables with the C-bit (nested paging)")
    f.add_argument("--no-minimize", action="store_true", help="save findings unminimized")
    f.add_argument("--stop-on-finding", action="store_true", help="end the campaign at the first finding")
    f.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    f.add_argument("--no-status", action="store_true", help="no live status panel")
    f.add_argument("--hooks", type=Path, metavar="FILE",
                   help="a hooks file of exit handlers to fuzz (raised, hung, livelock, invalid state, host memory)")
    f.add_argument("--no-arcs", action="store_true",
                   help="no handler arc coverage as feedback (it costs about 1%% of a case)")
    f.add_argument("--coverage-report", type=Path, metavar="DIR",
                   help="write an HTML coverage report of the handlers' arcs to DIR at the end (needs coverage.py)")
    f.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run the --jobs workers as Ray actors: a local Ray, or the cluster at HOST:PORT "
                        "(pip install -e '.[cluster]')")
    f.add_argument("--target", default="intercepts", metavar="NAME",
                   help="what to fuzz: intercepts (guest code, default), vmrun (VMCB states at VMRUN's checks) or "
                        "vmrun-nested (the same states as VMCB12 of an L1 guest hypervisor)")
    f.set_defaults(fn=cmd_fuzz)


def _status_table(stats: C.Stats, secs: float) -> Table:
    t = Table(title="sandbox fuzz", show_header=False, box=None)
    rate = stats.execs / secs if secs > 0 else 0.0
    t.add_row("execs", f"{stats.execs} ({rate:.0f}/s, {stats.audited} audited, "
                       f"{stats.differential} compared with QEMU"
                       + (f", {stats.uncounted} run uncounted)" if stats.uncounted else ")"))
    arcs = arc_count(stats.coverage)
    t.add_row("coverage", f"{len(stats.coverage) - arcs} (exit, info class, handler) tuples, {arcs} handler arcs; "
                          f"corpus +{stats.corpus}")
    top = ", ".join(f"{exit_name(c)} {n}" for c, n in stats.exits.most_common(8))
    t.add_row("exits", top or "-")
    t.add_row("findings", str(len(stats.findings)))
    for f, path in list(stats.findings.values())[-5:]:
        t.add_row("", f"[red]{f.kind}[/red] {f.message[:100]}")
    return t


#: the most instructions a generated case can hold: the code window at 16 bytes each (15 + room to place it)
MAX_INSNS = CODE_WINDOW // 16


def check_fuzz_numbers(a: argparse.Namespace) -> None:
    """Every numeric flag of ``sandbox fuzz``: one line on a value it cannot use."""
    if a.seconds is None and a.cases is None:
        raise CliError("give --seconds or --cases")
    if a.seconds is not None and not (0 < a.seconds < math.inf):
        raise CliError(f"--seconds {a.seconds:g}: give a finite number of seconds > 0")
    if a.cases is not None and a.cases < 1:
        raise CliError(f"--cases {a.cases}: must be >= 1")
    if a.seed < 0:
        raise CliError(f"--seed {a.seed}: must be >= 0")
    if a.jobs < 1:
        raise CliError(f"--jobs {a.jobs}: must be >= 1")
    if a.audit and a.audit_every is not None:
        raise CliError("--audit audits every case; --audit-every N (one case in N) applies without it")
    if a.audit_every is None:
        a.audit_every = 8
    if a.audit_every < 0 or a.differential_every < 0 or a.uncounted_every < 0:
        raise CliError("--audit-every, --differential-every and --uncounted-every must be >= 0 (0: never)")
    if not 1 <= a.insns <= MAX_INSNS:
        raise CliError(f"--insns {a.insns}: must be 1-{MAX_INSNS} (a case's code window is {CODE_WINDOW:#x} bytes)")
    for d, flag in ((a.corpus, "--corpus"), (a.crashes, "--crashes")):
        if d is not None and d.exists() and not d.is_dir():
            raise CliError(f"{flag} {d}: a file, not a directory")


def cmd_fuzz(a: argparse.Namespace, patch=None) -> int:
    check_fuzz_numbers(a)
    check_target(a)
    if a.target in ("vmrun", "vmrun-nested"):
        return cmd_fuzz_vmrun(a, patch)
    if a.coverage_report is not None:
        if a.no_arcs:
            raise CliError("--coverage-report reports handler arcs: drop --no-arcs")
        if a.coverage_report.exists() and not a.coverage_report.is_dir():
            raise CliError(f"--coverage-report {a.coverage_report}: a file, not a directory")
        if importlib.util.find_spec("coverage") is None:
            raise CliError("--coverage-report needs coverage.py: pip install -e '.[coverage]'")
    if a.hooks is not None:
        try:
            check_hooks(str(a.hooks))
        except HooksError as e:
            raise CliError(f"--hooks {e}") from None
    opts = C.Options(seed=a.seed, seconds=a.seconds, cases=a.cases, jobs=a.jobs, corpus=a.corpus,
                     crashes=a.crashes, audit=a.audit, audit_every=a.audit_every,
                     differential_every=a.differential_every, uncounted_every=a.uncounted_every,
                     n_insns=a.insns, paging=a.paging, sev=a.sev,
                     minimize=not a.no_minimize, stop_on_finding=a.stop_on_finding, hooks=a.hooks,
                     arcs=not a.no_arcs)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    ray_info: dict = {}
    try:
        if a.ray is not None:
            ray_module()                        # one line, exit 2, before anything else
            C.check_dirs(dataclasses.replace(opts, jobs=1))   # the workers' cores are the cluster's
            runner = lambda o, cb, p: _run_ray(o, a.ray, cb, ray_info)   # noqa: E731
        else:
            C.check_dirs(opts)
            runner = C.run
        if a.no_status or a.json or not err.is_terminal:
            stats, secs, interrupted = runner(opts, None, patch)
        else:
            with Live(_status_table(C.Stats(), 1.0), console=err, refresh_per_second=4) as live:
                stats, secs, interrupted = runner(opts, lambda s, t: live.update(_status_table(s, t)), patch)
    except C.CampaignError as e:
        raise CliError(str(e)) from None
    except KeyboardInterrupt:
        # Ctrl-C before the campaign loop took over SIGINT (checking the
        # directories, loading the corpus): nothing ran, nothing is lost
        stats, secs, interrupted = C.Stats(), 0.0, True
    summary = {
        "seed": a.seed, "jobs": a.jobs, "paging": a.paging, "sev": a.sev, "execs": stats.execs, "audited": stats.audited, "differential": stats.differential, "uncounted": stats.uncounted, "seconds": round(secs, 2),
        "execs_per_s": round(stats.execs / secs, 1) if secs else 0.0, "interrupted": interrupted,
        "coverage": len(stats.coverage), "arcs": arc_count(stats.coverage), "corpus_added": stats.corpus,
        "exits": {exit_name(c): n for c, n in stats.exits.most_common()},
        "ends": dict(stats.ends.most_common()),
        "findings": [{"kind": f.kind, "message": f.message, "file": p} for f, p in stats.findings.values()],
    }
    if ray_info:
        summary["ray"] = ray_info
    if a.coverage_report is not None:
        try:
            summary["coverage_report"] = str(a.coverage_report / "index.html")
            html_report(stats.coverage, a.coverage_report)
        except ReportError as e:
            raise CliError(str(e)) from None
    if a.json:
        print(json.dumps(summary))
    else:
        err.print(_status_table(stats, secs))
        err.print(f"{'interrupted; ' if interrupted else ''}{stats.execs} cases in {secs:.1f} s "
                  f"({summary['execs_per_s']}/s), {len(stats.findings)} finding(s)"
                  + (f"; corpus kept in {a.corpus}" if a.corpus else ""))
        for f in summary["findings"]:
            err.print(f"  [red]{f['kind']}[/red] {f['message']}" + (f"\n    saved: {f['file']}" if f["file"] else ""))
    if interrupted:
        return 130                 # as `sandbox run`: Ctrl-C (the summary and what was found are kept)
    return 1 if stats.findings else 0


def _run_ray(opts: C.Options, address: str, on_status, info: dict) -> tuple[C.Stats, float, bool]:
    stats, secs, interrupted, more = run_ray(opts, address or None, on_status)
    info.update(more)
    return stats, secs, interrupted


def replay_case(a: argparse.Namespace) -> int:
    """``sandbox run FILE.case``: run a saved case with the same oracles as the campaign."""
    if is_state_file(a.image):
        return replay_state(a)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        case = Case.load(a.image)
    except CaseError as e:
        raise CliError(str(e)) from None
    if case.hooks and not getattr(a, "hooks", None):
        # never loaded from the case itself: a case file must not be a way to run code
        raise CliError(f"{a.image} was found by a campaign with --hooks {case.hooks}: replay it with "
                       f"--hooks {case.hooks} (its findings come from those handlers)")
    h = Harness(audit=a.audit, paging=case.paging, sev=case.sev)      # the machine the case ran on
    outside = h.unmapped_edits(case)
    if outside:
        raise CliError(f"{a.image}: its 'npt' edit of {outside[0]:#x} is outside the guest's "
                       f"{h.ram_size >> 20} MiB of RAM (no nested mapping there to edit)")
    guard = None
    if getattr(a, "hooks", None):
        try:
            guard = HookGuard(h.m, a.hooks)
        except HooksError as e:
            raise CliError(f"--hooks {e}") from None
    out = h.run(case, full=True)          # all of DRAM compared: the isolation check is exact
    fs = findings(out) + (guard.take() if guard is not None else [])
    fs += [Finding("differential", d) for d in differential(case, out.exits)]
    ref = UncountedReference(case.paging, case.sev, a.hooks if guard is not None else None)
    fs += [Finding(k, m) for k, m in ref.compare(case, out)]
    r = out.result
    if a.json:
        for e in out.exits:
            print(json.dumps({"exitcode": e.exitcode, "exit": exit_name(e.exitcode), "rip": e.rip, "nrip": e.nrip,
                              "exitinfo1": e.exitinfo1, "exitinfo2": e.exitinfo2}))
        print(json.dumps({"final": True, "reason": r.reason if r else "crash", "detail": r.detail if r else out.crash,
                          "findings": [{"kind": f.kind, "message": f.message} for f in fs]}))
    else:
        if not a.quiet:
            for i, (e, hname) in enumerate(zip(out.exits, out.handlers)):
                err.print(f"[dim]#{i + 1:<4}[/dim] {e.rip:#018x} [bold]{exit_name(e.exitcode):<14}[/bold] "
                          f"exitinfo1={e.exitinfo1:#x} exitinfo2={e.exitinfo2:#x} nrip={e.nrip:#x} -> {hname}")
        err.print(f"run ended: {r.reason if r else 'crash'}" + (f" - {r.detail}" if r and r.detail else ""))
        for f in fs:
            err.print(f"[red]{f.kind}[/red]: {f.message}")
        if not fs:
            err.print("[green]no oracle findings[/green]")
    return 1 if fs else 0
