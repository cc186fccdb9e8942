# fault_triple.S - a guest that shuts the processor down with a triple fault.
#
# It loads an IDT with limit 0 explicitly (so no vector can be delivered,
# whatever the loader left in IDTR) and executes UD2:
#   1. UD2 raises #UD (vector 6, a benign exception). Delivering it needs
#      IDT entry 6, which lies beyond the IDT limit: that raises #GP, its
#      error code naming IDT entry 6.
#   2. Delivering the #GP needs IDT entry 13, also beyond the limit: a #GP
#      (contributory) while delivering a #GP (contributory) becomes #DF.
#   3. Delivering the #DF needs IDT entry 8, beyond the limit as well: a
#      fault while delivering #DF is a triple fault, and the processor
#      enters shutdown. Under SVM that is the SHUTDOWN intercept (exit code
#      0x7F).
# Nothing is printed and no hypercall is made: the expected end of the run
# is a shutdown, never a normal exit.
#
# Entry state (provided by the loader):
#   * 64-bit long mode, CPL 0. CS = 0x08 (64-bit code), SS = DS = ES = 0x10
#     (flat data). The loader's GDT is at guest-physical 0x1000.
#   * CR3 -> loader page tables identity-mapping guest-physical [0, 16 MiB)
#     with 4 KiB pages, present + writable + supervisor (U/S = 0).
#     CR0.PG = PE = WP = 1, CR4.PAE = 1, EFER.LME = LMA = NXE = 1.
#   * RIP = 0x100000 (the first byte of this file), RSP = 0x90000 (the stack
#     grows down into [0x80000, 0x90000)), RFLAGS = 0x2 (IF = 0).
#   * IDTR limit = 0: there is no IDT, so any exception escalates to a
#     triple fault until the guest loads an IDT of its own.
#   * Guest RAM is guest-physical [0, 16 MiB). Addresses at or above 16 MiB
#     are not mapped in the nested page tables: an access there is a nested
#     page fault that ends the run.
#   * COM1: data port 0x3F8 (OUT writes one console character), line status
#     port 0x3FD (bit 5 = 0x20, transmitter empty, always set).
#   * Hypercalls: VMMCALL (0f 01 d9), RAX = function, arguments in RDI, RSI,
#     RDX, result in RAX.
#       RAX = 0  EXIT   RDI = exit code, the run ends
#       RAX = 1  PRINT  RDI = guest-virtual address of the bytes, RSI = length
#   * HLT with interrupts disabled ends the run.
#
# The whole file is one flat blob loaded at 0x100000: code first, data after.

start:
    lidt [rip + null_idtr]
    ud2

    # not reached
halt_forever:
    hlt
    jmp halt_forever

    .align 16
# IDTR image: limit 0, base 0
null_idtr:
    .fill 16, 1, 0
