#!/usr/bin/env bash
# Rebuild the binary guest images from their sources (needs gcc, ld, objcopy).
#   guest_images/cguest.elf  freestanding ELF64, linked at 0x100000
#   guest_images/hello.bin   flat binary of hello.S (keystone, base 0x100000)
set -euo pipefail
case "${1:-}" in
    -h|--help)
        echo "usage: scripts/build_images.sh"
        echo "Rebuild guest_images/cguest.elf (gcc, from guest_images/src/cguest.c) and"
        echo "guest_images/hello.bin (hello.S assembled by keystone). Takes no options."
        exit 0 ;;
    "") ;;
    *) echo "build_images.sh: unknown option '$1' (--help for usage)" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
gcc -O2 -ffreestanding -fno-pic -fno-stack-protector -mno-red-zone -mgeneral-regs-only -nostdlib -static \
    -no-pie -Wl,-Ttext=0x100000 -Wl,--build-id=none -Wl,-z,noexecstack -Wl,-z,norelro \
    -o guest_images/cguest.elf guest_images/src/cguest.c
python -c "from sandbox.hypervisor.loader import assemble; import sys; \
sys.stdout.buffer.write(assemble(open('guest_images/hello.S').read()))" > guest_images/hello.bin
ls -l guest_images/cguest.elf guest_images/hello.bin
