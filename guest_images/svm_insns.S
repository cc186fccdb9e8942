# svm_insns.S - a probe of the SVM instructions and of the other
# instructions that raise #UD (or #DB) in a guest unless the hypervisor
# intercepts them: VMRUN, VMLOAD, VMSAVE, STGI, CLGI, INVLPGA, SKINIT,
# MONITOR, MWAIT and ICEBP.
#
# Every step prints its name on COM1 ("svm: <name>") and then executes
# exactly one of those instructions, so an exit trace shows which one
# caused each intercept:
#   VMRUN rax (rax = 0x10000), VMLOAD rax (rax = 0x10000), VMSAVE rax
#   (rax = 0x10000), STGI, CLGI, INVLPGA rax, ecx (rax = a mapped address,
#   ecx = ASID 0), SKINIT eax (eax = 0x10000), MONITOR (rax = a mapped
#   address, ecx = edx = 0), MWAIT (eax = ecx = 0), ICEBP.
# Then it prints "svm probe done" and executes HLT, which ends the run.
#
# The file is meant to be run with all of these intercepted (for example
# `--intercept sensitive`); it uses no hypercall, only COM1 and HLT.
#
# Exception catcher: a guest without nested virtualization gets #UD for the
# SVM instructions (from the processor, or injected by the hypervisor after
# the intercept), MONITOR/MWAIT raise #UD on a processor model without
# them, and ICEBP raises #DB. Before the first step the probe loads a small
# IDT (at 0x30000) whose handlers print the exception ("  -> #UD at rip
# 0x...") and continue with the next step. Loading it is one LIDT before the
# first step.
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
    .equ CATCH_IDT, 0x30000
    .equ CATCH_IDT_LIMIT, 256 * 16 - 1
    .equ VMCB_ADDR, 0x10000
    .equ SLB_ADDR, 0x10000
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

p_vmrun:
    lea rsi, [rip + n_vmrun]
    lea rdi, [rip + p_vmload]
    call step
    mov eax, VMCB_ADDR
    vmrun rax

p_vmload:
    lea rsi, [rip + n_vmload]
    lea rdi, [rip + p_vmsave]
    call step
    mov eax, VMCB_ADDR
    vmload rax

p_vmsave:
    lea rsi, [rip + n_vmsave]
    lea rdi, [rip + p_stgi]
    call step
    mov eax, VMCB_ADDR
    vmsave rax

p_stgi:
    lea rsi, [rip + n_stgi]
    lea rdi, [rip + p_clgi]
    call step
    stgi

p_clgi:
    lea rsi, [rip + n_clgi]
    lea rdi, [rip + p_invlpga]
    call step
    clgi

p_invlpga:
    lea rsi, [rip + n_invlpga]
    lea rdi, [rip + p_skinit]
    call step
    lea rax, [rip + monitor_line]
    xor ecx, ecx
    invlpga rax, ecx

p_skinit:
    lea rsi, [rip + n_skinit]
    lea rdi, [rip + p_monitor]
    call step
    mov eax, SLB_ADDR
    skinit eax

p_monitor:
    lea rsi, [rip + n_monitor]
    lea rdi, [rip + p_mwait]
    call step
    lea rax, [rip + monitor_line]
    xor ecx, ecx
    xor edx, edx
    monitor

p_mwait:
    lea rsi, [rip + n_mwait]
    lea rdi, [rip + p_icebp]
    call step
    xor eax, eax
    xor ecx, ecx
    mwait

p_icebp:
    lea rsi, [rip + n_icebp]
    lea rdi, [rip + p_done]
    call step
    icebp

p_done:
    mov qword ptr [rip + resume_rip], 0
    lea rsi, [rip + msg_faults]
    call puts
    mov rdi, qword ptr [rip + fault_count]
    call print_hex
    call newline
    lea rsi, [rip + msg_done]
    call puts
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
    .align 64
monitor_line:
    .fill 64, 1, 0
catch_idtr:
    .fill 16, 1, 0
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
    .asciz "svm: SVM and #UD-unless-intercepted instruction probe\n"
msg_step:
    .asciz "svm: "
msg_arrow:
    .asciz "svm:   -> "
msg_err:
    .asciz " err "
msg_at_rip:
    .asciz " at rip "
msg_skipped:
    .asciz ", skipped\n"
msg_unexpected_irq:
    .asciz "svm: unexpected interrupt"
msg_stop:
    .asciz ", stopping\n"
msg_faults:
    .asciz "svm: instructions that raised an exception: "
msg_done:
    .asciz "svm probe done\n"
n_vmrun:
    .asciz "VMRUN rax (rax=0x10000)"
n_vmload:
    .asciz "VMLOAD rax (rax=0x10000)"
n_vmsave:
    .asciz "VMSAVE rax (rax=0x10000)"
n_stgi:
    .asciz "STGI"
n_clgi:
    .asciz "CLGI"
n_invlpga:
    .asciz "INVLPGA rax, ecx (ecx=0)"
n_skinit:
    .asciz "SKINIT eax (eax=0x10000)"
n_monitor:
    .asciz "MONITOR (rax=mapped line, ecx=edx=0)"
n_mwait:
    .asciz "MWAIT (eax=ecx=0)"
n_icebp:
    .asciz "ICEBP"
