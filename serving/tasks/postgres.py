"""The PostgreSQL task store: few-shot tasks shared by every replica behind a load balancer.

    --tasks-store postgresql://USER[:PASSWORD]@HOST[:PORT]/DB[?sslmode=...]   (libpq URL; PG* env vars work)

One table, created on first use (under an advisory lock, so replicas starting together do not
race on CREATE TABLE):

    clipheads_tasks(identity, name, version, labels jsonb, tensors bytea, alpha, beta, created,
                    store_version)     PRIMARY KEY (identity, name)

`tensors` holds safetensors bytes (keys, targets, text), never a pickle. `version` comes from one
sequence and changes on every write, so a replica knows which of its copies are stale.

Consistency:
- register: `INSERT ... ON CONFLICT (identity, name) DO NOTHING RETURNING version` -- the
  database decides, so two replicas registering one name at once get exactly one row (201) and
  one 409; `replace` is an upsert. The task-count cap is checked under a per-identity advisory
  lock in the same transaction.
- every write sends `NOTIFY clipheads_tasks`; each replica LISTENs on its own connection (a
  daemon thread) and marks its copy stale, so adds, replaces and deletes are visible everywhere
  about as fast as the notification travels. If that connection drops, the copy is resynced at
  most every `max_staleness_s` (5 s) anyway, and a name this replica does not know is looked up
  in the table at once (so "register on A, classify on B" never waits for a notification).
- reads on a fresh copy touch no database; a database that is down answers 503
  `tasks_store_unavailable` for few-shot routes and lookups of unknown names, never a 500 (bundle
  tasks keep serving). A database that hangs without an error is the front's to bound: it calls
  the store off its event loop and, past its timeout, `interrupt()`s the stuck call
  (front/store_calls.py); keepalives and tcp_user_timeout drop connections to a vanished host.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from typing import Any, Optional, Sequence

import numpy as np

from .base import (
    STORE_VERSION, FewShotTask, TaskStore, TaskStoreError, check_name, log, new_task, redact, task_from_record,
    task_tensors,
)

CHANNEL = "clipheads_tasks"
_SCHEMA_LOCK = 0x636C6970  # advisory lock key for CREATE TABLE ("clip")
_SCHEMA = (
    "CREATE SEQUENCE IF NOT EXISTS clipheads_tasks_version",
    """CREATE TABLE IF NOT EXISTS clipheads_tasks (
        identity text NOT NULL,
        name text NOT NULL,
        version bigint NOT NULL DEFAULT nextval('clipheads_tasks_version'),
        labels jsonb NOT NULL,
        tensors bytea NOT NULL,
        alpha double precision NOT NULL,
        beta double precision NOT NULL,
        created double precision NOT NULL,
        store_version integer NOT NULL,
        PRIMARY KEY (identity, name))""",
)
_COLUMNS = "name, version, labels, tensors, alpha, beta, created, store_version"


def _unavailable(err: Exception) -> TaskStoreError:
    log.warning("task store: database error: %s: %s", type(err).__name__, err)
    return TaskStoreError("tasks_store_unavailable", "the shared task store is unreachable; retry shortly", 503)


class PostgresTaskStore(TaskStore):
    def __init__(self, url: str, identity: str, max_tasks: int = 256, max_staleness_s: float = 5.0,
                 connect_timeout_s: int = 5, statement_timeout_ms: int = 5000):
        try:
            import psycopg  # noqa: F401
        except ImportError as err:
            raise TaskStoreError("invalid_tasks_store", f"a postgresql:// task store needs psycopg "
                                 f"(pip install -r requirements/serve.txt): {err}", 500) from None
        self.url = url
        self.identity = identity
        self.max_tasks = max_tasks
        self.max_staleness_s = max_staleness_s
        # statement_timeout bounds a query the server runs; keepalives and tcp_user_timeout make a
        # connection to a vanished host fail (in ~30 s) instead of waiting on TCP's own minutes
        self._connect_kw = dict(connect_timeout=connect_timeout_s,
                                options=f"-c statement_timeout={int(statement_timeout_ms)}",
                                application_name="clipheads", keepalives=1, keepalives_idle=10,
                                keepalives_interval=5, keepalives_count=3, tcp_user_timeout=30_000)
        self._lock = threading.RLock()  # one connection, one statement at a time
        self._conn = None
        self._tasks: dict[str, tuple[int, FewShotTask]] = {}
        self._synced_at = float("-inf")
        self._stale = threading.Event()
        self._stale.set()
        self._closed = threading.Event()
        try:
            with self._transaction() as cur:
                cur.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
                for stmt in _SCHEMA:
                    cur.execute(stmt)
        except TaskStoreError:
            raise
        except Exception as err:  # noqa: BLE001 - psycopg errors: not ready (the front retries warm-up)
            raise _unavailable(err) from None
        self._listener = threading.Thread(target=self._listen, name="tasks-store-listen", daemon=True)
        self._listener.start()
        self._sync()

    def describe(self) -> str:
        return f"postgresql {redact(self.url)}"

    # ---- connection ------------------------------------------------------------------------
    def _connect(self):
        import psycopg

        return psycopg.connect(self.url, **self._connect_kw)

    class _Tx:
        """`with store._transaction() as cur:` one transaction on the shared connection; a broken
        connection is dropped (the next call reconnects)."""

        def __init__(self, store: "PostgresTaskStore"):
            self.store = store

        def __enter__(self):
            s = self.store
            s._lock.acquire()
            try:
                if s._conn is None or s._conn.closed:
                    s._conn = s._connect()
                self.tx = s._conn.transaction()
                self.tx.__enter__()
                self.cur = s._conn.cursor()
                return self.cur
            except BaseException:
                s._lock.release()
                raise

        def __exit__(self, et, ev, tb):
            s = self.store
            try:
                self.cur.close()
                return self.tx.__exit__(et, ev, tb)
            except Exception:
                if s._conn is not None and s._conn.broken:
                    s._conn = None
                raise
            finally:
                if et is not None and s._conn is not None and s._conn.broken:
                    s._conn = None
                s._lock.release()

    def _transaction(self) -> "PostgresTaskStore._Tx":
        return PostgresTaskStore._Tx(self)

    def _run(self, fn):
        """fn(cursor) in a transaction; one retry on a dropped connection; database errors -> 503."""
        import psycopg

        for attempt in (0, 1):
            try:
                with self._transaction() as cur:
                    return fn(cur)
            except psycopg.OperationalError as err:
                if attempt == 1:
                    raise _unavailable(err) from None
            except psycopg.Error as err:
                raise _unavailable(err) from None

    def _listen(self) -> None:
        """LISTEN on its own connection; any notification (or a lost connection) marks the copy stale."""
        while not self._closed.is_set():
            conn = None
            try:
                import psycopg

                conn = psycopg.connect(self.url, autocommit=True, **self._connect_kw)
                conn.execute(f"LISTEN {CHANNEL}")
                self._stale.set()  # anything may have changed while we were not listening
                while not self._closed.is_set():
                    for _ in conn.notifies(timeout=1.0):
                        self._stale.set()
            except Exception as err:  # noqa: BLE001 - reconnect; reads fall back to max_staleness_s
                if not self._closed.is_set():
                    log.warning("task store: notification connection lost (%s); retrying", err)
                    self._stale.set()
                    self._closed.wait(1.0)
            finally:
                if conn is not None:
                    try:
                        conn.close()
                    except Exception:  # noqa: BLE001
                        pass

    def interrupt(self) -> None:
        """Shut the shared connection's socket down: a call blocked reading from a stalled
        database or proxy gets an error at once (the connection is dropped, the next call
        reconnects) instead of holding the store until TCP gives up."""
        conn = self._conn
        if conn is None or conn.closed:
            return
        try:
            with socket.socket(fileno=os.dup(conn.fileno())) as sock:
                sock.shutdown(socket.SHUT_RDWR)
        except Exception as err:  # noqa: BLE001 - closed meanwhile: nothing left to unblock
            log.debug("task store: interrupt: %s", err)
        log.warning("task store: a database call took too long; its connection was shut down")

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # ---- the local copy --------------------------------------------------------------------
    def _decode(self, row: Sequence[Any]) -> Optional[tuple[int, FewShotTask]]:
        from safetensors.numpy import load

        name, version, labels, tensors, alpha, beta, created, store_version = row
        try:
            if store_version != STORE_VERSION:
                raise ValueError(f"unknown store_version {store_version}")
            labels = json.loads(labels) if isinstance(labels, str) else labels
            return int(version), task_from_record(name, labels, load(bytes(tensors)), alpha, beta, created)
        except Exception as err:  # noqa: BLE001 - one bad row must not hide the others
            log.warning("task store: ignoring row %s: %s", name, err)
            return None

    def _sync(self) -> None:
        """Bring the local copy up to date: names and versions first, then only changed rows."""
        self._stale.clear()  # a notification arriving during the sync marks it stale again

        def read(cur):
            cur.execute("SELECT name, version FROM clipheads_tasks WHERE identity = %s", (self.identity,))
            current = dict(cur.fetchall())
            changed = [n for n, v in current.items() if self._tasks.get(n, (None,))[0] != v]
            rows = []
            if changed:
                cur.execute(f"SELECT {_COLUMNS} FROM clipheads_tasks WHERE identity = %s AND name = ANY(%s)",
                            (self.identity, changed))
                rows = cur.fetchall()
            return current, rows

        try:
            current, rows = self._run(read)
        except TaskStoreError:
            self._stale.set()
            raise
        with self._lock:
            tasks = {n: vt for n, vt in self._tasks.items() if current.get(n) == vt[0]}
            for row in rows:
                decoded = self._decode(row)
                if decoded is not None:
                    tasks[row[0]] = decoded
            self._tasks = tasks
            self._synced_at = time.monotonic()

    def _fresh(self) -> None:
        if self._stale.is_set() or time.monotonic() - self._synced_at > self.max_staleness_s:
            self._sync()

    def _lookup(self, name: str) -> Optional[tuple[int, FewShotTask]]:
        """One indexed read for a name the copy does not hold (it may have just been registered)."""
        def read(cur):
            cur.execute(f"SELECT {_COLUMNS} FROM clipheads_tasks WHERE identity = %s AND name = %s",
                        (self.identity, name))
            return cur.fetchone()

        row = self._run(read)
        return self._decode(row) if row else None

    # ---- API -------------------------------------------------------------------------------
    def names(self) -> list[str]:
        self._fresh()
        with self._lock:
            return sorted(self._tasks)

    def get(self, name: str) -> Optional[FewShotTask]:
        self._fresh()
        with self._lock:
            hit = self._tasks.get(name)
        if hit is None and isinstance(name, str) and len(name) <= 64:
            try:
                check_name(name)
            except TaskStoreError:
                return None
            hit = self._lookup(name)
            if hit is not None:
                with self._lock:
                    self._tasks[name] = hit
        return hit[1] if hit else None

    def add(self, name: str, labels: Sequence[str], keys: np.ndarray, targets: np.ndarray, text: np.ndarray,
            replace: bool = False) -> FewShotTask:
        from psycopg.types.json import Jsonb

        check_name(name)
        task = new_task(name, labels, keys, targets, text)
        blob = task_tensors(task)

        def write(cur):
            cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (self.identity,))
            cur.execute("SELECT count(*) FROM clipheads_tasks WHERE identity = %s AND name <> %s",
                        (self.identity, name))
            if cur.fetchone()[0] >= self.max_tasks:
                raise TaskStoreError("too_many_tasks", f"the registry holds at most {self.max_tasks} tasks", 409)
            on_conflict = ("DO UPDATE SET labels = EXCLUDED.labels, tensors = EXCLUDED.tensors, alpha = EXCLUDED.alpha, "
                           "beta = EXCLUDED.beta, created = EXCLUDED.created, store_version = EXCLUDED.store_version, "
                           "version = nextval('clipheads_tasks_version')") if replace else "DO NOTHING"
            cur.execute(
                "INSERT INTO clipheads_tasks (identity, name, labels, tensors, alpha, beta, created, store_version) "
                f"VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (identity, name) {on_conflict} RETURNING version",
                (self.identity, name, Jsonb(list(task.labels)), blob, task.alpha, task.beta, task.created, STORE_VERSION),
            )
            row = cur.fetchone()
            if row is None:
                raise TaskStoreError("task_exists", f"task {name!r} already exists; delete it first", 409)
            cur.execute("SELECT pg_notify(%s, %s)", (CHANNEL, name))
            return int(row[0])

        version = self._run(write)
        with self._lock:
            self._tasks[name] = (version, task)
        return task

    def delete(self, name: str) -> bool:
        check_name(name)

        def write(cur):
            cur.execute("DELETE FROM clipheads_tasks WHERE identity = %s AND name = %s RETURNING name",
                        (self.identity, name))
            found = cur.fetchone() is not None
            if found:
                cur.execute("SELECT pg_notify(%s, %s)", (CHANNEL, name))
            return found

        found = self._run(write)
        with self._lock:
            self._tasks.pop(name, None)
        return found
