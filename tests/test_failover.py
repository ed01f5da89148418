"""Failover: a Sentinel group (a primary, a replica, three sentinels: ``SentinelGroup``) and a Redis
Cluster with a replica per master (``tests/cluster.py``), real servers and real processes.

The Sentinel group is shared by the module's tests, in file order: the ``redis+sentinel://``
``LOCATION`` (and a django-redis Sentinel cache), ``REPLICA_ACKS``, the demo, then one forced
failover (the fencing token refusing a holder whose lease the promoted replica never saw), then
the primary SIGKILLed under a multi-process race. Every wait is bounded; the stall a failover
causes is printed (``-s``) and reported in the README, never asserted.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_py
from redis.sentinel import SentinelConnectionPool

from dsm_redis import (
    LockBackendUnavailable,
    LockLost,
    LockNotReplicated,
    LockTemporarilyUnavailable,
    LockTimeout,
    StaleFencingToken,
    object_lock,
)
from dsm_redis.backends import get_backend
from dsm_redis.keys import object_key, redis_name
from dsm_redis.tools.servers import RedisServer, SentinelGroup
from tests.cluster import RedisCluster
from tests.helpers import WAIT, dsm_options, fresh, key_prefix, redis_backend_for, run_async, wait_for
from tests.procs import committed_per_account, in_background, run_workers

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def group() -> Iterator[SentinelGroup]:
    with SentinelGroup(down_after_ms=1000, failover_timeout_ms=3000) as running:
        yield running


def admin(server: RedisServer) -> Any:
    return redis_py.Redis(host="127.0.0.1", port=server.port, socket_timeout=5)


def lock_key(obj: Any) -> str:
    return f"lock:{redis_name(key_prefix(), object_key(obj))}"


# Every test of the group is transactional: pytest-django runs transactional tests after the others,
# and these must keep their file order (the failovers come last).
@pytest.mark.django_db(transaction=True)
def test_a_sentinel_location_leases_on_the_primary_and_waits_for_replicas(group):
    backend = redis_backend_for(group.url)
    assert isinstance(backend.client.connection_pool, SentinelConnectionPool)
    grant = backend.acquire("fo.test:1", ttl=30, timeout=0)
    assert admin(group.primary()).get(f"lock:{redis_name(backend.config.key_prefix, 'fo.test:1')}") is not None
    assert backend.release("fo.test:1", grant.owner)
    backend.close()

    acked = redis_backend_for(group.url, REPLICA_ACKS=1)
    grant = acked.acquire("fo.test:2", ttl=30, timeout=0)  # the one replica acknowledged it
    assert admin(group.replica()).get(f"lock:{redis_name(acked.config.key_prefix, 'fo.test:2')}") is not None
    acked.release("fo.test:2", grant.owner)
    acked.close()

    # More replicas than there are: refused in time, retriable, and the lease given back.
    greedy = redis_backend_for(group.url, REPLICA_ACKS=2, REPLICA_ACK_TIMEOUT=0.2)
    with pytest.raises(LockNotReplicated, match="1 of 2 replicas"):
        greedy.acquire("fo.test:3", ttl=30, timeout=0)
    assert greedy.describe("fo.test:3")["owner"] is None
    greedy.close()


@pytest.mark.django_db(transaction=True)
def test_a_django_redis_sentinel_cache_serves_the_leases(group, settings):
    from django.core import checks

    settings.CACHES = {
        **settings.CACHES,
        "sentinel": {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": f"redis://{group.service}/0",
            "OPTIONS": {
                "CLIENT_CLASS": "django_redis.client.SentinelClient",
                "CONNECTION_FACTORY": "django_redis.pool.SentinelConnectionFactory",
                "SENTINELS": [("127.0.0.1", s.port) for s in group.sentinels],
            },
        },
    }
    dsm_options(settings, "cache:sentinel")
    assert [m for m in checks.run_checks() if m.id.startswith("dsm_redis")] == []
    backend = get_backend()
    assert isinstance(backend.client.connection_pool, SentinelConnectionPool)
    grant = backend.acquire("fo.test:4", ttl=30, timeout=0)
    assert backend.release("fo.test:4", grant.owner)


@pytest.mark.django_db(transaction=True)
def test_asyncio_transitions_lease_through_a_sentinel_location(group, settings):
    """``redis.asyncio``'s Sentinel pool, on the loop: coroutines racing one object lose nothing,
    and their leases live on the primary."""
    import asyncio

    from tests.testapp.models import Account

    dsm_options(settings, group.url)
    account = Account.objects.create()

    copies = [fresh(account) for _ in range(20)]  # one instance per coroutine, read before the loop

    async def main() -> None:
        await asyncio.gather(*(copy.machine.adeposit() for copy in copies))

    run_async(main)
    assert fresh(account).balance == 20
    assert admin(group.primary()).get(f"{redis_name(key_prefix(), object_key(account))}:fence") == b"20"

    # REPLICA_ACKS on the loop: the one replica acknowledges each lease before the side effect.
    dsm_options(settings, group.url, REPLICA_ACKS=1)
    run_async(fresh(account).machine.adeposit)
    assert fresh(account).balance == 21

    # More replicas than there are: refused in time, retriable, nothing ran, the lease given back.
    dsm_options(settings, group.url, REPLICA_ACKS=2, REPLICA_ACK_TIMEOUT=0.2)
    with pytest.raises(LockNotReplicated, match="1 of 2 replicas"):
        run_async(fresh(account).machine.adeposit)
    assert fresh(account).balance == 21
    assert get_backend().describe(object_key(account))["owner"] is None


@pytest.mark.django_db(transaction=True)
def test_an_asyncio_acquire_cancelled_while_waiting_for_replicas_gives_its_lease_back(group):
    """Cancelled during its ``WAIT``: the lease granted just before is given back, and the lent
    connection, its reply unread, is not what the next call draws."""
    import asyncio

    greedy = redis_backend_for(group.url, REPLICA_ACKS=2, REPLICA_ACK_TIMEOUT=3)  # 1 replica: WAIT blocks 3 s

    async def main() -> None:
        leases = greedy.for_asyncio()
        waiting = asyncio.ensure_future(leases.acquire("fo.test:10", ttl=30, timeout=0))
        lock = f"lock:{redis_name(greedy.config.key_prefix, 'fo.test:10')}"
        primary = admin(group.primary())

        def waiting_for_replicas() -> bool:
            return any(client["cmd"] == "wait" for client in primary.client_list())

        # Cancelled once its WAIT is in flight: a cancellation landing while redis-py *sends* a
        # command is lost on Python 3.11 (asyncio.wait_for's own bug), and the call just completes.
        await asyncio.to_thread(wait_for, waiting_for_replicas, "the WAIT to block on the primary")
        assert primary.get(lock) is not None  # granted, not yet acknowledged
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await asyncio.to_thread(wait_for, lambda: primary.get(lock) is None, "the lease to be given back")
        assert await leases.release("fo.test:10", "nobody") is False  # a clean connection answers

    try:
        run_async(main)
    finally:
        greedy.close()


@pytest.mark.django_db(transaction=True)
def test_the_demo_runs_on_a_sentinel_url(group):
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    done = subprocess.run(
        [sys.executable, "-m", "dsm_redis", "demo", "--processes", "2", "--objects", "1", "--rounds", "4",
         "--redis-url", group.url, "--database-url", os.environ["DSM_TEST_DATABASE_URL"]],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    assert any(line.startswith("dsm_redis ") for line in done.stdout.splitlines()), done.stdout
    assert "Traceback" not in done.stderr


@pytest.mark.django_db(transaction=True)
def test_a_holder_whose_lease_the_promoted_replica_never_saw_is_refused(group, settings):
    from tests.testapp.models import Account

    dsm_options(settings, group.url)
    account = Account.objects.create()
    primary, replica = group.primary(), group.replica()
    # Replication stops: the primary refuses the replica's re-sync (ACL), its link is cut.
    admin(primary).execute_command("ACL", "SETUSER", "default", "-psync", "-sync")
    try:
        admin(primary).client_kill_filter(_type="replica")
        wait_for(lambda: not group.in_sync(replica), "the replica to lose its link")
        with object_lock(account) as lease:  # on the primary only; judged by the database at the door
            assert admin(replica).get(lock_key(account)) is None
            promote(group, replica)
            # What the sentinels do to a demoted primary at their next look at it (up to 10 s away).
            admin(primary).execute_command("REPLICAOF", "127.0.0.1", replica.port)
            assert group.wait_for_new_primary(primary) is replica
            # Another holder, through the promoted replica: the lease is free there, its token no
            # higher than ours; the database's mark refuses it, Redis re-anchors it, it commits.
            in_background(lambda: fresh(account).machine.deposit(amount=10))()
            with pytest.raises((LockLost, StaleFencingToken)):
                account.machine.deposit(amount=1)
            assert lease.fencing_token < fresh_mark(account)
    finally:
        admin(primary).execute_command("ACL", "SETUSER", "default", "+psync", "+sync")
    assert fresh(account).balance == 10
    wait_for(lambda: group.in_sync(primary), "the old primary to follow the new one")


@pytest.mark.django_db(transaction=True)
def test_leases_follow_a_failover_that_demotes_their_primary(group):
    """The demoted primary stays up as a replica. A waiter blocked on it is unblocked (UNBLOCKED)
    and waits on in the promoted replica; an event loop's pooled connection to it answers READONLY
    from inside the script, is dropped and the call goes to the promoted replica (as the blocking
    calls do)."""
    import asyncio

    holder = redis_backend_for(group.url)
    waiter = redis_backend_for(group.url, prefix=holder.config.key_prefix)
    held = holder.acquire("fo.test:5", ttl=30, timeout=0)
    grants: list[Any] = []
    joined = in_background(lambda: grants.append(waiter.acquire("fo.test:5", ttl=30, timeout=WAIT)))
    queue = f"{redis_name(holder.config.key_prefix, 'fo.test:5')}:queue"
    wait_for(lambda: admin(group.primary()).zcard(queue), "the waiter to queue on the primary")

    async def main() -> None:
        leases = holder.for_asyncio()
        grant = await leases.acquire("fo.test:6", ttl=30, timeout=0)  # a pooled connection to the primary
        assert await leases.release("fo.test:6", grant.owner)
        primary, replica = group.primary(), group.replica()
        await asyncio.to_thread(promote, group, replica)
        admin(primary).execute_command("REPLICAOF", "127.0.0.1", replica.port)  # demoted, still up
        assert await asyncio.to_thread(group.wait_for_new_primary, primary) is replica
        grant = await leases.acquire("fo.test:6", ttl=30, timeout=0)
        assert await leases.release("fo.test:6", grant.owner)

    try:
        run_async(main)
        assert holder.release("fo.test:5", held.owner)  # on the promoted replica: handed to the waiter
        joined()
        assert grants and grants[0].fencing_token > held.fencing_token
        assert waiter.release("fo.test:5", grants[0].owner)
    finally:
        holder.close()
        waiter.close()
    wait_for(lambda: group.in_sync(group.replica()), "the old primary to follow the new one")


def named_by_every_sentinel(group: SentinelGroup, server: RedisServer) -> bool:
    """Every sentinel names ``server`` the primary: as the sentinels do, the old primary is demoted
    only then. Demoted earlier, a client that asks a sentinel still naming it (the demotion's
    READONLY or UNBLOCKED sends it there) is sent back to the replica it has become."""
    states = [group.sentinel_state(sentinel) for sentinel in group.sentinels]
    return all(state is not None and int(state["port"]) == server.port for state in states)


@contextlib.contextmanager
def demoted_keeping_connections(group: SentinelGroup) -> Iterator[RedisServer]:
    """A failover whose demoted primary stays up and keeps its clients' connections; yields the
    promoted replica. The sentinels demote a primary with CLIENT KILL, closing every connection to
    it: refused meanwhile, as when it was out of their reach."""
    primary, replica = group.primary(), group.replica()
    admin(primary).execute_command("ACL", "SETUSER", "default", "-client")
    try:
        promote(group, replica)
        admin(primary).execute_command("REPLICAOF", "127.0.0.1", replica.port)  # demoted, still up
        assert group.wait_for_new_primary(primary) is replica
        yield replica
    finally:
        admin(primary).execute_command("ACL", "SETUSER", "default", "+client")
    wait_for(lambda: group.in_sync(primary), "the old primary to follow the new one")


def promote(group: SentinelGroup, replica: RedisServer) -> None:
    """A forced failover (``SENTINEL FAILOVER``), until every sentinel names ``replica``."""
    admin(group.sentinels[0]).execute_command("SENTINEL", "FAILOVER", group.service)
    wait_for(lambda: named_by_every_sentinel(group, replica), "the replica's promotion")


@contextlib.contextmanager
def demoted_only_by_hand(group: SentinelGroup) -> Iterator[Any]:
    """The sentinels may promote the replica but not demote the primary (its default user may not
    REPLICAOF): it stays a writable primary, as for the seconds before the sentinels convert it,
    until the test demotes it with the client yielded."""
    primary = group.primary()
    admin(primary).execute_command("ACL", "SETUSER", "demoter", "on", ">demoter", "~*", "&*", "+@all")
    demoter = redis_py.Redis(port=primary.port, username="demoter", password="demoter", socket_timeout=5)
    admin(primary).execute_command("ACL", "SETUSER", "default", "-replicaof", "-slaveof")
    try:
        yield demoter
    finally:
        demoter.execute_command("ACL", "SETUSER", "default", "+replicaof", "+slaveof")
    wait_for(lambda: group.in_sync(primary), "the old primary to follow the new one")


def held_there_alone(server: RedisServer, backend: Any, key: str, grant: Any) -> None:
    """``grant``'s lease is on ``server``, and nobody else can take it; then it is given back."""
    assert admin(server).get(f"lock:{redis_name(backend.config.key_prefix, key)}") == grant.owner.encode()
    other = redis_backend_for(backend.config.location, prefix=backend.config.key_prefix)
    try:
        with pytest.raises(LockTimeout):
            other.acquire(key, ttl=30, timeout=0)
    finally:
        other.close()
    assert backend.release(key, grant.owner)


@pytest.mark.django_db(transaction=True)
def test_a_connection_in_flight_on_a_demoted_primary_is_not_what_the_retry_draws(group, monkeypatch):
    """A call meets READONLY and drops the pool's idle connections while another thread's (or
    coroutine's) command is still in flight on the demoted primary: that connection comes back to
    the pool just after the drop, still on the demoted primary. The call's one retry must not draw
    it (it would answer READONLY again, with no retry left): it is dropped when it comes back."""
    import asyncio

    backend = redis_backend_for(group.url)
    pool = backend.client.connection_pool

    def back_after_the_drop(pool: Any, release: Callable[[], Any]) -> None:
        # The other command ends right after the pool's first drop, before the retry draws.
        drop = pool.disconnect

        def disconnect(*args: Any, **kwargs: Any) -> Any:
            monkeypatch.setattr(pool, "disconnect", drop)
            done = drop(*args, **kwargs)
            if asyncio.iscoroutine(done):
                return then(done, release)
            release()
            return done

        monkeypatch.setattr(pool, "disconnect", disconnect)

    async def then(done: Any, release: Callable[[], Any]) -> None:
        await done
        await release()

    async def main() -> None:
        leases = backend.for_asyncio()
        apool = leases.client.connection_pool
        # In each pool a connection in use (another thread's, another coroutine's command in
        # flight), then an idle one, both to the primary.
        busy, abusy = pool.get_connection(), await apool.get_connection()
        backend.release("fo.test:7", backend.acquire("fo.test:7", ttl=30, timeout=0).owner)
        assert await leases.release("fo.test:8", (await leases.acquire("fo.test:8", ttl=30, timeout=0)).owner)
        with demoted_keeping_connections(group):
            back_after_the_drop(pool, lambda: pool.release(busy))
            grant = backend.acquire("fo.test:7", ttl=30, timeout=0)  # READONLY, dropped, retried
            assert backend.release("fo.test:7", grant.owner)
            back_after_the_drop(apool, lambda: apool.release(abusy))
            grant = await leases.acquire("fo.test:8", ttl=30, timeout=0)
            assert await leases.release("fo.test:8", grant.owner)

    try:
        run_async(main)
    finally:
        backend.close()


@pytest.mark.django_db(transaction=True)
def test_replica_acks_retry_a_script_that_met_a_demoted_primary_on_the_promoted_one(group):
    """With ``REPLICA_ACKS`` the acquire script runs on a connection pinned for its ``WAIT``: when
    it meets READONLY, the retry must not run on that same connection, still on the demoted primary."""
    acked = redis_backend_for(group.url, REPLICA_ACKS=1)

    async def main() -> None:
        leases = acked.for_asyncio()
        await leases.release("fo.test:11", (await leases.acquire("fo.test:11", ttl=30, timeout=0)).owner)
        acked.release("fo.test:9", acked.acquire("fo.test:9", ttl=30, timeout=0).owner)  # idle connections
        with demoted_keeping_connections(group) as promoted:
            wait_for(lambda: admin(promoted).info("replication")["connected_slaves"], "the demoted primary to follow")
            grant = acked.acquire("fo.test:9", ttl=30, timeout=0)  # READONLY, dropped, retried, acknowledged
            assert acked.release("fo.test:9", grant.owner)
            grant = await leases.acquire("fo.test:11", ttl=30, timeout=0)  # the same on the loop
            assert await leases.release("fo.test:11", grant.owner)

    try:
        run_async(main)
    finally:
        acked.close()


@pytest.mark.django_db(transaction=True)
def test_replica_acks_count_only_a_wait_sent_with_its_script(group):
    """The replica promoted (every sentinel names it) while the old primary is still writable: an
    acquire's script runs there and its WAIT blocks (no replica left), then the old primary is
    demoted (UNBLOCKED). Sent alone again, on a connection to the promoted primary, the WAIT would
    count that server's replica for a lease it never held: a grant nobody else is kept from. Script
    and WAIT are sent again together: the lease granted is on the promoted primary. Blocking and
    asyncio."""
    import asyncio

    replica = group.replica()
    acked = redis_backend_for(group.url, REPLICA_ACKS=1, REPLICA_ACK_TIMEOUT=4)
    grants: dict[str, Any] = {}

    async def main(demoter: Any) -> None:
        leases = acked.for_asyncio()
        # Pooled connections to the primary, blocking and on the loop.
        acked.release("fo.test:12", acked.acquire("fo.test:12", ttl=30, timeout=0).owner)
        await leases.release("fo.test:13", (await leases.acquire("fo.test:13", ttl=30, timeout=0)).owner)
        await asyncio.to_thread(promote, group, replica)
        joined = in_background(lambda: grants.update({"fo.test:12": acked.acquire("fo.test:12", ttl=30, timeout=0)}))
        waiting = asyncio.ensure_future(leases.acquire("fo.test:13", ttl=30, timeout=0))

        def both_blocked() -> bool:
            return sum(client["cmd"] == "wait" for client in demoter.client_list()) == 2

        await asyncio.to_thread(wait_for, both_blocked, "both WAITs to block on the old primary")
        demoter.execute_command("REPLICAOF", "127.0.0.1", replica.port)
        grants["fo.test:13"] = await waiting
        await asyncio.to_thread(joined)

    try:
        with demoted_only_by_hand(group) as demoter:
            run_async(lambda: main(demoter))
            for key, grant in grants.items():
                held_there_alone(replica, acked, key, grant)
    finally:
        acked.close()


@pytest.mark.django_db(transaction=True)
def test_replica_acks_wait_stays_on_its_scripts_connection_when_another_coroutine_drops_the_pool(group, monkeypatch):
    """On one loop: A's script ran on the old primary (still writable, the replica promoted); it is
    demoted; B meets READONLY and drops the pool, marking A's connection (in use) to reconnect. A
    WAIT sent after A's script on that connection, reconnected through the sentinels, would count
    the promoted primary's replica for a lease it never held. The only hook: A reads its first
    reply once B's drop is done (a loop busy with other coroutines does the same)."""
    import asyncio

    import redis.asyncio.connection as connection_module

    from dsm_redis.backends import redis as backend_module

    replica = group.replica()
    acked = redis_backend_for(group.url, REPLICA_ACKS=1, REPLICA_ACK_TIMEOUT=4)
    lock = f"lock:{redis_name(acked.config.key_prefix, 'fo.test:14')}"
    dropped: list[asyncio.Event] = []
    read, drop = connection_module.AbstractConnection.read_response, backend_module._drop_async_connections

    async def read_after_the_drop(self: Any, *args: Any, **kwargs: Any) -> Any:
        task = asyncio.current_task()
        if task is not None and task.get_name() == "A" and dropped and not dropped[0].is_set():
            await dropped[0].wait()
        return await read(self, *args, **kwargs)

    async def drop_and_tell(pool: Any) -> None:
        await drop(pool)
        if dropped:
            dropped[0].set()

    monkeypatch.setattr(connection_module.AbstractConnection, "read_response", read_after_the_drop)
    monkeypatch.setattr(backend_module, "_drop_async_connections", drop_and_tell)

    async def main(demoter: Any) -> Any:
        leases = acked.for_asyncio()
        warm = await asyncio.gather(*(leases.acquire(f"fo.test:{n}", ttl=30, timeout=0) for n in (15, 16)))
        for n, grant in zip((15, 16), warm, strict=True):  # two pooled connections to the primary
            await leases.release(f"fo.test:{n}", grant.owner)
        await asyncio.to_thread(promote, group, replica)
        dropped.append(asyncio.Event())
        a = asyncio.create_task(leases.acquire("fo.test:14", ttl=30, timeout=0), name="A")
        await asyncio.to_thread(wait_for, lambda: demoter.get(lock), "A's script to run on the old primary")
        demoter.execute_command("REPLICAOF", "127.0.0.1", replica.port)
        b = asyncio.create_task(leases.acquire("fo.test:17", ttl=30, timeout=0), name="B")
        await leases.release("fo.test:17", (await b).owner)
        return await a

    try:
        with demoted_only_by_hand(group) as demoter:
            held_there_alone(replica, acked, "fo.test:14", run_async(lambda: main(demoter)))
    finally:
        acked.close()


@pytest.mark.django_db(transaction=True)
def test_replica_acks_a_waiters_polls_send_no_wait_until_the_lease_is_its_own(group):
    """A poll that finds the lease still held sends the script alone: a WAIT behind each would hold
    every poll up to REPLICA_ACK_TIMEOUT while the replicas lag. The first call sends both (one
    round trip for an uncontended lease), and so does the poll that finds the lease handed over."""
    primary = admin(group.primary())
    holder = redis_backend_for(group.url)
    waiter = redis_backend_for(group.url, prefix=holder.config.key_prefix, REPLICA_ACKS=1, HANDOVER_GRACE=0.2)

    def calls(command: str) -> int:
        return int(primary.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))

    held = holder.acquire("fo.test:18", ttl=30, timeout=0)
    scripts, waits = calls("evalsha"), calls("wait")
    grants: list[Any] = []
    joined = in_background(lambda: grants.append(waiter.acquire("fo.test:18", ttl=30, timeout=WAIT)))
    try:
        wait_for(lambda: calls("evalsha") - scripts >= 3, "the waiter to poll the held lease twice")
        assert holder.release("fo.test:18", held.owner)  # handed over to the waiter
        joined()
        assert grants and grants[0].fencing_token > held.fencing_token
        assert calls("wait") - waits == 2  # its first call's, and the poll's that found the lease its own
        assert waiter.release("fo.test:18", grants[0].owner)
    finally:
        holder.close()
        waiter.close()


def fresh_mark(obj: Any) -> int:
    from dsm_redis.models import FencingMark

    return int(FencingMark.objects.get(pk=object_key(obj)).token)


# The failover races' load: processes x rounds of deposits over two accounts, WORK seconds between
# each read and its write.
RACE, WORK = (3, 24), 0.003


@pytest.mark.django_db(transaction=True)
def test_the_failover_races_load_makes_unprotected_code_lose_updates():
    """Without this, the failover races below could pass on a load too light to race at all."""
    from tests.testapp.models import Account

    accounts = [Account.objects.create() for _ in range(2)]
    ids = [account.pk for account in accounts]
    processes, rounds = RACE
    results = run_workers("tests.workers:cowboy_deposit", processes, ids, rounds, WORK)
    assert sum(r["committed"] for r in results) == processes * rounds
    balances = sum(Account.objects.filter(pk__in=ids).values_list("balance", flat=True))
    assert balances < processes * rounds, "the unprotected code lost nothing: this load cannot show a race"


def race_through_a_failover(location: str, kill: Callable[[], None], accounts: list[Any]) -> float:
    """Workers deposit on ``accounts`` through ``location``; ``kill`` runs when a third of the
    deposits committed. Asserts every deposit a worker saw commit is in the database exactly once
    and that the workers carried on after the kill; returns the stall (for the report only)."""
    from tests.testapp.models import Account

    processes, rounds = RACE
    total = processes * rounds
    ids = [account.pk for account in accounts]
    results: list[Any] = []
    env = {"DSM_TEST_LOCK_REDIS_URL": location, "DSM_TEST_TTL": "3"}
    join = in_background(
        lambda: results.extend(run_workers("tests.workers:dsm_deposit", processes, ids, rounds, WORK, env=env))
    )

    def deposited() -> int:
        return sum(Account.objects.filter(pk__in=ids).values_list("deposits", flat=True))

    wait_for(lambda: deposited() >= total // 3, "a third of the deposits", timeout=120)
    # A lease of a prefix of its own on the first account's hash slot (the killed node's, on the cluster).
    probe, slot = redis_backend_for(location), object_key(accounts[0])
    assert probe.client is not None  # connected before the kill: a cluster URL names one node, maybe the victim
    killed_at = time.time()
    kill()

    def leased() -> bool:
        try:
            probe.release(slot, probe.acquire(slot, ttl=5, timeout=0).owner)
        except LockTemporarilyUnavailable:
            return False
        return True

    wait_for(leased, "a lease on the promoted replica", timeout=120)
    resumed = time.time() - killed_at
    probe.close()
    join(240)
    committed = committed_per_account(results, ids)
    assert sum(committed.values()) == total  # every worker finished its rounds, none restarted
    for pk in ids:
        row = Account.objects.get(pk=pk)
        assert row.balance == row.deposits == committed[pk]  # none lost, none doubled
    after = [t for result in results for t in result["committed_at"] if t > killed_at]
    assert after, "no deposit committed after the kill"
    # The stall: the longest time an object went without a commit across the kill.
    stall = 0.0
    for pk in ids:
        times = sorted(t for r in results for t, a in zip(r["committed_at"], r["per_account"], strict=True) if a == pk)
        across = [killed_at, *(t for t in times if t > killed_at)]
        stall = max(stall, *(b - a for a, b in itertools.pairwise(across)))
    print(
        f"\nfailover: leases again after {resumed:.2f}s; {stall:.2f}s at most without a commit on an object "
        f"(TTL {env['DSM_TEST_TTL']}s); {len(after)} of {total} deposits after the kill"
    )
    return stall


@pytest.mark.django_db(transaction=True)
def test_processes_racing_through_a_sentinel_failover_lose_nothing(group):
    from tests.testapp.models import Account

    accounts = [Account.objects.create() for _ in range(2)]
    primary = group.primary()
    race_through_a_failover(group.url, primary.kill, accounts)
    new = group.wait_for_new_primary(primary)
    # The leases and counters now live on the promoted replica.
    assert all(admin(new).exists(f"{redis_name(key_prefix(), object_key(a))}:fence") for a in accounts)


@pytest.mark.django_db(transaction=True)
def test_processes_racing_through_a_cluster_failover_lose_nothing():
    from tests.testapp.models import Account

    accounts = [Account.objects.create() for _ in range(2)]
    slot = object_key(accounts[0])
    with RedisCluster(replicas=1, node_timeout_ms=1000) as cluster:
        acked = redis_backend_for(cluster.url, REPLICA_ACKS=1, REPLICA_ACK_TIMEOUT=0.5)
        acked.release(slot, acked.acquire(slot, ttl=5, timeout=0).owner)  # the master's replica acknowledged
        victim = cluster.primary_of(lock_key(accounts[0]))
        race_through_a_failover(cluster.url, victim.kill, accounts)
        cluster.wait_for_promotion(victim)
        assert cluster.primary_of(lock_key(accounts[0])) is not victim

        # The promoted replica has no replica of its own: the same backend finds it (its slot map
        # refreshed after the dead node failed it) and refuses to hand out an unreplicated lease.
        def refused() -> bool:
            try:
                acked.acquire(slot, ttl=5, timeout=0)
            except LockBackendUnavailable:
                return False
            except LockNotReplicated:
                return True
            raise AssertionError("a lease no replica acknowledged was granted")

        wait_for(refused, "the promoted master to refuse an unreplicated lease")
        assert acked.describe(slot)["owner"] is None
        acked.close()
