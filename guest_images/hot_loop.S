# hot_loop.S - a tight arithmetic loop for benchmarking guest execution.
#
# 20,000,000 iterations of four ALU instructions with no exits inside the
# loop, then the EXIT hypercall with code 0. At the exit:
#   RBX = sum of 1 .. 20,000,000 = 200000010000000 = 0xb5e6218d1680
#   RDX = XOR of the running sums  = 0x8718be3b6800
#   RCX = 0
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
# The whole file is one flat blob loaded at 0x100000.

    .equ HC_EXIT, 0
    .equ ITERATIONS, 20000000

start:
    xor eax, eax
    xor edx, edx
    mov rcx, ITERATIONS
hot_loop:
    add rax, rcx
    xor rdx, rax
    dec rcx
    jnz hot_loop

    mov rbx, rax
    mov eax, HC_EXIT
    xor edi, edi
    vmmcall

    # not reached: EXIT does not return
halt_forever:
    hlt
    jmp halt_forever
