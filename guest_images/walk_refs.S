# walk_refs.S - one cold 2-D walk per touch, with the guest page size chosen
# by the caller: the guest builds its own page tables in which K virtual
# pages of one size (4 KiB, 2 MiB or 1 GiB) all lead to guest-physical
# 0x150000, loads them into CR3 and reads one qword through each.  Each
# touch is a new virtual page, so each is a TLB miss and one full walk; with
# no page-walk cache the walk reads (n + 1)(m + 1) - 1 table entries for n
# guest and m nested levels (24 for 4 KiB pages at both).
#
# Parameters (qwords at guest-physical 0xF0000; 0 = the default):
#   [0xF0000] guest page size: 0 or 1 = 4 KiB, 2 = 2 MiB, 3 = 1 GiB   (default 4 KiB)
#   [0xF0008] touches K, at most 512                              (default 64)
# The tables (PML4 0x1A0000, PDPT 0x1A1000, PD 0x1A2000, PT 0x1A3000) keep
# the loader's identity map in PML4 entry 0 and put the K pages at
# virtual 0x80_0000_0000 (PML4 entry 1).  Needs guest RAM >= 2 MiB.
# Exit code 0; 1 for a bad parameter.  Entry state: the loader's.

    .equ PARAMS, 0xF0000
    .equ PML4, 0x1A0000
    .equ TARGET, 0x150000
    .equ BASE_HI, 0x80                  # virtual base 0x80_0000_0000 = BASE_HI << 32

start:
    mov rsi, PARAMS
    mov r8, qword ptr [rsi]             # size selector
    mov r9, qword ptr [rsi + 8]         # K
    test r9, r9
    jnz have_k
    mov r9, 64
have_k:
    cmp r9, 512
    ja bad

    # four zeroed table pages
    mov rdi, PML4
    mov ecx, 4 * 512
    xor eax, eax
zero:
    mov qword ptr [rdi], rax
    add rdi, 8
    dec ecx
    jnz zero

    mov rbp, PML4
    mov rax, cr3                        # keep the loader's identity map (PML4 entry 0)
    and rax, -4096
    mov rax, qword ptr [rax]
    mov qword ptr [rbp], rax
    lea rax, [rbp + 0x1003]             # PML4[1] -> PDPT, present + writable
    mov qword ptr [rbp + 8], rax

    xor ecx, ecx                        # k
    cmp r8, 3
    je gib
    lea rax, [rbp + 0x2003]             # PDPT[0] -> PD
    mov qword ptr [rbp + 0x1000], rax
    cmp r8, 2
    je mib

kib:                                    # PD[0] -> PT; PT[k] -> TARGET (4 KiB pages)
    lea rax, [rbp + 0x3003]
    mov qword ptr [rbp + 0x2000], rax
    mov r10, 0x1000                     # virtual stride
    xor r11, r11                        # offset inside the page
    mov rax, TARGET + 3
kib_fill:
    mov qword ptr [rbp + rcx*8 + 0x3000], rax
    inc ecx
    cmp rcx, r9
    jb kib_fill
    jmp load

mib:                                    # PD[k] -> 2 MiB page at guest-physical 0 (PS)
    mov r10, 0x200000
    mov r11, TARGET
    mov eax, 0x83
mib_fill:
    mov qword ptr [rbp + rcx*8 + 0x2000], rax
    inc ecx
    cmp rcx, r9
    jb mib_fill
    jmp load

gib:                                    # PDPT[k] -> 1 GiB page at guest-physical 0 (PS)
    mov r10, 0x40000000
    mov r11, TARGET
    mov eax, 0x83
gib_fill:
    mov qword ptr [rbp + rcx*8 + 0x1000], rax
    inc ecx
    cmp rcx, r9
    jb gib_fill

load:
    mov cr3, rbp
    mov rbx, BASE_HI
    shl rbx, 32
    add rbx, r11
    mov rcx, r9
touch:
    mov rax, qword ptr [rbx]
    add rbx, r10
    dec rcx
    jnz touch
    xor edi, edi
    jmp hc_exit
bad:
    mov edi, 1
hc_exit:
    xor eax, eax
    .byte 0x0f, 0x01, 0xd9
