# hello: prints on the COM1 serial console, asks CPUID who it runs under,
# prints through the PRINT hypercall, and exits with code 0.
#
# Entry state (see README): 64-bit long mode, CPL 0, identity-mapped RAM,
# RIP = 0x100000, RSP = 0x90000. COM1 data port 0x3F8, line status 0x3FD.
# Hypercalls: VMMCALL with RAX = 0 EXIT(RDI = code), RAX = 1 PRINT(RDI, RSI).

    lea rsi, [rip + hello_msg]
    call puts
    mov eax, 0x40000000          # hypervisor vendor leaf
    cpuid
    lea rdi, [rip + vendor]
    mov dword ptr [rdi], ebx
    mov dword ptr [rdi + 4], ecx
    mov dword ptr [rdi + 8], edx
    lea rsi, [rip + vendor_msg]
    call puts
    lea rsi, [rip + vendor]
    call puts
    lea rsi, [rip + newline]
    call puts
    mov eax, 1                   # PRINT hypercall
    lea rdi, [rip + hcall_msg]
    mov esi, 22
    .byte 0x0f, 0x01, 0xd9       # vmmcall
    xor eax, eax                 # EXIT hypercall, code 0
    xor edi, edi
    .byte 0x0f, 0x01, 0xd9

# puts: write the NUL-terminated string at RSI to COM1
puts:
    mov dx, 0x3fd
wait_thr:
    in al, dx
    test al, 0x20
    jz wait_thr
    mov dx, 0x3f8
    mov al, byte ptr [rsi]
    test al, al
    jz puts_done
    out dx, al
    inc rsi
    jmp puts
puts_done:
    ret

hello_msg:
    .asciz "Hello from the guest!\n"
vendor_msg:
    .asciz "hypervisor vendor: "
newline:
    .asciz "\n"
hcall_msg:
    .ascii "hypercall print works\n"
hcall_end:
vendor:
    .byte 0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0
