"""One page of Unicorn's soft TLB flushed (QEMU's ``tlb_flush_page``), and the
code stores that use it (sandbox.svm.smc): a code page's executable entries
go when the guest stores to it, and its writable ones when it runs again,
with that page's entries alone, so the guest's other pages stay filled; the
guest computes what it computes when the whole soft TLB is flushed instead."""
from __future__ import annotations

from unicorn import UC_PROT_ALL, UC_TLB_VIRTUAL

from conftest import BASE, DATA, hc_exit

import sandbox.svm.fill as fill_module
from sandbox.svm.engine import TCG_BUFFER_SMALL, add_raw_tlb_fill_hook, x86_64_engine
from sandbox.svm.soft_tlb import page_flusher

COUNTER = BASE + 0xC00                  # on the code's own page
STORES = 5


def test_one_page_flushed_refills_that_page_alone():
    """Code reading four data pages, run again after one of them is flushed:
    only that page comes back through the fill hook (the others, and the code
    page, are still in the soft TLB)."""
    uc = x86_64_engine(TCG_BUFFER_SMALL)
    uc.mem_map(0, 0x5000)
    uc.ctl_set_tlb_mode(UC_TLB_VIRTUAL)
    fills: list[int] = []

    def fill(handle, vaddr, access, entry, ud):
        fills.append(vaddr & ~0xFFF)
        entry[0].paddr = vaddr & ~0xFFF
        entry[0].perms = UC_PROT_ALL
        return True

    keep = add_raw_tlb_fill_hook(uc, fill)
    # mov rax, [0x1000]; mov rax, [0x2000]; mov rax, [0x3000]; mov rax, [0x4000]
    code = b"".join(bytes.fromhex("488b0425") + (p << 12).to_bytes(4, "little") for p in range(1, 5))
    uc.mem_write(0, code)
    flush = page_flusher(uc)
    assert flush is not None, "this Unicorn exports tlb_flush_page and passed the self-test"
    uc.emu_start(0, len(code))
    assert sorted(fills) == [0, 0x1000, 0x2000, 0x3000, 0x4000]
    for page in (0x3000, 0x1000):
        del fills[:]
        uc.emu_start(0, len(code))
        assert fills == []
        flush(page + 0x123)                 # any address within the page
        uc.emu_start(0, len(code))
        assert fills == [page]
    del keep


def _smc_guest(guest):
    """A loop that reads a data page and stores into its own code page each time."""
    src = f"""
    mov rbx, {COUNTER:#x}
    mov rsi, {DATA:#x}
    mov ecx, {STORES}
again:
    add rax, [rsi]
    inc qword ptr [rbx]
    dec ecx
    jnz again
    """ + hc_exit(0x55)
    m = guest(src)
    m.guest.write_phys(DATA, (7).to_bytes(8, "little"))
    data_fills: list[int] = []
    m.cpu.add_fill_observer(lambda gva, access, hpa, perms: data_fills.append(gva) if gva >> 12 == DATA >> 12 else None)
    return m, data_fills


def test_a_code_store_keeps_the_guests_other_pages_filled(guest, monkeypatch):
    """With the per-page flush, the data page is filled once for the whole
    loop; with the whole soft TLB flushed where a code page's entries go (the
    path taken where the per-page flush is not available) it is filled again.
    The guest's results are the same either way."""
    m, data_fills = _smc_guest(guest)
    r = m.run(timeout=20)
    assert r.reason == "guest-exit" and r.exit_code == 0x55, (r.reason, r.detail)
    assert int.from_bytes(m.guest.read_phys(COUNTER, 8), "little") == STORES
    assert len(data_fills) == 1

    monkeypatch.setattr(fill_module, "page_flusher", lambda uc: None)
    m2, data_fills2 = _smc_guest(guest)
    r2 = m2.run(timeout=20)
    assert r2.reason == "guest-exit" and r2.exit_code == 0x55, (r2.reason, r2.detail)
    assert int.from_bytes(m2.guest.read_phys(COUNTER, 8), "little") == STORES
    assert len(data_fills2) > 1
    assert r2.regs == r.regs
