# sev_secrets.S - an SEV guest that keeps one secret private and shares another.
#
# Run it encrypted:  sandbox run guest_images/sev_secrets.S --sev --dump-host-memory dram.bin
#
# The loader's page tables start with the C-bit (bit 47, CPUID Fn8000_001F
# EBX[5:0]) set in every entry, so all guest memory is private.  The guest
#   1. copies PRIVATE_SECRET into the private page at 0x1C0000;
#   2. makes the page at 0x1C1000 shared by clearing the C-bit in its own
#      page-table entry (walking its tables from CR3) and INVLPG;
#   3. copies SHARED_SECRET into the shared page;
#   4. prints both pages back over COM1 (port I/O: the hypervisor sees AL,
#      never guest memory) and exits with code 0.
# Expected console:
#   private page: FORTRESS-PRIVATE-7f3a9c5e
#   shared page: SHARED-BOUNCE-1b2e
# A dump of host DRAM afterwards holds the shared secret in plaintext and the
# private one nowhere (its page, and this code page, are ciphertext).

    .equ COM1_DATA, 0x3f8
    .equ COM1_LSR, 0x3fd
    .equ PRIVATE_PAGE, 0x1c0000
    .equ SHARED_PAGE, 0x1c1000

start:
    lea rsi, [rip + private_secret]
    mov rdi, PRIVATE_PAGE
    call strcpy

    mov rdi, SHARED_PAGE
    call make_shared

    lea rsi, [rip + shared_secret]
    mov rdi, SHARED_PAGE
    call strcpy

    lea rsi, [rip + msg_private]
    call serial_puts
    mov rsi, PRIVATE_PAGE
    call serial_puts
    lea rsi, [rip + msg_newline]
    call serial_puts
    lea rsi, [rip + msg_shared]
    call serial_puts
    mov rsi, SHARED_PAGE
    call serial_puts
    lea rsi, [rip + msg_newline]
    call serial_puts

    xor eax, eax
    xor edi, edi
    .byte 0x0f,0x01,0xd9

halt_forever:
    hlt
    jmp halt_forever

# make_shared: clear the C-bit in the 4 KiB PTE mapping RDI (identity-mapped
# tables) and drop its TLB entry.  Clobbers RAX, RCX, RDX.
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

# strcpy: copy the NUL-terminated string at RSI to RDI.  Clobbers AL, RSI, RDI.
strcpy:
    mov al, byte ptr [rsi]
    mov byte ptr [rdi], al
    inc rsi
    inc rdi
    test al, al
    jnz strcpy
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

    .align 16
private_secret:
    .asciz "FORTRESS-PRIVATE-7f3a9c5e"
shared_secret:
    .asciz "SHARED-BOUNCE-1b2e"
msg_private:
    .asciz "private page: "
msg_shared:
    .asciz "shared page: "
msg_newline:
    .asciz "\n"
