"""Beat's leader lease: with beat on several hosts sharing one database, one of them schedules.

A lease row per name (``leader_leases``): its holder (``host:pid:random``)
and when the lease ends. Taking and renewing it is one conditional UPDATE
(the row free, lapsed or ours already); an INSERT when the row is missing,
where losing the primary-key race is losing the lease. :class:`Leader`'s
thread renews every third of the lease and, standing by, looks every
:data:`POLL_SECONDS`.

Fencing: a leader stops leading by its own monotonic clock one renewal
period before the lease it last renewed lapses (:attr:`Leader.leading`), so
a leader cut off from the database has stopped scheduling before a standby
may take over. At its stop it releases the lease (if still its own): a
standby takes over at its next look, not after the lease.

Schedule state: Celery's PersistentScheduler keeps each entry's last run in
a file on its own host. The leader also records each run here
(``leader_runs``, only ever moved forward) as it reserves it, and a new
leader starts from the later of its own and the recorded run: a takeover
neither repeats nor skips a run.

Clocks: lease ends and recorded runs are wall-clock times (naive UTC, as in
the job ledger) compared across hosts, as Celery compares its schedule with
the clock anyway: hosts must run NTP. The fencing margin covers small skew.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

from sqlalchemy import (
    Column,
    DateTime,
    MetaData,
    String,
    Table,
    and_,
    bindparam,
    exc,
    inspect,
    or_,
    select,
    update,
)

from core import db, outages
from stopright.registry import ShutdownRegistry

log = logging.getLogger("leader")

#: How often a standby looks whether the lease is free (a stopped leader's successor waits this, at most).
POLL_SECONDS = 1.0
#: The leader renews this many times per lease; it stops leading one renewal period before the lease ends.
RENEWALS_PER_LEASE = 3
#: How long a stop waits to record the last runs and release the lease.
STOP_SECONDS = 0.5

metadata = MetaData()
leases = Table(
    "leader_leases",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("holder", String(255)),  # None: released
    Column("expires_at", DateTime, nullable=False),
    Column("renewed_at", DateTime, nullable=False),  # the holder's last renewal, or its release
)
runs = Table(
    "leader_runs",
    metadata,
    Column("name", String(64), primary_key=True),  # the lease's
    Column("entry", String(255), primary_key=True),
    Column("last_run_at", DateTime, nullable=False),
)

# Statements built once (as in jobs/ledger.py): a standby runs them every second.
_TAKE = (update(leases)
         .where(leases.c.name == bindparam("p_name"),
                or_(leases.c.holder == bindparam("p_holder"), leases.c.holder.is_(None),
                    leases.c.expires_at <= bindparam("p_now")))
         .values(holder=bindparam("p_holder"), expires_at=bindparam("p_until"),
                 renewed_at=bindparam("p_now")))
_RELEASE = (update(leases)
            .where(leases.c.name == bindparam("p_name"), leases.c.holder == bindparam("p_holder"))
            .values(holder=None, expires_at=bindparam("p_now"), renewed_at=bindparam("p_now")))
_READ = select(leases.c.holder, leases.c.expires_at, leases.c.renewed_at).where(
    leases.c.name == bindparam("p_name"))
_RUN = and_(runs.c.name == bindparam("p_name"), runs.c.entry == bindparam("p_entry"))
_RECORD = (update(runs).where(_RUN, runs.c.last_run_at < bindparam("p_at"))
           .values(last_run_at=bindparam("p_at")))
_RECORDED = select(runs.c.entry, runs.c.last_run_at).where(runs.c.name == bindparam("p_name"))


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def holder_id() -> str:
    """This process, unique even for a pid reused on the same host: ``host:pid:random``."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def ensure_schema() -> None:
    """Create the tables if missing; every beat may race to do it at start."""
    engine = db.get_engine()
    try:
        metadata.create_all(engine)
    except exc.DBAPIError:  # another beat created them between check and CREATE
        if not all(inspect(engine).has_table(t.name) for t in metadata.sorted_tables):
            raise


class Row(NamedTuple):
    holder: str | None
    expires_at: datetime
    renewed_at: datetime


class Lease:
    """One named lease in the database and its recorded runs: the statements, no thread."""

    def __init__(self, name: str, holder: str, seconds: float, *,
                 now: Callable[[], datetime] = utcnow) -> None:
        self.name, self.holder, self.seconds = name, holder, seconds
        self.now = now  # the wall clock compared across hosts (a seam for the tests)

    def read(self) -> Row | None:
        with db.get_engine().connect() as conn:
            row = conn.execute(_READ, {"p_name": self.name}).first()
        return None if row is None else Row(*row)

    def lapsed(self, row: Row | None) -> bool:
        """Whether ``row`` leaves the lease to anyone: missing, released or past its end."""
        return row is None or row.holder is None or row.expires_at <= self.now()

    def acquire(self) -> bool:
        """Take or renew the lease until now + its length; False when another holds it."""
        now = self.now()
        params = {"p_name": self.name, "p_holder": self.holder, "p_now": now,
                  "p_until": now + timedelta(seconds=self.seconds)}
        with db.transaction() as conn:
            if conn.execute(_TAKE, params).rowcount:
                return True
            if conn.execute(_READ, params).first() is not None:
                return False
        try:
            with db.transaction() as conn:
                conn.execute(leases.insert(), {"name": self.name, "holder": self.holder,
                                               "expires_at": params["p_until"], "renewed_at": now})
        except exc.IntegrityError:  # another beat inserted it first: its lease
            return False
        return True

    def release(self) -> bool:
        """End the lease now, if it is still ours."""
        now = self.now()
        with db.transaction() as conn:
            return bool(conn.execute(_RELEASE, {"p_name": self.name, "p_holder": self.holder,
                                                "p_now": now}).rowcount)

    def record(self, entry: str, at: datetime) -> None:
        """``entry`` ran at ``at`` (naive UTC): kept unless a later run is recorded already."""
        params = {"p_name": self.name, "p_entry": entry, "p_at": at}
        with db.transaction() as conn:
            if conn.execute(_RECORD, params).rowcount or conn.execute(
                    select(runs.c.entry).where(_RUN), params).first() is not None:
                return
        try:
            with db.transaction() as conn:
                conn.execute(runs.insert(), {"name": self.name, "entry": entry, "last_run_at": at})
        except exc.IntegrityError:  # recorded meanwhile: keep the later one
            with db.transaction() as conn:
                conn.execute(_RECORD, params)

    def recorded(self) -> dict[str, datetime]:
        """Each entry's last recorded run (naive UTC)."""
        with db.get_engine().connect() as conn:
            return {entry: at for entry, at in conn.execute(_RECORDED, {"p_name": self.name})}


def naive_utc(at: datetime) -> datetime:
    return at if at.tzinfo is None else at.astimezone(UTC).replace(tzinfo=None)


class Leader:
    """The lease kept by a thread of its own: a database that does not answer never stalls beat's loop.

    The scheduler reads :attr:`leading` (no database call) before each tick,
    and :attr:`term` / :attr:`recorded` to learn the runs recorded before it
    took over. :meth:`step` is the thread's one round (the unit tests call it).
    """

    def __init__(self, lease: Lease, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.lease = lease
        self.period = lease.seconds / RENEWALS_PER_LEASE
        self._clock = clock
        self._fence_at = float("-inf")  # leading until then, by this host's monotonic clock
        self._held = False  # the last renewal succeeded, and the lease was not given up since
        #: Incremented at each takeover: the scheduler then starts from :attr:`recorded`.
        self.term = 0
        self.recorded: dict[str, datetime] = {}
        self._pending: dict[str, datetime] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="leader-lease", daemon=True)
        self._schema_ready = False
        self._seen: str | None = None  # the holder last logged as leading
        self._failing = False

    @property
    def leading(self) -> bool:
        return self._clock() < self._fence_at

    def start(self, registry: ShutdownRegistry) -> None:
        # The engine first, so the registry (newest first) releases the lease before it closes
        # the database.
        db.get_engine()
        self._thread.start()
        registry.register("beat leader lease", self.stop, timeout=STOP_SECONDS + 0.5)

    def record(self, entry: str, at: datetime) -> None:
        """``entry`` runs now (reserved at ``at``): written by the thread at once, and before the release."""
        at = naive_utc(at)
        with self._lock:
            self._pending[entry] = max(at, self._pending.get(entry, at))
        self._wake.set()

    def stop(self) -> None:
        """Stop scheduling at once; the thread records the last runs and releases the lease."""
        self._fence_at = float("-inf")
        self._stop.set()
        self._wake.set()
        self._thread.join(STOP_SECONDS + 0.2)

    def step(self) -> float:
        """Record pending runs, then renew, take or look at the lease; the seconds until the next step."""
        started = self._clock()
        self._fenced()  # the last renewal is too old (a stalled step): a new term, if any, not a renewal
        try:
            with db.deadline(self.period):
                if not self._schema_ready:  # beat may be first up on a fresh database
                    ensure_schema()
                    self._schema_ready = True
                self.flush()
                delay = self._renew_or_look(started)
                if self._stop.is_set():  # stopped meanwhile: renewed or not, beat schedules no more
                    self._fence_at = float("-inf")
        except Exception as exc:  # noqa: BLE001 - an outage or a bug: log it once, try again
            kind = outages.database_outage(exc)
            if kind is None:
                log.exception("leader lease: step failed")
            elif not self._failing:
                log.warning("leader lease: database %s (%s); retrying every %.1f s", kind,
                            type(exc).__name__, POLL_SECONDS)
            self._failing = kind is not None
            self._fenced()
            return min(POLL_SECONDS, self.period)
        if self._failing:
            log.warning("leader lease: the database answers again")
            self._failing = False
        return delay

    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
        try:
            for entry, at in list(pending.items()):
                self.lease.record(entry, at)
                del pending[entry]  # not reached for the one that failed: kept for the next try
        finally:
            if pending:
                with self._lock:
                    for entry, at in pending.items():
                        self._pending[entry] = max(at, self._pending.get(entry, at))

    def _renew_or_look(self, started: float) -> float:
        if self._held:
            if self.lease.acquire():
                self._fence_at = started + self.lease.seconds - self.period
                return self.period
            self._held = False
            self._fence_at = float("-inf")
            log.warning("not leading: the lease was taken over")
        row = self.lease.read()
        if (self.lease.lapsed(row) or row is not None and row.holder == self.lease.holder) \
                and self.lease.acquire():
            self.recorded = self.lease.recorded()
            self._fence_at = started + self.lease.seconds - self.period
            self._held = True
            self.term += 1
            self._seen = None
            self._log_takeover(row)
            return self.period
        row = self.lease.read()
        holder = row.holder if row is not None else None
        if holder != self._seen:
            log.info("standby: %s leads", holder)
            self._seen = holder
        return POLL_SECONDS

    def _log_takeover(self, row: Row | None) -> None:
        if row is None or row.holder == self.lease.holder:
            log.info("leading (lease %s)", self.lease.holder)
            return
        since = (self.lease.now() - row.renewed_at).total_seconds()
        how = "a released lease" if row.holder is None else f"{row.holder}, whose lease lapsed"
        log.info("leading (took over after %.1f s, from %s) as %s", since, how, self.lease.holder)

    def _fenced(self) -> None:
        """Once the fence passed unrenewed, say so once (:attr:`leading` is False already).

        Leading again then takes the lease anew (a new :attr:`term`): another
        beat may have led meanwhile and recorded runs.
        """
        if self._held and not self.leading:
            self._held = False
            log.warning("not leading: the lease could not be renewed in time; stopped scheduling "
                        "before it lapses")

    def _run(self) -> None:
        next_at = self._clock()
        while not self._stop.is_set():
            if self._clock() >= next_at:
                next_at = self._clock() + self.step()
            elif self._pending:
                self._flush_guarded()
            self._wake.wait(max(0.0, next_at - self._clock()))
            self._wake.clear()
        self._release()

    def _flush_guarded(self) -> None:
        try:
            with db.deadline(self.period):
                self.flush()
        except Exception as exc:  # noqa: BLE001 - retried at the next step, which logs an outage
            log.debug("leader lease: runs not recorded (%s)", exc)

    def _release(self) -> None:
        """At the stop: the last runs recorded, then the lease released, within :data:`STOP_SECONDS`."""
        if not self._held:
            return
        try:
            with db.deadline(STOP_SECONDS):
                self.flush()
                if self.lease.release():
                    log.info("leader lease released")
        except Exception as exc:  # noqa: BLE001 - the lease lapses on its own
            log.warning("leader lease not released (%s: %s); it lapses in %.0f s at most",
                        type(exc).__name__, exc, self.lease.seconds)
        self._held = False

