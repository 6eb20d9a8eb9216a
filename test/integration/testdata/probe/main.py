"""A FastAPI app that reports what it can see, for the isolation tests."""
import asyncio
import hashlib
import os
import socket
import uuid

from fastapi import FastAPI, Query, Request
from fastapi.responses import StreamingResponse

app = FastAPI()
BOOT_ID = str(uuid.uuid4())
hoard = []


@app.get("/")
async def index():
    return {"boot_id": BOOT_ID, "pid": os.getpid()}


@app.get("/path/{rest:path}")
async def path(rest: str, request: Request):
    return {"rest": rest, "query": str(request.url.query), "headers": dict(request.headers)}


@app.get("/read-file")
async def read_file(path: str):
    try:
        with open(path, "rb") as f:
            return {"ok": True, "content": f.read(4096).decode(errors="replace")}
    except OSError as e:
        return {"ok": False, "error": str(e)}


@app.get("/processes")
async def processes():
    pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    cmds = []
    for p in pids:
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                cmds.append(f.read().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            pass
    return {"pids": pids, "cmdlines": cmds}


@app.get("/connect")
async def connect(host: str, port: int):
    try:
        with socket.create_connection((host, port), timeout=2):
            return {"connected": True}
    except OSError as e:
        return {"connected": False, "error": str(e)}


@app.get("/connect-all")
async def connect_all(to: list[str] = Query(...), read: bool = False):
    """Tries every host:port in `to` at once (2 s each); with read, returns
    the first line the other side sends."""

    async def attempt(target: str):
        host, _, port = target.rpartition(":")
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 2)
        except Exception as e:
            return {"connected": False, "error": f"{type(e).__name__}: {e}"}
        received = ""
        if read:
            try:
                received = (await asyncio.wait_for(reader.readline(), 2)).decode(errors="replace")
            except Exception as e:
                received = f"{type(e).__name__}: {e}"
        writer.close()
        return {"connected": True, "received": received}

    results = await asyncio.gather(*(attempt(t) for t in to))
    return dict(zip(to, results))


listeners = {}


@app.get("/listen")
async def listen(port: int):
    """Starts a TCP server on 0.0.0.0:port that says "pong" to whoever connects."""

    async def pong(reader, writer):
        writer.write(b"pong\n")
        await writer.drain()
        writer.close()

    if port not in listeners:
        listeners[port] = await asyncio.start_server(pong, "0.0.0.0", port)
    return {"listening": True, "port": port}


def _fetch(url: str):
    import urllib.error
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=3) as r:
            return {"ok": True, "status": r.status, "body": r.read(4096).decode(errors="replace"), "error": None}
    except urllib.error.HTTPError as e:
        return {"ok": False, "status": e.code, "body": "", "error": str(e)}
    except Exception as e:
        return {"ok": False, "status": None, "body": "", "error": f"{type(e).__name__}: {e}"}


@app.get("/fetch")
async def fetch(url: str):
    return await asyncio.get_running_loop().run_in_executor(None, _fetch, url)


def _resolve(name: str):
    try:
        infos = socket.getaddrinfo(name, None, socket.AF_INET, socket.SOCK_STREAM)
        return {"ok": True, "addresses": sorted({i[4][0] for i in infos}), "error": None}
    except OSError as e:
        return {"ok": False, "addresses": [], "error": f"{type(e).__name__}: {e}"}


@app.get("/resolve")
async def resolve(name: str):
    return await asyncio.get_running_loop().run_in_executor(None, _resolve, name)


@app.get("/ip")
async def ip(target: str = "198.18.0.2"):
    """The program's own IPv4 address (the source of a route to target), its
    interfaces and its resolver configuration."""
    address, error = None, None
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect((target, 9))
        address = s.getsockname()[0]
    except OSError as e:
        error = f"{type(e).__name__}: {e}"
    finally:
        s.close()
    try:
        with open("/etc/resolv.conf") as f:
            resolv_conf = f.read()
    except OSError as e:
        resolv_conf = None
    try:
        interfaces = [name for _, name in socket.if_nameindex()]
    except OSError:
        interfaces = None
    return {"address": address, "error": error, "resolv_conf": resolv_conf,
            "interfaces": interfaces, "hostname": socket.gethostname()}


@app.get("/memory")
async def memory(mib: int):
    for _ in range(mib):
        hoard.append(bytearray(1024 * 1024))
    return {"held_mib": len(hoard)}


@app.get("/sleep")
async def sleep(seconds: float):
    await asyncio.sleep(seconds)
    return {"slept": seconds}


@app.get("/stream")
async def stream(chunks: int = 5, delay: float = 0.3):
    async def gen():
        for i in range(chunks):
            yield f"chunk {i}\n".encode()
            await asyncio.sleep(delay)

    return StreamingResponse(gen(), media_type="text/plain")


@app.post("/echo")
async def echo(request: Request):
    h = hashlib.sha256()
    n = 0
    async for part in request.stream():
        h.update(part)
        n += len(part)
    return {"length": n, "sha256": h.hexdigest()}


@app.get("/random")
async def rand():
    """Python's random module, whose state a restored snapshot would share."""
    import random
    return {"random": random.random(), "hostname": socket.gethostname()}


@app.get("/crash")
async def crash():
    os._exit(1)


@app.get("/environ")
async def environ():
    return dict(os.environ)


def _guest_api(method: str, path: str, body: bytes = b"", sock_path: str = ""):
    """Calls the host's guest API over ALEPH_API_UNIX_SOCKET (or sock_path)."""
    import http.client

    class UnixConnection(http.client.HTTPConnection):
        def connect(self):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(10)
            self.sock.connect(sock_path or os.environ["ALEPH_API_UNIX_SOCKET"])

    conn = UnixConnection("localhost")
    conn.request(method, path, body=body or None)
    resp = conn.getresponse()
    return resp.status, resp.read().decode(errors="replace")


@app.get("/guest-api")
async def guest_api(method: str = "GET", path: str = "/properties", body: str = "", sock: str = ""):
    status, text = await asyncio.get_running_loop().run_in_executor(
        None, _guest_api, method, path, body.encode(), sock
    )
    return {"status": status, "body": text}


# Hostile behaviour, for the containment tests.

@app.get("/fork-bomb")
async def fork_bomb(n: int = 100000):
    """Forks children that sleep until told to go, up to n or the limit."""
    children, error = [], None
    try:
        for _ in range(n):
            pid = os.fork()
            if pid == 0:
                import time
                time.sleep(30)
                os._exit(0)
            children.append(pid)
    except OSError as e:
        error = str(e)
    for pid in children:
        try:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        except OSError:
            pass
    return {"forked": len(children), "error": error}


@app.get("/cpu-burn")
def cpu_burn(seconds: float = 5, processes: int = 8):
    """Spins every core it can get for a while."""
    import multiprocessing
    import time

    def spin(until):
        while time.time() < until:
            pass

    until = time.time() + seconds
    procs = [multiprocessing.Process(target=spin, args=(until,)) for _ in range(processes)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    return {"burned": seconds, "processes": processes}


@app.get("/print")
def print_lines(text: str, n: int = 1):
    """Prints n numbered lines to stdout (the owner's logs read them)."""
    for i in range(n):
        print(f"{text} {i}", flush=True)
    return {"printed": n}


@app.get("/log-flood")
def log_flood(mib: int = 100):
    """Prints mib MiB of lines to stdout and stderr."""
    import sys
    line = "x" * 1023 + "\n"
    for i in range(mib * 1024):
        (sys.stdout if i % 2 else sys.stderr).write(line)
    sys.stdout.flush()
    sys.stderr.flush()
    return {"printed_mib": mib}


@app.get("/big-response")
async def big_response(mib: int = 512):
    chunk = b"y" * (1024 * 1024)

    async def gen():
        for _ in range(mib):
            yield chunk

    return StreamingResponse(gen(), media_type="application/octet-stream")


@app.get("/write-file")
async def write_file(path: str, content: str):
    try:
        with open(path, "w") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())  # durable as a careful program makes it: a VM may be killed
        return {"ok": True}
    except OSError as e:
        return {"ok": False, "error": str(e)}
def _guest_api_put(path: str, size: int):
    """PUTs size bytes to the guest API; returns (status, body) or (None, error)."""
    try:
        return _guest_api("PUT", path, b"v" * size)
    except Exception as e:
        return None, f"{type(e).__name__}: {e}"


@app.get("/cache-flood")
async def cache_flood(n: int = 100, size: int = 1024 * 1024 - 1, concurrency: int = 8, prefix: str = "flood"):
    """PUTs n values of size bytes into the guest cache (keys prefix_0…),
    concurrency at a time; counts the answers by status."""
    from concurrent.futures import ThreadPoolExecutor

    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(concurrency) as pool:
        results = await asyncio.gather(
            *(loop.run_in_executor(pool, _guest_api_put, f"/cache/{prefix}_{i}", size) for i in range(n))
        )
    counts, samples = {}, {}
    for status, body in results:
        counts[str(status)] = counts.get(str(status), 0) + 1
        samples.setdefault(str(status), body[:300])
    return {"counts": counts, "samples": samples}


@app.get("/fill")
async def fill(path: str, mib: int):
    """Writes up to mib MiB of zeros to path and reports how much went in
    and the error (errno name) that stopped it, if any."""
    import errno

    chunk = b"\0" * (1 << 20)
    written, error = 0, None
    fd = None
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        for _ in range(mib):
            view = memoryview(chunk)
            while view:
                n = os.write(fd, view)
                written += n
                view = view[n:]
        os.fsync(fd)
    except OSError as e:
        error = errno.errorcode.get(e.errno, str(e.errno))
    finally:
        if fd is not None:
            os.close(fd)
    return {"written": written, "error": error}


@app.get("/remove")
async def remove(path: str):
    try:
        os.remove(path)
        return {"ok": True}
    except OSError as e:
        return {"ok": False, "error": str(e)}


@app.get("/plant")
async def plant(dir: str):
    """Leaves what a hostile program would for the host to trip on: a
    set-user-id root executable, a symbolic link to a host secret and a
    marker file."""
    import shutil

    shutil.copy("/bin/sh", f"{dir}/suid")
    os.chmod(f"{dir}/suid", 0o4755)
    if not os.path.lexists(f"{dir}/link"):
        os.symlink("/etc/shadow", f"{dir}/link")
    with open(f"{dir}/marker", "w") as f:
        f.write("kept")
    os.sync()  # durable before the test kills the VM
    return {"suid_mode": oct(os.stat(f"{dir}/suid").st_mode), "link": os.readlink(f"{dir}/link")}
