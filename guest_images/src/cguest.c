/* cguest.c - a freestanding C guest, built into the ELF64 image cguest.elf
 * (see scripts/build_images.sh).  It runs under the loader's entry state
 * (64-bit mode, CPL 0, identity-mapped RAM, RSP = 0x90000) and talks to the
 * hypervisor the same way the assembly guests do: COM1 at 0x3F8 and the
 * VMMCALL hypercalls (RAX = 0 EXIT, RAX = 1 PRINT).
 */
typedef unsigned long u64;
typedef unsigned int u32;
typedef unsigned char u8;

static inline void outb(unsigned short port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(unsigned short port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }

static inline u64 hypercall(u64 nr, u64 a0, u64 a1) {
    u64 ret;
    __asm__ volatile(".byte 0x0f, 0x01, 0xd9" : "=a"(ret) : "a"(nr), "D"(a0), "S"(a1) : "memory");
    return ret;
}

static inline void cpuid(u32 leaf, u32 *a, u32 *b, u32 *c, u32 *d) {
    __asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(0));
}

static void putc_serial(char c) {
    while (!(inb(0x3fd) & 0x20)) { }
    outb(0x3f8, (u8)c);
}

static void puts_serial(const char *s) { while (*s) putc_serial(*s++); }

static void put_hex(u64 v) {
    static const char digits[] = "0123456789abcdef";
    puts_serial("0x");
    for (int i = 60; i >= 0; i -= 4) putc_serial(digits[(v >> i) & 0xf]);
}

/* a little real work: the first 20 primes, summed */
static u64 sum_primes(int n) {
    u64 sum = 0; int found = 0;
    for (u64 k = 2; found < n; k++) {
        int prime = 1;
        for (u64 d = 2; d * d <= k; d++) if (k % d == 0) { prime = 0; break; }
        if (prime) { sum += k; found++; }
    }
    return sum;
}

static char vendor[13];

void _start(void) {
    u32 a, b, c, d;
    puts_serial("Hello from a C guest!\n");
    cpuid(0x40000000, &a, &b, &c, &d);
    ((u32 *)vendor)[0] = b; ((u32 *)vendor)[1] = c; ((u32 *)vendor)[2] = d;
    puts_serial("hypervisor: ");
    puts_serial(vendor);
    puts_serial("\nsum of the first 20 primes: ");
    put_hex(sum_primes(20));
    puts_serial("\n");
    static const char msg[] = "printed by hypercall\n";
    hypercall(1, (u64)msg, sizeof(msg) - 1);
    hypercall(0, 0, 0);
    for (;;) { }
}
