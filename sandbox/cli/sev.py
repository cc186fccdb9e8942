"""The command line's SEV launch: one call that picks SEV, SEV-ES or SNP."""
from __future__ import annotations

from ..hypervisor.machine import Machine
from ..debug.rr import seeded_bytes
from ..hypervisor.sev_launch import attach_sev, launch_sev, launch_sev_es, launch_snp
from ..sev.firmware import SevError


def launch_from_cli(m: Machine, *, es: bool = False, snp: bool = False, key_seed: int | None = None) -> str:
    """Launch the loaded guest encrypted; returns a one-line note for the user.
    ``key_seed``: memory-encryption keys from a seeded generator (a recorded or
    replayed run). Raises ValueError with a one-line message when the launch fails."""
    if key_seed is not None:
        attach_sev(m).sp.key_source = seeded_bytes(key_seed)
    try:
        if es:
            rep = launch_sev_es(m, snp=snp)
        elif snp:
            rep = launch_snp(m)
        else:
            rep = launch_sev(m)
    except SevError as e:
        raise ValueError(f"SEV launch failed: {e}") from None
    kind = "SEV" + ("-ES" if es else "") + ("-SNP" if snp else "")
    ok = "verified by the guest owner" if rep.verified else "NOT verified"
    return (f"{kind} guest launched: ASID {rep.asid}, {rep.pages} pages encrypted, "
            f"measurement {rep.measurement.measure.hex()[:16]}... {ok}")
