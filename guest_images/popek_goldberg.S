# popek_goldberg.S - a probe of the x86 instructions the virtualization
# literature names as sensitive (Popek & Goldberg 1974, Robin & Irvine 2000,
# Adams & Agesen 2006): privileged ones, which a trap-and-emulate monitor
# gets for free on a deprivileged guest, and sensitive-but-unprivileged
# ones (SGDT, SIDT, SLDT, STR, SMSW, PUSHF, POPF ...), which made classic
# x86 not virtualizable until VT-x / AMD-V added intercepts for them.
#
# Every step prints its name on COM1 ("probe: <name>") and then executes
# exactly one sensitive instruction, so an exit trace shows which
# instruction caused each intercept. Steps, in order:
#   SGDT, SIDT, SLDT, STR, SMSW, PUSHF, POPF, CPUID (eax=0), RDTSC,
#   RDTSCP, RDPMC (ecx=0), IN al,0x80, OUT 0x80,al, RDMSR (0x10, TSC),
#   WRMSR (0xC0000103 TSC_AUX := 0), MOV rax,CR0, MOV CR0,rax (same
#   value), MOV rax,CR3, MOV CR3,rax (same value), MOV rax,CR4,
#   MOV rax,DR7, MOV DR7,rax (same value), LMSW (the value SMSW read),
#   CLTS, INVLPG, WBINVD, INVD, PAUSE, MOV CR4,rax (sets CR4.OSXSAVE),
#   XSETBV (XCR0 := 3, x87|SSE), LGDT and LIDT (reloading what SGDT and
#   SIDT stored), LLDT (null selector).
# Then it prints "probe done" and EXITs with code 0.
#
# Not executed here: INT n and an explicit IRET; ICEBP, the SVM
# instructions (VMRUN, VMLOAD, VMSAVE, STGI, CLGI, SKINIT, INVLPGA) and
# MONITOR/MWAIT, which fault (#UD, or #DB for ICEBP) unless a hypervisor
# intercepts them (see svm_insns.S); and HLT, which would end the run.
#
# Exception catcher: some of these instructions fault when they are not
# intercepted (RDPMC raises #UD on a processor model without performance
# counters, XSETBV needs XSAVE support ...). Before the first step the
# probe loads a small IDT (at 0x30000) whose handlers print the exception
# ("  -> #UD at rip 0x...") and continue with the next step, so one faulting
# instruction does not end the whole probe in a triple fault. Loading that
# IDT is one LIDT before the first step.
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
    .equ CATCH_IDT, 0x30000
    .equ CATCH_IDT_LIMIT, 256 * 16 - 1
    .equ CR4_OSXSAVE, 0x40000
    .equ MSR_TSC, 0x10
    .equ MSR_TSC_AUX, 0xc0000103
# exception vectors that push an error code: 8, 10-14, 17, 21, 29, 30
    .equ ERROR_CODE_VECTORS, 0x60227d00

start:
    mov rsp, 0x90000
    cld
    lea rsi, [rip + msg_start]
    call puts
    call install_catcher

# ---------------------------------------------------------------- steps
# Each step: RSI = its name, RDI = the next step (where the exception
# catcher continues if the instruction faults), then the instruction.

p_sgdt:
    lea rsi, [rip + n_sgdt]
    lea rdi, [rip + p_sidt]
    call step
    sgdt [rip + saved_gdtr]

p_sidt:
    lea rsi, [rip + n_sidt]
    lea rdi, [rip + p_sldt]
    call step
    sidt [rip + saved_idtr]

p_sldt:
    lea rsi, [rip + n_sldt]
    lea rdi, [rip + p_str]
    call step
    sldt eax

p_str:
    lea rsi, [rip + n_str]
    lea rdi, [rip + p_smsw]
    call step
    str eax

p_smsw:
    lea rsi, [rip + n_smsw]
    lea rdi, [rip + p_pushf]
    call step
    smsw eax
    mov dword ptr [rip + saved_msw], eax

p_pushf:
    lea rsi, [rip + n_pushf]
    lea rdi, [rip + p_popf]
    call step
    pushfq
    pop qword ptr [rip + saved_rflags]

p_popf:
    lea rsi, [rip + n_popf]
    lea rdi, [rip + p_cpuid]
    call step
    push qword ptr [rip + saved_rflags]
    popfq

p_cpuid:
    lea rsi, [rip + n_cpuid]
    lea rdi, [rip + p_rdtsc]
    call step
    xor eax, eax
    xor ecx, ecx
    cpuid

p_rdtsc:
    lea rsi, [rip + n_rdtsc]
    lea rdi, [rip + p_rdtscp]
    call step
    rdtsc

p_rdtscp:
    lea rsi, [rip + n_rdtscp]
    lea rdi, [rip + p_rdpmc]
    call step
    rdtscp

p_rdpmc:
    lea rsi, [rip + n_rdpmc]
    lea rdi, [rip + p_in]
    call step
    xor ecx, ecx
    rdpmc

p_in:
    lea rsi, [rip + n_in]
    lea rdi, [rip + p_out]
    call step
    in al, 0x80

p_out:
    lea rsi, [rip + n_out]
    lea rdi, [rip + p_rdmsr]
    call step
    xor eax, eax
    out 0x80, al

p_rdmsr:
    lea rsi, [rip + n_rdmsr]
    lea rdi, [rip + p_wrmsr]
    call step
    mov ecx, MSR_TSC
    rdmsr

p_wrmsr:
    lea rsi, [rip + n_wrmsr]
    lea rdi, [rip + p_read_cr0]
    call step
    mov ecx, MSR_TSC_AUX
    xor eax, eax
    xor edx, edx
    wrmsr

p_read_cr0:
    lea rsi, [rip + n_read_cr0]
    lea rdi, [rip + p_write_cr0]
    call step
    mov rax, cr0
    mov qword ptr [rip + saved_cr0], rax

p_write_cr0:
    lea rsi, [rip + n_write_cr0]
    lea rdi, [rip + p_read_cr3]
    call step
    mov rax, qword ptr [rip + saved_cr0]
    mov cr0, rax

p_read_cr3:
    lea rsi, [rip + n_read_cr3]
    lea rdi, [rip + p_write_cr3]
    call step
    mov rax, cr3
    mov qword ptr [rip + saved_cr3], rax

p_write_cr3:
    lea rsi, [rip + n_write_cr3]
    lea rdi, [rip + p_read_cr4]
    call step
    mov rax, qword ptr [rip + saved_cr3]
    mov cr3, rax

p_read_cr4:
    lea rsi, [rip + n_read_cr4]
    lea rdi, [rip + p_read_dr7]
    call step
    mov rax, cr4
    mov qword ptr [rip + saved_cr4], rax

p_read_dr7:
    lea rsi, [rip + n_read_dr7]
    lea rdi, [rip + p_write_dr7]
    call step
    mov rax, dr7
    mov qword ptr [rip + saved_dr7], rax

p_write_dr7:
    lea rsi, [rip + n_write_dr7]
    lea rdi, [rip + p_lmsw]
    call step
    mov rax, qword ptr [rip + saved_dr7]
    mov dr7, rax

p_lmsw:
    lea rsi, [rip + n_lmsw]
    lea rdi, [rip + p_clts]
    call step
    mov eax, dword ptr [rip + saved_msw]
    lmsw ax

p_clts:
    lea rsi, [rip + n_clts]
    lea rdi, [rip + p_invlpg]
    call step
    clts

p_invlpg:
    lea rsi, [rip + n_invlpg]
    lea rdi, [rip + p_wbinvd]
    call step
    invlpg [rip + saved_gdtr]

p_wbinvd:
    lea rsi, [rip + n_wbinvd]
    lea rdi, [rip + p_invd]
    call step
    wbinvd

p_invd:
    lea rsi, [rip + n_invd]
    lea rdi, [rip + p_pause]
    call step
    invd

p_pause:
    lea rsi, [rip + n_pause]
    lea rdi, [rip + p_write_cr4]
    call step
    pause

p_write_cr4:
    lea rsi, [rip + n_write_cr4]
    lea rdi, [rip + p_xsetbv]
    call step
    mov rax, qword ptr [rip + saved_cr4]
    or rax, CR4_OSXSAVE
    mov cr4, rax

p_xsetbv:
    lea rsi, [rip + n_xsetbv]
    lea rdi, [rip + p_lgdt]
    call step
    xor ecx, ecx
    mov eax, 3
    xor edx, edx
    xsetbv

p_lgdt:
    lea rsi, [rip + n_lgdt]
    lea rdi, [rip + p_lidt]
    call step
    lgdt [rip + saved_gdtr]

p_lidt:
    lea rsi, [rip + n_lidt]
    lea rdi, [rip + p_lldt]
    call step
    lidt [rip + saved_idtr]

p_lldt:
    lea rsi, [rip + n_lldt]
    lea rdi, [rip + p_done]
    call step
    xor eax, eax
    lldt ax

p_done:
    mov qword ptr [rip + resume_rip], 0
    lea rsi, [rip + msg_faults]
    call puts
    mov rdi, qword ptr [rip + fault_count]
    call print_hex
    call newline
    lea rsi, [rip + msg_done]
    call puts
    mov eax, HC_EXIT
    xor edi, edi
    vmmcall
halt_forever:
    hlt
    jmp halt_forever

# step: announce a step. RSI = NUL-terminated name, RDI = where to continue
# if the step's instruction raises an exception (with the stack pointer the
# caller has after this call returns). Clobbers RAX, RDX, RSI.
step:
    mov qword ptr [rip + resume_rip], rdi
    lea rax, [rsp + 8]
    mov qword ptr [rip + resume_rsp], rax
    push rsi
    lea rsi, [rip + msg_step]
    call puts
    pop rsi
    call puts
    jmp newline

# ---------------------------------------------------------------- catcher
# install_catcher: IDT at CATCH_IDT, vectors 0-31 -> exc_stubs + 16 * n,
# vectors 32-255 -> irq_unexpected; LIDT.
install_catcher:
    push rbx
    xor ebx, ebx
install_catcher_loop:
    lea rsi, [rip + irq_unexpected]
    cmp ebx, 32
    jae install_catcher_set
    lea rsi, [rip + exc_stubs]
    mov eax, ebx
    shl eax, 4
    add rsi, rax
install_catcher_set:
    mov edi, ebx
    call set_gate
    inc ebx
    cmp ebx, 256
    jb install_catcher_loop
    mov word ptr [rip + catch_idtr], CATCH_IDT_LIMIT
    mov rax, CATCH_IDT
    mov qword ptr [rip + catch_idtr + 2], rax
    lidt [rip + catch_idtr]
    pop rbx
    ret

# set_gate: IDT entry EDI := 64-bit interrupt gate (type 0xE, P, DPL 0,
# selector 0x08, IST 0) to RSI. Clobbers RAX, RCX, RDI.
set_gate:
    mov edi, edi
    shl rdi, 4
    mov rax, CATCH_IDT
    add rdi, rax
    mov rax, rsi
    and eax, 0xffff
    or eax, 0x08 << 16
    mov rcx, 0x8e
    shl rcx, 40
    or rax, rcx
    mov rcx, rsi
    shr rcx, 16
    and ecx, 0xffff
    shl rcx, 48
    or rax, rcx
    mov qword ptr [rdi], rax
    mov rax, rsi
    shr rax, 32
    mov qword ptr [rdi + 8], rax
    ret

# exc_common: reached from a stub with [rsp] = vector, [rsp + 8] = error
# code (0 for vectors without one), then the interrupt frame. Prints the
# exception and continues at the current step's successor.
exc_common:
    push rax
    push rcx
    push rdx
    push rsi
    push rdi
    # [rsp+40] vector, [rsp+48] error code, [rsp+56] RIP, [rsp+64] CS,
    # [rsp+72] RFLAGS, [rsp+80] RSP, [rsp+88] SS
    lea rsi, [rip + msg_arrow]
    call puts
    mov rax, qword ptr [rsp + 40]
    lea rsi, [rip + exc_names]
    lea rsi, [rsi + rax * 4]
    call puts
    mov rax, qword ptr [rsp + 40]
    mov ecx, ERROR_CODE_VECTORS
    bt ecx, eax
    jnc exc_common_no_error_code
    lea rsi, [rip + msg_err]
    call puts
    mov rdi, qword ptr [rsp + 48]
    call print_hex
exc_common_no_error_code:
    lea rsi, [rip + msg_at_rip]
    call puts
    mov rdi, qword ptr [rsp + 56]
    call print_hex
    lea rsi, [rip + msg_skipped]
    call puts
    inc qword ptr [rip + fault_count]
    mov rax, qword ptr [rip + resume_rip]
    test rax, rax
    jz catcher_stop
    mov qword ptr [rsp + 56], rax
    mov rax, qword ptr [rip + resume_rsp]
    mov qword ptr [rsp + 80], rax
    pop rdi
    pop rsi
    pop rdx
    pop rcx
    pop rax
    add rsp, 16
    iretq

irq_unexpected:
    lea rsi, [rip + msg_unexpected_irq]
    call puts
catcher_stop:
    lea rsi, [rip + msg_stop]
    call puts
    mov eax, HC_EXIT
    mov edi, 3
    vmmcall
    jmp halt_forever

# 32 stubs, 16 bytes apart: vectors without an error code push a 0 first
    .align 16
exc_stubs:
    push 0
    push 0
    jmp exc_common
    .align 16
    push 0
    push 1
    jmp exc_common
    .align 16
    push 0
    push 2
    jmp exc_common
    .align 16
    push 0
    push 3
    jmp exc_common
    .align 16
    push 0
    push 4
    jmp exc_common
    .align 16
    push 0
    push 5
    jmp exc_common
    .align 16
    push 0
    push 6
    jmp exc_common
    .align 16
    push 0
    push 7
    jmp exc_common
    .align 16
    push 8
    jmp exc_common
    .align 16
    push 0
    push 9
    jmp exc_common
    .align 16
    push 10
    jmp exc_common
    .align 16
    push 11
    jmp exc_common
    .align 16
    push 12
    jmp exc_common
    .align 16
    push 13
    jmp exc_common
    .align 16
    push 14
    jmp exc_common
    .align 16
    push 0
    push 15
    jmp exc_common
    .align 16
    push 0
    push 16
    jmp exc_common
    .align 16
    push 17
    jmp exc_common
    .align 16
    push 0
    push 18
    jmp exc_common
    .align 16
    push 0
    push 19
    jmp exc_common
    .align 16
    push 0
    push 20
    jmp exc_common
    .align 16
    push 21
    jmp exc_common
    .align 16
    push 0
    push 22
    jmp exc_common
    .align 16
    push 0
    push 23
    jmp exc_common
    .align 16
    push 0
    push 24
    jmp exc_common
    .align 16
    push 0
    push 25
    jmp exc_common
    .align 16
    push 0
    push 26
    jmp exc_common
    .align 16
    push 0
    push 27
    jmp exc_common
    .align 16
    push 0
    push 28
    jmp exc_common
    .align 16
    push 29
    jmp exc_common
    .align 16
    push 30
    jmp exc_common
    .align 16
    push 0
    push 31
    jmp exc_common
    .align 16
exc_stubs_end:

# ---------------------------------------------------------------- console
# putc: write AL to COM1 once the transmitter is empty. Clobbers DX.
putc:
    push rax
    mov dx, COM1_LSR
putc_wait:
    in al, dx
    test al, LSR_THR_EMPTY
    jz putc_wait
    pop rax
    mov dx, COM1_DATA
    out dx, al
    ret

# puts: write the NUL-terminated string at RSI. Clobbers RAX, RDX, RSI.
puts:
    mov al, byte ptr [rsi]
    test al, al
    jz puts_done
    call putc
    inc rsi
    jmp puts
puts_done:
    ret

# newline: write "\n". Clobbers RAX, RDX.
newline:
    mov al, 10
    jmp putc

# print_hex: write RDI as "0x" and 16 hex digits. Clobbers RAX, RCX, RDX, RSI.
print_hex:
    mov al, 0x30
    call putc
    mov al, 0x78
    call putc
    mov ecx, 16
print_hex_loop:
    rol rdi, 4
    mov eax, edi
    and eax, 0xf
    lea rsi, [rip + hex_digits]
    mov al, byte ptr [rsi + rax]
    call putc
    dec ecx
    jnz print_hex_loop
    ret

# ---------------------------------------------------------------- data
    .align 16
saved_gdtr:
    .fill 16, 1, 0
saved_idtr:
    .fill 16, 1, 0
catch_idtr:
    .fill 16, 1, 0
saved_rflags:
    .quad 0
saved_cr0:
    .quad 0
saved_cr3:
    .quad 0
saved_cr4:
    .quad 0
saved_dr7:
    .quad 0
saved_msw:
    .quad 0
resume_rip:
    .quad 0
resume_rsp:
    .quad 0
fault_count:
    .quad 0
hex_digits:
    .ascii "0123456789abcdef"
exc_names:
    .asciz "#DE"
    .asciz "#DB"
    .asciz "NMI"
    .asciz "#BP"
    .asciz "#OF"
    .asciz "#BR"
    .asciz "#UD"
    .asciz "#NM"
    .asciz "#DF"
    .asciz "#09"
    .asciz "#TS"
    .asciz "#NP"
    .asciz "#SS"
    .asciz "#GP"
    .asciz "#PF"
    .asciz "#15"
    .asciz "#MF"
    .asciz "#AC"
    .asciz "#MC"
    .asciz "#XM"
    .asciz "#VE"
    .asciz "#CP"
    .asciz "#22"
    .asciz "#23"
    .asciz "#24"
    .asciz "#25"
    .asciz "#26"
    .asciz "#27"
    .asciz "#HV"
    .asciz "#VC"
    .asciz "#SX"
    .asciz "#31"
msg_start:
    .asciz "probe: Popek-Goldberg sensitive instruction probe\n"
msg_step:
    .asciz "probe: "
msg_arrow:
    .asciz "probe:   -> "
msg_err:
    .asciz " err "
msg_at_rip:
    .asciz " at rip "
msg_skipped:
    .asciz ", skipped\n"
msg_unexpected_irq:
    .asciz "probe: unexpected interrupt"
msg_stop:
    .asciz ", stopping\n"
msg_faults:
    .asciz "probe: instructions that raised an exception: "
msg_done:
    .asciz "probe done\n"
n_sgdt:
    .asciz "SGDT [mem]"
n_sidt:
    .asciz "SIDT [mem]"
n_sldt:
    .asciz "SLDT eax"
n_str:
    .asciz "STR eax"
n_smsw:
    .asciz "SMSW eax"
n_pushf:
    .asciz "PUSHFQ"
n_popf:
    .asciz "POPFQ"
n_cpuid:
    .asciz "CPUID (eax=0)"
n_rdtsc:
    .asciz "RDTSC"
n_rdtscp:
    .asciz "RDTSCP"
n_rdpmc:
    .asciz "RDPMC (ecx=0)"
n_in:
    .asciz "IN al, 0x80"
n_out:
    .asciz "OUT 0x80, al"
n_rdmsr:
    .asciz "RDMSR (ecx=0x10, TSC)"
n_wrmsr:
    .asciz "WRMSR (ecx=0xc0000103, TSC_AUX := 0)"
n_read_cr0:
    .asciz "MOV rax, cr0"
n_write_cr0:
    .asciz "MOV cr0, rax (same value)"
n_read_cr3:
    .asciz "MOV rax, cr3"
n_write_cr3:
    .asciz "MOV cr3, rax (same value)"
n_read_cr4:
    .asciz "MOV rax, cr4"
n_read_dr7:
    .asciz "MOV rax, dr7"
n_write_dr7:
    .asciz "MOV dr7, rax (same value)"
n_lmsw:
    .asciz "LMSW ax (the value SMSW read)"
n_clts:
    .asciz "CLTS"
n_invlpg:
    .asciz "INVLPG [mem]"
n_wbinvd:
    .asciz "WBINVD"
n_invd:
    .asciz "INVD"
n_pause:
    .asciz "PAUSE"
n_write_cr4:
    .asciz "MOV cr4, rax (set CR4.OSXSAVE)"
n_xsetbv:
    .asciz "XSETBV (ecx=0, XCR0 := 3)"
n_lgdt:
    .asciz "LGDT [mem] (the value SGDT stored)"
n_lidt:
    .asciz "LIDT [mem] (the value SIDT stored)"
n_lldt:
    .asciz "LLDT ax (null selector)"
