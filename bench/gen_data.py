#!/usr/bin/env python3
"""Writes a deterministic artifacts folder for the archive benchmark.

Half text logs (timestamped lines with varying numbers, compressing about
as well as real test logs), half incompressible binaries, spread over a
few directories and file sizes, as a test phase tends to leave them.
Usage: gen_data.py DIR TOTAL_MIB
"""
import os
import random
import sys


def text_file(path, size, rng):
    levels = ["INFO", "DEBUG", "WARNING", "ERROR"]
    words = ("kernel usb device probe firmware timeout retry passed failed "
             "network interface link up down suspend resume test case "
             "checkbox job result stdout stderr module loaded").split()
    with open(path, "w") as f:
        written = 0
        t = 1700000000.0
        chunk = []
        while written < size:
            t += rng.random() * 0.05
            line = "%.6f [%s] %s: %s %d 0x%08x\n" % (
                t, rng.choice(levels), rng.choice(words),
                " ".join(rng.choice(words) for _ in range(rng.randint(3, 12))),
                rng.randint(0, 100000), rng.getrandbits(32))
            chunk.append(line)
            written += len(line)
            if len(chunk) >= 4096:
                f.write("".join(chunk))
                chunk = []
        f.write("".join(chunk))


def binary_file(path, size):
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(left, 1 << 20)
            f.write(os.urandom(n))
            left -= n


def main():
    dest, total_mib = sys.argv[1], int(sys.argv[2])
    rng = random.Random(42)
    total = total_mib << 20
    half = total // 2
    os.makedirs(os.path.join(dest, "logs", "per-test"), exist_ok=True)
    os.makedirs(os.path.join(dest, "images"), exist_ok=True)
    # Text: one big log, many small ones.
    text_file(os.path.join(dest, "logs", "console.log"), half // 2, rng)
    small = 200
    for i in range(small):
        text_file(os.path.join(dest, "logs", "per-test", "test-%03d.log" % i), (half // 2) // small, rng)
    # Binaries: a few large, some medium.
    binary_file(os.path.join(dest, "images", "crash.dump"), half // 2)
    for i in range(16):
        binary_file(os.path.join(dest, "images", "blob-%02d.bin" % i), (half // 2) // 16)


if __name__ == "__main__":
    main()
