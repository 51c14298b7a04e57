"""Writes awkward bytes to both streams: no final newline, CR, invalid UTF-8, large blocks."""

import os
import sys

PATTERN = bytes(range(256)) * 64  # every byte value, 16 KiB


def main():
    for i in range(200):
        os.write(1, b"line %d\r\n" % i)
        if i % 50 == 0:
            os.write(2, b"err \xff\xfe %d\n" % i)
    os.write(1, PATTERN * 16)  # 256 KiB in one write
    os.write(2, b"partial line without newline")
    os.write(1, b"\x00\x01 end")
    sys.exit(int(os.environ.get("EXIT_CODE", "0")))


main()
