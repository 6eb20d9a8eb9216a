# An HTTP/1.1 server for ASGI apps on a unix socket, with nothing but the
# Python standard library. launcher.py uses it when the runtime has no
# uvicorn, as aleph-vm's official runtimes do (their init serves ASGI
# itself), so programs written for those runtimes run here unchanged.
#
# Its only client is vm-agent relaying the supervisor's requests: one
# request at a time per connection (no pipelining is relied on, though a
# pipelined request is kept for the next turn), keep-alive, request bodies
# by Content-Length or chunked, streamed both ways with backpressure.
# Websocket upgrades are not served: such requests reach the app as plain
# HTTP, as with uvicorn when no websocket library is installed.
import asyncio
import email.utils
import http
import logging
import os
import signal
import time
import traceback
import urllib.parse

log = logging.getLogger("aleph.launcher")

MAX_HEAD = 64 << 10  # request line and headers
READ_SIZE = 64 << 10  # request body bytes per http.request message
DRAIN_LIMIT = 64 << 10  # unread body drained to keep the connection
NO_BODY_STATUS = {204, 304}


class BadRequest(Exception):
    def __init__(self, status, reason):
        super().__init__(reason)
        self.status = status


class ClientGone(Exception):
    pass


_date = [0, b""]


def date_header():
    now = int(time.time())
    if _date[0] != now:
        _date[0] = now
        _date[1] = email.utils.formatdate(now, usegmt=True).encode()
    return _date[1]


class Request:
    """The request being served on a connection: its body reader and the
    ASGI receive/send pair."""

    def __init__(self, conn, method, version, headers, body_kind, length):
        self.conn = conn
        self.method = method
        self.version = version
        self.headers = headers
        self.body_kind = body_kind  # "length" or "chunked"
        self.remaining = length  # bytes left (length) or in this chunk (chunked)
        self.body_done = body_kind == "length" and length == 0
        self.body_delivered = False  # the app has had the last http.request
        self.expect_continue = False
        self.response_started = False
        self.response_done = asyncio.Event()
        self.disconnected = False
        self.status = 0
        self.keep_alive = True
        self.framing = None  # "length", "chunked", "close" or "none"
        self.to_send = 0  # bytes still due under Content-Length
        self.pending_start = None

    # --- request body ---

    async def read_body_chunk(self):
        r = self.conn
        if self.body_kind == "length":
            data = await r.read_some(min(self.remaining, READ_SIZE))
            self.remaining -= len(data)
            self.body_done = self.remaining == 0
            return data
        # chunked
        if self.remaining == 0:
            line = await r.read_line()
            size_text = line.split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise BadRequest(400, "invalid chunk size") from None
            if size < 0 or len(size_text) > 16:
                raise BadRequest(400, "invalid chunk size")
            if size == 0:
                # Trailers, ignored, up to the empty line.
                while await r.read_line():
                    pass
                self.body_done = True
                return b""
            self.remaining = size
        data = await r.read_some(min(self.remaining, READ_SIZE))
        self.remaining -= len(data)
        if self.remaining == 0:
            if await r.read_exactly(2) != b"\r\n":
                raise BadRequest(400, "chunk not followed by CRLF")
        return data

    async def receive(self):
        if self.disconnected:
            return {"type": "http.disconnect"}
        if not self.body_delivered:
            body = b""
            if not self.body_done:
                if self.expect_continue and not self.response_started:
                    self.expect_continue = False
                    self.conn.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                try:
                    body = await self.read_body_chunk()
                    while not body and not self.body_done:
                        body = await self.read_body_chunk()
                except (ClientGone, ConnectionError):
                    self.disconnected = True
                    return {"type": "http.disconnect"}
            self.body_delivered = self.body_done
            return {"type": "http.request", "body": body, "more_body": not self.body_done}
        # Body read: the next event is the client going away, or the end of
        # this request once the response is complete.
        await self.conn.wait_disconnect(self.response_done)
        self.disconnected = True
        return {"type": "http.disconnect"}

    async def drain_body(self):
        """Reads what the app left of the body, so the connection can serve
        the next request; False when it is too much to be worth it."""
        budget = DRAIN_LIMIT
        while not self.body_done:
            data = await self.read_body_chunk()
            budget -= len(data)
            if budget < 0:
                return False
        return True

    # --- response ---

    async def send(self, message):
        kind = message["type"]
        if kind == "http.response.start":
            if self.response_started:
                raise RuntimeError("http.response.start sent twice")
            self.response_started = True
            self.expect_continue = False
            self.status = int(message["status"])
            self.pending_start = message
            return
        if kind != "http.response.body":
            raise RuntimeError("unexpected ASGI message %r" % kind)
        if not self.response_started:
            raise RuntimeError("http.response.body before http.response.start")
        if self.response_done.is_set():
            raise RuntimeError("http.response.body after the response completed")
        body = bytes(message.get("body", b""))
        more = bool(message.get("more_body", False))
        if self.disconnected:
            # The client is gone: sends are no-ops so the app ends quietly.
            if not more:
                self.response_done.set()
            return
        out = []
        if self.pending_start is not None:
            out.append(self.head(self.pending_start, body, more))
            self.pending_start = None
        if self.framing == "length":
            if len(body) > self.to_send:
                raise RuntimeError("response body longer than its Content-Length")
            self.to_send -= len(body)
        if body and self.method != "HEAD" and self.framing != "none":
            if self.framing == "chunked":
                out.append(b"%x\r\n" % len(body))
                out.append(body)
                out.append(b"\r\n")
            else:
                out.append(body)
        if not more:
            if self.framing == "chunked" and self.method != "HEAD":
                out.append(b"0\r\n\r\n")
            if self.framing == "length" and self.to_send:
                self.keep_alive = False  # the client waits for bytes never coming
            if self.framing == "close":
                self.keep_alive = False
        try:
            self.conn.write(b"".join(out))
            await self.conn.drain()
        except (ConnectionError, ClientGone):
            self.disconnected = True
        if not more:
            self.response_done.set()

    def head(self, start, first_body, more):
        status = self.status
        headers = []
        length = None
        chunked_by_app = False
        for name, value in start.get("headers", []):
            name = bytes(name).lower()
            value = bytes(value)
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked_by_app = True
                continue  # framing is ours to decide
            elif name == b"connection":
                if value.lower() == b"close":
                    self.keep_alive = False
                continue
            headers.append((name, value))
        if status < 200 or status in NO_BODY_STATUS:
            self.framing = "none"
            if length is not None:
                headers.append((b"content-length", b"%d" % length))
        elif length is not None:
            self.framing = "length"
            self.to_send = length
            headers.append((b"content-length", b"%d" % length))
        elif not more and not chunked_by_app:
            # The whole body in one message: its length is known.
            self.framing = "length"
            self.to_send = len(first_body)
            headers.append((b"content-length", b"%d" % len(first_body)))
        elif self.version == "1.1":
            self.framing = "chunked"
            headers.append((b"transfer-encoding", b"chunked"))
        else:
            self.framing = "close"
            self.keep_alive = False
        if self.method == "HEAD":
            self.framing = "none" if self.framing != "close" else "close"
        if not self.keep_alive or self.conn.closing:
            self.keep_alive = False
            headers.append((b"connection", b"close"))
        elif self.version == "1.0":
            headers.append((b"connection", b"keep-alive"))
        if not any(n == b"date" for n, _ in headers):
            headers.append((b"date", date_header()))
        try:
            reason = http.HTTPStatus(status).phrase.encode()
        except ValueError:
            reason = b""
        lines = [b"HTTP/1.1 %d %s\r\n" % (status, reason)]
        for name, value in headers:
            if b"\r" in value or b"\n" in value or b"\r" in name or b"\n" in name or b":" in name:
                raise RuntimeError("invalid response header %r" % name)
            lines.append(name + b": " + value + b"\r\n")
        lines.append(b"\r\n")
        return b"".join(lines)


class Connection:
    def __init__(self, server, reader, writer):
        self.server = server
        self.reader = reader
        self.writer = writer
        self.buf = bytearray()
        self.eof = False
        self.closing = False  # the server is stopping: last request here
        self.idle = True

    # Reads go through self.buf so that bytes read while watching for a
    # disconnect (a pipelined request) are not lost.

    async def _fill(self):
        data = await self.reader.read(READ_SIZE)
        if not data:
            self.eof = True
            raise ClientGone()
        self.buf += data

    async def read_some(self, n):
        if not self.buf:
            await self._fill()
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    async def read_exactly(self, n):
        while len(self.buf) < n:
            await self._fill()
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    async def read_line(self, limit=8192):
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                line = bytes(self.buf[:i])
                del self.buf[:i + 2]
                return line
            if len(self.buf) > limit:
                raise BadRequest(400, "line too long")
            await self._fill()

    async def read_head(self):
        start = 0
        while True:
            i = self.buf.find(b"\r\n\r\n", start)
            if i >= 0:
                head = bytes(self.buf[:i])
                del self.buf[:i + 4]
                return head
            if len(self.buf) > MAX_HEAD:
                raise BadRequest(431, "request head too large")
            start = max(0, len(self.buf) - 3)
            await self._fill()

    async def wait_disconnect(self, done):
        """Returns when the client closes its side or done is set."""
        done_wait = asyncio.ensure_future(done.wait())
        try:
            while not done.is_set() and not self.eof:
                reading = asyncio.ensure_future(self._fill())
                try:
                    await asyncio.wait({reading, done_wait}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    if not reading.done():
                        reading.cancel()
                        try:
                            await reading
                        except (asyncio.CancelledError, Exception):
                            pass
                if reading.done() and not reading.cancelled() and reading.exception() is not None:
                    return  # EOF or reset
        finally:
            done_wait.cancel()

    def write(self, data):
        if self.writer.is_closing():
            raise ClientGone()
        self.writer.write(data)

    async def drain(self):
        await self.writer.drain()

    def simple_response(self, status, text):
        body = text.encode()
        reason = http.HTTPStatus(status).phrase.encode()
        self.write(b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\n"
                   b"content-length: %d\r\nconnection: close\r\ndate: %s\r\n\r\n%s"
                   % (status, reason, len(body), date_header(), body))

    async def serve(self):
        try:
            while not self.closing:
                self.idle = True
                try:
                    head = await asyncio.wait_for(self.read_head(), self.server.keep_alive_timeout)
                except (asyncio.TimeoutError, ClientGone, ConnectionError):
                    return
                self.idle = False
                try:
                    req, scope = self.parse(head)
                except BadRequest as e:
                    self.simple_response(e.status, str(e) + "\n")
                    await self.drain()
                    return
                if not await self.run(req, scope):
                    return
        except BadRequest as e:
            log.info("bad request: %s", e)
        except (ClientGone, ConnectionError):
            pass
        finally:
            self.writer.close()

    def parse(self, head):
        try:
            text = head.decode("latin-1")
        except UnicodeDecodeError:
            raise BadRequest(400, "undecodable request head") from None
        lines = text.split("\r\n")
        # Tolerate empty lines before the request line (RFC 9112 2.2).
        while lines and not lines[0]:
            lines.pop(0)
        if not lines:
            raise BadRequest(400, "empty request")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise BadRequest(400, "invalid request line")
        method, target, proto = parts
        version = proto[len("HTTP/"):]
        if version not in ("1.0", "1.1") or not method.isalpha():
            raise BadRequest(400, "unsupported request line")
        headers = []
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip() or name[0] in " \t":
                raise BadRequest(400, "invalid header line")
            headers.append((name.lower().encode("latin-1"), value.strip(" \t").encode("latin-1")))

        def values(n):
            return [v for k, v in headers if k == n]

        te = values(b"transfer-encoding")
        cl = values(b"content-length")
        if te:
            if cl:
                raise BadRequest(400, "both Transfer-Encoding and Content-Length")
            codings = [c.strip().lower() for v in te for c in v.split(b",")]
            if codings[-1] != b"chunked" or codings.count(b"chunked") != 1:
                raise BadRequest(501, "unsupported transfer coding")
            if codings != [b"chunked"]:
                raise BadRequest(501, "unsupported transfer coding")
            body_kind, length = "chunked", 0
        else:
            if len(set(cl)) > 1 or (cl and not cl[0].isdigit()):
                raise BadRequest(400, "invalid Content-Length")
            body_kind, length = "length", int(cl[0]) if cl else 0

        req = Request(self, method, version, headers, body_kind, length)
        connection = b",".join(values(b"connection")).lower()
        if version == "1.0":
            req.keep_alive = b"keep-alive" in connection
        elif b"close" in connection:
            req.keep_alive = False
        if version == "1.1" and b"100-continue" in [v.lower() for v in values(b"expect")]:
            req.expect_continue = True

        if target.startswith(("http://", "https://")):
            split = urllib.parse.urlsplit(target)
            target = split.path or "/"
            if split.query:
                target += "?" + split.query
        raw_path, _, query = target.partition("?")
        raw = raw_path.encode("latin-1")
        try:
            path = urllib.parse.unquote(raw_path, errors="strict") if "%" in raw_path else raw_path
        except UnicodeDecodeError:
            path = urllib.parse.unquote(raw_path, encoding="latin-1")
        scheme = "http"
        client = None
        # Only vm-agent reaches this socket: its forwarded headers are
        # trusted, as uvicorn does with forwarded_allow_ips="*".
        for proto_value in values(b"x-forwarded-proto"):
            p = proto_value.decode("latin-1").strip().lower()
            if p in ("http", "https"):
                scheme = p
        fwd = values(b"x-forwarded-for")
        if fwd:
            client = (fwd[-1].decode("latin-1").split(",")[-1].strip(), 0)
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": version,
            "server": self.server.server_addr,
            "client": client,
            "scheme": scheme,
            "method": method,
            "root_path": "",
            "path": path,
            "raw_path": raw,
            "query_string": query.encode("latin-1"),
            "headers": headers,
        }
        if self.server.state is not None:
            scope["state"] = self.server.state.copy()
        return req, scope

    async def run(self, req, scope):
        """Serves one request; True when the connection may serve another."""
        crashed = False
        try:
            await self.server.app(scope, req.receive, req.send)
        except BadRequest as e:
            if not req.response_started:
                self.simple_response(e.status, str(e) + "\n")
                await self.drain()
            return False
        except (ClientGone, ConnectionError):
            return False
        except Exception:
            crashed = True
            log.error("exception in ASGI application\n%s", traceback.format_exc())
        if not req.response_started:
            if req.disconnected:
                return False
            # Nothing was answered (or the app raised first): a bare 500.
            self.simple_response(500, "Internal Server Error\n")
            await self.drain()
            return False
        if req.pending_start is not None and not crashed:
            # Start sent with no body message: an empty body.
            await req.send({"type": "http.response.body", "body": b""})
        if not req.response_done.is_set():
            if not crashed:
                log.error("ASGI application returned before completing its response")
            # Cut the connection: the client sees an incomplete response
            # rather than a well-formed truncated one.
            self.writer.transport.abort()
            return False
        if req.disconnected or not req.keep_alive or self.closing:
            return False
        try:
            return await req.drain_body()
        except (BadRequest, ClientGone, ConnectionError):
            return False


class Server:
    def __init__(self, app, path, keep_alive_timeout=75, shutdown_timeout=None):
        self.app = app
        self.path = path
        self.server_addr = (path, None)
        self.keep_alive_timeout = keep_alive_timeout
        self.shutdown_timeout = shutdown_timeout
        self.state = {}
        self.connections = set()
        self.tasks = set()

    async def lifespan_startup(self):
        """Runs the lifespan startup; None when it succeeded, else the
        reason it failed (the app's message or the traceback)."""
        self.lifespan_in = asyncio.Queue()
        self.lifespan_out = asyncio.Queue()
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": self.state}

        async def run():
            try:
                await self.app(scope, self.lifespan_in.get, self.lifespan_out.put)
            except BaseException:
                return traceback.format_exc()
            return None

        self.lifespan_task = asyncio.ensure_future(run())
        return await self._lifespan_event("startup")

    async def lifespan_shutdown(self):
        if self.lifespan_task.done():
            return None
        return await self._lifespan_event("shutdown")

    async def _lifespan_event(self, event):
        await self.lifespan_in.put({"type": "lifespan." + event})
        answer = asyncio.ensure_future(self.lifespan_out.get())
        await asyncio.wait({answer, self.lifespan_task}, return_when=asyncio.FIRST_COMPLETED)
        message = None
        if answer.done():
            message = answer.result()
        else:
            # The app ended; an answer it sent just before is still queued.
            answer.cancel()
            try:
                message = self.lifespan_out.get_nowait()
            except asyncio.QueueEmpty:
                pass
        if message is not None:
            if message["type"] == "lifespan.%s.complete" % event:
                return None
            return message.get("message") or "lifespan.%s.failed" % event
        err = self.lifespan_task.result()
        return err or "the application returned during lifespan %s" % event

    async def handle(self, reader, writer):
        conn = Connection(self, reader, writer)
        self.connections.add(conn)
        task = asyncio.current_task()
        self.tasks.add(task)
        try:
            await conn.serve()
        finally:
            self.connections.discard(conn)
            self.tasks.discard(task)

    async def serve(self, on_startup_failed):
        """Runs the app until SIGTERM or SIGINT; returns the exit status."""
        failure = await self.lifespan_startup()
        if failure is not None:
            on_startup_failed(failure)
            return 3
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        server = await asyncio.start_unix_server(self.handle, path=self.path, limit=MAX_HEAD + READ_SIZE)
        os.chmod(self.path, 0o666)
        log.info("serving on %s (standard library server: no uvicorn in this runtime)", self.path)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("shutting down")
        server.close()
        # Idle connections close now, busy ones after their request.
        for conn in list(self.connections):
            conn.closing = True
            if conn.idle:
                conn.writer.close()
        if self.tasks:
            _, pending = await asyncio.wait(set(self.tasks), timeout=self.shutdown_timeout)
            for t in pending:
                t.cancel()
        failure = await self.lifespan_shutdown()
        if failure is not None:
            log.error("lifespan shutdown failed: %s", failure)
            return 1
        return 0


def serve(app, path, on_startup_failed):
    return asyncio.run(Server(app, path).serve(on_startup_failed))
