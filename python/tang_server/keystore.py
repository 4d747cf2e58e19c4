"""The live key set of one worker process: the key directory watched with inotify, re-read when it changes.

Freshness without a cost per request: the kernel queues an inotify event synchronously inside the system call
that changes the directory (rename, unlink, create, close after write). So before answering, a request asks the
inotify descriptor whether anything is queued, one `poll` with a zero timeout (about a microsecond); if so the
set is rebuilt before the request is answered. A change completed before a request arrived is therefore always
seen by that request, as with the reference server, which re-reads the directory every time.
"""

from __future__ import annotations

import contextlib
import logging
import select
from pathlib import Path

from inotify_simple import INotify, flags

from . import keyfiles
from .keyset import KeySet, load_keyset

logger = logging.getLogger(__name__)

_WATCH_FLAGS = (
    flags.CREATE
    | flags.DELETE
    | flags.MOVED_FROM
    | flags.MOVED_TO
    | flags.CLOSE_WRITE
    | flags.MODIFY
    | flags.ATTRIB
    | flags.DELETE_SELF
    | flags.MOVE_SELF
    | flags.ONLYDIR
)


class KeyStore:
    def __init__(self, directory: Path, *, auto_keygen: bool) -> None:
        self.directory = directory
        self.auto_keygen = auto_keygen
        self._inotify = INotify()
        self._poll = select.poll()
        self._poll.register(self._inotify.fileno(), select.POLLIN)
        self._watch: int | None = None
        self._keyset = KeySet.empty()
        self.reload()

    @property
    def keyset(self) -> KeySet:
        """The current set, brought up to date with every change to the directory completed before this call."""
        if self._watch is None or self._poll.poll(0):
            self.reload()
        return self._keyset

    def reload(self) -> None:
        """Re-read the directory; on failure keep serving the last set and say why."""
        self._drain_events()
        if self._watch is None:
            self._add_watch()
        try:
            if self.auto_keygen:
                for path in keyfiles.ensure_keys(self.directory):
                    logger.info("generated key %s", path.name)
            keyset = load_keyset(self.directory)
        except OSError as exc:
            logger.error("cannot read key directory %s: %s; serving the previous key set", self.directory, exc)
            return
        if keyset.digest != self._keyset.digest or not self._keyset.keys:
            for problem in keyset.problems:
                logger.warning("key directory %s: %s", self.directory, problem)
            logger.info(
                "key set %s: %d visible, %d hidden",
                keyset.digest[:16],
                len(keyset.visible),
                len(keyset.hidden),
            )
        self._keyset = keyset

    def _add_watch(self) -> None:
        try:
            self._watch = self._inotify.add_watch(self.directory, _WATCH_FLAGS)
        except OSError as exc:
            self._watch = None
            logger.error("cannot watch key directory %s: %s", self.directory, exc)

    def _drain_events(self) -> None:
        for event in self._inotify.read(timeout=0):
            if event.mask & (flags.IGNORED | flags.DELETE_SELF | flags.MOVE_SELF):
                # The directory went away or moved: watch the path again once something is there.
                if self._watch is not None:
                    with contextlib.suppress(OSError):  # already gone with the directory
                        self._inotify.rm_watch(self._watch)
                self._watch = None

    def close(self) -> None:
        self._inotify.close()
