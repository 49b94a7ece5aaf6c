"""Two real `clipheads serve` replicas sharing few-shot tasks through a real PostgreSQL server.

Register on A, classify on B at once; delete on A, gone on B within a bounded time; both replicas
registering one name at the same moment: exactly one 201. B reaches the database through a proxy
that can stall, so a hung database is shown to cost B's few-shot requests a 503 and nothing else.
"""
from __future__ import annotations

import json
import threading
import time

import pytest

from pg_server import PostgresServer, StallingProxy, require_bindir
from test_serving import Server, make_micro_head, png, post

pytestmark = pytest.mark.integration
httpx = pytest.importorskip("httpx")

RED, BLUE = png((230, 10, 10)), png((10, 10, 230))
STORE_TIMEOUT_S = 2
EXAMPLES = [("images", (f"{i}.png", b, "image/png")) for i, b in enumerate([RED, RED, BLUE, BLUE])]


def _task_form(name: str) -> dict:
    return {"name": name, "labels": '["reddish", "bluish"]',
            "example_labels": '["reddish", "reddish", "bluish", "bluish"]'}


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    bindir = require_bindir()
    d = tmp_path_factory.mktemp("replicas")
    head = make_micro_head(d)
    pg = PostgresServer(bindir)
    proxy = StallingProxy("127.0.0.1", pg.port)
    urls = {"a": pg.url, "b": proxy.url_for(pg.url)}
    servers: dict[str, Server] = {}
    errors: list[BaseException] = []

    def start(name):
        try:
            servers[name] = Server(head, None, d / f"{name}.log", args=("--tasks-store", urls[name]),
                                   env_extra={"CLIPHEADS_TASKS_STORE_TIMEOUT_S": str(STORE_TIMEOUT_S)})
        except BaseException as err:  # noqa: BLE001 - re-raised below
            errors.append(err)

    threads = [threading.Thread(target=start, args=(n,)) for n in ("a", "b")]
    [t.start() for t in threads]
    [t.join() for t in threads]
    try:
        if errors:
            raise errors[0]
        servers["b"].proxy = proxy
        yield servers["a"], servers["b"]
    finally:
        proxy.thaw()
        for s in servers.values():
            s.stop()
        proxy.close()
        pg.stop()


def _classify(server, task: str):
    return post(server, "/classify", files=[("images", ("r.png", RED, "image/png"))], data={"tasks": json.dumps([task])})


def test_register_on_a_classify_on_b_delete_on_a_gone_on_b(replicas):
    a, b = replicas
    r = post(a, "/tasks", files=EXAMPLES, data=_task_form("redblue"))
    assert r.status_code == 201, r.text
    t0 = time.monotonic()
    rb = _classify(b, "redblue")
    visible_s = time.monotonic() - t0
    assert rb.status_code == 200, rb.text
    ra = _classify(a, "redblue")
    assert rb.json()["predictions"] == ra.json()["predictions"]  # the same task on both replicas
    assert visible_s < 5
    listed = httpx.get(b.url + "/tasks", timeout=10).json()["tasks"]
    assert {t["name"] for t in listed if t["kind"] == "few_shot"} == {"redblue"}
    assert post(b, "/tasks", files=EXAMPLES, data=_task_form("redblue")).status_code == 409

    assert httpx.delete(a.url + "/tasks/redblue", timeout=10).status_code == 200
    deadline = time.monotonic() + 5
    while True:
        gone = _classify(b, "redblue")
        if gone.status_code == 422 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert gone.status_code == 422 and gone.json()["error"] == "unknown_task", gone.text
    assert httpx.delete(b.url + "/tasks/redblue", timeout=10).status_code == 404


def test_concurrent_registration_of_one_name_from_both_replicas_gives_one_201(replicas):
    a, b = replicas
    for round_ in range(5):
        name = f"race{round_}"
        barrier = threading.Barrier(2)
        codes: dict[str, int] = {}

        def go(server, who):
            barrier.wait()
            codes[who] = post(server, "/tasks", files=EXAMPLES, data=_task_form(name)).status_code

        ts = [threading.Thread(target=go, args=(s, w)) for s, w in ((a, "a"), (b, "b"))]
        [t.start() for t in ts]
        [t.join() for t in ts]
        assert sorted(codes.values()) == [201, 409], (name, codes)
        assert _classify(a, name).status_code == 200 and _classify(b, name).status_code == 200


def test_a_stalled_database_costs_few_shot_requests_a_503_and_nothing_else(replicas):
    """B's database connection hangs (no error, no bytes): a few-shot request there answers 503
    `tasks_store_unavailable` after the store timeout, while /livez and bundle tasks answer at once
    the whole time; when the database comes back, B's few-shot tasks work again."""
    a, b = replicas
    assert post(a, "/tasks", files=EXAMPLES, data=_task_form("stall")).status_code == 201
    assert _classify(b, "stall").status_code == 200
    b.proxy.freeze()
    try:
        answers: dict[str, object] = {}

        def few_shot():  # a name B has never seen: looked up in the table, which hangs
            t0 = time.monotonic()
            answers["few_shot"] = (_classify(b, "never-registered"), time.monotonic() - t0)

        waiter = threading.Thread(target=few_shot)
        waiter.start()
        time.sleep(0.3)  # the lookup is now waiting on the database
        while waiter.is_alive():
            t0 = time.monotonic()
            live = httpx.get(b.url + "/livez", timeout=STORE_TIMEOUT_S)
            bundle = _classify(b, "color")
            assert live.status_code == 200 and bundle.status_code == 200, (live.text, bundle.text)
            assert time.monotonic() - t0 < 1.5
            time.sleep(0.1)
        r, took = answers["few_shot"]
        assert r.status_code == 503 and r.json()["error"] == "tasks_store_unavailable", r.text
        assert STORE_TIMEOUT_S - 0.5 < took < STORE_TIMEOUT_S + 3
    finally:
        b.proxy.thaw()
    deadline = time.monotonic() + 20
    while (r := _classify(b, "stall")).status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert r.status_code == 200, r.text
    assert post(b, "/tasks", files=EXAMPLES, data=_task_form("after-stall")).status_code == 201
