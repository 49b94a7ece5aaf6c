"""Few-shot task stores: the directory store and the PostgreSQL store against a real server.

Two store objects on one database stand for two replicas; `test_tasks_store_replicas.py` runs two
real `clipheads serve` processes against it.
"""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from pg_server import PostgresServer, require_bindir
from clipheads.serving.tasks import TaskStoreError, open_task_store, redact, store_scheme


def _task(seed: int = 0, n_labels: int = 2, shots: int = 2, dim: int = 8):
    rng = np.random.default_rng(seed)
    keys = rng.normal(size=(n_labels * shots, dim)).astype(np.float32)
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    text = rng.normal(size=(n_labels, dim)).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    labels = [f"l{i}" for i in range(n_labels)]
    return labels, keys, np.repeat(np.arange(n_labels), shots), text


@pytest.fixture(scope="module")
def pg():
    bindir = require_bindir()
    srv = PostgresServer(bindir)
    yield srv
    srv.stop()


@pytest.fixture
def db_url(pg, request):
    """A fresh database per test (the same server)."""
    import psycopg

    name = "t_" + request.node.name.lower().replace("[", "_").replace("]", "").replace("-", "_")[:50]
    with psycopg.connect(pg.url, autocommit=True) as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}"')
        c.execute(f'CREATE DATABASE "{name}"')
    return pg.url.rsplit("/", 1)[0] + "/" + name


# ---- locations -------------------------------------------------------------------------------
def test_locations_pick_the_store(tmp_path):
    assert store_scheme("") == store_scheme(str(tmp_path)) == ""
    assert store_scheme("postgresql://u@h/db") == "postgresql" == store_scheme("POSTGRESQL://u@h/db").lower()
    with pytest.raises(TaskStoreError, match="unknown task store"):
        store_scheme("mysql://u@h/db")
    assert open_task_store("", "id").describe() == "memory"
    assert redact("postgresql://u:secret@h:5/db") == "postgresql://u:***@h:5/db"
    assert redact("postgresql://u@h/db") == "postgresql://u@h/db"
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(TaskStoreError, match="not a directory"):
        open_task_store(str(f), "id")


# ---- directory store -------------------------------------------------------------------------
def test_directory_store_concurrent_add_of_one_name_has_one_winner(tmp_path):
    """Two store objects on one directory (two processes of one machine) race on one name 20 times:
    exactly one add wins each time and the stored tensors are the winner's."""
    a, b = open_task_store(str(tmp_path), "id"), open_task_store(str(tmp_path), "id")
    for round_ in range(20):
        name = f"race{round_}"
        results: dict[str, object] = {}
        barrier = threading.Barrier(2)

        def go(store, who, seed):
            labels, keys, targets, text = _task(seed)
            barrier.wait()
            try:
                store.add(name, labels, keys, targets, text)
                results[who] = seed
            except TaskStoreError as err:
                results[who] = err.kind

        ts = [threading.Thread(target=go, args=(a, "a", 1)), threading.Thread(target=go, args=(b, "b", 2))]
        [t.start() for t in ts]
        [t.join() for t in ts]
        winners = [v for v in results.values() if isinstance(v, int)]
        assert len(winners) == 1 and "task_exists" in results.values(), results
        fresh = open_task_store(str(tmp_path), "id").get(name)
        np.testing.assert_array_equal(fresh.keys, _task(winners[0])[1])
    assert len(list(a.dir.glob("*.safetensors"))) == 20  # losers left no tensor file behind


def test_directory_store_replace_and_delete_keep_one_tensor_file(tmp_path):
    s = open_task_store(str(tmp_path), "id")
    s.add("t", *_task(1))
    s.add("t", *_task(2), replace=True)
    assert len(list(s.dir.glob("t.*.safetensors"))) == 1
    np.testing.assert_array_equal(open_task_store(str(tmp_path), "id").get("t").keys, _task(2)[1])
    assert s.delete("t") and {p.name for p in s.dir.iterdir()} == {"identity.txt"}


def test_directory_store_keeps_each_backbones_tasks_apart(tmp_path):
    """Servers on two backbones share one directory: one name is free on each, and a replace or
    delete on one never touches the other's task."""
    a, b = open_task_store(str(tmp_path), "ViT-B-16:openai:aaaa"), open_task_store(str(tmp_path), "ViT-B-32:x:bbbb")
    a.add("pets", *_task(1))
    assert b.names() == [] and b.get("pets") is None
    b.add("pets", *_task(2))  # not a 409: A's task is not B's
    b.add("pets", *_task(3), replace=True)
    np.testing.assert_array_equal(open_task_store(str(tmp_path), "ViT-B-16:openai:aaaa").get("pets").keys, _task(1)[1])
    assert b.delete("pets") and not b.delete("pets")
    assert a.names() == ["pets"] and open_task_store(str(tmp_path), "ViT-B-16:openai:aaaa").names() == ["pets"]
    assert a.dir != b.dir and a.dir.parent == b.dir.parent == tmp_path
    assert (a.dir / "identity.txt").read_text() == "ViT-B-16:openai:aaaa\n"


def test_directory_store_moves_tasks_of_the_flat_layout_into_their_folder(tmp_path):
    """Tasks written directly in DIR (before identity folders) are adopted by their own backbone's
    server, and only by it; a name its folder already holds is left in place."""
    import json

    old = open_task_store(str(tmp_path), "id-old")
    old.add("legacy", *_task(4))
    old.add("clash", *_task(5))
    for f in list(old.dir.iterdir()):  # lay the files out as the flat layout did
        if f.name != "identity.txt":
            f.rename(tmp_path / f.name)
    old.dir.joinpath("identity.txt").unlink()
    old.dir.rmdir()
    other = open_task_store(str(tmp_path), "id-other")
    assert other.names() == [] and (tmp_path / "legacy.json").is_file()  # not the other backbone's to take
    mine = open_task_store(str(tmp_path), "id-old")
    assert mine.names() == ["clash", "legacy"] and not list(tmp_path.glob("*.json"))
    np.testing.assert_array_equal(mine.get("legacy").keys, _task(4)[1])
    assert json.loads((mine.dir / "legacy.json").read_text())["identity"] == "id-old"

    # a flat-layout task whose name the folder already holds stays where it is
    (tmp_path / "clash.json").write_text((mine.dir / "clash.json").read_text())
    open_task_store(str(tmp_path), "id-old")
    assert (tmp_path / "clash.json").is_file()


# ---- PostgreSQL store ------------------------------------------------------------------------
def test_pg_add_on_one_replica_is_visible_on_the_other_and_delete_too(db_url):
    a, b = open_task_store(db_url, "bb1"), open_task_store(db_url, "bb1")
    try:
        assert a.names() == b.names() == []
        labels, keys, targets, text = _task(3)
        a.add("birds", labels, keys, targets, text)
        got = b.get("birds")  # an unknown name is looked up at once: no wait for the notification
        assert got is not None and got.labels == tuple(labels)
        np.testing.assert_array_equal(got.keys, keys)
        np.testing.assert_array_equal(got.targets, targets)
        assert b.names() == ["birds"] and [t["name"] for t in b.list()] == ["birds"]

        a.add("birds", *_task(4), replace=True)  # a replace reaches B's copy through NOTIFY
        deadline = time.time() + 5
        while time.time() < deadline and not np.array_equal(b.get("birds").keys, _task(4)[1]):
            time.sleep(0.02)
        np.testing.assert_array_equal(b.get("birds").keys, _task(4)[1])

        assert a.delete("birds")
        deadline = time.time() + 5
        while time.time() < deadline and b.get("birds") is not None:
            time.sleep(0.02)
        assert b.get("birds") is None and b.names() == []
        assert not b.delete("birds")
    finally:
        a.close()
        b.close()


def test_pg_concurrent_registration_of_one_name_has_exactly_one_winner(db_url):
    stores = [open_task_store(db_url, "bb1") for _ in range(4)]
    try:
        for round_ in range(10):
            name = f"race{round_}"
            barrier = threading.Barrier(len(stores))
            outcome: list = [None] * len(stores)

            def go(i):
                barrier.wait()
                try:
                    stores[i].add(name, *_task(i))
                    outcome[i] = "created"
                except TaskStoreError as err:
                    outcome[i] = err.kind

            ts = [threading.Thread(target=go, args=(i,)) for i in range(len(stores))]
            [t.start() for t in ts]
            [t.join() for t in ts]
            assert outcome.count("created") == 1 and outcome.count("task_exists") == 3, outcome
            winner = outcome.index("created")
            for s in stores:  # every replica sees the winner's tensors, not a mix
                np.testing.assert_array_equal(s.get(name).keys, _task(winner)[1])
    finally:
        for s in stores:
            s.close()


def test_pg_identities_are_separate_and_the_cap_holds(db_url):
    from clipheads.serving.tasks.postgres import PostgresTaskStore

    a = PostgresTaskStore(db_url, "bb1", max_tasks=2)
    other = open_task_store(db_url, "bb2")
    try:
        a.add("x", *_task(1))
        assert other.get("x") is None and other.names() == []
        other.add("x", *_task(2))  # the same name under another backbone is another task
        a.add("y", *_task(3))
        with pytest.raises(TaskStoreError, match="at most 2"):
            a.add("z", *_task(4))
        a.add("y", *_task(5), replace=True)  # replacing does not count against the cap
        np.testing.assert_array_equal(a.get("x").keys, _task(1)[1])
    finally:
        a.close()
        other.close()


def test_pg_down_is_a_503_not_a_crash(db_url, pg):
    """A database that stops answering turns store calls into 503 tasks_store_unavailable."""
    import psycopg

    s = open_task_store(db_url, "bb1")
    try:
        s.add("keep", *_task(1))
        dbname = db_url.rsplit("/", 1)[1]
        with psycopg.connect(pg.url, autocommit=True) as c:  # cut every connection to that database
            c.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS false')
            c.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (dbname,))
        time.sleep(0.2)
        with pytest.raises(TaskStoreError) as err:
            s.get("unknown-name")
        assert err.value.http_status == 503 and err.value.kind == "tasks_store_unavailable"
        with psycopg.connect(pg.url, autocommit=True) as c:
            c.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS true')
        assert s.get("keep") is not None  # reconnects by itself
    finally:
        s.close()


def test_pg_interrupt_frees_a_call_stuck_on_a_hung_connection(db_url, pg):
    """A call waiting on a database that sends nothing (no error either) holds the store until
    `interrupt()`, the front's move when its store timeout passes: then it fails at once with a 503
    error, and once the database answers again the store reconnects by itself."""
    from pg_server import StallingProxy
    from clipheads.serving.tasks.postgres import PostgresTaskStore

    proxy = StallingProxy("127.0.0.1", pg.port)
    s = PostgresTaskStore(proxy.url_for(db_url), "bb1", connect_timeout_s=1)
    try:
        s.add("keep", *_task(1))
        proxy.freeze()
        outcome: list = []

        def lookup():
            try:
                outcome.append(s.get("unknown-name"))
            except TaskStoreError as err:
                outcome.append(err.kind)

        t = threading.Thread(target=lookup, daemon=True)
        t.start()
        t.join(1.0)
        assert t.is_alive()  # stuck: no statement_timeout reaches the server, no TCP error comes back
        t0 = time.monotonic()
        s.interrupt()
        t.join(5.0)
        assert not t.is_alive() and outcome == ["tasks_store_unavailable"], outcome
        assert time.monotonic() - t0 < 4  # the retry's connect is bounded by connect_timeout (1 s)
        proxy.thaw()
        assert s.get("keep") is not None and s.names() == ["keep"]
    finally:
        proxy.thaw()
        s.close()
        proxy.close()
