"""Self-test program of the supervisor (our own code).

Each route exercises one feature the supervisor must provide: routing,
environment, lifespan events, error reporting, crash recovery, timeouts,
streaming, request bodies, memory limits and isolation.
"""
import asyncio
import hashlib
import os

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

app = FastAPI()

state = {"lifespan": False, "memory": []}


@app.on_event("startup")
async def startup():
    state["lifespan"] = True
    print("example_fastapi: startup event ran", flush=True)


@app.on_event("shutdown")
async def shutdown():
    print("example_fastapi: shutdown event ran", flush=True)


@app.get("/")
async def index():
    return {"Example": "example_fastapi"}


@app.get("/environ")
async def environ():
    return dict(os.environ)


@app.get("/lifespan")
async def lifespan():
    return {"Lifespan": state["lifespan"]}


@app.get("/raise")
async def raise_error():
    raise ValueError("This exception was raised on purpose by /raise")


@app.get("/crash")
async def crash():
    print("example_fastapi: crashing on purpose", flush=True)
    os._exit(1)


@app.get("/sleep")
async def sleep(seconds: float = 1.0):
    await asyncio.sleep(seconds)
    return {"slept": seconds}


@app.get("/stream")
async def stream(chunks: int = 5, delay: float = 0.2):
    async def generate():
        for i in range(chunks):
            yield f"chunk {i}\n"
            await asyncio.sleep(delay)

    return StreamingResponse(generate(), media_type="text/plain")


@app.post("/echo")
async def echo(request: Request):
    digest = hashlib.sha256()
    length = 0
    async for chunk in request.stream():
        digest.update(chunk)
        length += len(chunk)
    return {"length": length, "sha256": digest.hexdigest()}


@app.get("/memory")
async def memory(mib: int = 1):
    # bytearray pages are zeroed on touch; writing each page makes the
    # memory resident, which is what a limit has to catch.
    block = bytearray(mib << 20)
    for i in range(0, len(block), 4096):
        block[i] = 1
    state["memory"].append(block)
    return {"held_mib": sum(len(b) for b in state["memory"]) >> 20}


@app.get("/read-file")
async def read_file(path: str):
    try:
        with open(path, "rb") as f:
            data = f.read(1 << 20)
    except OSError as e:
        return {"path": path, "error": f"{type(e).__name__}: {e}"}
    return {"path": path, "content": data.decode(errors="replace")}


@app.get("/processes")
async def processes():
    pids = sorted(int(name) for name in os.listdir("/proc") if name.isdigit())
    result = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            cmdline = ""
        result.append({"pid": pid, "cmdline": cmdline})
    return {"pids": pids, "processes": result}


def _guest_api(method: str, path: str, body: bytes = b""):
    """Calls the node's guest API, a unix socket named by the environment."""
    import http.client
    import socket

    class UnixConnection(http.client.HTTPConnection):
        def connect(self):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(10)
            self.sock.connect(os.environ["ALEPH_API_UNIX_SOCKET"])

    conn = UnixConnection("localhost")
    conn.request(method, path, body=body or None)
    resp = conn.getresponse()
    return resp.status, resp.read().decode(errors="replace")


@app.get("/cache/set/{key}/{value}")
async def cache_set(key: str, value: str):
    loop = asyncio.get_running_loop()
    status, _ = await loop.run_in_executor(None, _guest_api, "PUT", f"/cache/{key}", value.encode())
    return {"stored": status == 200}


@app.get("/cache/get/{key}")
async def cache_get(key: str):
    loop = asyncio.get_running_loop()
    status, body = await loop.run_in_executor(None, _guest_api, "GET", f"/cache/{key}")
    return {"found": status == 200, "value": body if status == 200 else None}
