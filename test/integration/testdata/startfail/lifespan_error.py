"""A program whose lifespan startup raises: its client must read why."""
from fastapi import FastAPI

app = FastAPI()


@app.on_event("startup")
async def startup():
    raise RuntimeError("startup refused on purpose")


@app.get("/")
async def index():
    return {"served": True}
