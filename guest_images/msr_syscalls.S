# msr_syscalls.S - a guest kernel that writes IA32_TSC_AUX (MSR C000_0103h)
# on every simulated system call, as the seed's "Selective Interception"
# paragraph describes (Linux keeps the CPU number there for RDTSCP and
# RDPID).  Each "system call" is some user work followed by the kernel's
# WRMSR; the work per call sets the system-call rate in guest time.
#
# Parameters (qwords at guest-physical 0xF0000; 0 = the default):
#   [0xF0000] system calls N             (default 1000)
#   [0xF0008] work iterations per call W (default 100; 4 instructions each)
# Results (qwords at guest-physical 0xF0800):
#   [0xF0800] checksum of the work and of TSC_AUX read back at the end
#   [0xF0808] TSC_AUX read back (RDMSR) after the last call
#   [0xF0810] system calls made (= N)
#
# The checksum does not depend on whether the hypervisor intercepts the
# MSR (MSRPM bit set: it emulates the write and the final read) or lets it
# through (bit clear: the processor writes the real MSR): the guest must
# not be able to tell.  sandbox/experiments/msr_bitmap.py runs it both ways.
#
# Entry state: the loader's (64-bit long mode, CPL 0, identity tables over
# guest RAM, RIP = 0x100000, RSP = 0x90000; see README "Guest images").
# Hypercalls: VMMCALL with RAX = 0 (EXIT, RDI = code).

    .equ PARAMS, 0xF0000
    .equ RESULTS, 0xF0800
    .equ MSR_TSC_AUX, 0xC0000103

start:
    mov rsi, PARAMS                     # (a base register: keystone may assemble a bare
    mov r14, qword ptr [rsi]            #  [constant] operand RIP-relative)   N
    test r14, r14
    jnz have_n
    mov r14, 1000
have_n:
    mov r12, qword ptr [rsi + 8]        # W
    test r12, r12
    jnz have_w
    mov r12, 100
have_w:
    xor r15, r15                        # checksum
    xor r13, r13                        # system calls made

syscall_loop:
    # user work: checksum = checksum * 31 + i, W times
    mov rbx, r12
work:
    imul r15, r15, 31
    add r15, rbx
    dec rbx
    jnz work
    # the system call: the kernel writes TSC_AUX (EDX:EAX = low 12 bits of the call number)
    mov ecx, MSR_TSC_AUX
    mov eax, r13d
    and eax, 0xfff
    xor edx, edx
    wrmsr
    inc r13
    cmp r13, r14
    jb syscall_loop

    # read TSC_AUX back: the last value written, whoever kept it
    mov ecx, MSR_TSC_AUX
    rdmsr
    shl rdx, 32
    or rax, rdx
    mov rsi, RESULTS
    mov qword ptr [rsi + 8], rax
    add r15, rax
    mov qword ptr [rsi], r15
    mov qword ptr [rsi + 16], r13

    xor edi, edi                        # EXIT, code 0
    xor eax, eax
    .byte 0x0f, 0x01, 0xd9
