# hello.S - the smallest useful guest.
#
# Prints a greeting on the COM1 serial console (polling the line status
# register before every byte), asks CPUID leaf 0x40000000 for the
# hypervisor vendor string, prints a line through the PRINT hypercall and
# ends the run with the EXIT hypercall, exit code 0.
#
# Expected console:
#   Hello from the guest!
#   hypervisor vendor: <12-character vendor string>
#   hypercall print works
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

    .equ COM1_DATA, 0x3f8
    .equ COM1_LSR, 0x3fd
    .equ LSR_THR_EMPTY, 0x20
    .equ HC_EXIT, 0
    .equ HC_PRINT, 1

start:
    # 1. the serial console
    lea rsi, [rip + msg_hello]
    call serial_puts

    # 2. who are we running under? CPUID 0x40000000 returns the hypervisor
    #    vendor string in EBX, ECX, EDX
    mov eax, 0x40000000
    xor ecx, ecx
    cpuid
    lea rdi, [rip + vendor]
    mov dword ptr [rdi], ebx
    mov dword ptr [rdi + 4], ecx
    mov dword ptr [rdi + 8], edx
    mov byte ptr [rdi + 12], 0
    lea rsi, [rip + msg_vendor]
    call serial_puts
    lea rsi, [rip + vendor]
    call serial_puts
    lea rsi, [rip + msg_newline]
    call serial_puts

    # 3. the PRINT hypercall: RDI = address, RSI = length
    mov eax, HC_PRINT
    lea rdi, [rip + msg_hcall]
    mov esi, msg_hcall_end - msg_hcall
    vmmcall

    # 4. the EXIT hypercall, exit code 0
    mov eax, HC_EXIT
    xor edi, edi
    vmmcall

    # not reached: EXIT does not return
halt_forever:
    hlt
    jmp halt_forever

# serial_putc: write the byte in AL to COM1 once the transmitter is empty.
# Clobbers DX.
serial_putc:
    push rax
    mov dx, COM1_LSR
serial_putc_wait:
    in al, dx
    test al, LSR_THR_EMPTY
    jz serial_putc_wait
    pop rax
    mov dx, COM1_DATA
    out dx, al
    ret

# serial_puts: write the NUL-terminated string at RSI to COM1.
# Clobbers RAX, RDX, RSI.
serial_puts:
    mov al, byte ptr [rsi]
    test al, al
    jz serial_puts_done
    call serial_putc
    inc rsi
    jmp serial_puts
serial_puts_done:
    ret

# ---------------------------------------------------------------- data
    .align 16
msg_hello:
    .asciz "Hello from the guest!\n"
msg_vendor:
    .asciz "hypervisor vendor: "
msg_newline:
    .asciz "\n"
msg_hcall:
    .ascii "hypercall print works\n"
msg_hcall_end:
    .align 16
vendor:
    .fill 16, 1, 0
