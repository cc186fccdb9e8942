"""The command line's output files and streams: an output never overwrites an
input or another output, a write that fails (a full disk) is one line after the
run's summary, and a handler that never returns cannot hang the command."""
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cli.test_cli_edges import one_line_error

ROOT = Path(__file__).resolve().parents[2]
IMG = ROOT / "guest_images"
FULL = Path("/dev/full")


def run_cli(*args, timeout=120, **kw):
    return subprocess.run([sys.executable, "-m", "sandbox.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout, **kw)


@pytest.fixture
def guest(tmp_path):
    g = tmp_path / "hello.S"
    shutil.copy(IMG / "hello.S", g)
    return g


# -- an output that is an input, or another output -----------------------------------------------
@pytest.mark.parametrize("flag", ["--record", "--timeline", "--dump-host-memory"])
def test_output_onto_the_guest_image_is_refused_and_the_image_kept(guest, flag):
    before = guest.read_bytes()
    assert "is the guest image" in one_line_error(run_cli("run", guest, "--quiet", flag, guest))
    assert guest.read_bytes() == before


def test_output_onto_the_hooks_file_is_refused(guest, tmp_path):
    hooks = tmp_path / "h.py"
    hooks.write_text("def setup(machine):\n    pass\n")
    assert "is the --hooks file" in one_line_error(run_cli("run", guest, "--quiet", "--hooks", hooks,
                                                           "--timeline", hooks))
    assert hooks.read_text().startswith("def setup")


def test_two_outputs_onto_one_file_are_refused(guest, tmp_path):
    out = tmp_path / "x.out"
    msg = one_line_error(run_cli("run", guest, "--quiet", "--record", out, "--timeline", out))
    assert "--timeline" in msg and "is the --record file" in msg and not out.exists()


def test_replay_timeline_onto_its_recording_is_refused_and_the_recording_kept(guest, tmp_path):
    rec = tmp_path / "k.rec"
    assert run_cli("run", guest, "--quiet", "--record", rec).returncode == 0
    before = rec.read_bytes()
    assert "is the recording" in one_line_error(run_cli("replay", rec, "--quiet", "--timeline", rec))
    assert rec.read_bytes() == before
    assert run_cli("replay", rec, "--quiet").returncode == 0          # still a whole recording


@pytest.mark.parametrize("flag", ["--record", "--timeline", "--dump-host-memory"])
def test_empty_output_name_is_refused(guest, flag):
    assert "empty file name" in one_line_error(run_cli("run", guest, "--quiet", flag, ""))


def test_two_outputs_to_dev_null_are_fine(guest):
    r = run_cli("run", guest, "--quiet", "--record", os.devnull, "--timeline", os.devnull)
    assert r.returncode == 0, r.stderr[-500:]


# -- writes that fail: one line after the summary, exit 2 --------------------------------------------
def _summary_then_one_error(r, what):
    assert r.returncode == 2, (r.returncode, r.stderr[-800:])
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("sandbox: error: cannot write " + what), lines[-1]
    assert "No space left on device" in lines[-1]
    assert any(line.startswith("run ended: guest-exit") for line in lines), r.stderr[-800:]


@pytest.mark.skipif(not FULL.exists(), reason="needs /dev/full")
@pytest.mark.parametrize("flag,what", [("--dump-host-memory", "--dump-host-memory file"),
                                       ("--record", "--record file"), ("--timeline", "--timeline file")])
def test_output_file_on_a_full_disk_keeps_console_and_summary(guest, flag, what):
    r = run_cli("run", guest, "--quiet", flag, FULL)
    _summary_then_one_error(r, what)
    assert "Hello from the guest!" in r.stdout                  # the console still reached stdout


@pytest.mark.skipif(not FULL.exists(), reason="needs /dev/full")
@pytest.mark.parametrize("json_flag,what", [((), "the guest's console to stdout"),
                                            (("--json",), "the JSON result to stdout")])
def test_stdout_on_a_full_disk_is_not_blamed_on_the_guest(guest, json_flag, what):
    with open(FULL, "w") as full:
        p = subprocess.run([sys.executable, "-m", "sandbox.cli", "run", str(guest), "--quiet", *json_flag],
                           stdout=full, stderr=subprocess.PIPE, text=True, cwd=ROOT, timeout=120)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and "Traceback" not in p.stderr and "handler raised" not in p.stderr, p.stderr[-800:]
    assert lines[-1] == f"sandbox: error: cannot write {what}: No space left on device"


def test_closed_stdout_is_one_line_before_anything_runs(guest):
    p = subprocess.run([sys.executable, "-m", "sandbox.cli", "run", str(guest), "--quiet", "--json"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT, timeout=120,
                       preexec_fn=lambda: os.close(1))
    assert p.returncode == 2 and p.stderr.strip() == \
        "sandbox: error: stdout is closed; redirect it to a file or /dev/null instead"


# -- a handler that never returns ------------------------------------------------------------------
HANG = "def h(machine, exit):\n    while True:\n        pass\nHANDLERS = {'CPUID': h}\n"


def test_a_handler_that_never_returns_ends_after_the_timeout(guest, tmp_path):
    hooks = tmp_path / "hang.py"
    hooks.write_text(HANG)
    t = time.monotonic()
    r = run_cli("run", guest, "--quiet", "--hooks", hooks, "--timeout", "1", timeout=60)
    assert time.monotonic() - t < 30
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-800:]
    assert "run ended: handler-error - CPUID handler raised HandlerStuck: still running 2 s after the " \
           "wall-clock limit of 1 s" in r.stderr


def test_a_second_ctrl_c_ends_a_handler_that_never_returns(guest, tmp_path):
    hooks = tmp_path / "hang.py"
    hooks.write_text(HANG)
    p = subprocess.Popen([sys.executable, "-m", "sandbox.cli", "run", str(guest), "--quiet", "--hooks", str(hooks),
                          "--timeout", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        line = ""
        while time.monotonic() < deadline and "Hello" not in line:
            line = p.stdout.readline()          # the guest printed, then ran CPUID into the handler
        time.sleep(0.5)
        p.send_signal(signal.SIGINT)
        time.sleep(1.0)
        assert p.poll() is None                 # one Ctrl-C asks the processor, which the handler never returns to
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130 and "Traceback" not in err, err[-800:]
    assert "run ended: stopped - interrupted" in err


# -- malformed inputs ------------------------------------------------------------------------------
@pytest.mark.parametrize("body,msg", [("HANDLERS = 5\n", "HANDLERS must be a dict"),
                                      ("HANDLERS = []\n", "HANDLERS must be a dict"),
                                      ("HANDLERS = {114: 3}\n", "handler for CPUID is not callable"),
                                      ("HANDLERS = {1.5: print}\n", "neither an exit name nor an exit code")])
def test_malformed_handlers_table_is_one_line(guest, tmp_path, body, msg):
    hooks = tmp_path / "h.py"
    hooks.write_text(body)
    assert msg in one_line_error(run_cli("run", guest, "--quiet", "--hooks", hooks))


def _with_first_load(tmp_path, field_off: int, value: int) -> Path:
    """cguest.elf with one field of its first PT_LOAD program header replaced."""
    elf = bytearray((IMG / "cguest.elf").read_bytes())
    phoff = struct.unpack_from("<Q", elf, 32)[0]
    phentsize, phnum = struct.unpack_from("<HH", elf, 54)
    for i in range(phnum):
        o = phoff + i * phentsize
        if struct.unpack_from("<I", elf, o)[0] == 1:          # PT_LOAD
            struct.pack_into("<Q", elf, o + field_off, value)
            break
    p = tmp_path / "bad.elf"
    p.write_bytes(bytes(elf))
    return p


@pytest.mark.parametrize("memsz", [1 << 62, 1 << 34])
def test_elf_segment_larger_than_ram_is_refused_before_allocating(tmp_path, memsz):
    bad = _with_first_load(tmp_path, 40, memsz)           # p_memsz
    assert "is outside guest RAM" in one_line_error(run_cli("run", bad, "--quiet", timeout=60))


def test_elf_segment_past_the_end_of_the_file_is_refused(tmp_path):
    bad = _with_first_load(tmp_path, 32, 1 << 20)          # p_filesz: a megabyte the file does not have
    assert "past the end of the" in one_line_error(run_cli("run", bad, "--quiet", timeout=60))


# -- a recording whose integrity trailer holds but whose body does not make sense ----------------
def _forge(src: Path, dst: Path, config=None, records=None, zraw=None, **config_changes) -> Path:
    """Rewrite recording ``src`` with another header config or records, and a
    matching sha256 trailer (the file format: magic, header JSON, zlib records,
    then ``\\nsha256:<hex>\\n`` over everything before it)."""
    import hashlib
    import json
    import zlib
    raw = src.read_bytes()
    body = raw[:-len(b"\nsha256:") - 65]
    magic, header, z = body.split(b"\n", 2)
    h = json.loads(header)
    recs = zlib.decompress(z).decode().splitlines()
    if config is not None:
        h["config"] = config
    if config_changes:
        h["config"].update(config_changes)
        h["config_sha256"] = hashlib.sha256(json.dumps(h["config"], sort_keys=True,
                                                       separators=(",", ":")).encode()).hexdigest()
    if records is not None:
        recs = records(recs)
    zz = zraw if zraw is not None else zlib.compress(("\n".join(recs) + "\n").encode())
    out = magic + b"\n" + json.dumps(h).encode() + b"\n" + zz
    dst.write_bytes(out + b"\nsha256:" + hashlib.sha256(out).hexdigest().encode() + b"\n")
    return dst


@pytest.mark.parametrize("change,msg", [
    (dict(config=[1, 2]), "holds no run configuration"),
    (dict(max_exits="x"), "recorded max_exits is 'x'"),
    (dict(ram="abc"), "recorded ram is 'abc'"),
    (dict(mode="nope"), "recorded mode is 'nope'"),
    (dict(timeout=-5), "recorded timeout is -5"),
    (dict(records=lambda rs: ["nope"] + rs), "a record is not JSON"),
    (dict(records=lambda rs: [r for r in rs if '"end"' not in r]), "no end record"),
    (dict(zraw=b"not zlib at all"), "do not decompress"),
])
def test_forged_recording_is_one_line_not_a_traceback(guest, tmp_path, change, msg):
    rec = tmp_path / "k.rec"
    assert run_cli("run", guest, "--quiet", "--record", rec).returncode == 0
    same = _forge(rec, tmp_path / "same.rec")
    assert run_cli("replay", same, "--quiet").returncode == 0       # the forging itself keeps a good file good
    bad = _forge(rec, tmp_path / "bad.rec", **change)
    assert msg in one_line_error(run_cli("replay", bad, "--quiet"))


# -- Ctrl-C while the command is still importing its modules ---------------------------------------
@pytest.mark.parametrize("after", [0.3, 0.6])
def test_ctrl_c_during_start_up_is_one_line(after):
    p = subprocess.Popen([sys.executable, "-m", "sandbox.cli", "run", str(IMG / "spin.S"), "--timeout", "0",
                          "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    time.sleep(after)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130 and "Traceback" not in err, err[-800:]
    assert err.strip().splitlines()[-1].startswith(("sandbox: interrupted", "run ended: stopped - interrupted"))


def test_ctrl_c_while_the_arguments_are_parsed_is_one_line(monkeypatch, capsys):
    """A Ctrl-C that lands in argument parsing (argparse looks up its message
    catalogue through gettext: a KeyboardInterrupt there printed a traceback and
    killed the process with SIGINT, seen on a fresh install where start-up is slow)
    is noted and ends the command with one line and 130, parsing having finished."""
    import sandbox.cli as cli
    import sandbox.cli.run as run
    real = run.parse
    parsed = []

    def parse_interrupted(argv=None):
        os.kill(os.getpid(), signal.SIGINT)        # delivered at the next bytecode, inside parsing
        a = real(argv)
        parsed.append(a)
        return a
    monkeypatch.setattr(run, "parse", parse_interrupted)
    assert cli.main(["run", str(IMG / "spin.S"), "--quiet"]) == 130
    assert parsed and capsys.readouterr().err.strip() == "sandbox: interrupted"


def test_package_root_names_load_on_first_use():
    code = ("import sys, sandbox.cli; assert 'sandbox.hypervisor.machine' not in sys.modules; "
            "import sandbox; from sandbox import Machine, handlers, ExitCode, VMCB, RESUME; "
            "assert Machine.__name__ == 'Machine' and handlers.__name__ == 'sandbox.hypervisor.handlers'; "
            "assert int(ExitCode.CPUID) == 0x72 and set(sandbox.__all__) <= set(dir(sandbox)); print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-800:]


@pytest.mark.parametrize("n", [str(1 << 63), str(1 << 64), str((1 << 64) + 1)])
def test_instruction_budget_beyond_63_bits_is_refused(guest, n):
    assert "must be 0-9223372036854775807" in one_line_error(run_cli("run", guest, "--quiet", "--max-insns", n))


# -- smaller edges -----------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", [",", "", "cpuid,,hlt", "-"])
def test_empty_intercept_name_is_refused(guest, spec):
    assert "an empty name" in one_line_error(run_cli("run", guest, "--quiet", f"--intercept={spec}"))


def test_ram_too_big_for_the_derived_dram_names_ram(guest):
    msg = one_line_error(run_cli("run", guest, "--quiet", "--ram", "16384"))
    assert msg.startswith("sandbox: error: --ram 16384:") and "--dram" not in msg


def test_fuzz_audit_with_audit_every_is_refused():
    assert "--audit audits every case" in one_line_error(
        run_cli("fuzz", "--cases", "5", "--audit", "--audit-every", "4"))


def test_empty_recording_says_it_was_cut_off(tmp_path):
    rec = tmp_path / "killed.rec"
    rec.write_bytes(b"")
    assert "is empty: a recording cut off before its header" in one_line_error(run_cli("replay", rec))


def test_every_recorded_choice_argument_is_checked_against_the_parsers_choices():
    """A recording's arguments are checked against the values ``sandbox run``'s
    parser offers: every recorded argument that takes one of a few values is
    in RUN_CHOICES, with the parser's very choices."""
    import argparse
    from sandbox.cli.run import build_parser
    from sandbox.cli.workbench import RECORDED_ARGS, RUN_CHOICES
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    run = sub.choices["run"]
    with_choices = {a.dest: tuple(a.choices) for a in run._actions if a.choices is not None}
    recorded = {k: v for k, v in with_choices.items() if k in RECORDED_ARGS}
    assert set(recorded) == {"platform", "paging", "npt_page", "tlb", "mode"}
    assert recorded == {k: tuple(v) for k, v in RUN_CHOICES.items()}


def test_case_editing_a_page_outside_guest_ram_is_refused(tmp_path):
    """A hand-edited case whose nested-page edit names no page of the guest's RAM
    would run with nothing edited: refused, naming the address."""
    p = tmp_path / "far.case"
    p.write_text('{"format": "sandbox-fuzz-case", "version": 1, "code": "31c031ff0f01d9", '
                 '"intercepts": ["0","0","0","0x80000000","0x3","0"], "npt": [["0x7fffffff000", true, true, true]]}')
    assert "edit of 0x7fffffff000 is outside the guest's 2 MiB of RAM" in one_line_error(run_cli("run", p, "--quiet"))
    p.write_text(p.read_text().replace("0x7fffffff000", "0x1c0000"))
    assert run_cli("run", p, "--quiet").returncode == 0


def test_without_an_unknown_feature_is_one_line(guest):
    assert "--without avx9: unknown CPU feature 'avx9'" in one_line_error(run_cli("run", guest, "--without", "avx9"))


def test_without_is_recorded_and_replayed(tmp_path):
    """The recording keeps --without and the replay rebuilds that processor: a guest whose
    exit code is CPUID's RDTSCP bit replays to the same end, and the recording with the
    list taken out does not (a recorded name the replay cannot build is one line)."""
    g = tmp_path / "rdtscp_bit.S"
    g.write_text("mov eax, 0x80000001\ncpuid\nshr edx, 27\nand edx, 1\nmov edi, edx\nxor eax, eax\n"
                 ".byte 0x0f, 0x01, 0xd9\n")
    rec = tmp_path / "w.rec"
    p = run_cli("run", g, "--quiet", "--without", "rdtscp,-xsave", "--record", rec)
    assert p.returncode == 0 and "EXIT hypercall with code 0" in p.stderr, p.stderr
    q = run_cli("replay", rec, "--quiet")
    assert q.returncode == 0, q.stderr
    full = _forge(rec, tmp_path / "full.rec", without=None)
    assert run_cli("replay", full, "--quiet").returncode != 0       # that processor reports RDTSCP
    bad = _forge(rec, tmp_path / "bad.rec", without="avx9")
    assert "unknown CPU feature 'avx9'" in one_line_error(run_cli("replay", bad, "--quiet"))


def test_a_handled_interrupt_inside_exec_still_exits_with_our_status(tmp_path):
    """CPython marks a KeyboardInterrupt that ends an ``exec`` of source text as unhandled
    even when it is caught, and a ``python -m`` process then dies by SIGINT (status -2)
    instead of exiting 130; ``interrupt_handled`` clears the mark (``dataclasses`` execs
    every ``__init__`` it builds, so a Ctrl-C at import can land there)."""
    body = ("import sys\ntry:\n    exec('raise KeyboardInterrupt')\nexcept KeyboardInterrupt:\n    pass\n"
            "{clear}sys.exit(130)\n")
    (tmp_path / "marked.py").write_text(body.format(clear=""))
    (tmp_path / "cleared.py").write_text(body.format(
        clear="from sandbox.cli import interrupt_handled\ninterrupt_handled()\n"))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    codes = [subprocess.run([sys.executable, "-m", name], cwd=tmp_path, env=env, timeout=60).returncode
             for name in ("marked", "cleared")]
    assert codes[0] in (-signal.SIGINT, 130)  # the interpreter's quirk (3.11 has it)
    assert codes[1] == 130                     # and the CLI's way round it
