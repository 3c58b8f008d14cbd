"""A minimal PostgreSQL client for bench/postgres.sh's breakdown (standard library only).

It speaks just enough of the frontend/backend protocol (version 3.0) to time what a
chan-run run costs the server and the network, without a client library's own cost:
the start-up handshake (trust authentication only: the bench's throw-away clusters),
simple queries ('Q'), and Terminate. Each call is one request and waits for the
server's ReadyForQuery, so `query` is exactly one round trip.
"""

import socket
import struct
import time
import urllib.parse


class PgError(Exception):
    pass


def parse_url(url):
    """postgres://USER@HOST:PORT/DB -> (host, port, user, dbname)."""
    u = urllib.parse.urlsplit(url)
    if u.scheme not in ("postgres", "postgresql"):
        raise ValueError(f"not a postgres:// URL: {url}")
    user = urllib.parse.unquote(u.username or "postgres")
    db = urllib.parse.unquote(u.path.lstrip("/")) or user
    return u.hostname or "127.0.0.1", u.port or 5432, user, db


class Conn:
    """One connection: `Conn(url)` connects (TCP + start-up until ReadyForQuery)."""

    def __init__(self, url, application_name="chan-run bench"):
        host, port, user, db = parse_url(url)
        self.sock = socket.create_connection((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        params = b"".join(
            k.encode() + b"\0" + v.encode() + b"\0"
            for k, v in (("user", user), ("database", db), ("application_name", application_name),
                         ("client_encoding", "UTF8"))
        ) + b"\0"
        self.sock.sendall(struct.pack("!ii", 8 + len(params), 196608) + params)
        self.backend_pid = None
        while True:
            kind, body = self._message()
            if kind == b"R":
                (code,) = struct.unpack("!i", body[:4])
                if code != 0:
                    raise PgError(f"the server asks for authentication (method {code}); "
                                  "bench/pgwire.py only speaks to trust-auth clusters")
            elif kind == b"K":
                self.backend_pid = struct.unpack("!i", body[:4])[0]
            elif kind == b"E":
                raise PgError(_error_text(body))
            elif kind == b"Z":
                return

    def _recv(self, n):
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise PgError("the server closed the connection")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _message(self):
        head = self._recv(5)
        kind, length = head[:1], struct.unpack("!i", head[1:])[0]
        return kind, self._recv(length - 4)

    def query(self, sql):
        """One simple query, one round trip; returns the rows as lists of str/None."""
        data = sql.encode() + b"\0"
        self.sock.sendall(b"Q" + struct.pack("!i", 4 + len(data)) + data)
        rows, error = [], None
        while True:
            kind, body = self._message()
            if kind == b"D":
                (n,) = struct.unpack("!h", body[:2])
                pos, row = 2, []
                for _ in range(n):
                    (size,) = struct.unpack("!i", body[pos:pos + 4])
                    pos += 4
                    if size < 0:
                        row.append(None)
                    else:
                        row.append(body[pos:pos + size].decode())
                        pos += size
                rows.append(row)
            elif kind == b"E":
                error = _error_text(body)
            elif kind == b"Z":
                if error:
                    raise PgError(error)
                return rows

    def close(self):
        try:
            self.sock.sendall(b"X\0\0\0\4")
        finally:
            self.sock.close()


def _error_text(body):
    fields = {}
    for part in body.split(b"\0"):
        if part:
            fields[part[:1]] = part[1:].decode(errors="replace")
    return fields.get(b"M", "error") + (f" ({fields[b'D']})" if b"D" in fields else "")


def one_value(url, sql):
    c = Conn(url)
    try:
        return c.query(sql)[0][0]
    finally:
        c.close()


def wait_until_ready(url, seconds=10):
    deadline = time.monotonic() + seconds
    while True:
        try:
            return one_value(url, "SELECT 1")
        except (OSError, PgError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
