"""Privileged writes to the guest kernel: clock, entropy, page cache.

In host mode they are only logged: a test machine's clock and caches are not envd's to touch.
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct
import time
from pathlib import Path

log = logging.getLogger("envd.guest")

# From <linux/random.h>: RNDADDENTROPY = _IOW('R', 0x03, int[2]), RNDRESEEDCRNG = _IO('R', 0x07).
RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207


class GuestKernel:
    def __init__(
        self,
        host_mode: bool,
        proc: Path = Path("/proc"),
        urandom: Path = Path("/dev/urandom"),
    ) -> None:
        self.host_mode = host_mode
        self.proc = proc
        self.urandom = urandom

    def set_clock(self, unix_seconds: float) -> bool:
        if self.host_mode:
            log.info(
                "host mode: not setting the clock to %.3f (off by %.3fs)",
                unix_seconds,
                unix_seconds - time.time(),
            )
            return False
        try:
            time.clock_settime(time.CLOCK_REALTIME, unix_seconds)
        except OSError as exc:
            log.error("setting the clock failed: %s", exc)
            return False
        return True

    def add_entropy(self, data: bytes) -> bool:
        """Mix ``data`` into the kernel RNG and force a reseed.

        Capsules cloned from one snapshot resume with identical RNG state; without this they
        would hand out the same "random" numbers.
        """
        if not data:
            return False
        if self.host_mode:
            log.info("host mode: not mixing %d bytes into the RNG", len(data))
            return False
        try:
            fd = os.open(self.urandom, os.O_WRONLY)
        except OSError as exc:
            log.error("opening %s failed: %s", self.urandom, exc)
            return False
        try:
            os.write(fd, data)
            # Writing only mixes; crediting entropy and reseeding the CRNG needs the ioctls.
            try:
                info = struct.pack("ii", len(data) * 8, len(data)) + data
                fcntl.ioctl(fd, RNDADDENTROPY, info)
                fcntl.ioctl(fd, RNDRESEEDCRNG)
            except OSError as exc:
                log.warning("RNG ioctl failed (data was still mixed in): %s", exc)
        except OSError as exc:
            log.error("writing entropy failed: %s", exc)
            return False
        finally:
            os.close(fd)
        return True

    def sync(self) -> None:
        os.sync()

    def drop_page_cache(self) -> bool:
        """Drop clean page cache only (1): dentries and inodes are small and costly to rebuild."""
        if self.host_mode:
            log.debug("host mode: would drop the page cache")
            return False
        try:
            with open(self.proc / "sys" / "vm" / "drop_caches", "w") as fh:
                fh.write("1\n")
        except OSError as exc:
            log.error("dropping the page cache failed: %s", exc)
            return False
        return True
