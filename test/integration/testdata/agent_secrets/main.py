"""Reports what a program could share with others restored from the same
snapshot: every value drawn from a random generator that lives in the
interpreter's memory, and what the sandbox says about itself."""
import os
import socket
import sys

# What the interpreter had imported before this program (at the checkpoint,
# for a restored one).
PRELOADED = sorted(m for m in ("random", "multiprocessing.process", "tempfile", "ssl", "aiohttp.http_websocket")
                   if m in sys.modules)

from fastapi import FastAPI  # noqa: E402

app = FastAPI()


def attempt(fn):
    try:
        return fn()
    except Exception as e:  # reported, not fatal: the test says which failed
        return "error: %s: %s" % (type(e).__name__, e)


def authkey():
    import multiprocessing

    return bytes(multiprocessing.current_process().authkey).hex()


def aiohttp_mask():
    """The masks of a websocket client's frames, through aiohttp's own
    writer (its default generator), as a client of the program would send."""
    from aiohttp.http_websocket import WebSocketWriter

    class Transport:
        def __init__(self):
            self.data = b""

        def is_closing(self):
            return False

        def write(self, data):
            self.data += data

    async def frames():
        t = Transport()
        w = WebSocketWriter(None, t, use_mask=True)
        await w.send("x")
        await w.send("y")
        # Each frame: 2 header bytes, 4 mask bytes, 1 masked byte.
        return t.data[2:6].hex() + t.data[9:13].hex()

    import asyncio

    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(frames())
    finally:
        loop.close()


def tempfile_names():
    import tempfile

    names = tempfile._get_candidate_names()
    return ",".join(next(names) for _ in range(3))


def read(path):
    with open(path) as f:
        return f.read().strip()


@app.get("/secrets")
def secrets():
    import random
    import ssl

    return {
        # Drawn from state in the interpreter's memory: must differ.
        "random": attempt(lambda: random.random()),
        "authkey": attempt(authkey),
        "aiohttp_mask": attempt(aiohttp_mask),
        "tempfile": attempt(tempfile_names),
        "ssl_rand": attempt(lambda: ssl.RAND_bytes(16).hex()),
        "urandom": attempt(lambda: os.urandom(16).hex()),
        # What is known to be shared, or decided by the sandbox: reported.
        "hash": attempt(lambda: hash("aleph")),
        "hostname": attempt(socket.gethostname),
        "boot_id": attempt(lambda: read("/proc/sys/kernel/random/boot_id")),
        "machine_id": attempt(lambda: read("/etc/machine-id")),
        "tmp": attempt(lambda: sorted(os.listdir("/tmp"))),
        "pid": os.getpid(),
        "env": sorted(os.environ),
        "preloaded": PRELOADED,
    }
