"""A single-file program published with the `plain` encoding."""
from fastapi import FastAPI

app = FastAPI()


@app.get("/")
async def index():
    return {"encoding": "plain"}
