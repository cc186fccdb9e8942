#!/usr/bin/env bash
# Rebuild the binary guest images from their sources (needs gcc, ld, objcopy).
#   guest_images/cguest.elf  freestanding ELF64, linked at 0x100000
#   guest_images/hello.bin   flat binary of hello.S (keystone, base 0x100000)
set -euo pipefail
cd "$(dirname "$0")/.."
gcc -O2 -ffreestanding -fno-pic -fno-stack-protector -mno-red-zone -mgeneral-regs-only -nostdlib -static \
    -no-pie -Wl,-Ttext=0x100000 -Wl,--build-id=none -Wl,-z,noexecstack -Wl,-z,norelro \
    -o guest_images/cguest.elf guest_images/src/cguest.c
python -c "from sandbox.hypervisor.loader import assemble; import sys; \
sys.stdout.buffer.write(assemble(open('guest_images/hello.S').read()))" > guest_images/hello.bin
ls -l guest_images/cguest.elf guest_images/hello.bin
