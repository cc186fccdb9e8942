"""Every script's bad flag is one line on stderr with exit status 2, as the CLI's are."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(p.name for p in (ROOT / "scripts").glob("*.py") if "ArgumentParser" in p.read_text()
                 or "Parser(" in p.read_text())


def test_every_script_with_arguments_is_listed():
    assert {"bench.py", "bench_memory.py", "bench_sev.py", "kvm_unit_tests.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_bad_flag_is_one_line_with_status_2(script):
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / script), "--no-such-flag"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip() == (f"{script}: error: unrecognized arguments: --no-such-flag "
                                f"(see '{script} --help')"), p.stderr
