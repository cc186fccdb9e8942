# avic_irq.S - a guest that takes device interrupts through its local APIC,
# for the AVIC experiment (seeds 000 and 002: AVIC "delivering [interrupts]
# directly to guests without exits").
#
# Run on the PC platform (xAPIC at 0xFEE00000).  The guest maps the APIC page
# (uncached, 2 MiB page) into its own tables, installs an IDT gate for the
# device's vector, enables the APIC (SVR) with TPR = 0, and spins with
# interrupts enabled until it has handled N interrupts.  Its handler counts
# the interrupt and writes EOI.  The device is the hypervisor's (port 0xE0: a
# read starts it, once the guest is ready, and returns 0; with no device the
# read floats to 0xFF and the guest ends at once): it raises the vector N times,
# every so often in guest time, whether by a physical interrupt and injection
# (an exit per interrupt, a trapped EOI) or through AVIC.
#
# Parameters (qwords at guest-physical 0xF0000; 0 = the default; the ACPI
# RSDP the PC platform leaves there means "no parameters"):
#   [0xF0000] interrupts N to handle  (default 100)
#   [0xF0008] vector                  (default 0x41)
# Results (qwords at 0xF0800): interrupts handled, EOIs written, loop
# iterations spent waiting, the PPR read after the last EOI.
# Ends by writing 0 to isa-debug-exit (port 0xF4).

    .equ PARAMS, 0xF0000
    .equ RESULTS, 0xF0800
    .equ APIC, 0xFEE00000
    .equ IDT, 0x60000
    .equ APIC_PD, 0x70000

start:
    mov rsi, PARAMS
    mov r14, 100                        # the defaults
    mov r13, 0x41
    mov rax, 0x2052545020445352         # "RSD PTR ": the PC platform's ACPI RSDP sits here
    cmp qword ptr [rsi], rax            # unless the host wrote parameters over it
    je have_v
    mov r14, qword ptr [rsi]
    test r14, r14
    jnz have_n
    mov r14, 100
have_n:
    mov r13, qword ptr [rsi + 8]
    test r13, r13
    jnz have_v
    mov r13, 0x41
have_v:
    # map 0xFEE00000 (PDPT[3] -> a new PD, 2 MiB page with PCD and PWT)
    mov rdi, APIC_PD
    xor eax, eax
    mov ecx, 512
clear_pd:
    mov qword ptr [rdi], rax
    add rdi, 8
    dec ecx
    jnz clear_pd
    mov rax, 0xFEE0009B                 # P, RW, PWT, PCD, PS
    mov rdi, APIC_PD + 0x1F7 * 8
    mov qword ptr [rdi], rax
    mov rax, cr3
    and rax, -4096
    mov rax, qword ptr [rax]            # PML4[0] -> PDPT
    and rax, -4096
    mov rdx, APIC_PD + 3
    mov qword ptr [rax + 3 * 8], rdx    # PDPT[3]: 3 GiB .. 4 GiB
    mov rax, cr3
    mov cr3, rax

    # IDT: one 64-bit interrupt gate for the vector
    mov rdi, IDT
    xor eax, eax
    mov ecx, 512
clear_idt:
    mov qword ptr [rdi], rax
    add rdi, 8
    dec ecx
    jnz clear_idt
    lea rax, [rip + handler]
    mov rdi, r13
    shl rdi, 4
    add rdi, IDT
    mov word ptr [rdi], ax              # offset 15:0
    mov word ptr [rdi + 2], 0x08        # selector
    mov word ptr [rdi + 4], 0x8E00      # present, DPL 0, interrupt gate
    shr rax, 16
    mov word ptr [rdi + 6], ax          # offset 31:16
    shr rax, 16
    mov dword ptr [rdi + 8], eax        # offset 63:32
    sub rsp, 16
    mov word ptr [rsp], 4095
    mov qword ptr [rsp + 2], IDT
    lidt [rsp]
    add rsp, 16

    mov rbx, APIC
    mov dword ptr [rbx + 0x80], 0       # TPR = 0
    mov dword ptr [rbx + 0xF0], 0x1FF   # SVR: APIC software-enabled, spurious vector 0xFF

    xor r15, r15                        # interrupts handled
    xor r12, r12                        # EOIs written
    xor r11, r11                        # loop iterations waiting
    sti
    in al, 0xE0                         # start the device (it raises N interrupts)
    cmp al, 0xFF
    je finish                           # no device on the port (the bus floats high): nothing to wait for
wait:
    inc r11
    pause
    cmp r15, r14
    jb wait
finish:
    cli

    mov rsi, RESULTS
    mov qword ptr [rsi], r15
    mov qword ptr [rsi + 8], r12
    mov qword ptr [rsi + 16], r11
    mov eax, dword ptr [rbx + 0xA0]     # PPR: 0 once every interrupt is done
    mov qword ptr [rsi + 24], rax
    xor eax, eax
    out 0xF4, al
    hlt

handler:
    inc r15
    mov dword ptr [rbx + 0xB0], 0       # EOI
    inc r12
    iretq
