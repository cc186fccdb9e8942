# mixed_workload.S - a guest with CPU-bound and I/O phases, for the seed's
# exit-rate model (lambda = lambda_cpu + lambda_io).  Each round:
#
#   CPU phase: S "system calls" - W iterations of user work each, then the
#              kernel writes IA32_TSC_AUX (WRMSR), and every 8th call asks
#              CPUID; then the round's working set of P pages is read and
#              written, and the kernel switches address space (MOV CR3
#              between two page-table roots that map the same memory).
#   I/O phase: B bytes of console output, through the 16550 UART (poll the
#              line status register, write the byte) or through a virtio
#              console (one buffer of B bytes and one QueueNotify); then,
#              with I > 0, the round waits (spinning with IF set) until the
#              device's interrupts of this round -- I of them -- are handled.
#
# Interrupts (I > 0; needs the PC platform's local APIC at 0xFEE00000): the
# guest maps the APIC page (uncached, 2 MiB) into its tables, installs an
# IDT gate for the vector, enables the APIC (TPR = 0, SVR), sets IF and
# starts the device (a read of port 0xE0; with no device the read floats to
# 0xFF and the guest takes no interrupts).  The device raises the vector
# R x I times; the handler counts it and writes EOI.
#
# The same guest runs under a pre-2008 feature set and a modern one; the
# host checks that the console bytes and the checksum are the same.
#
# Parameters (qwords at guest-physical 0xF0000; 0 = the default; the ACPI
# RSDP the PC platform leaves there means "no parameters"):
#   [0xF0000] rounds R                          (default 100)
#   [0xF0008] system calls per round S          (default 32)
#   [0xF0010] work iterations per call W        (default 50)
#   [0xF0018] console bytes per round B         (default 64)
#   [0xF0020] console: 0 or 1 = UART, 2 = virtio (default UART)
#   [0xF0028] GPA of the virtio-mmio registers  (default 0x1F0000)
#   [0xF0030] pages in the working set P, <= 64 (default 16)
#   [0xF0038] device interrupts per round I     (default 0: none)
#   [0xF0040] their vector, 32..255             (default 0x41)
# Results (qwords at 0xF0800): checksum, console bytes sent, rounds done,
# QueueNotify writes, interrupts handled, EOIs written.  Exit codes: 0 done;
# 1 bad parameter; 2 no virtio console; 3 features refused; 4 queue
# unusable; 5 buffer not returned.  The end is the EXIT hypercall; where
# VMMCALL returns (the PC platform's KVM ABI) the code goes to isa-debug-exit
# (port 0xF4).
#
# The console payload is the LCG stream of virtio_console.S
# (x = x * 1103515245 + 12345, byte = 0x30 + ((x >> 16) & 0x3F), from
# x = 0x12345678), generated up front at 0x240000 (R x B <= 1 MiB).
# Working set at 0x380000; second PML4 at 0x1B0000; virtqueue at 0x1C0000;
# the APIC's page directory at 0x1A0000, the IDT at 0x1A1000
# (64 entries, as in virtio_console.S).  Needs 4 MiB of guest RAM.
# Entry state: the loader's (see README "Guest images").

    .equ PARAMS, 0xF0000
    .equ RESULTS, 0xF0800
    .equ PAYLOAD, 0x240000
    .equ WSET, 0x380000
    .equ PML4_B, 0x1B0000
    .equ VQ, 0x1C0000
    .equ QSZ, 64
    .equ MSR_TSC_AUX, 0xC0000103
    .equ APIC, 0xFEE00000
    .equ APIC_PD, 0x1A0000
    .equ IDT, 0x1A1000
    .equ HANDLED, RESULTS + 0x20
    .equ EOIS, RESULTS + 0x28

start:
    mov rsi, PARAMS
    mov rax, 0x2052545020445352         # "RSD PTR ": the PC platform's ACPI RSDP sits here
    cmp qword ptr [rsi], rax            # unless the host wrote parameters over it
    jne params_given
    xor eax, eax                        # then every parameter takes its default
    mov ecx, 9
clear_params:
    mov qword ptr [rsi + rcx * 8 - 8], rax
    dec ecx
    jnz clear_params
params_given:
    mov rax, qword ptr [rsi]
    test rax, rax
    jnz have_r
    mov rax, 100
have_r:
    mov qword ptr [rsi], rax
    mov rax, qword ptr [rsi + 8]
    test rax, rax
    jnz have_s
    mov rax, 32
have_s:
    mov qword ptr [rsi + 8], rax
    mov rax, qword ptr [rsi + 0x10]
    test rax, rax
    jnz have_w
    mov rax, 50
have_w:
    mov qword ptr [rsi + 0x10], rax
    mov rax, qword ptr [rsi + 0x18]
    test rax, rax
    jnz have_b
    mov rax, 64
have_b:
    mov qword ptr [rsi + 0x18], rax
    mov rax, qword ptr [rsi + 0x28]
    test rax, rax
    jnz have_mmio
    mov rax, 0x1F0000
have_mmio:
    mov qword ptr [rsi + 0x28], rax
    mov rax, qword ptr [rsi + 0x30]
    test rax, rax
    jnz have_p
    mov rax, 16
have_p:
    cmp rax, 64
    ja bad_param
    mov qword ptr [rsi + 0x30], rax
    mov rax, qword ptr [rsi + 0x40]
    test rax, rax
    jnz have_vec
    mov rax, 0x41
have_vec:
    cmp rax, 32
    jb bad_param
    cmp rax, 255
    ja bad_param
    mov qword ptr [rsi + 0x40], rax
    mov rax, qword ptr [rsi]            # R x B <= 1 MiB
    imul rax, qword ptr [rsi + 0x18]
    cmp rax, 0x100000
    ja bad_param

    # the payload, R x B bytes
    mov rcx, rax
    mov rdi, PAYLOAD
    mov eax, 0x12345678
gen:
    imul eax, eax, 1103515245
    add eax, 12345
    mov edx, eax
    shr edx, 16
    and edx, 0x3f
    add edx, 0x30
    mov byte ptr [rdi], dl
    inc rdi
    dec rcx
    jnz gen

    # a second address space: a copy of the loader's PML4 (same mappings)
    mov rax, cr3
    and rax, -4096
    mov r8, rax                         # root A
    mov r10, rax                        # the current root
    mov rsi, rax
    mov rdi, PML4_B
    mov ecx, 512
copy_pml4:
    mov rax, qword ptr [rsi]
    mov qword ptr [rdi], rax
    add rsi, 8
    add rdi, 8
    dec ecx
    jnz copy_pml4

    mov rsi, PARAMS
    mov rax, qword ptr [rsi + 0x20]
    cmp rax, 2
    jne console_ready
    call virtio_init
console_ready:
    mov rsi, RESULTS
    mov qword ptr [rsi + 0x20], 0       # interrupts handled
    mov qword ptr [rsi + 0x28], 0       # EOIs written
    mov rsi, PARAMS
    cmp qword ptr [rsi + 0x38], 0
    je irq_ready
    call irq_init
irq_ready:

    xor r15, r15                        # checksum
    xor r14, r14                        # rounds done
    xor r13, r13                        # system calls made
    xor r12, r12                        # virtio: available index (= notifies)
round:
    # ---- CPU phase: S system calls
    mov rsi, PARAMS
    mov r11, qword ptr [rsi + 8]
syscall:
    mov rsi, PARAMS
    mov rbx, qword ptr [rsi + 0x10]
work:
    imul r15, r15, 31
    add r15, rbx
    dec rbx
    jnz work
    mov ecx, MSR_TSC_AUX
    mov eax, r13d
    and eax, 0xfff
    xor edx, edx
    wrmsr
    test r13, 7
    jnz no_cpuid
    mov eax, 1
    xor ecx, ecx
    cpuid                               # family/model: the same answer every time
    add r15, rax
no_cpuid:
    inc r13
    dec r11
    jnz syscall

    # the working set: read and write each page
    mov rsi, PARAMS
    mov rcx, qword ptr [rsi + 0x30]
    mov rdi, WSET
touch:
    mov rax, qword ptr [rdi]
    add rax, r15
    mov qword ptr [rdi], rax
    add r15, rax
    add rdi, 0x1000
    dec rcx
    jnz touch

    # context switch: the other page-table root (R10 = the current one)
    mov rax, PML4_B
    cmp r10, r8
    je do_switch
    mov rax, r8
do_switch:
    mov r10, rax
    mov cr3, rax

    # ---- I/O phase: B console bytes
    mov rsi, PARAMS
    mov rcx, qword ptr [rsi + 0x18]     # B
    mov rdi, r14
    imul rdi, rcx
    add rdi, PAYLOAD                    # this round's bytes
    mov rax, qword ptr [rsi + 0x20]
    cmp rax, 2
    je io_virtio
uart_byte:
    mov dx, 0x3fd
uart_wait:
    in al, dx
    test al, 0x20
    jz uart_wait
    mov dx, 0x3f8
    mov al, byte ptr [rdi]
    out dx, al
    inc rdi
    dec rcx
    jnz uart_byte
    jmp round_done
io_virtio:
    call virtio_send                    # RDI = bytes, RCX = length
    test eax, eax
    jnz incomplete
round_done:
    # this round's device interrupts: wait until (round + 1) x I are handled
    mov rsi, PARAMS
    mov rax, r14
    inc rax
    imul rax, qword ptr [rsi + 0x38]
    mov rsi, HANDLED
irq_wait:
    cmp qword ptr [rsi], rax
    jae irq_done
    pause
    jmp irq_wait
irq_done:
    inc r14
    mov rsi, PARAMS
    cmp r14, qword ptr [rsi]
    jb round

    mov rsi, RESULTS
    mov qword ptr [rsi], r15
    mov rax, r14
    mov rdi, PARAMS
    imul rax, qword ptr [rdi + 0x18]
    mov qword ptr [rsi + 8], rax
    mov qword ptr [rsi + 16], r14
    mov qword ptr [rsi + 24], r12
    cli
    xor edi, edi
    jmp hc_exit

# ------------------------------------------------------------- interrupts
irq_init:
    mov rdi, APIC_PD                    # map 0xFEE00000: PDPT[3] -> a PD with a 2 MiB page, PCD | PWT
    xor eax, eax
    mov ecx, 512
clear_apic_pd:
    mov qword ptr [rdi], rax
    add rdi, 8
    dec ecx
    jnz clear_apic_pd
    mov rax, APIC | 0x9B                # P, RW, PWT, PCD, PS
    mov qword ptr [APIC_PD + 0x1F7 * 8], rax
    mov rax, r8                         # the PDPT both address spaces share
    mov rax, qword ptr [rax]
    and rax, -4096
    mov qword ptr [rax + 3 * 8], APIC_PD + 3
    mov rax, cr3
    mov cr3, rax
    mov rdi, IDT                        # IDT: one 64-bit interrupt gate
    xor eax, eax
    mov ecx, 512
clear_idt:
    mov qword ptr [rdi], rax
    add rdi, 8
    dec ecx
    jnz clear_idt
    lea rax, [rip + irq_handler]
    mov rsi, PARAMS
    mov rdi, qword ptr [rsi + 0x40]
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
    mov eax, APIC
    mov dword ptr [rax + 0x80], 0       # TPR = 0
    mov dword ptr [rax + 0xF0], 0x1FF   # SVR: software-enabled, spurious vector 0xFF
    sti
    in al, 0xE0                         # start the device
    cmp al, 0xFF
    jne irq_started
    mov qword ptr [rsi + 0x38], 0       # no device on the port: no interrupts to wait for
irq_started:
    ret

irq_handler:
    push rax
    inc qword ptr [HANDLED]
    mov eax, APIC
    mov dword ptr [rax + 0xB0], 0       # EOI
    inc qword ptr [EOIS]
    pop rax
    iretq

# ---------------------------------------------------------------- virtio
# (the driver of virtio_console.S: OASIS virtio 1.1 §3.1.1, §4.2.3)
virtio_init:
    mov rsi, PARAMS
    mov rbx, qword ptr [rsi + 0x28]
    mov eax, dword ptr [rbx]            # MagicValue
    cmp eax, 0x74726976
    jne no_device
    mov eax, dword ptr [rbx + 0x4]      # Version 2
    cmp eax, 2
    jne no_device
    mov eax, dword ptr [rbx + 0x8]      # DeviceID 3: console
    cmp eax, 3
    jne no_device
    mov dword ptr [rbx + 0x70], 0       # reset
    mov dword ptr [rbx + 0x70], 1       # ACKNOWLEDGE
    mov dword ptr [rbx + 0x70], 3       # DRIVER
    mov dword ptr [rbx + 0x14], 1
    mov eax, dword ptr [rbx + 0x10]
    test eax, 1                         # VERSION_1
    jz bad_features
    mov dword ptr [rbx + 0x24], 0
    mov dword ptr [rbx + 0x20], 0
    mov dword ptr [rbx + 0x24], 1
    mov dword ptr [rbx + 0x20], 1
    mov dword ptr [rbx + 0x70], 11      # FEATURES_OK
    mov eax, dword ptr [rbx + 0x70]
    test eax, 8
    jz bad_features
    mov rdi, VQ
    mov ecx, 0x3000 / 8
    xor eax, eax
vq_zero:
    mov qword ptr [rdi], rax
    add rdi, 8
    dec ecx
    jnz vq_zero
    mov rbp, VQ
    mov word ptr [rbp + 0x1000], 1      # avail.flags = NO_INTERRUPT
    mov dword ptr [rbx + 0x30], 1       # QueueSel = transmitq
    mov eax, dword ptr [rbx + 0x44]
    test eax, eax
    jnz bad_queue
    mov eax, dword ptr [rbx + 0x34]
    cmp eax, QSZ
    jb bad_queue
    mov dword ptr [rbx + 0x38], QSZ
    mov eax, ebp
    mov dword ptr [rbx + 0x80], eax
    mov dword ptr [rbx + 0x84], 0
    add eax, 0x1000
    mov dword ptr [rbx + 0x90], eax
    mov dword ptr [rbx + 0x94], 0
    add eax, 0x1000
    mov dword ptr [rbx + 0xa0], eax
    mov dword ptr [rbx + 0xa4], 0
    mov dword ptr [rbx + 0x44], 1       # QueueReady
    mov dword ptr [rbx + 0x70], 15      # DRIVER_OK
    ret

# RDI = GPA of the bytes, RCX = length: one buffer, one notify; EAX = 0 when returned
virtio_send:
    mov rbp, VQ
    mov rsi, PARAMS
    mov rbx, qword ptr [rsi + 0x28]
    mov rdx, r12
    and edx, QSZ - 1
    mov r9, rdx
    shl r9, 4
    mov qword ptr [rbp + r9], rdi       # desc.addr
    mov dword ptr [rbp + r9 + 8], ecx   # desc.len
    mov dword ptr [rbp + r9 + 12], 0    # flags, next
    mov word ptr [rbp + rdx*2 + 0x1004], dx
    inc r12
    mov word ptr [rbp + 0x1002], r12w   # avail.idx
    mov dword ptr [rbx + 0x50], 1       # QueueNotify
    movzx eax, word ptr [rbp + 0x2002]  # used.idx
    sub ax, r12w
    movzx eax, ax
    ret

no_device:
    mov edi, 2
    jmp hc_exit
bad_features:
    mov edi, 3
    jmp hc_exit
bad_queue:
    mov edi, 4
    jmp hc_exit
incomplete:
    mov edi, 5
    jmp hc_exit
bad_param:
    mov edi, 1
hc_exit:
    xor eax, eax
    .byte 0x0f, 0x01, 0xd9              # VMMCALL: EXIT, RDI = the code
    mov eax, edi                        # it returned: the PC platform's isa-debug-exit
    out 0xF4, al
    hlt
