#!/usr/bin/env bash
# A short end-to-end run of corefmt on images it makes itself.
set -euo pipefail
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"

echo "== formats"
corefmt formats > formats.txt   # (not piped into head: pipefail would see SIGPIPE)
head -n 1 formats.txt

echo "== create a sparse 64 MiB raw disk and write to it (qemu-io syntax)"
corefmt create -f raw disk.raw 64M
corefmt io -c 'write -P 0xab 0 1M' -c 'write -P 0x5a 32M 512k' -c 'write -z 1M 1M' \
    -c 'read -P 0xab 0 1M' -c 'read -P 0x5a 32M 512k' disk.raw

echo "== where the data is"
corefmt map disk.raw
corefmt info disk.raw

echo "== convert (zero runs stay sparse) and compare"
corefmt convert -f raw -O raw disk.raw copy.raw
corefmt compare disk.raw copy.raw
corefmt map --output=json copy.raw

echo "== node graphs, as qemu writes them: a window of the disk, a request log filter"
corefmt info --image-opts driver=raw,file.filename=disk.raw,offset=32M,size=1M
corefmt io -r -c 'read -P 0x5a 0 512k' \
    --image-opts driver=raw,file.filename=disk.raw,offset=32M,size=1M
corefmt io -r -c 'read 0 64k' \
    'json:{"driver":"log","path":"requests.log","file":{"driver":"raw","file":"disk.raw"}}'
cat requests.log

echo "== a chain of mixed formats: a qcow2 overlay over the raw disk"
corefmt create -f qcow2 -b disk.raw -F raw overlay.qcow2
corefmt io -c 'write -P 0xcd 16k 8k' -c 'write -z 32M 64k' -c 'read -P 0xab 0 16k' \
    -c 'read -P 0xcd 16k 8k' overlay.qcow2
corefmt info --backing-chain overlay.qcow2
corefmt map overlay.qcow2
corefmt check overlay.qcow2
corefmt convert -O qcow2 overlay.qcow2 flat.qcow2   # the whole chain, into one image
corefmt compare overlay.qcow2 flat.qcow2

echo "== three formats in one chain: an FVD image over the qcow2 overlay (raw <- qcow2 <- fvd)"
corefmt create -f fvd -b overlay.qcow2 -F qcow2 -o block_size=64k,compact_image=on top.fvd
# 4k into a 64 KiB block: FVD copies the rest of the block from the qcow2 and the raw below
corefmt io -c 'write -P 0xef 4k 4k' -c 'write -P 0x22 32M 4k' -c 'write -P 0x11 40M 64k' \
    -c flush -c 'read -P 0xab 0 4k' -c 'read -P 0xef 4k 4k' -c 'read -P 0xab 8k 8k' \
    -c 'read -P 0xcd 16k 8k' -c 'read -P 0x22 32M 4k' -c 'read -P 0 33558528 60k' top.fvd
corefmt info --backing-chain top.fvd
corefmt map top.fvd
corefmt check top.fvd
corefmt convert -O raw top.fvd top-flat.raw        # the three layers, into one raw image
# what the chain must read: the raw disk with both layers' writes applied in order
cp --sparse=always disk.raw expected.raw
corefmt io -f raw -c 'write -P 0xcd 16k 8k' -c 'write -z 32M 64k' -c 'write -P 0xef 4k 4k' \
    -c 'write -P 0x22 32M 4k' -c 'write -P 0x11 40M 64k' expected.raw > /dev/null
corefmt compare -f raw -F raw expected.raw top-flat.raw
corefmt compare top.fvd expected.raw

echo "== prefetch: everything top.fvd reads from below is copied into it; it then needs no base"
corefmt prefetch -p top.fvd
mv overlay.qcow2 overlay.qcow2.away   # the chain below is gone...
corefmt compare -f fvd -F raw top.fvd expected.raw   # ...and top.fvd still reads the same
mv overlay.qcow2.away overlay.qcow2

echo "== a compressed qcow2 of the whole chain (convert -c compresses on every core)"
corefmt convert -c -O qcow2 -o compression_type=zstd top.fvd packed.qcow2
corefmt compare top.fvd packed.qcow2
corefmt check packed.qcow2

echo "== internal snapshots and a dirty bitmap in the qcow2 overlay"
corefmt snapshot -c before overlay.qcow2
corefmt bitmap --add -g 64k overlay.qcow2 backup-1     # enabled: every write marks it
corefmt io -c 'write -P 0x77 16k 8k' overlay.qcow2 > /dev/null
corefmt snapshot -l overlay.qcow2
corefmt info overlay.qcow2 | sed -n '/bitmaps:/,/granularity/p'
corefmt convert -l before -O qcow2 overlay.qcow2 before.qcow2   # the state at the snapshot
corefmt io -r -c 'read -P 0xcd 16k 8k' before.qcow2 > /dev/null
corefmt snapshot -a before overlay.qcow2                        # back to it
corefmt snapshot -d before overlay.qcow2
corefmt compare overlay.qcow2 flat.qcow2
corefmt check overlay.qcow2

echo "== the Python API"
python3 - <<'PY'
import corefmt
with corefmt.open("copy.raw", "raw") as disk, disk.io() as f:
    f.seek(32 * 1024 * 1024)
    assert f.read(4) == b"\x5a" * 4
    print("read back through the file view:", f.read(4).hex())
PY
if command -v qemu-img >/dev/null; then
    echo "== qemu-img agrees"
    qemu-img compare -f raw -F raw disk.raw copy.raw
    qemu-img check overlay.qcow2
    qemu-img compare -f qcow2 -F qcow2 overlay.qcow2 flat.qcow2
    qemu-img compare -f raw -F raw expected.raw top-flat.raw   # qemu has no FVD driver
    qemu-img compare -f raw -F qcow2 expected.raw packed.qcow2
fi
echo "demo finished"
