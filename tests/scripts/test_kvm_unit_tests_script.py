"""scripts/kvm_unit_tests.py: unittests.cfg parsing, command lines, skip rules,
report-line counting and the kvm-unit-tests reading of exit statuses."""
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("kvm_unit_tests", ROOT / "scripts" / "kvm_unit_tests.py")
kut = importlib.util.module_from_spec(spec)
sys.modules["kvm_unit_tests"] = kut          # dataclasses look their module up there
spec.loader.exec_module(kut)

CFG = """
# a comment
[vmexit_cpuid]
file = vmexit.flat
test_args = 'cpuid'
groups = vmexit

[svm]
file = svm.flat
smp = 2
test_args = "-pause_filter_test"
qemu_params = -cpu max,+svm -m 4g
arch = x86_64

[old_style]
file = svm.flat
extra_params = -cpu max,+svm -append "-a -b"

[i386only]
file = cmpxchg8b.flat
arch = i386

[nodef]
file = vmexit.flat
groups = vmexit nodefault
"""


def test_parse_cfg_and_command_lines(tmp_path):
    es = {e.name: e for e in kut.parse_cfg(CFG)}
    assert es["vmexit_cpuid"].file == "vmexit.flat" and kut.command_line(es["vmexit_cpuid"]) == "cpuid"
    assert es["svm"].smp == 2 and kut.command_line(es["svm"]) == "-pause_filter_test"
    assert kut.split_params(es["svm"].extra_params)[1] == ["-cpu", "max,+svm", "-m", "4g"]
    assert kut.command_line(es["old_style"]) == "-a -b"            # -append inside extra_params
    for f in ("vmexit.flat", "svm.flat"):
        (tmp_path / f).write_bytes(b"")
    assert kut.skip_reason(es["vmexit_cpuid"], str(tmp_path)) == ""
    assert "2 CPUs" in kut.skip_reason(es["svm"], str(tmp_path))
    assert kut.skip_reason(es["i386only"], str(tmp_path)).startswith("arch")
    assert kut.skip_reason(es["nodef"], str(tmp_path)) == "nodefault group"
    (tmp_path / "vmexit.flat").unlink()
    assert kut.skip_reason(es["vmexit_cpuid"], str(tmp_path)) == "binary not built"


def test_report_lines_and_verdicts():
    o = kut.Outcome()
    kut.parse_output("PASS: a\r\nFAIL: b\nSKIP: c\nXFAIL: d\nnot PASS: e\nSUMMARY: 4 tests, 1 unexpected failures\n", o)
    assert (o.passed, o.failed, o.skipped) == (2, 1, 1) and o.summary.startswith("SUMMARY: 4 tests")
    for status, v in ((1, "PASS"), (3, "FAIL"), (77, "SKIP"), (None, "ERROR")):
        o.status = status
        assert kut.verdict(o) == v
