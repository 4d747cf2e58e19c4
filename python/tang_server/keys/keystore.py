"""The live key set of one worker process: the key directory watched with inotify, rebuilt off the request path.

Freshness at almost no cost per request. The kernel queues an inotify event synchronously inside the system call
that changes the directory (create, rename, unlink, close after writing, the kubelet's `..data` swap), so:

- a watcher thread waits on the inotify descriptor and, holding `_lock`, drains the events, rebuilds the key
  set and swaps it in whole;
- before answering, a request checks that nothing is queued (`poll` with a zero timeout) and *then* that the
  lock is free. Events are only drained under the lock, so if both hold, every change completed before the
  request arrived is already in the served set. Otherwise the request waits for the rebuild (in a thread, so
  the event loop keeps serving). Both checks together cost about a microsecond.

A periodic re-check catches what inotify cannot see (writers on other hosts of a network file system) and
re-arms the watch when the directory itself was removed and comes back.

Reading never writes. Like the reference, a pair is generated (when `auto_keygen`) only because a Tang request
found no visible key, never because the directory changed: an operator who hides every key and then runs
`tangd-keygen` must end with exactly the pair they made. The request's own thread generates it under the
directory lock, and the request is answered from the set that holds it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import select
import threading
import time
from pathlib import Path
from typing import Protocol

from inotify_simple import INotify, flags

from tang_server.keys import keyfiles
from tang_server.keys.keyset import KeySet, load_keyset, scan_directory
from tang_server.settings import Settings

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
_WATCH_GONE = flags.IGNORED | flags.DELETE_SELF | flags.MOVE_SELF

#: While the directory cannot be watched (removed, not yet created), look for it this often.
_MISSING_RETRY_SECONDS = 0.5


class KeyStoreListener(Protocol):
    """Told about every key set swapped in and every failed read (the metrics implement it)."""

    def keyset_loaded(self, keyset: KeySet) -> None: ...

    def reload_failed(self) -> None: ...


class KeyStore:
    def __init__(
        self,
        directory: Path,
        *,
        auto_keygen: bool,
        recheck_seconds: float = Settings.recheck_seconds,
        listener: KeyStoreListener | None = None,
    ) -> None:
        self.directory = directory
        self.listener = listener
        self.auto_keygen = auto_keygen
        self.recheck_seconds = recheck_seconds
        self._inotify = INotify()
        # A poll object must not be used by two threads at once, so there is one per context: the event loop's
        # thread (`is_fresh`), the watcher's wait, and whoever holds `_lock`.
        self._loop_poll = self._poller()
        self._watcher_poll = self._poller()
        self._locked_poll = self._poller()
        self._lock = threading.Lock()
        self._watch: int | None = None
        self._keyset = KeySet.empty()
        #: Why the directory could not be read last time, or None when the last read succeeded.
        self.failure: str | None = None
        #: time.time() of the last successful load (None before the first).
        self.loaded_at: float | None = None
        #: True while a Tang request must generate a pair before it is answered (auto_keygen, and no visible key
        #: or an interrupted generation).
        self._needs_pair = False
        self._keygen_failure: str | None = None
        with self._lock:
            self._reload_locked()
        self._stopping = threading.Event()
        self._watcher = threading.Thread(target=self._watch_loop, name="tang-keystore", daemon=True)
        self._watcher.start()

    @property
    def keyset(self) -> KeySet:
        """The set swapped in last; use `current()` to answer a request."""
        return self._keyset

    def is_fresh(self, *, generate: bool = True) -> bool:
        """True when no change to the directory is waiting to be applied and, for a Tang request (`generate`), no
        pair is to be generated first. The order of the checks matters.

        Called from the event loop's thread only.
        """
        fresh = self._watch is not None and not self._loop_poll.poll(0) and not self._lock.locked()
        return fresh and not (generate and self._needs_pair)

    async def current(self, *, generate: bool = True) -> KeySet:
        """The key set including every change completed before this call.

        `generate`: the caller answers a Tang request (/adv, /adv/{thp}, /rec), which generates a pair first
        when none is visible; health and status endpoints pass False and never write.
        """
        if not self.is_fresh(generate=generate):
            await asyncio.to_thread(self.refresh, generate=generate)
        return self._keyset

    def refresh(self, *, generate: bool = True) -> None:
        """Apply pending changes now (waits for a rebuild already under way); then, for a Tang request
        (`generate`), generate a pair if no key is visible."""
        with self._lock:
            if self._watch is None or self._locked_poll.poll(0):
                self._reload_locked()
            if generate and self._needs_pair:
                self._generate_locked()

    def recheck(self) -> None:
        """Re-read the directory now if its files differ from what the served set was built from, whatever
        inotify said (SIGHUP: `systemctl reload`, for changes no event reports)."""
        with self._lock:
            self._recheck_locked()

    def close(self) -> None:
        self._stopping.set()
        self._watcher.join(timeout=5)
        self._inotify.close()

    def _watch_loop(self) -> None:
        next_recheck = time.monotonic() + self.recheck_seconds
        while not self._stopping.is_set():
            wait = _MISSING_RETRY_SECONDS if self._watch is None else max(0.0, next_recheck - time.monotonic())
            ready = self._watcher_poll.poll(min(wait, 1.0) * 1000)
            try:
                with self._lock:
                    if self._watch is None or self._locked_poll.poll(0):
                        self._reload_locked()
                    elif ready == [] and time.monotonic() >= next_recheck:
                        self._recheck_locked()
            except Exception:  # the watcher must outlive any surprise; the request path still works without it
                logger.exception("key directory watcher error")
            if time.monotonic() >= next_recheck:
                next_recheck = time.monotonic() + self.recheck_seconds

    def _poller(self) -> select.poll:
        poller = select.poll()
        poller.register(self._inotify.fileno(), select.POLLIN)
        return poller

    def _recheck_locked(self) -> None:
        """The safety net: rebuild only if the files differ from what the current set was built from."""
        try:
            changed = scan_directory(self.directory).fingerprint != self._keyset.fingerprint
        except OSError:
            changed = True  # let the reload report it
        if changed:
            logger.info("periodic re-check found changes in %s", self.directory)
            self._reload_locked()

    def _reload_locked(self) -> None:
        """Drain pending events, re-read the directory, swap the new set in. On failure keep the last set."""
        self._drain_events()
        if self._watch is None:
            self._add_watch()
        try:
            keyset = load_keyset(self.directory, previous=self._keyset)
        except OSError as exc:
            self._report_failure(f"cannot read key directory {self.directory}: {exc.strerror or exc}")
            self._needs_pair = False  # never write into a directory that cannot be read
            return
        if self.failure is not None:
            logger.info("key directory %s readable again", self.directory)
            self.failure = None
        if keyset.digest != self._keyset.digest or self.loaded_at is None:
            visible, hidden = len(keyset.visible), len(keyset.hidden)
            logger.info("key set %s: %d visible, %d hidden", keyset.digest[:16], visible, hidden)
            for problem in keyset.problems:
                logger.warning("key directory %s: %s", self.directory, problem)
        self._keyset = keyset
        # An interrupted generation may have left one key visible: the next request finishes its pair.
        self._needs_pair = self.auto_keygen and (not keyset.visible or keyfiles.generation_pending(self.directory))
        self.loaded_at = time.time()
        if self.listener is not None:
            self.listener.keyset_loaded(keyset)

    def _generate_locked(self) -> None:
        """A request found no visible key: write a pair (unless another worker did first), then load it."""
        try:
            for path in keyfiles.generate_if_needed(self.directory):
                logger.info("generated key %s", path.name)
        except (OSError, keyfiles.RotationError) as exc:
            reason = f"cannot generate keys in {self.directory}: {getattr(exc, 'strerror', None) or exc}"
            if reason != self._keygen_failure:  # once per failure, not once per request
                logger.error("%s", reason)
                self._keygen_failure = reason
            if self._watch is not None and not self._locked_poll.poll(0):
                return  # nothing changed: no rebuild
        else:
            self._keygen_failure = None
        self._reload_locked()  # our pair, or (when we wrote nothing) the visible keys another worker wrote

    def _report_failure(self, reason: str) -> None:
        if self.listener is not None:
            self.listener.reload_failed()
        if reason != self.failure:  # say it once per failure, not once per request
            logger.error("%s; serving the previous key set (%s)", reason, self._keyset.digest[:16])
            self.failure = reason

    def _add_watch(self) -> None:
        try:
            self._watch = self._inotify.add_watch(self.directory, _WATCH_FLAGS)
        except OSError as exc:
            self._watch = None
            if self.directory.is_dir():  # a missing directory is reported by the read that follows
                self._report_failure(f"cannot watch key directory {self.directory}: {exc.strerror or exc}")

    def _drain_events(self) -> None:
        for event in self._inotify.read(timeout=0):
            if event.mask & _WATCH_GONE and event.wd == self._watch:
                # The directory went away or moved: watch the path again once something is there.
                with contextlib.suppress(OSError):
                    self._inotify.rm_watch(self._watch)
                self._watch = None
