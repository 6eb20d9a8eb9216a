"""Diagnostic program of the supervisor (our own code).

/status/check/fastapi runs aleph-vm's checks against it (orchestrator/
status.py upstream): every route those checks call is here, answering in
the shapes they expect. The Aleph API and the cache are reached only
through the node's guest API, over the unix socket named by
ALEPH_API_UNIX_SOCKET, with the requests the aleph SDK makes (the SDK
itself is not in the runtime). Other routes exercise what the
supervisor's own tests need: timeouts, streaming, request bodies, memory
limits and isolation.

The network checks reach public hosts by default, as aleph-vm's do. The
DIAGNOSTIC_DNS_HOSTNAME, DIAGNOSTIC_IPV4_URLS, DIAGNOSTIC_IPV6_URLS and
DIAGNOSTIC_INTERNET_URLS variables (comma-separated URLs) replace them,
for a node on a private network or a test.
"""
import asyncio
import hashlib
import json
import os
import socket
import sys
from pathlib import Path

import aiohttp
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

app = FastAPI()

state = {"lifespan": False, "memory": []}

# The messages aleph-vm's example asks the network for.
MESSAGES_HASH = "f246f873c3e0f637a15c566e7a465d2ecbb83eaa024d54ccb8fb566b549a929e"
PROGRAM_MESSAGE_HASH = "3fc0aa9569da840c43e7bd2033c3c580abb46b007527d6d20f2d4e98e867f7af"

STATE_FILE = Path("/var/lib/example/storage.json")
_state_lock = asyncio.Lock()


def _setting(name, default):
    value = os.environ.get(name, "").strip()
    return value if value else default


def _urls(name, default):
    return [u.strip() for u in _setting(name, ",".join(default)).split(",") if u.strip()]


@app.on_event("startup")
async def startup():
    state["lifespan"] = True
    print("example_fastapi: startup event ran", flush=True)


@app.on_event("shutdown")
async def shutdown():
    print("example_fastapi: shutdown event ran", flush=True)


@app.get("/")
async def index():
    return {
        "Example": "example_fastapi",
        "endpoints": [
            "/lifespan", "/environ", "/state/increment", "/wait-for/{delay}",
            "/cache/get/{key}", "/cache/set/{key}/{value}", "/cache/remove/{key}", "/cache/keys",
            "/dns", "/ip/4", "/ip/6", "/internet",
            "/raise", "/crash",
            "/messages", "/get_a_message",
            "/platform/os", "/platform/python",
        ],
    }


@app.get("/environ")
async def environ():
    return dict(os.environ)


@app.get("/lifespan")
async def lifespan():
    return {"Lifespan": state["lifespan"]}


class CustomError(Exception):
    pass


@app.get("/raise")
async def raise_error():
    # The supervisor's agent answers 500 with the traceback.
    raise CustomError("This exception was raised on purpose by /raise")


@app.get("/crash")
async def crash():
    print("example_fastapi: crashing on purpose", flush=True)
    os._exit(1)


@app.get("/wait-for/{delay}")
async def wait_for(delay: float):
    await asyncio.sleep(delay)
    return {"waited": delay}


@app.get("/platform/os")
def platform_os():
    return PlainTextResponse(content=Path("/etc/os-release").read_text())


@app.get("/platform/python")
def platform_python():
    return PlainTextResponse(content=sys.version)


@app.get("/state/increment")
async def increment():
    """A counter in the persistent volume: 0 the first time, then +1."""
    async with _state_lock:
        try:
            data = json.loads(STATE_FILE.read_text())
            data["counter"] += 1
        except FileNotFoundError:
            data = {"counter": 0}
        # Write, rename, then sync the directory: a crash leaves the old
        # counter or the new one, never half a file, and a counter that
        # was answered is on disk (a VM killed with its host process
        # loses what the guest kernel had not written back).
        tmp = STATE_FILE.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, STATE_FILE)
        dir_fd = os.open(STATE_FILE.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return data


# --- Network ----------------------------------------------------------------


def _failure(host, reason, error_type=None):
    return {"host": host, "reason": reason, "error_type": error_type, "result": None}


async def _check_url(url, family=socket.AF_INET, accept_404=False, timeout_seconds=5):
    timeout = aiohttp.ClientTimeout(total=timeout_seconds)
    connector = aiohttp.TCPConnector(family=family)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        try:
            async with session.get(url) as resp:
                if 200 <= resp.status < 300 or (resp.status == 404 and accept_404):
                    return {"result": True, "headers": dict(resp.headers), "url": url}
                return {"result": False, "url": url, "reason": f"HTTP Status {resp.status}"}
        except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as e:
            return {"result": False, "url": url, "reason": type(e).__name__}
        except Exception as e:
            return {"result": False, "url": url, "reason": f"Unexpected error: {type(e).__name__}"}


async def _first_success(urls, **kwargs):
    """Tries every URL at once; the first that answers wins."""
    tasks = {asyncio.ensure_future(_check_url(u, **kwargs)): u for u in urls}
    failures = []
    pending = set(tasks)
    while pending:
        done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            result = task.result()
            if result.get("result"):
                for p in pending:
                    p.cancel()
                return result
            failures.append(_failure(tasks[task], result.get("reason", "Unknown failure")))
    return JSONResponse(status_code=503, content={"result": False, "failures": failures})


@app.get("/dns")
async def resolve_dns_hostname():
    hostname = _setting("DIAGNOSTIC_DNS_HOSTNAME", "example.org")
    loop = asyncio.get_running_loop()
    try:
        info = await loop.getaddrinfo(hostname, 80, proto=socket.IPPROTO_TCP)
    except OSError as e:
        return JSONResponse(status_code=503, content={"ipv4": None, "ipv6": None, "error": f"{type(e).__name__}: {e}"})
    ipv4 = next((i[4][0] for i in info if i[0] == socket.AF_INET), None)
    ipv6 = next((i[4][0] for i in info if i[0] == socket.AF_INET6), None)
    return JSONResponse(status_code=200 if len(info) > 1 else 503, content={"ipv4": ipv4, "ipv6": ipv6})


@app.get("/ip/4")
async def connect_ipv4():
    urls = _urls("DIAGNOSTIC_IPV4_URLS", ["https://208.67.222.222", "https://9.9.9.9", "https://94.140.14.14"])
    return await _first_success(urls, family=socket.AF_INET, accept_404=True)


@app.get("/ip/6")
async def connect_ipv6():
    urls = _urls("DIAGNOSTIC_IPV6_URLS", ["https://[2620:0:ccc::2]", "https://[2620:fe::fe]", "https://[2606:4700:4700::1111]"])
    return await _first_success(urls, family=socket.AF_INET6, accept_404=True)


@app.get("/internet")
async def read_internet():
    urls = _urls("DIAGNOSTIC_INTERNET_URLS", ["https://aleph.im/", "https://ethereum.org/en/", "https://ipfs.io/"])
    return await _first_success(urls)


# --- Guest API: the Aleph API and the cache ---------------------------------


def _guest_session():
    """A session to the guest API, as the SDK opens it: http://localhost
    over the unix socket."""
    connector = aiohttp.UnixConnector(path=os.environ["ALEPH_API_UNIX_SOCKET"])
    return aiohttp.ClientSession(
        base_url="http://localhost", connector=connector, timeout=aiohttp.ClientTimeout(total=30)
    )


@app.get("/messages")
async def read_aleph_messages():
    """The SDK's get_messages(MessageFilter(hashes=[...]))."""
    params = {"hashes": MESSAGES_HASH, "pagination": "200", "page": "1"}
    try:
        async with _guest_session() as session:
            async with session.get("/api/v0/messages.json", params=params) as resp:
                resp.raise_for_status()
                data = await resp.json()
    except Exception as e:
        return JSONResponse(status_code=503, content={"result": False, "failures": [_failure("guest API", str(e), type(e).__name__)]})
    if not data.get("messages"):
        return JSONResponse(status_code=503, content={"result": False, "failures": [_failure("guest API", "no messages")]})
    return {"Messages": data}


@app.get("/get_a_message")
async def get_a_message():
    """The SDK's get_message(item_hash, message_type=ProgramMessage)."""
    try:
        async with _guest_session() as session:
            async with session.get(f"/api/v0/messages/{PROGRAM_MESSAGE_HASH}") as resp:
                resp.raise_for_status()
                raw = await resp.json()
        message = raw.get("message", raw)
        if raw.get("status") == "forgotten":
            raise ValueError("the message was forgotten")
        if message.get("type") != "PROGRAM":
            raise TypeError(f"expected a PROGRAM message, got {message.get('type')}")
    except Exception as e:
        return JSONResponse(status_code=503, content={"result": False, "failures": [_failure("guest API", str(e), type(e).__name__)]})
    return message


@app.get("/cache/get/{key}")
async def cache_get(key: str):
    async with _guest_session() as session:
        async with session.get(f"/cache/{key}") as resp:
            if resp.status == 404:
                return None
            resp.raise_for_status()
            return (await resp.read()).decode(errors="replace")


@app.get("/cache/set/{key}/{value}")
async def cache_set(key: str, value: str):
    async with _guest_session() as session:
        async with session.put(f"/cache/{key}", data=value.encode()) as resp:
            resp.raise_for_status()
            return await resp.json()


@app.get("/cache/remove/{key}")
async def cache_remove(key: str):
    async with _guest_session() as session:
        async with session.delete(f"/cache/{key}") as resp:
            resp.raise_for_status()
            return await resp.json() == 1


@app.get("/cache/keys")
async def cache_keys(pattern: str = "*"):
    async with _guest_session() as session:
        async with session.get("/cache/", params={"pattern": pattern}) as resp:
            resp.raise_for_status()
            return await resp.json()


# --- For the supervisor's own tests ----------------------------------------


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
