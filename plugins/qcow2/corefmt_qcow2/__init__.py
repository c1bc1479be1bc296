"""qcow2 for corefmt: QEMU's copy-on-write format (docs/interop/qcow2.txt)."""
