#!/usr/bin/env python3
"""Overwrite a seeded random selection of 4 KiB blocks of a block device.

  scribble.py DEV --fraction F --seed S [--block-size 4096]

Chooses round(F * device_blocks) distinct blocks with random.Random(S) and
overwrites each, in that (random) order, with seeded pseudo-random bytes using
one synchronous O_DIRECT pwrite per block, then fsyncs. The selection and the
data are a pure function of (device size, F, S, block size). Prints one JSON
line: {"blocks": N, "bytes": N*bs, "device_blocks": ..., "seconds": ...}.
"""

import argparse
import json
import mmap
import os
import random
import sys
import time

CHUNK_BLOCKS = 256  # generate random data 1 MiB at a time


def device_size(fd):
    return os.lseek(fd, 0, os.SEEK_END)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("device")
    ap.add_argument("--fraction", type=float, required=True)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--block-size", type=int, default=4096)
    a = ap.parse_args()
    bs = a.block_size
    if bs <= 0 or bs % 512:
        sys.exit("scribble.py: --block-size must be a positive multiple of 512")
    if not 0.0 < a.fraction <= 1.0:
        sys.exit("scribble.py: --fraction must be in (0, 1]")

    t0 = time.monotonic()
    fd = os.open(a.device, os.O_WRONLY | os.O_DIRECT)
    try:
        nblocks = device_size(fd) // bs
        k = max(1, round(nblocks * a.fraction))
        rng = random.Random(a.seed)
        blocks = rng.sample(range(nblocks), k)
        data_rng = random.Random(a.seed ^ 0x5C41B)
        buf = mmap.mmap(-1, bs)  # page-aligned, as O_DIRECT needs
        chunk = b""
        for i, b in enumerate(blocks):
            j = i % CHUNK_BLOCKS
            if j == 0:
                chunk = data_rng.randbytes(bs * CHUNK_BLOCKS)
            buf.seek(0)
            buf.write(chunk[j * bs:(j + 1) * bs])
            n = os.pwrite(fd, buf, b * bs)
            if n != bs:
                sys.exit(f"scribble.py: short write at block {b}: {n} bytes")
        os.fsync(fd)
    finally:
        os.close(fd)
    print(json.dumps({
        "blocks": k,
        "bytes": k * bs,
        "device_blocks": nblocks,
        "block_size": bs,
        "fraction": a.fraction,
        "seed": a.seed,
        "seconds": round(time.monotonic() - t0, 3),
    }))


if __name__ == "__main__":
    main()
