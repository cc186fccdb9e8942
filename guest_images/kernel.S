# kernel.S - a small guest kernel that owns its descriptor tables, its page
# tables and its exception handlers.
#
# What it does, in order:
#   a. builds its own GDT (null, 64-bit code 0x08, data 0x10, 64-bit TSS
#      0x18 whose IST1 stack serves #DF), loads it with LGDT, reloads CS with
#      a far return, reloads SS/DS/ES/FS/GS and loads TR with LTR;
#   b. builds a 256-entry IDT of 64-bit interrupt gates (type 0xE, present,
#      DPL 0, selector 0x08) with handlers for #DE, #BP, #UD, #DF (IST1),
#      #GP and #PF and a default handler for every other vector; LIDT;
#   c. builds its own 4-level page tables identity-mapping [0, 16 MiB) with
#      4 KiB pages, except the page at 0x400000 which is left not present,
#      and switches CR3 to them;
#   d. writes to 0x400000: the #PF handler prints CR2 and the error code,
#      maps the page, INVLPGs it and returns, so the write is retried and
#      succeeds (the value is read back and checked);
#   e. makes a non-canonical memory access: #GP, handled and skipped;
#   f. executes UD2: #UD, handled and skipped;
#   g. executes INT3: #BP, a trap, the handler simply returns;
#   h. divides by zero: #DE, handled and skipped;
#   i. checks that each of the five handlers ran exactly once, prints
#      "kernel: all handlers ran" and EXITs with code 0 (code 1 if a check
#      failed; 2 on a double fault; 3 on an unexpected exception).
#
# Faults that are skipped (#GP, #UD, #DE) resume at an address the kernel
# stores in `resume_rip` just before the faulting instruction. A handler
# that finds `resume_rip` = 0 treats the fault as unexpected and exits.
#
# Memory used by the kernel (all inside guest RAM, identity-mapped):
#   0x200000  PML4            0x201000  PDPT            0x202000  PD
#   0x203000  8 page tables (0x203000 - 0x20AFFF), 2 MiB each
#   0x20B000  IDT (256 x 16 bytes)
#   0x20C000  GDT (5 x 8 bytes)    0x20C100  TSS (104 bytes)
#   0x20D000 - 0x20DFFF  IST1 stack for #DF (top = 0x20E000)
#   0x400000  the page that starts out not present
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

    .equ KPML4, 0x200000
    .equ KPDPT, 0x201000
    .equ KPD, 0x202000
    .equ KPT, 0x203000
    .equ KIDT, 0x20b000
    .equ KGDT, 0x20c000
    .equ KTSS, 0x20c100
    .equ IST1_TOP, 0x20e000
    .equ KAREA_END, 0x20e000
    .equ KAREA_QWORDS, (KAREA_END - KPML4) / 8
    .equ RAM_TOP, 0x1000000
    .equ RAM_PAGES, RAM_TOP / 0x1000
    .equ PROBE_PAGE, 0x400000
    .equ PROBE_VALUE, 0x5a5aa5a5

    .equ SEL_CODE, 0x08
    .equ SEL_DATA, 0x10
    .equ SEL_TSS, 0x18
    .equ GDT_LIMIT, 5 * 8 - 1
    .equ TSS_LIMIT, 104 - 1
    .equ IDT_LIMIT, 256 * 16 - 1
    .equ PTE_P_RW, 3

# ====================================================================
# main line
# ====================================================================
start:
    mov rsp, 0x90000
    cld
    lea rsi, [rip + msg_boot]
    call puts

    # zero the kernel's table area [0x200000, 0x20E000)
    mov rdi, KPML4
    mov rcx, KAREA_QWORDS
    xor eax, eax
    rep stosq

    call setup_gdt
    call setup_idt
    call setup_paging

    # ---- (d) page fault on a not-present page, fixed up by the handler
    lea rsi, [rip + msg_pf_test]
    call puts
    mov rbx, PROBE_PAGE
    mov eax, PROBE_VALUE
    mov qword ptr [rbx], rax
    mov rcx, qword ptr [rbx]
    cmp rcx, rax
    jne fail
    lea rsi, [rip + msg_pf_ok]
    call puts

    # ---- (e) general protection fault: non-canonical address
    lea rsi, [rip + msg_gp_test]
    call puts
    lea rax, [rip + gp_resume]
    mov qword ptr [rip + resume_rip], rax
    mov rbx, 0x8000000000000000
gp_fault_insn:
    mov qword ptr [rbx], 1
gp_resume:

    # ---- (f) invalid opcode
    lea rsi, [rip + msg_ud_test]
    call puts
    lea rax, [rip + ud_resume]
    mov qword ptr [rip + resume_rip], rax
ud_fault_insn:
    ud2
ud_resume:

    # ---- (g) breakpoint: a trap, the saved RIP is already past INT3
    lea rsi, [rip + msg_bp_test]
    call puts
    int3

    # ---- (h) divide error
    lea rsi, [rip + msg_de_test]
    call puts
    lea rax, [rip + de_resume]
    mov qword ptr [rip + resume_rip], rax
    mov eax, 1
    xor edx, edx
    xor ecx, ecx
de_fault_insn:
    div ecx
de_resume:

    # ---- (i) every handler must have run exactly once
    cmp qword ptr [rip + count_pf], 1
    jne fail
    cmp qword ptr [rip + count_gp], 1
    jne fail
    cmp qword ptr [rip + count_ud], 1
    jne fail
    cmp qword ptr [rip + count_bp], 1
    jne fail
    cmp qword ptr [rip + count_de], 1
    jne fail
    lea rsi, [rip + msg_done]
    call puts
    xor edi, edi
    jmp hc_exit

fail:
    lea rsi, [rip + msg_fail]
    call puts
    mov edi, 1
    jmp hc_exit

# hc_exit: EXIT hypercall with the exit code in EDI; does not return.
hc_exit:
    mov eax, HC_EXIT
    vmmcall
hc_exit_halt:
    hlt
    jmp hc_exit_halt

# ====================================================================
# (a) GDT, TSS, segment reload, LTR
# ====================================================================
setup_gdt:
    mov rdi, KGDT
    mov qword ptr [rdi], 0
    # 0x08: 64-bit code. P=1 DPL=0 S=1 type=0xA (execute/read), L=1, G=1
    mov rax, 0x00af9a000000ffff
    mov qword ptr [rdi + 8], rax
    # 0x10: data. P=1 DPL=0 S=1 type=0x2 (read/write), D/B=1, G=1
    mov rax, 0x00cf92000000ffff
    mov qword ptr [rdi + 16], rax
    # 0x18: 16-byte 64-bit TSS descriptor, type 0x9 (available), P=1
    #   low  = limit[15:0] | base[23:0] << 16 | 0x89 << 40
    #          | limit[19:16] << 48 | base[31:24] << 56
    #   high = base[63:32]
    mov rsi, KTSS
    mov rax, rsi
    and eax, 0xffffff
    shl rax, 16
    or rax, TSS_LIMIT
    mov rcx, 0x89
    shl rcx, 40
    or rax, rcx
    mov rcx, rsi
    shr rcx, 24
    and ecx, 0xff
    shl rcx, 56
    or rax, rcx
    mov qword ptr [rdi + 24], rax
    mov rax, rsi
    shr rax, 32
    mov qword ptr [rdi + 32], rax

    # the TSS: RSP0 (offset 4), IST1 (offset 0x24), I/O map base (0x66)
    mov rax, 0x90000
    mov qword ptr [rsi + 4], rax
    mov rax, IST1_TOP
    mov qword ptr [rsi + 0x24], rax
    mov word ptr [rsi + 0x66], 104

    # LGDT
    mov word ptr [rip + gdtr], GDT_LIMIT
    mov qword ptr [rip + gdtr + 2], rdi
    lgdt [rip + gdtr]

    # reload CS with a far return: the stack holds RIP, then CS above it
    push SEL_CODE
    lea rax, [rip + setup_gdt_cs_reloaded]
    push rax
    retfq
setup_gdt_cs_reloaded:
    mov ax, SEL_DATA
    mov ss, ax
    mov ds, ax
    mov es, ax
    xor eax, eax
    mov fs, ax
    mov gs, ax
    mov ax, SEL_TSS
    ltr ax

    lea rsi, [rip + msg_gdt]
    call puts
    mov ax, cs
    movzx edi, ax
    call print_hex
    lea rsi, [rip + msg_gdt_tr]
    call puts
    str eax
    movzx edi, ax
    call print_hex
    call newline
    ret

# ====================================================================
# (b) IDT
# ====================================================================
setup_idt:
    push rbx
    xor ebx, ebx
setup_idt_default_loop:
    mov edi, ebx
    lea rsi, [rip + isr_default]
    xor edx, edx
    call set_gate
    inc ebx
    cmp ebx, 256
    jb setup_idt_default_loop

    mov edi, 0
    lea rsi, [rip + isr_de]
    xor edx, edx
    call set_gate
    mov edi, 3
    lea rsi, [rip + isr_bp]
    xor edx, edx
    call set_gate
    mov edi, 6
    lea rsi, [rip + isr_ud]
    xor edx, edx
    call set_gate
    mov edi, 8
    lea rsi, [rip + isr_df]
    mov edx, 1
    call set_gate
    mov edi, 13
    lea rsi, [rip + isr_gp]
    xor edx, edx
    call set_gate
    mov edi, 14
    lea rsi, [rip + isr_pf]
    xor edx, edx
    call set_gate

    mov word ptr [rip + idtr], IDT_LIMIT
    mov rax, KIDT
    mov qword ptr [rip + idtr + 2], rax
    lidt [rip + idtr]
    lea rsi, [rip + msg_idt]
    call puts
    pop rbx
    ret

# set_gate: IDT entry EDI := 64-bit interrupt gate to RSI, IST index EDX.
#   low  = offset[15:0] | 0x08 << 16 | ist << 32 | 0x8E << 40
#          | offset[31:16] << 48
#   high = offset[63:32]
# Clobbers RAX, RCX, RDI.
set_gate:
    mov edi, edi
    shl rdi, 4
    mov rax, KIDT
    add rdi, rax
    mov rax, rsi
    and eax, 0xffff
    or eax, SEL_CODE << 16
    mov ecx, edx
    and ecx, 7
    shl rcx, 32
    or rax, rcx
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

# ====================================================================
# (c) page tables
# ====================================================================
setup_paging:
    # PML4[0] -> PDPT, PDPT[0] -> PD
    mov rdi, KPML4
    mov rax, KPDPT | PTE_P_RW
    mov qword ptr [rdi], rax
    mov rdi, KPDPT
    mov rax, KPD | PTE_P_RW
    mov qword ptr [rdi], rax
    # PD[0..7] -> the eight page tables
    mov rdi, KPD
    mov rax, KPT | PTE_P_RW
    mov ecx, 8
setup_paging_pd_loop:
    mov qword ptr [rdi], rax
    add rax, 0x1000
    add rdi, 8
    dec ecx
    jnz setup_paging_pd_loop
    # 4096 PTEs: virtual page i -> physical page i
    mov rdi, KPT
    mov eax, PTE_P_RW
    mov ecx, RAM_PAGES
setup_paging_pt_loop:
    mov qword ptr [rdi], rax
    add rax, 0x1000
    add rdi, 8
    dec ecx
    jnz setup_paging_pt_loop
    # leave the probe page not present
    mov rdi, PROBE_PAGE
    call pte_address
    mov qword ptr [rax], 0
    # switch to the new tables
    mov rax, KPML4
    mov cr3, rax
    lea rsi, [rip + msg_paging]
    call puts
    ret

# pte_address: RAX := address of the PTE that maps virtual address RDI
# (RDI < RAM_TOP; the page tables are contiguous from KPT).
pte_address:
    mov rax, rdi
    shr rax, 12
    shl rax, 3
    add rax, KPT
    ret

# ====================================================================
# exception handlers
#
# Each handler saves the registers it (and the print helpers) use.
# With the six pushes below, the interrupt frame is at:
#   vectors with an error code:  [rsp+48] error code, [rsp+56] RIP,
#                                [rsp+64] CS, [rsp+72] RFLAGS, [rsp+80] RSP
#   vectors without one:         [rsp+48] RIP, [rsp+56] CS, ...
# ====================================================================

# #PF (14): error code. Map the page and retry the access.
isr_pf:
    push rax
    push rcx
    push rdx
    push rbx
    push rsi
    push rdi
    mov rbx, cr2
    lea rsi, [rip + msg_pf_at]
    call puts
    mov rdi, rbx
    call print_hex
    lea rsi, [rip + msg_err]
    call puts
    mov rdi, qword ptr [rsp + 48]
    call print_hex
    lea rsi, [rip + msg_rip]
    call puts
    mov rdi, qword ptr [rsp + 56]
    call print_hex
    call newline
    # only a not-present fault (error code bit 0 clear) below RAM_TOP is fixable
    test byte ptr [rsp + 48], 1
    jnz unexpected
    mov rax, RAM_TOP
    cmp rbx, rax
    jae unexpected
    mov rdi, rbx
    call pte_address
    mov rcx, rbx
    and rcx, -4096
    or rcx, PTE_P_RW
    mov qword ptr [rax], rcx
    invlpg [rbx]
    inc qword ptr [rip + count_pf]
    pop rdi
    pop rsi
    pop rbx
    pop rdx
    pop rcx
    pop rax
    add rsp, 8
    iretq

# #GP (13): error code. Print it and the faulting RIP, resume at resume_rip.
isr_gp:
    push rax
    push rcx
    push rdx
    push rbx
    push rsi
    push rdi
    lea rsi, [rip + msg_gp]
    call puts
    mov rdi, qword ptr [rsp + 48]
    call print_hex
    lea rsi, [rip + msg_rip]
    call puts
    mov rdi, qword ptr [rsp + 56]
    call print_hex
    call newline
    mov rax, qword ptr [rip + resume_rip]
    test rax, rax
    jz unexpected
    mov qword ptr [rsp + 56], rax
    mov qword ptr [rip + resume_rip], 0
    inc qword ptr [rip + count_gp]
    pop rdi
    pop rsi
    pop rbx
    pop rdx
    pop rcx
    pop rax
    add rsp, 8
    iretq

# #UD (6): no error code. Print the faulting RIP, resume at resume_rip.
isr_ud:
    push rax
    push rcx
    push rdx
    push rbx
    push rsi
    push rdi
    lea rsi, [rip + msg_ud]
    call puts
    mov rdi, qword ptr [rsp + 48]
    call print_hex
    call newline
    mov rax, qword ptr [rip + resume_rip]
    test rax, rax
    jz unexpected
    mov qword ptr [rsp + 48], rax
    mov qword ptr [rip + resume_rip], 0
    inc qword ptr [rip + count_ud]
    pop rdi
    pop rsi
    pop rbx
    pop rdx
    pop rcx
    pop rax
    iretq

# #DE (0): no error code. Print the faulting RIP, resume at resume_rip.
isr_de:
    push rax
    push rcx
    push rdx
    push rbx
    push rsi
    push rdi
    lea rsi, [rip + msg_de]
    call puts
    mov rdi, qword ptr [rsp + 48]
    call print_hex
    call newline
    mov rax, qword ptr [rip + resume_rip]
    test rax, rax
    jz unexpected
    mov qword ptr [rsp + 48], rax
    mov qword ptr [rip + resume_rip], 0
    inc qword ptr [rip + count_de]
    pop rdi
    pop rsi
    pop rbx
    pop rdx
    pop rcx
    pop rax
    iretq

# #BP (3): a trap, no error code; the saved RIP already points past INT3.
isr_bp:
    push rax
    push rcx
    push rdx
    push rbx
    push rsi
    push rdi
    lea rsi, [rip + msg_bp]
    call puts
    mov rdi, qword ptr [rsp + 48]
    call print_hex
    call newline
    inc qword ptr [rip + count_bp]
    pop rdi
    pop rsi
    pop rbx
    pop rdx
    pop rcx
    pop rax
    iretq

# #DF (8): runs on the IST1 stack; a double fault cannot be resumed.
isr_df:
    lea rsi, [rip + msg_df]
    call puts
    mov rdi, rsp
    call print_hex
    lea rsi, [rip + msg_stopping]
    call puts
    mov edi, 2
    jmp hc_exit

# every other vector
isr_default:
    lea rsi, [rip + msg_default]
    call puts
    mov edi, 3
    jmp hc_exit

# a handler met a fault it cannot resolve
unexpected:
    lea rsi, [rip + msg_unexpected]
    call puts
    mov edi, 3
    jmp hc_exit

# ====================================================================
# console helpers
# ====================================================================

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

# ====================================================================
# data
# ====================================================================
    .align 16
gdtr:
    .fill 16, 1, 0
idtr:
    .fill 16, 1, 0
resume_rip:
    .quad 0
count_pf:
    .quad 0
count_gp:
    .quad 0
count_ud:
    .quad 0
count_bp:
    .quad 0
count_de:
    .quad 0
hex_digits:
    .ascii "0123456789abcdef"
msg_boot:
    .asciz "kernel: booting\n"
msg_gdt:
    .asciz "kernel: own GDT loaded, CS="
msg_gdt_tr:
    .asciz " TR="
msg_idt:
    .asciz "kernel: own IDT loaded (256 gates)\n"
msg_paging:
    .asciz "kernel: own page tables loaded, 0x400000 not present\n"
msg_pf_test:
    .asciz "kernel: writing to 0x400000\n"
msg_pf_ok:
    .asciz "kernel: 0x400000 mapped on demand, value read back\n"
msg_gp_test:
    .asciz "kernel: non-canonical access\n"
msg_ud_test:
    .asciz "kernel: ud2\n"
msg_bp_test:
    .asciz "kernel: int3\n"
msg_de_test:
    .asciz "kernel: divide by zero\n"
msg_done:
    .asciz "kernel: all handlers ran\n"
msg_fail:
    .asciz "kernel: FAILED: a handler did not run exactly once\n"
msg_pf_at:
    .asciz "#PF at "
msg_err:
    .asciz " err "
msg_rip:
    .asciz " rip "
msg_gp:
    .asciz "#GP err "
msg_ud:
    .asciz "#UD at rip "
msg_de:
    .asciz "#DE at rip "
msg_bp:
    .asciz "#BP, resuming at rip "
msg_df:
    .asciz "#DF: double fault on the IST1 stack, rsp "
msg_stopping:
    .asciz ", stopping\n"
msg_default:
    .asciz "kernel: unexpected interrupt or exception, stopping\n"
msg_unexpected:
    .asciz "kernel: exception the handler cannot resolve, stopping\n"
