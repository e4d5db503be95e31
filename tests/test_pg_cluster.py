"""The throwaway PostgreSQL cluster the PostgreSQL tests run on (tests/helpers/pg_cluster.py)."""

from __future__ import annotations

import psycopg
import pytest
from helpers.pg_cluster import PgCluster


def test_a_row_committed_on_one_connection_is_read_on_another(pg_url: str) -> None:
    """The server is real: a commit is visible to a second, independent connection."""
    assert pg_url.startswith("postgresql://aiworker@127.0.0.1:")
    with psycopg.connect(pg_url) as writer:
        writer.execute("CREATE TABLE studies (uid text PRIMARY KEY, instances int NOT NULL)")
        writer.execute("INSERT INTO studies VALUES (%s, %s), (%s, %s)",
                       ("1.2.3", 40, "1.2.4", 7))
    with psycopg.connect(pg_url) as reader:
        rows = reader.execute("SELECT uid, instances FROM studies ORDER BY uid").fetchall()
        backend = reader.execute("SELECT inet_server_port()").fetchone()
    assert rows == [("1.2.3", 40), ("1.2.4", 7)]
    assert backend is not None and f":{backend[0]}/" in pg_url


def test_two_new_databases_are_independent(pg_cluster: PgCluster) -> None:
    """Each test's database starts empty: a table in one does not exist in the other."""
    first, second = pg_cluster.new_database(), pg_cluster.new_database()
    assert first != second
    with psycopg.connect(first) as conn:
        conn.execute("CREATE TABLE jobs (id int)")
        conn.execute("INSERT INTO jobs VALUES (1)")
    with psycopg.connect(second) as conn:
        with pytest.raises(psycopg.errors.UndefinedTable):
            conn.execute("SELECT id FROM jobs")
    with psycopg.connect(first) as conn:
        assert conn.execute("SELECT id FROM jobs").fetchall() == [(1,)]
