"""Tests for ``dsm_redis.tools.servers``: real throwaway Redis and PostgreSQL servers.

Plain pytest: no Django settings are needed (``-p no:django`` works), only the module's API.
A test skips when its server's binaries are not installed (``ServerUnavailable``).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from dsm_redis.tools.servers import (
    PostgresServer,
    RedisServer,
    ServerUnavailable,
    database_settings_from_url,
)

pytestmark: list[pytest.MarkDecorator] = []


def _redis_command(port: int, command: bytes) -> bytes:
    """One inline command over a raw socket: no client library, no connection pool."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(command + b"\r\n")
        return sock.recv(65536)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    try:
        server.start()
    except ServerUnavailable as exc:
        pytest.skip(str(exc))
    try:
        yield server
    finally:
        server.stop()


def _start_postgres() -> PostgresServer:
    server = PostgresServer()
    try:
        return server.start()
    except ServerUnavailable as exc:
        pytest.skip(str(exc))


def test_redis_restart_empties_data_on_the_same_port(redis_server: RedisServer) -> None:
    port, pid = redis_server.port, redis_server.pid
    assert redis_server.url == f"redis://127.0.0.1:{port}/0"
    assert _redis_command(port, b"SET greeting hello") == b"+OK\r\n"
    assert _redis_command(port, b"GET greeting") == b"$5\r\nhello\r\n"

    redis_server.restart()

    assert redis_server.port == port
    assert redis_server.pid is not None and redis_server.pid != pid
    assert _redis_command(port, b"GET greeting") == b"$-1\r\n"  # nil: the data is gone
    assert _redis_command(port, b"DBSIZE") == b":0\r\n"


def test_redis_kill_then_start_comes_back_empty(redis_server: RedisServer) -> None:
    port = redis_server.port
    _redis_command(port, b"SET k v")

    redis_server.kill()

    assert redis_server.pid is None
    with pytest.raises(OSError):
        _redis_command(port, b"PING")
    redis_server.start()
    assert redis_server.port == port
    assert _redis_command(port, b"PING") == b"+PONG\r\n"
    assert _redis_command(port, b"EXISTS k") == b":0\r\n"


def test_redis_stop_removes_its_directory_and_is_idempotent(redis_server: RedisServer) -> None:
    directory = redis_server.directory
    assert directory is not None and directory.is_dir()

    redis_server.stop()
    redis_server.stop()

    assert not directory.exists()
    assert redis_server.pid is None


def test_postgres_stop_leaves_no_data_dir() -> None:
    psycopg = pytest.importorskip("psycopg")
    server = _start_postgres()
    try:
        directory, pid = server.directory, server.pid
        assert directory is not None and (directory / "data" / "PG_VERSION").is_file()
        assert pid is not None
        with psycopg.connect(server.url, autocommit=True) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
            assert int(conn.execute("SHOW max_connections").fetchone()[0]) >= 100
            conn.execute("CREATE DATABASE test_servers_x")
        settings = server.django_settings("test_servers_x")
        assert settings["ENGINE"] == "django.db.backends.postgresql"
        assert settings["NAME"] == "test_servers_x"
        assert settings["HOST"].startswith(str(directory))
    finally:
        server.stop()

    assert not directory.exists()
    assert server.pid is None
    server.stop()  # idempotent


def test_two_postgres_servers_in_one_process_do_not_collide() -> None:
    psycopg = pytest.importorskip("psycopg")
    first = _start_postgres()
    try:
        second = PostgresServer().start()
        try:
            assert first.url != second.url
            with psycopg.connect(first.url, autocommit=True) as conn:
                conn.execute("CREATE TABLE only_in_first (id int)")
            with psycopg.connect(second.url, autocommit=True) as conn:
                found = conn.execute("SELECT to_regclass('only_in_first')").fetchone()
                assert found == (None,)
        finally:
            second.stop()
        with psycopg.connect(first.url) as conn:  # stopping one leaves the other running
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        first.stop()


def test_database_settings_from_socket_dir_url() -> None:
    url = "postgresql://postgres@/postgres?host=/tmp/dsm_redis-pg-abc/data&port=5432"
    assert database_settings_from_url(url) == {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": "postgres",
        "USER": "postgres",
        "PASSWORD": "",
        "HOST": "/tmp/dsm_redis-pg-abc/data",
        "PORT": "5432",
    }
    # The socket directory percent-encoded in place of the host, as libpq also accepts.
    encoded = database_settings_from_url("postgres://me@%2Fvar%2Frun%2Fpostgresql/app")
    assert (encoded["HOST"], encoded["PORT"], encoded["NAME"]) == ("/var/run/postgresql", "", "app")


def test_database_settings_from_tcp_url() -> None:
    url = "postgres://app%40x:p%3Ass@db.example.com:6543/my_db?sslmode=require&connect_timeout=5"
    assert database_settings_from_url(url) == {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": "my_db",
        "USER": "app@x",
        "PASSWORD": "p:ss",
        "HOST": "db.example.com",
        "PORT": "6543",
        "OPTIONS": {"sslmode": "require", "connect_timeout": "5"},
    }
    ipv6 = database_settings_from_url("postgresql://u@[::1]:5433/d")
    assert (ipv6["HOST"], ipv6["PORT"]) == ("::1", "5433")


def test_database_settings_from_sqlite_url() -> None:
    absolute = database_settings_from_url("sqlite:////tmp/dsm/test.sqlite3")
    assert absolute == {"ENGINE": "django.db.backends.sqlite3", "NAME": "/tmp/dsm/test.sqlite3"}
    assert database_settings_from_url("sqlite:///db.sqlite3")["NAME"] == "db.sqlite3"
    assert database_settings_from_url("sqlite://:memory:")["NAME"] == ":memory:"
    with pytest.raises(ValueError, match="Unsupported database URL scheme"):
        database_settings_from_url("mysql://u:p@h/d")
