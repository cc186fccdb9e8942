# pg_probe.S - Popek and Goldberg's test, run by a small kernel: first the
# privileged instructions a kernel uses to set itself up (LGDT, LIDT, LLDT,
# LTR, MOV CR0 setting TS, CLI), then every sensitive instruction x86 lets
# any privilege level execute, each result stored for the host to compare
# with what a real ring-0 kernel sees (the values this kernel just loaded).
#
# Run it under SVM (sandbox run guest_images/pg_probe.S --intercept
# sensitive: each of the first seven probes exits) or in classic mode
# (the kernel deprivileged to ring 3, sandbox/hypervisor/classic.py: the
# privileged set-up instructions trap, the probes do not, and they see the
# monitor's state).  sandbox experiment popek-goldberg runs both.
#
# Parameter (qword at guest-physical 0xF0000; 0 = all): a mask of phases,
#   1 LGDT, LIDT -> SGDT, SIDT        2 LLDT, LTR -> SLDT, STR
#   4 MOV CR0 (TS) -> SMSW            8 CLI -> PUSHF, POPF
#   16 LGDT -> LAR, LSL, VERR, VERW, MOV from CS and SS
#
# Before each step the kernel writes the step number to guest-physical
# 0xF07F8, so the host can tell which step an exit belongs to.  Results
# (qwords at 0xF0800):
#   +0x00 SGDT (limit in bits 15:0, base from byte 2)   +0x10 SIDT (same)
#   +0x20 SLDT   +0x28 STR   +0x30 SMSW   +0x38 PUSHF after CLI
#   +0x40 PUSHF after POPF of IF=1 (step 16 also makes a 0x50 hypercall:
#         the host notes the interrupt flag the VM really has)
#   +0x48 LAR 0x08 (access rights)  +0x50 its ZF   +0x58 LSL 0x28  +0x60 its ZF
#   +0x68 VERR 0x08 ZF   +0x70 VERW 0x10 ZF   +0x78 CS   +0x80 SS
# The kernel's tables: GDT 0x60000 (null, 64-bit code 0x08 and data 0x10 at
# DPL 0, an LDT descriptor 0x18 -> 0x63000, a 64-bit TSS 0x28 -> 0x62000,
# limit 0x37), IDT 0x61000 (limit 0xFFF, empty).  CR0 = the loader's
# 0x80010033 with TS set.  Exit code 0.  Entry state: the loader's.

    .equ PARAMS, 0xF0000
    .equ RES, 0xF0800
    .equ STEP, 0xF07F8
    .equ DESC, 0xF0700
    .equ GDT, 0x60000

start:
    mov rbp, RES
    mov r12, STEP
    # the kernel's GDT
    mov rdi, GDT
    mov qword ptr [rdi], 0
    mov rax, 0x00AF9B000000FFFF
    mov qword ptr [rdi + 0x08], rax
    mov rax, 0x00CF93000000FFFF
    mov qword ptr [rdi + 0x10], rax
    mov rax, 0x0000820630000FFF         # LDT, base 0x63000, limit 0xFFF, P, DPL 0
    mov qword ptr [rdi + 0x18], rax
    mov qword ptr [rdi + 0x20], 0
    mov rax, 0x0000890620000067         # 64-bit TSS, base 0x62000, limit 0x67, P, DPL 0
    mov qword ptr [rdi + 0x28], rax
    mov qword ptr [rdi + 0x30], 0
    # pseudo-descriptors: GDTR (0x37, 0x60000) at DESC, IDTR (0xFFF, 0x61000) at DESC + 16
    mov rsi, DESC
    mov word ptr [rsi], 0x37
    mov qword ptr [rsi + 2], GDT
    mov word ptr [rsi + 16], 0xFFF
    mov qword ptr [rsi + 18], 0x61000

    mov r13, PARAMS
    mov r13, qword ptr [r13]
    test r13, r13
    jnz have_mask
    mov r13, 0x1F
have_mask:

    # ---- phase 1: descriptor-table registers
    test r13, 1
    jz phase2
    mov qword ptr [r12], 1
    lgdt [rsi]
    mov qword ptr [r12], 2
    lidt [rsi + 16]
    mov qword ptr [r12], 10
    sgdt [rbp]
    mov qword ptr [r12], 11
    sidt [rbp + 0x10]
phase2:
    test r13, 2
    jz phase3
    mov qword ptr [r12], 3
    mov ax, 0x18
    lldt ax
    mov qword ptr [r12], 4
    mov ax, 0x28
    ltr ax
    mov qword ptr [r12], 12
    xor eax, eax
    sldt ax
    mov qword ptr [rbp + 0x20], rax
    mov qword ptr [r12], 13
    xor eax, eax
    str ax
    mov qword ptr [rbp + 0x28], rax
phase3:
    test r13, 4
    jz phase4
    mov qword ptr [r12], 5
    mov rax, cr0
    or rax, 8                           # CR0.TS
    mov cr0, rax
    mov qword ptr [r12], 14
    xor eax, eax
    smsw ax
    mov qword ptr [rbp + 0x30], rax
phase4:
    test r13, 8
    jz phase5
    mov qword ptr [r12], 6
    cli
    mov qword ptr [r12], 15
    pushfq
    pop rax
    mov qword ptr [rbp + 0x38], rax
    mov qword ptr [r12], 16
    push 0x202                          # IF = 1
    popfq
    pushfq
    pop rax
    mov qword ptr [rbp + 0x40], rax
    mov eax, 0x50                       # "report": the host notes the VM's interrupt flag
    .byte 0x0f, 0x01, 0xd9
phase5:
    test r13, 16
    jz done
    test r13, 1
    jnz gdt_loaded
    mov qword ptr [r12], 7
    lgdt [rsi]
gdt_loaded:
    mov qword ptr [r12], 17
    mov ecx, 0x08
    xor eax, eax
    lar eax, ecx
    setz dl
    movzx edx, dl
    mov qword ptr [rbp + 0x48], rax
    mov qword ptr [rbp + 0x50], rdx
    mov qword ptr [r12], 18
    mov ecx, 0x28
    xor eax, eax
    lsl eax, ecx
    setz dl
    movzx edx, dl
    mov qword ptr [rbp + 0x58], rax
    mov qword ptr [rbp + 0x60], rdx
    mov qword ptr [r12], 19
    mov cx, 0x08
    verr cx
    setz dl
    movzx edx, dl
    mov qword ptr [rbp + 0x68], rdx
    mov qword ptr [r12], 20
    mov cx, 0x10
    verw cx
    setz dl
    movzx edx, dl
    mov qword ptr [rbp + 0x70], rdx
    mov qword ptr [r12], 21
    xor eax, eax
    mov ax, cs
    mov qword ptr [rbp + 0x78], rax
    mov qword ptr [r12], 22
    xor eax, eax
    mov ax, ss
    mov qword ptr [rbp + 0x80], rax
done:
    mov qword ptr [r12], 99
    xor edi, edi
    xor eax, eax
    .byte 0x0f, 0x01, 0xd9
