# nested_tsc.S - an L1 hypervisor that runs an L2 guest and reads the TSC at
# each level, for the nested-TSC experiment (seed 000: "T_L2 = T_H + d1 + d2").
#
# L1 enables SVM (EFER.SVME, VM_HSAVE_PA), builds a VMCB for its L2 in its own
# memory (APM vol. 2 Table B-1/B-2 offsets) with TSC_OFFSET = d2 and the
# VMRUN and VMMCALL intercepts, and no nested paging: L2 runs on L1's own
# identity page tables.  Neither level intercepts RDTSC, so each reads
# TSC + its TSC_OFFSET natively (APM §15.30.4); L0 gives L1 d1 in its VMCB.
#
# Each round:
#   h0 = hypercall HOST_TSC (L0 reads its own TSC at the exit)
#   a  = RDTSC in L1
#   VMRUN -> L2: b = RDTSC; VMMCALL (intercepted by L1: #VMEXIT to L1)
#   c  = RDTSC in L1
#   h1 = hypercall HOST_TSC
# The host TSC only moves forward, so exactly:
#   h0 <= a - d1 <= b - d1 - d2 <= c - d1 <= h1   (mod 2^64)
#
# Parameters (qwords at guest-physical 0xF0000; 0 = the default):
#   [0xF0000] rounds R   (default 8, at most 64)
#   [0xF0008] d2, L2's TSC_OFFSET as L1 sets it (default 0x10000000000)
# Results (qwords at 0xF0800): R, d2 as written into the VMCB, then R
# records of 5 qwords: h0 a b c h1.
# Hypercalls: VMMCALL with RAX = 0 (EXIT, RDI = code); RAX = 0x54534348
# ("HTSC": L0 returns its own TSC in RAX; the experiment's L0 answers it).

    .equ PARAMS, 0xF0000
    .equ RESULTS, 0xF0800
    .equ VMCB12, 0x1A0000
    .equ HSAVE, 0x1A1000
    .equ L2_STACK, 0x1B0000
    .equ HOST_TSC_CALL, 0x54534348

start:
    mov rsi, PARAMS
    mov r14, qword ptr [rsi]
    test r14, r14
    jnz have_r
    mov r14, 8
have_r:
    cmp r14, 64
    jbe r_ok
    mov r14, 64
r_ok:
    mov r12, qword ptr [rsi + 8]
    test r12, r12
    jnz have_d2
    mov r12, 0x10000000000
have_d2:
    # EFER.SVME and VM_HSAVE_PA
    mov ecx, 0xC0000080
    rdmsr
    or eax, 0x1000
    wrmsr
    mov ecx, 0xC0010117
    mov eax, HSAVE
    xor edx, edx
    wrmsr

    # clear the VMCB page
    mov rdi, VMCB12
    xor eax, eax
    mov ecx, 512
clear:
    mov qword ptr [rdi], rax
    add rdi, 8
    dec ecx
    jnz clear

    mov rdi, VMCB12
    mov dword ptr [rdi + 0x10], 3           # INTERCEPT_MISC2: VMRUN (bit 0), VMMCALL (bit 1)
    mov qword ptr [rdi + 0x50], r12         # TSC_OFFSET = d2
    mov dword ptr [rdi + 0x58], 1           # GUEST_ASID
    # segments: selector, attrib, limit, base (16 bytes each)
    mov rax, 0xFFFFFFFF029B0008             # CS 0x08, attrib 0x29B (64-bit code)
    mov qword ptr [rdi + 0x410], rax
    mov rax, 0xFFFFFFFF0C930010             # data 0x10, attrib 0xC93
    mov qword ptr [rdi + 0x400], rax        # ES
    mov qword ptr [rdi + 0x420], rax        # SS
    mov qword ptr [rdi + 0x430], rax        # DS
    sub rsp, 16
    sgdt [rsp]
    movzx eax, word ptr [rsp]
    mov dword ptr [rdi + 0x464], eax        # GDTR limit
    mov rax, qword ptr [rsp + 2]
    mov qword ptr [rdi + 0x468], rax        # GDTR base
    add rsp, 16
    mov rax, cr4
    mov qword ptr [rdi + 0x548], rax
    mov rax, cr3
    mov qword ptr [rdi + 0x550], rax
    mov rax, cr0
    mov qword ptr [rdi + 0x558], rax
    mov qword ptr [rdi + 0x560], 0x400      # DR7
    mov eax, 0xFFFF0FF0
    mov qword ptr [rdi + 0x568], rax        # DR6
    mov ecx, 0xC0000080
    rdmsr
    shl rdx, 32
    or rax, rdx
    mov qword ptr [rdi + 0x4D0], rax        # EFER (SVME included)
    mov rax, 0x0007040600070406
    mov qword ptr [rdi + 0x668], rax        # G_PAT
    mov qword ptr [rdi + 0x5D8], L2_STACK   # RSP

    mov rsi, RESULTS
    mov qword ptr [rsi], r14
    mov qword ptr [rsi + 8], r12            # d2
    lea r15, [rsi + 16]                     # the current record
    xor r13, r13                            # rounds done

round:
    mov eax, HOST_TSC_CALL
    .byte 0x0f, 0x01, 0xd9              # VMMCALL
    mov qword ptr [r15], rax                # h0
    rdtsc
    shl rdx, 32
    or rax, rdx
    mov qword ptr [r15 + 8], rax            # a: L1
    mov rdi, VMCB12
    lea rax, [rip + l2_entry]
    mov qword ptr [rdi + 0x578], rax        # RIP
    mov qword ptr [rdi + 0x570], 2          # RFLAGS
    mov rax, rdi
    vmrun rax
    rdtsc
    shl rdx, 32
    or rax, rdx
    mov qword ptr [r15 + 24], rax           # c: L1
    mov eax, HOST_TSC_CALL
    .byte 0x0f, 0x01, 0xd9              # VMMCALL
    mov qword ptr [r15 + 32], rax           # h1
    mov rdi, VMCB12
    cmp qword ptr [rdi + 0x70], 0x81        # L2 left by its VMMCALL?
    jne fail
    add r15, 40
    inc r13
    cmp r13, r14
    jb round

    xor edi, edi
    xor eax, eax
    .byte 0x0f, 0x01, 0xd9              # VMMCALL
fail:
    mov edi, 1
    xor eax, eax
    .byte 0x0f, 0x01, 0xd9              # VMMCALL

l2_entry:                                   # L2: one RDTSC into the record L1 points at (r15)
    rdtsc
    shl rdx, 32
    or rax, rdx
    mov qword ptr [r15 + 16], rax           # b: L2
    .byte 0x0f, 0x01, 0xd9              # VMMCALL
