# sev_es_vc.S - an SEV-ES guest with a #VC handler that talks to the hypervisor through a GHCB.
#
# Run:  sandbox run guest_images/sev_es_vc.S --sev-es
# It also runs unencrypted or with plain --sev: then CPUID, port I/O and
# RDMSR exit to the hypervisor directly and the #VC handler is never used.
#
# 1. Builds an IDT whose vector 29 (#VC) gate points at vc_handler.
# 2. Makes the GHCB page (0x1C3000) shared (clears the C-bit in its PTE) and
#    writes its GPA to the GHCB MSR C001_0130h.
# 3. Prints over COM1 (each OUT is a #VC -> GHCB IOIO request -> VMGEXIT),
#    reads CPUID Fn8000_001F (the C-bit position, through the GHCB) and
#    RDMSR 0x1B (APIC base), prints them in hex, and exits with the EXIT
#    hypercall (VMMCALL -> #VC -> GHCB VMMCALL request).
# Expected console:
#   SEV-ES guest: #VC handler ready
#   cbit=000000000000002f
#   apicbase=00000000fee00900
#
# vc_handler: the error code is the exit code (APM §15.35.5).  It fills the
# GHCB (SW_EXITCODE 390h, SW_EXITINFO1 398h, SW_EXITINFO2 3A0h, RAX 1F8h,
# RBX 318h, RCX 308h, RDX 310h, RDI 338h; valid bitmap 3F0h, bit = offset/8),
# executes VMGEXIT (F3 0F 01 D9), copies the results back into the saved
# registers, skips the instruction that raised #VC and IRETQs.  A GHCB error
# (SW_EXITINFO1 != 0) or an exit code it does not know ends the guest with HLT.

    .equ IDT, 0x60000
    .equ GHCB, 0x1c3000
    .equ COM1_DATA, 0x3f8
    .equ COM1_LSR, 0x3fd

start:
    # IDT gate for vector 29: selector 0x08, present, DPL 0, 64-bit interrupt gate
    mov rdi, IDT
    mov rax, vc_handler
    mov rdx, rax
    and edx, 0xffff
    mov rcx, 0x00008e0000080000
    or rdx, rcx
    mov rcx, rax
    shr rcx, 16
    shl rcx, 48
    or rdx, rcx
    mov [rdi + 29*16], rdx
    mov qword ptr [rdi + 29*16 + 8], 0
    lea rax, [rip + idtr]
    lidt [rax]

    mov rdi, GHCB
    call make_shared
    mov ecx, 0xc0010130
    mov eax, GHCB
    xor edx, edx
    wrmsr

    lea rsi, [rip + msg_ready]
    call serial_puts

    mov eax, 0x8000001f
    xor ecx, ecx
    cpuid
    and ebx, 0x3f
    lea rsi, [rip + msg_cbit]
    call serial_puts
    mov rax, rbx
    call print_hex

    mov ecx, 0x1b
    rdmsr
    shl rdx, 32
    or rax, rdx
    push rax
    lea rsi, [rip + msg_apic]
    call serial_puts
    pop rax
    call print_hex

    xor edi, edi
    xor eax, eax
    .byte 0x0f,0x01,0xd9
halt_forever:
    hlt
    jmp halt_forever

# ------------------------------------------------------------------ #VC
vc_handler:
    push rax
    push rbx
    push rcx
    push rdx
    push rsi
    push rdi
    push r8
    # [rsp] r8, +8 rdi, +16 rsi, +24 rdx, +32 rcx, +40 rbx, +48 rax, +56 error code, +64 RIP
    mov r8, [rsp + 56]
    mov rsi, GHCB
    mov qword ptr [rsi + 0x3f0], 0
    mov qword ptr [rsi + 0x3f8], 0
    mov [rsi + 0x390], r8
    mov qword ptr [rsi + 0x398], 0
    mov qword ptr [rsi + 0x3a0], 0
    # valid: SW_EXITCODE (bit 114), SW_EXITINFO1 (115), SW_EXITINFO2 (116) -> qword 1 bits 50-52
    mov rax, 0x001c000000000000
    mov [rsi + 0x3f8], rax
    cmp r8, 0x72
    je vc_cpuid
    cmp r8, 0x7b
    je vc_ioio
    cmp r8, 0x7c
    je vc_msr
    cmp r8, 0x81
    je vc_vmmcall
    jmp vc_fail

vc_cpuid:
    mov rax, [rsp + 48]
    mov [rsi + 0x1f8], rax
    mov rax, [rsp + 32]
    mov [rsi + 0x308], rax
    bts qword ptr [rsi + 0x3f0], 63
    bts qword ptr [rsi + 0x3f8], 33
    call vmgexit
    mov rax, [rsi + 0x1f8]
    mov [rsp + 48], rax
    mov rax, [rsi + 0x318]
    mov [rsp + 40], rax
    mov rax, [rsi + 0x308]
    mov [rsp + 32], rax
    mov rax, [rsi + 0x310]
    mov [rsp + 24], rax
    mov rax, 2
    jmp vc_done

vc_ioio:
    mov rdi, [rsp + 64]
    movzx eax, byte ptr [rdi]
    mov rdx, [rsp + 24]
    and edx, 0xffff
    shl rdx, 16
    or rdx, 0x210
    cmp eax, 0xee
    je vc_out
    cmp eax, 0xec
    jne vc_fail
    or rdx, 1
    mov [rsi + 0x398], rdx
    call vmgexit
    mov rax, [rsi + 0x1f8]
    and eax, 0xff
    mov rdx, [rsp + 48]
    and rdx, -256
    or rax, rdx
    mov [rsp + 48], rax
    mov rax, 1
    jmp vc_done
vc_out:
    mov [rsi + 0x398], rdx
    mov rax, [rsp + 48]
    mov [rsi + 0x1f8], rax
    bts qword ptr [rsi + 0x3f0], 63
    call vmgexit
    mov rax, 1
    jmp vc_done

vc_msr:
    mov rdi, [rsp + 64]
    cmp byte ptr [rdi + 1], 0x32
    jne vc_fail
    mov rax, [rsp + 32]
    mov [rsi + 0x308], rax
    bts qword ptr [rsi + 0x3f8], 33
    call vmgexit
    mov rax, [rsi + 0x1f8]
    mov [rsp + 48], rax
    mov rax, [rsi + 0x310]
    mov [rsp + 24], rax
    mov rax, 2
    jmp vc_done

vc_vmmcall:
    mov rax, [rsp + 48]
    mov [rsi + 0x1f8], rax
    mov rax, [rsp + 8]
    mov [rsi + 0x338], rax
    bts qword ptr [rsi + 0x3f0], 63
    bts qword ptr [rsi + 0x3f8], 39
    call vmgexit
    mov rax, 3
    jmp vc_done

vc_done:
    add [rsp + 64], rax
    pop r8
    pop rdi
    pop rsi
    pop rdx
    pop rcx
    pop rbx
    pop rax
    add rsp, 8
    iretq

# VMGEXIT, then stop on a GHCB error (SW_EXITINFO1[31:0] != 0)
vmgexit:
    .byte 0xf3,0x0f,0x01,0xd9
    mov eax, dword ptr [rsi + 0x398]
    test eax, eax
    jnz vc_fail
    ret

vc_fail:
    hlt
    jmp vc_fail

# ------------------------------------------------------------------ helpers
make_shared:
    mov rax, cr3
    mov rdx, 0x00007ffffffff000
    and rax, rdx
    mov rcx, rdi
    shr rcx, 39
    and ecx, 0x1ff
    mov rax, [rax + rcx*8]
    and rax, rdx
    mov rcx, rdi
    shr rcx, 30
    and ecx, 0x1ff
    mov rax, [rax + rcx*8]
    and rax, rdx
    mov rcx, rdi
    shr rcx, 21
    and ecx, 0x1ff
    mov rax, [rax + rcx*8]
    and rax, rdx
    mov rcx, rdi
    shr rcx, 12
    and ecx, 0x1ff
    lea rax, [rax + rcx*8]
    mov rcx, 1
    shl rcx, 47
    not rcx
    and [rax], rcx
    invlpg [rdi]
    ret

serial_putc:
    push rax
    mov dx, COM1_LSR
serial_putc_wait:
    in al, dx
    test al, 0x20
    jz serial_putc_wait
    pop rax
    mov dx, COM1_DATA
    out dx, al
    ret

serial_puts:
    mov al, byte ptr [rsi]
    test al, al
    jz serial_puts_done
    call serial_putc
    inc rsi
    jmp serial_puts
serial_puts_done:
    ret

# print_hex: RAX as 16 hex digits and a newline
print_hex:
    mov rbx, rax
    mov ecx, 16
print_hex_loop:
    rol rbx, 4
    mov eax, ebx
    and eax, 0xf
    cmp eax, 10
    jb print_hex_digit
    add eax, 0x27
print_hex_digit:
    add eax, 0x30
    push rcx
    call serial_putc
    pop rcx
    dec ecx
    jnz print_hex_loop
    mov al, 0x0a
    call serial_putc
    ret

    .align 16
idtr:
    .word 256*16-1
    .quad IDT
msg_ready:
    .asciz "SEV-ES guest: #VC handler ready\n"
msg_cbit:
    .asciz "cbit="
msg_apic:
    .asciz "apicbase="
