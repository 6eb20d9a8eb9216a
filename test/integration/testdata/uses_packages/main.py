"""Imports a module from the dependency volume mounted at /opt/packages."""
import sys

import aleph_test_dependency
from fastapi import FastAPI

app = FastAPI()


@app.get("/")
async def index():
    return {
        "dependency": aleph_test_dependency.VALUE,
        "file": aleph_test_dependency.__file__,
        "sys_path": sys.path,
    }
