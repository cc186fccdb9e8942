# tlb_switch.S - a guest that touches P pages between two intercepted
# instructions: each round reads one qword from each of P consecutive pages
# at guest-physical 0x200000, then executes CPUID (always intercepted, so a
# #VMEXIT and a VMRUN: two world switches).  With an ASID-tagged TLB the
# pages stay cached across the switches; with a TLB flushed on every world
# switch (pre-ASID hardware) each round walks every page again.
#
# Parameters (qwords at guest-physical 0xF0000; 0 = the default):
#   [0xF0000] pages per round P (at most 512)   (default 32)
#   [0xF0008] rounds                            (default 1000)
# Needs guest RAM >= 2 MiB + 4 KiB x P.  Exit code 0 (1: bad parameter).
# Entry state: the loader's (see README "Guest images").

    .equ PARAMS, 0xF0000
    .equ DATA, 0x200000

start:
    mov rsi, PARAMS
    mov r13, qword ptr [rsi]            # P
    test r13, r13
    jnz have_p
    mov r13, 32
have_p:
    cmp r13, 512
    ja bad
    mov r12, qword ptr [rsi + 8]        # rounds
    test r12, r12
    jnz again
    mov r12, 1000
again:
    mov rbx, DATA
    mov rcx, r13
touch:
    mov rax, qword ptr [rbx]
    add rbx, 0x1000
    dec rcx
    jnz touch
    xor eax, eax
    cpuid                               # the world switch
    dec r12
    jnz again
    xor edi, edi
    jmp hc_exit
bad:
    mov edi, 1
hc_exit:
    xor eax, eax
    .byte 0x0f, 0x01, 0xd9
