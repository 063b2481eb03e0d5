"""Mongrel2's async uploads: the spool file a request body arrives in, checked and read.

Mongrel2 spools a body over its ``limits.content_length`` to a file and sends two messages:
``x-mongrel2-upload-start: PATH`` as soon as it starts writing, and, once the body is
complete, the same headers plus ``x-mongrel2-upload-done: PATH``. Clients can send headers
of those names too and Mongrel2 passes them through, so PATH is never trusted:

- Mongrel2 spools a body only when the request's Content-Length exceeds its
  ``limits.content_length`` (``UploadPlace.content_limit``), and then writes the upload
  headers itself over any the client sent. An upload header on a request with a smaller
  or no Content-Length is the client's: refused, and the file it names is neither opened
  nor deleted (it may be another client's spool file);
- the upload directory is configured (``--upload-dir``, or derived from ``--m2-config``);
  without one every upload is refused;
- PATH resolves (symbolic links followed, ``..`` collapsed) to a file directly in that
  directory, opened without following a final symbolic link, and it must be a regular file;
- it is deleted only if the same file (device and inode) is still at that path, and only
  by the request that opened it.

The app may read the body while Mongrel2 is still writing it: a read at the end of the file
waits for more (up to ``--timeout`` without progress) until ``CONTENT_LENGTH`` bytes have
been read. It never needs the done message (which, with several handler processes, PUSH may
give to another process): the length says when the body is complete.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable
from typing import Any

from chaussette.drivers.m2config import UploadPlace
from chaussette.wsgi import BodyTruncated

POLL_START = 0.002  # seconds: first wait for the file to grow, doubled up to POLL_MAX
POLL_MAX = 0.05


class UploadRefused(Exception):
    """The upload path is not one we may read: answer 400."""


MAX_LENGTH_DIGITS = 19  # a Content-Length longer than this is no body Mongrel2 took


def spooled_length(place: UploadPlace, content_length: str | None) -> int:
    """The body length of an upload message whose Content-Length is ``content_length``;
    UploadRefused when Mongrel2 does not spool a body of that length (it passes bodies up
    to ``limits.content_length`` inline): the upload headers are the client's."""
    text = content_length or ""
    if not (text.isascii() and text.isdigit() and len(text) <= MAX_LENGTH_DIGITS):
        raise UploadRefused(
            f"upload header on a request without a valid Content-Length ({text!r}): not Mongrel2's"
        )
    length = int(text)
    if length <= place.content_limit:
        raise UploadRefused(
            f"upload header on a request of Content-Length {length}: Mongrel2 spools only "
            f"bodies over {place.content_limit} bytes (limits.content_length), so not its"
        )
    return length


def resolve(place: UploadPlace, name: str) -> str:
    """The real path of the spool file a message names; UploadRefused when it is not
    directly in the upload directory."""
    if place.directory is None:
        raise UploadRefused("no upload directory (set --upload-dir)")
    if not name or "\0" in name:
        raise UploadRefused("empty upload path")
    if place.root is not None:  # Mongrel2's names are relative to its root (chroot)
        full = os.path.join(place.root, name.lstrip("/"))
    else:
        full = os.path.abspath(name)
    real = os.path.realpath(full)
    if os.path.dirname(real) != place.directory:
        raise UploadRefused(f"upload path {name!r} is outside the upload directory")
    return real


class SpoolFile:
    """An upload's spool file, opened after the checks of ``resolve``."""

    def __init__(self, place: UploadPlace, name: str) -> None:
        self.name = name
        self.path = resolve(place, name)
        try:
            self.fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise UploadRefused(f"upload path {name!r}: {exc.strerror}") from None
        st = os.fstat(self.fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(self.fd)
            raise UploadRefused(f"upload path {name!r} is not a regular file")
        self.ident = (st.st_dev, st.st_ino)
        self.closed = False

    def read(self, size: int) -> bytes:
        return os.read(self.fd, size)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self.fd)

    def delete(self) -> None:
        """Remove the file if it is still the one we opened (Mongrel2 may have removed it
        already, when the client went away)."""
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self.ident:
                os.unlink(self.path)
        except FileNotFoundError:
            pass


class UploadBody:
    """``read_some`` for ``wsgi.input`` over a spool file still being written.

    ``wait(seconds)`` blocks until woken (the done message, a disconnect) or the time
    passes; ``gone()`` says the client went away. Reads stop at ``length`` bytes."""

    def __init__(
        self,
        spool: SpoolFile,
        length: int,
        wait: Callable[[float], Any],
        gone: Callable[[], bool],
        timeout: float | None,
    ) -> None:
        self.spool = spool
        self.remaining = length
        self.wait = wait
        self.gone = gone
        self.timeout = timeout
        self.done = False  # Mongrel2 said the file is complete

    @property
    def complete(self) -> bool:
        return self.remaining <= 0

    def read_some(self, size: int) -> bytes:
        if self.remaining <= 0:
            return b""
        want = min(size, self.remaining)
        data = self.spool.read(want)
        if data:
            self.remaining -= len(data)
            return data
        return self._wait_and_read(want)

    def _wait_and_read(self, want: int) -> bytes:
        pause = POLL_START
        since = time.monotonic()
        while True:
            if self.gone():
                raise BodyTruncated("the client went away during its upload")
            done = self.done
            data = self.spool.read(want)
            if data:
                self.remaining -= len(data)
                return data
            if done:  # the done message came before this read: the file has it all
                raise BodyTruncated(
                    f"upload file {self.spool.name!r} ended {self.remaining} bytes short"
                )
            if self.timeout is not None and time.monotonic() - since >= self.timeout:
                raise BodyTruncated(f"upload stalled for {self.timeout:g} s (--timeout)")
            self.wait(pause)
            pause = min(pause * 2, POLL_MAX)

    def finish(self) -> None:
        """After the response: remove the file. Mongrel2 may still be writing a body the
        app did not read; it writes on into the unlinked file, which is harmless."""
        self.spool.close()
        self.spool.delete()
