# io_poll.S - the seed's I/O workload ("reads device status a million times
# and writes a control command thirty thousand times"), with every command
# stamped so the host can measure how long it took the device to notice it.
#
# Per iteration the guest reads the device's status register once, writes a
# command in `writes` of every 100 iterations, then computes for `spin`
# loop turns (two instructions each), which sets how much guest time the
# whole run lasts.
#
#   port mode: status = IN from port 0x510, command = OUT to port 0x514
#              with EAX = the iteration number (every access traps: IOPM);
#   mmio mode: status = a byte load from the register page at the MMIO
#              base, command = a qword store into slot (seq mod 512) of the
#              control page at base + 0x1000: (seq << 32) | iteration.
#              With the pages granted, neither exits; the device reads the
#              slots when the nested Dirty bit says the page was written.
#
# Parameters (qwords at guest-physical 0xF0000; 0 = the default):
#   [0xF0000] iterations (status reads)            (default 1,000,000)
#   [0xF0008] commands per 100 iterations          (default 3)
#   [0xF0010] spin turns per iteration             (default 45: ~1 s of guest time at 100 MIPS)
#   [0xF0018] mode: 0 or 1 = port, 2 = mmio        (default port)
#   [0xF0020] GPA of the two MMIO register pages   (default 0x1E0000)
# Results (qwords at 0xF0800): iterations done, commands written.
# Exit code 0.  Entry state: the loader's (see README "Guest images").

    .equ PARAMS, 0xF0000
    .equ RESULTS, 0xF0800
    .equ STATUS_PORT, 0x510
    .equ CONTROL_PORT, 0x514

start:
    mov rsi, PARAMS
    mov r14, qword ptr [rsi]            # iterations
    test r14, r14
    jnz have_iters
    mov r14, 1000000
have_iters:
    mov r10, qword ptr [rsi + 8]        # commands per 100 iterations
    test r10, r10
    jnz have_writes
    mov r10, 3
have_writes:
    mov r9, qword ptr [rsi + 0x10]      # spin
    test r9, r9
    jnz have_spin
    mov r9, 45
have_spin:
    mov r12, qword ptr [rsi + 0x20]     # MMIO base
    test r12, r12
    jnz have_base
    mov r12, 0x1E0000
have_base:
    xor r15, r15                        # iteration
    mov r13, 1                          # next command's sequence number
    mov r11, 100                        # iterations left in this block of 100
    mov rax, qword ptr [rsi + 0x18]
    cmp rax, 2
    je mmio_loop

port_loop:
    mov dx, STATUS_PORT
    in al, dx
    dec r11
    jnz port_same_block
    mov r11, 100
port_same_block:
    cmp r11, r10
    ja port_no_command
    mov dx, CONTROL_PORT
    mov eax, r15d
    out dx, eax
    inc r13
port_no_command:
    mov ecx, r9d
port_spin:
    dec ecx
    jnz port_spin
    inc r15
    cmp r15, r14
    jb port_loop
    jmp done

mmio_loop:
    mov al, byte ptr [r12]
    dec r11
    jnz mmio_same_block
    mov r11, 100
mmio_same_block:
    cmp r11, r10
    ja mmio_no_command
    mov rax, r13
    shl rax, 32
    or rax, r15
    mov ecx, r13d
    and ecx, 511
    mov qword ptr [r12 + rcx*8 + 0x1000], rax
    inc r13
mmio_no_command:
    mov ecx, r9d
mmio_spin:
    dec ecx
    jnz mmio_spin
    inc r15
    cmp r15, r14
    jb mmio_loop

done:
    mov rsi, RESULTS
    mov qword ptr [rsi], r15
    dec r13
    mov qword ptr [rsi + 8], r13
    xor edi, edi
    xor eax, eax
    .byte 0x0f, 0x01, 0xd9
