# virtio_console.S - the same payload sent to the console two ways: through
# the emulated 16550 UART (poll the line status register, then write one
# byte: two trapped port accesses per byte) or through a virtio console
# (virtio-mmio version 2, one split transmit queue in guest memory, one
# QueueNotify write per batch of buffers).
#
# Parameters (qwords at guest-physical 0xF0000; 0 = the default):
#   [0xF0000] payload bytes                           (default 4096)
#   [0xF0008] how: 0 or 1 = UART, 2 = virtio          (default UART)
#   [0xF0010] bytes per virtio buffer (descriptor)    (default 1024)
#   [0xF0018] buffers per notify (batch, at most 64)  (default 64)
#   [0xF0020] GPA of the virtio-mmio register page    (default 0x1F0000)
# Results (qwords at 0xF0800):
#   [0xF0800] payload bytes sent
#   [0xF0808] QueueNotify writes (virtio)
#   [0xF0810] buffers made available (virtio)
# Exit codes: 0 sent; 2 no virtio console at the MMIO address (magic,
# version 2, device ID 3); 3 the device refused VERSION_1 / FEATURES_OK;
# 4 the transmit queue is unusable; 5 the device did not return a buffer.
#
# The payload is generated in guest memory at 0x200000 (so guest RAM must
# exceed 2 MiB + the payload): printable bytes from a 32-bit LCG,
#   x = x * 1103515245 + 12345 (mod 2^32), byte = 0x30 + ((x >> 16) & 0x3F),
# starting from x = 0x12345678; the host checks what it received against
# the same formula.
#
# virtio driver (OASIS virtio 1.1 §3.1.1 and §4.2.3): reset, ACKNOWLEDGE,
# DRIVER, read the device features (bank 1 must offer VERSION_1, bit 32),
# accept VERSION_1 only, FEATURES_OK and check it stuck, set up queue 1
# (transmitq) with 64 entries - descriptor table 0x1C0000, available ring
# 0x1C1000 (flags = NO_INTERRUPT: this driver polls the used ring), used
# ring 0x1C2000 - then DRIVER_OK.  Each buffer is one device-readable
# descriptor; after `batch` buffers (or the last) the driver publishes the
# available index and writes QueueNotify = 1.  The device consumes the
# buffers during that exit, so the used index must equal the available
# index right after it.
#
# Entry state: the loader's (see README "Guest images").

    .equ PARAMS, 0xF0000
    .equ RESULTS, 0xF0800
    .equ PAYLOAD, 0x200000
    .equ VQ, 0x1C0000                   # descriptors; +0x1000 available ring; +0x2000 used ring
    .equ QSZ, 64
    .equ COM1_DATA, 0x3f8
    .equ COM1_LSR, 0x3fd

start:
    mov rsi, PARAMS
    mov r9, qword ptr [rsi]             # payload bytes
    test r9, r9
    jnz have_size
    mov r9, 4096
have_size:  mov r10, qword ptr [rsi + 0x10]     # bytes per buffer
    test r10, r10
    jnz have_bufsize
    mov r10, 1024
have_bufsize:  mov r11, qword ptr [rsi + 0x18]     # batch
    test r11, r11
    jz batch_default
    cmp r11, QSZ
    jbe have_batch
batch_default:  mov r11, QSZ
have_batch:  mov rbx, qword ptr [rsi + 0x20]     # MMIO base
    test rbx, rbx
    jnz have_mmio
    mov rbx, 0x1F0000
have_mmio:
    # the payload
    mov r8, PAYLOAD
    mov rdi, r8
    mov rcx, r9
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

    xor r15, r15                        # notifies
    xor r12, r12                        # available index
    mov rax, qword ptr [rsi + 8]
    cmp rax, 2
    je virtio

# ---------------------------------------------------------------- UART
    mov rdi, r8
    mov rcx, r9
uart_byte:
    mov dx, COM1_LSR
uart_wait:
    in al, dx
    test al, 0x20                       # transmitter holding register empty
    jz uart_wait
    mov dx, COM1_DATA
    mov al, byte ptr [rdi]
    out dx, al
    inc rdi
    dec rcx
    jnz uart_byte
    jmp done

# ---------------------------------------------------------------- virtio
virtio:
    mov eax, dword ptr [rbx]            # MagicValue
    cmp eax, 0x74726976
    jne no_device
    mov eax, dword ptr [rbx + 0x4]      # Version
    cmp eax, 2
    jne no_device
    mov eax, dword ptr [rbx + 0x8]      # DeviceID
    cmp eax, 3
    jne no_device
    mov dword ptr [rbx + 0x70], 0       # Status: reset
    mov dword ptr [rbx + 0x70], 1       # ACKNOWLEDGE
    mov dword ptr [rbx + 0x70], 3       # DRIVER
    mov dword ptr [rbx + 0x14], 1       # DeviceFeaturesSel = 1 (bits 63:32)
    mov eax, dword ptr [rbx + 0x10]     # DeviceFeatures
    test eax, 1                         # VERSION_1
    jz bad_features
    mov dword ptr [rbx + 0x24], 0       # DriverFeaturesSel = 0
    mov dword ptr [rbx + 0x20], 0       # no device-specific features
    mov dword ptr [rbx + 0x24], 1
    mov dword ptr [rbx + 0x20], 1       # VERSION_1
    mov dword ptr [rbx + 0x70], 11      # + FEATURES_OK
    mov eax, dword ptr [rbx + 0x70]
    test eax, 8
    jz bad_features

    # the transmit queue's memory: descriptors, available and used rings
    mov rbp, VQ
    mov rdi, rbp
    mov rcx, 0x3000 / 8
    xor eax, eax
zero:
    mov qword ptr [rdi], rax
    add rdi, 8
    dec rcx
    jnz zero
    mov word ptr [rbp + 0x1000], 1      # avail.flags = VIRTQ_AVAIL_F_NO_INTERRUPT

    mov dword ptr [rbx + 0x30], 1       # QueueSel = transmitq
    mov eax, dword ptr [rbx + 0x44]     # QueueReady must read 0
    test eax, eax
    jnz bad_queue
    mov eax, dword ptr [rbx + 0x34]     # QueueNumMax
    cmp eax, QSZ
    jb bad_queue
    mov dword ptr [rbx + 0x38], QSZ     # QueueNum
    mov eax, ebp
    mov dword ptr [rbx + 0x80], eax     # QueueDescLow
    mov dword ptr [rbx + 0x84], 0
    add eax, 0x1000
    mov dword ptr [rbx + 0x90], eax     # QueueDriverLow (available ring)
    mov dword ptr [rbx + 0x94], 0
    add eax, 0x1000
    mov dword ptr [rbx + 0xa0], eax     # QueueDeviceLow (used ring)
    mov dword ptr [rbx + 0xa4], 0
    mov dword ptr [rbx + 0x44], 1       # QueueReady
    mov dword ptr [rbx + 0x70], 15      # + DRIVER_OK
    mov eax, dword ptr [rbx + 0x70]
    test eax, 0x40                      # DEVICE_NEEDS_RESET
    jnz bad_queue

    xor r13, r13                        # bytes queued
    xor r14, r14                        # buffers since the last notify
send:
    cmp r13, r9
    jae done
    mov rax, r9                         # this buffer: min(buffer size, bytes left)
    sub rax, r13
    cmp rax, r10
    jbe have_len
    mov rax, r10
have_len:  mov rcx, r12
    and rcx, QSZ - 1                    # descriptor = available-ring slot
    mov rdx, rcx
    shl rdx, 4
    add rdx, rbp
    lea rdi, [r8 + r13]
    mov qword ptr [rdx], rdi            # addr
    mov dword ptr [rdx + 8], eax        # len
    mov dword ptr [rdx + 12], 0         # flags = 0 (device-readable, no next), next = 0
    mov word ptr [rbp + rcx*2 + 0x1004], cx   # avail.ring[slot] = descriptor
    add r13, rax
    inc r12
    inc r14
    cmp r14, r11
    jae kick
    cmp r13, r9
    jb send
kick:
    mov word ptr [rbp + 0x1002], r12w   # avail.idx (x86 stores are ordered: no fence needed)
    mov dword ptr [rbx + 0x50], 1       # QueueNotify = transmitq: the one exit
    inc r15
    xor r14, r14
    movzx eax, word ptr [rbp + 0x2002]  # used.idx
    cmp ax, r12w
    jne incomplete
    jmp send

done:
    mov rsi, RESULTS
    mov qword ptr [rsi], r9
    mov qword ptr [rsi + 8], r15
    mov qword ptr [rsi + 16], r12
    xor edi, edi
    jmp hc_exit
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
hc_exit:
    xor eax, eax                        # EXIT hypercall, RDI = code
    .byte 0x0f, 0x01, 0xd9
