"""Redis Cluster: a real 3-master cluster (``tests/cluster.py``) started from the suite's
``redis-server`` binary. Every key of one object carries the hash tag ``{app_label.model:pk}``, so
the lease's Lua scripts (which touch the lock and the fencing counter together) run on one node;
objects spread over all three masters; transitions and a multi-process race run against it."""

from __future__ import annotations

import io
import threading
from collections import Counter
from typing import Any

import pytest
from django.core.management import call_command
from redis.cluster import RedisCluster as ClusterClient

from dsm_redis import object_lock
from dsm_redis.backends import get_backend
from dsm_redis.backends.redis import RedisLockBackend
from dsm_redis.conf import parse
from dsm_redis.keys import counter_key, object_key, redis_name
from tests.cluster import RedisCluster
from tests.helpers import dsm_options, effects
from tests.procs import committed_per_account, run_workers


@pytest.fixture(scope="module")
def cluster():
    with RedisCluster() as running:
        yield running


@pytest.fixture
def client(cluster):
    c = cluster.client()
    yield c
    c.close()


@pytest.fixture
def on_cluster(settings, cluster):
    """Point DSM_REDIS at the cluster (by URL) for one test."""
    dsm_options(settings, cluster.url)
    backend = get_backend()
    assert isinstance(backend.client, ClusterClient)
    return backend


def keys_of(prefix: str, key: str) -> list[str]:
    name = redis_name(prefix, key)
    return [f"lock:{name}", f"lock-signal:{name}", counter_key(prefix, key)]


def test_the_cluster_has_three_masters_sharing_every_slot(client):
    assert len(client.get_primaries()) == 3
    info = client.cluster_info(target_nodes=ClusterClient.RANDOM)
    assert (info["cluster_state"], int(info["cluster_slots_assigned"])) == ("ok", 16384)


def test_every_key_of_an_object_lands_in_one_slot_and_objects_spread_over_every_master(client):
    nodes = Counter()
    for pk in [*range(60), "a{b}c", "}{", "x:y"]:
        slots = {client.keyslot(k) for k in keys_of("dsm", f"shop.order:{pk}")}
        assert len(slots) == 1
        nodes[client.nodes_manager.get_node_from_slot(slots.pop()).name] += 1
    assert len(nodes) == 3


def test_the_lease_protocol_on_the_cluster(on_cluster, client):
    backend = on_cluster
    grant = backend.acquire("cl.test:1", ttl=30, timeout=0)
    assert backend.renew("cl.test:1", grant.owner, 30)
    assert backend.describe("cl.test:1")["owner"] == grant.owner
    client.delete(counter_key(backend.config.key_prefix, "cl.test:1"))  # a failover lost the counter
    assert backend.reanchor("cl.test:1", grant.owner, 100) == 101
    # python-redis-lock's UNLOCK runs on the cluster client the backend passes, not on whichever
    # client registered the script first in this process (a standalone one, earlier in the suite).
    _, signal, _ = keys_of(backend.config.key_prefix, "cl.test:1")
    woken: list[Any] = []
    waiter = threading.Thread(target=lambda: woken.append(client.blpop([signal], timeout=60)))
    waiter.start()
    assert backend.release("cl.test:1", grant.owner)
    waiter.join(90)
    assert woken and woken[0] is not None
    again = backend.acquire("cl.test:1", ttl=30, timeout=0)
    assert again.fencing_token == 102
    backend.release("cl.test:1", again.owner)


def test_a_waiter_gets_the_lease_when_the_holder_releases(on_cluster):
    backend = on_cluster
    first = backend.acquire("cl.test:2", ttl=60, timeout=0)
    got: list[Any] = []
    thread = threading.Thread(target=lambda: got.append(backend.acquire("cl.test:2", ttl=30, timeout=60)))
    thread.start()
    backend.release("cl.test:2", first.owner)
    thread.join(90)
    assert got and got[0].fencing_token == first.fencing_token + 1
    backend.release("cl.test:2", got[0].owner)


def test_dsm_locks_scans_every_master(on_cluster, client):
    backend = on_cluster
    keys = [f"cl.test:{pk}" for pk in range(100, 130)]
    grants = {key: backend.acquire(key, ttl=30, timeout=0) for key in keys}
    masters = {client.get_node_from_key(keys_of(backend.config.key_prefix, key)[0]).name for key in keys}
    assert len(masters) == 3
    listed = {lease.key: lease for lease in backend.iter_leases() if lease.key in grants}
    assert {k: (v.owner, v.fencing_token) for k, v in listed.items()} == {
        k: (g.owner, g.fencing_token) for k, g in grants.items()
    }
    out = io.StringIO()
    call_command("dsm_locks", "--release", keys[0], "--force", stdout=out)
    assert "Released" in out.getvalue()
    assert keys[0] not in {lease.key for lease in backend.iter_leases()}
    for key, grant in grants.items():
        backend.release(key, grant.owner)


def test_a_factory_returning_a_cluster_client_works(cluster):
    backend = RedisLockBackend(parse({"LOCATION": cluster.client, "OPTIONS": {"KEY_PREFIX": "factory"}}))
    grant = backend.acquire("cl.test:3", ttl=30, timeout=0)
    assert isinstance(backend.client, ClusterClient)
    assert backend.release("cl.test:3", grant.owner)
    backend.close()


def test_asyncio_leases_on_the_cluster_and_their_refusal_of_replica_acks(cluster):
    """On the loop through ``redis.asyncio``'s cluster client; it lends no connection for a
    ``WAIT``, so ``REPLICA_ACKS`` is refused before any lease is taken."""
    import asyncio

    from django.core.exceptions import ImproperlyConfigured

    plain = RedisLockBackend(parse({"LOCATION": cluster.url, "OPTIONS": {"KEY_PREFIX": "aio"}}))
    acked = RedisLockBackend(parse({"LOCATION": cluster.url, "OPTIONS": {"KEY_PREFIX": "aio", "REPLICA_ACKS": 1}}))

    async def main() -> None:
        leases = plain.for_asyncio()
        grant = await leases.acquire("cl.test:4", ttl=30, timeout=0)
        assert await leases.release("cl.test:4", grant.owner)
        with pytest.raises(ImproperlyConfigured, match=r"REPLICA_ACKS.*asyncio leases on Redis Cluster"):
            acked.for_asyncio()

    try:
        asyncio.run(main())
    finally:
        plain.close()
        acked.close()


@pytest.mark.django_db(transaction=True)
def test_transitions_on_the_cluster(on_cluster, client):
    from dsm_redis.models import FencingMark
    from tests.testapp.models import ALIVE, DEAD, Cat

    cat = Cat.objects.create()
    cat.state_machine.survive()
    with object_lock(cat) as lease:
        cat.state_machine.transition_to(DEAD)  # re-enters the lease taken on the cluster
        token = lease.fencing_token
    row = Cat.objects.get(pk=cat.pk)
    assert (row.state, row.can_meow) == (DEAD, True)
    assert FencingMark.objects.get(pk=object_key(cat)).token == token == 2
    counter = counter_key(on_cluster.config.key_prefix, object_key(cat))
    assert int(client.get(counter)) == token  # the counter lives in the cluster
    assert ALIVE != DEAD


@pytest.mark.django_db(transaction=True)
def test_processes_racing_on_the_cluster_lose_nothing(cluster, client, redis):
    from django.conf import settings

    from tests.testapp.models import Account

    processes, rounds, work = 4, 15, 0.003
    # The same load without protection loses updates: this race can be seen.
    unprotected = Account.objects.create()
    run_workers("tests.workers:cowboy_deposit", processes, unprotected.pk, rounds, work)
    unprotected.refresh_from_db()
    assert unprotected.balance < processes * rounds

    account = Account.objects.create()
    results = run_workers(
        "tests.workers:dsm_deposit", processes, [account.pk], rounds, work, env={"DSM_TEST_LOCK_REDIS_URL": cluster.url}
    )
    committed = committed_per_account(results, [account.pk])[account.pk]
    assert committed == processes * rounds
    account.refresh_from_db()
    assert account.balance == account.deposits == committed
    assert effects(redis, account.pk) == committed  # each side effect ran once
    # the leases were the cluster's: one token per lease, minted there
    prefix = settings.DSM_REDIS["OPTIONS"]["KEY_PREFIX"]
    assert int(client.get(counter_key(prefix, object_key(account))) or 0) >= committed
