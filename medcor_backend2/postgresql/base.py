"""PostgreSQL as Django's backend runs it, with a health check that asks the server only when needed.

With CONN_HEALTH_CHECKS, Django sends `SELECT 1` before the first query of every request that
finds a persistent connection: a round trip, and a statement for the server, on each POST. A
connection that the server closed or is closing (a restart, `pg_terminate_backend`, an idle
timeout) has said so on its socket: the server's last message, then the end of the stream. So an
idle connection whose socket holds nothing to read is taken as usable without a query; one with
anything waiting (that, or a notice), or not idle, gets Django's own check. A connection lost
without a word (a host gone, a dropped route) goes unnoticed by both until they use it.
"""

import select

from django.db.backends.postgresql import base
from psycopg.pq import TransactionStatus


class DatabaseWrapper(base.DatabaseWrapper):
    def close_if_health_check_failed(self):
        if (
            self.connection is not None
            and self.health_check_enabled
            and not self.health_check_done
            and not self.pool
            and is_quiet(self.connection)
        ):
            self.health_check_done = True
            return
        super().close_if_health_check_failed()


def is_quiet(connection):
    """Whether a psycopg connection is open, idle and has nothing from the server waiting to be read."""
    if connection.closed or connection.broken:
        return False
    if connection.info.transaction_status != TransactionStatus.IDLE:
        return False
    try:
        poller = select.poll()
        poller.register(connection.fileno(), select.POLLIN | select.POLLPRI)
        return not poller.poll(0)
    except (OSError, ValueError):
        return False
