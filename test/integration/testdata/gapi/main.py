"""A FastAPI app that attacks the host's guest API, for the guest API
hardening tests (hostile3_guestapi_test.go)."""
import asyncio
import http.client
import os
import resource
import socket
import threading
import time

from fastapi import FastAPI

app = FastAPI()
hoard = []
listing = {"stop": None, "threads": [], "count": 0, "errors": 0}


def _sock_path(sock: str = "") -> str:
    return sock or os.environ["ALEPH_API_UNIX_SOCKET"]


def _call(method: str, path: str, body: bytes = b"", timeout: float = 10):
    class UnixConnection(http.client.HTTPConnection):
        def connect(self):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(_sock_path())

    conn = UnixConnection("localhost")
    try:
        conn.request(method, path, body=body or None)
        resp = conn.getresponse()
        return resp.status, resp.read().decode(errors="replace"), dict(resp.getheaders())
    finally:
        conn.close()


@app.get("/")
async def index():
    return {"pid": os.getpid()}


@app.get("/call")
async def call(method: str = "GET", path: str = "/properties", body: str = ""):
    def run():
        try:
            status, text, headers = _call(method, path, body.encode())
            return {"status": status, "body": text, "retry_after": headers.get("Retry-After")}
        except Exception as e:
            return {"status": None, "body": f"{type(e).__name__}: {e}", "retry_after": None}

    return await asyncio.get_running_loop().run_in_executor(None, run)


@app.get("/hoard")
async def hoard_connections(n: int = 3000):
    """Opens n connections to the guest API socket and keeps them open
    without a word; counts the ones that connected."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        pass
    opened, error, retries = 0, None, 0
    for _ in range(n):
        for attempt in range(500):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(_sock_path())
                error = None
                break
            except BlockingIOError as e:  # the agent's backlog is full: it catches up
                s.close()
                s, error = None, f"{type(e).__name__}: {e}"
                retries += 1
                await asyncio.sleep(0.01)
            except OSError as e:
                s.close()
                s, error = None, f"{type(e).__name__}: {e}"
                break
        if s is None:
            break
        hoard.append(s)
        opened += 1
    return {"opened": opened, "held": len(hoard), "error": error, "retries": retries,
            "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)}


@app.get("/hoard-state")
async def hoard_state():
    """How many of the held connections the host has closed (EOF)."""
    closed = 0
    for s in hoard:
        s.setblocking(False)
        try:
            if s.recv(1) == b"":
                closed += 1
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
    return {"held": len(hoard), "closed_by_host": closed}


@app.get("/release")
async def release():
    n = len(hoard)
    for s in hoard:
        s.close()
    hoard.clear()
    return {"released": n}


@app.get("/list-start")
async def list_start(threads: int = 16, pattern: str = "*"):
    """Lists the program's cache keys matching pattern in a loop from
    several threads."""
    stop = threading.Event()
    listing.update(stop=stop, count=0, errors=0)

    def loop():
        while not stop.is_set():
            try:
                status, _, _ = _call("GET", f"/cache/?pattern={pattern}", timeout=30)
                if status == 200:
                    listing["count"] += 1
                else:
                    listing["errors"] += 1
            except Exception:
                listing["errors"] += 1

    listing["threads"] = [threading.Thread(target=loop, daemon=True) for _ in range(threads)]
    for t in listing["threads"]:
        t.start()
    return {"threads": threads}


@app.get("/list-stop")
async def list_stop():
    if listing["stop"] is not None:
        listing["stop"].set()
    for t in listing["threads"]:
        t.join(35)
    return {"listings": listing["count"], "errors": listing["errors"]}


@app.get("/fill-keys")
async def fill_keys(n: int = 1000, length: int = 500):
    def run():
        failed = 0
        for i in range(n):
            key = f"key_{i:05d}_" + "k" * length
            status, _, _ = _call("PUT", f"/cache/{key}", b"v")
            if status != 200:
                failed += 1
        return {"put": n, "failed": failed}

    return await asyncio.get_running_loop().run_in_executor(None, run)


@app.get("/put-latency")
async def put_latency(n: int = 30, size: int = 4096):
    """Times n PUTs (and GETs) of its own, in milliseconds, sorted."""
    def run():
        puts, gets, failed = [], [], 0
        value = b"v" * size
        for i in range(n):
            start = time.monotonic()
            status, _, _ = _call("PUT", f"/cache/lat_{i}", value, timeout=30)
            puts.append((time.monotonic() - start) * 1000)
            start = time.monotonic()
            gstatus, _, _ = _call("GET", f"/cache/lat_{i}", timeout=30)
            gets.append((time.monotonic() - start) * 1000)
            if status != 200 or gstatus != 200:
                failed += 1
        return {"puts": sorted(puts), "gets": sorted(gets), "failed": failed}

    return await asyncio.get_running_loop().run_in_executor(None, run)
