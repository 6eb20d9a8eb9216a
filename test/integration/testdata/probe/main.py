"""A FastAPI app that reports what it can see, for the isolation tests."""
import asyncio
import hashlib
import os
import socket
import uuid

from fastapi import FastAPI, Request
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


@app.get("/crash")
async def crash():
    os._exit(1)


@app.get("/environ")
async def environ():
    return dict(os.environ)


def _guest_api(method: str, path: str, body: bytes = b""):
    """Calls the host's guest API over ALEPH_API_UNIX_SOCKET."""
    import http.client

    class UnixConnection(http.client.HTTPConnection):
        def connect(self):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(10)
            self.sock.connect(os.environ["ALEPH_API_UNIX_SOCKET"])

    conn = UnixConnection("localhost")
    conn.request(method, path, body=body or None)
    resp = conn.getresponse()
    return resp.status, resp.read().decode(errors="replace")


@app.get("/guest-api")
async def guest_api(method: str = "GET", path: str = "/properties", body: str = ""):
    status, text = await asyncio.get_running_loop().run_in_executor(
        None, _guest_api, method, path, body.encode()
    )
    return {"status": status, "body": text}
