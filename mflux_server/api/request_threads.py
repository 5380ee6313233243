"""How each API server process spreads requests over threads: gunicorn's gthread, with threads of their own for submissions."""

from __future__ import annotations

import errno
import selectors
import socket
import time
from concurrent import futures
from functools import partial
from typing import Any

from gunicorn.workers.gthread import ThreadWorker

# Methods that change the queue. They get their own threads so a submission never waits behind a
# crowd of status polls or slow image downloads (bench/explanations.md).
WRITE_METHODS = (b"POST", b"PUT", b"PATCH", b"DELETE")
WRITE_THREADS = 2


def peek_method(sock: socket.socket) -> bytes | None:
    """The first bytes a client has sent, left unread; None if it has sent nothing yet."""
    try:
        return sock.recv(8, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return None
    except OSError as error:
        if error.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
            return None
        return b""  # a broken connection: let the normal path read the error and close it


class SubmitFirstThreads(ThreadWorker):
    """gunicorn's gthread worker, routing requests that change the queue to a small pool of their own."""

    def init_process(self) -> None:
        """Create the write pool next to gunicorn's pool (which then serves reads)."""
        self.write_pool = futures.ThreadPoolExecutor(max_workers=WRITE_THREADS, thread_name_prefix="writes")
        super().init_process()

    def enqueue_req(self, conn: Any) -> None:
        """Hand a connection whose request has arrived to the pool for its method."""
        head = peek_method(conn.sock)
        if head is None and not conn.initialized and not conn.data_ready:
            # A fresh connection with no request yet: wait on the poller, not in a thread, so the
            # method is known when it is dispatched. Same deadline as gthread's own pending connections
            # (the keep-alive timeout), which keeps that deque ordered by deadline.
            conn.sock.setblocking(False)
            conn.timeout = time.monotonic() + self.cfg.keepalive
            self.pending_conns.append(conn)
            self.poller.register(conn.sock, selectors.EVENT_READ, partial(self.on_pending_socket_readable, conn))
            return
        pool = self.write_pool if head and head.startswith(WRITE_METHODS) else self.tpool
        done = pool.submit(self.handle, conn)
        done.add_done_callback(lambda fut: self.method_queue.defer(self.finish_request, conn, fut))
