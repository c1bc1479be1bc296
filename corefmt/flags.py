"""Request flags: what a caller asks of one write (QEMU's BDRV_REQ_*).

Drivers that take a ``flags`` argument see them; for drivers written
before flags existed the block layer honours them itself (FUA by a flush
after the write, MAY_UNMAP by passing ``unmap``) or refuses (COMPRESSED).
"""

from __future__ import annotations

import enum


class RequestFlags(enum.IntFlag):
    NONE = 0
    #: Force unit access: the write is durable when it completes.
    FUA = 1
    #: write_zeroes may deallocate the range instead of writing zeros.
    MAY_UNMAP = 2
    #: write_zeroes must be efficient: fail with NotSupported rather than
    #: falling back to writing zero bytes (qemu-img convert asks this).
    NO_FALLBACK = 4
    #: Store the data compressed (qcow2 convert -c); a format that cannot
    #: compress refuses the write.
    COMPRESSED = 8
    #: The data was fetched from the backing chain (copy-on-read, prefetch),
    #: not written by a guest: it can be fetched again, so a driver may skip
    #: journaling it (FVD's un-journaled fills) and must not let it overwrite
    #: a guest write that landed first.
    FILL = 16
    #: A read that should copy what it reads from below into this node
    #: (set by the copy-on-read filter, QEMU's BDRV_REQ_COPY_ON_READ).
    COPY_ON_READ = 32
    #: A read of a range an overlay's merged status assigned to this layer:
    #: the layer reads its own data without resolving the chain again (a
    #: part it does not hold after all is read through the chain).
    OWN_DATA = 64
