"""A program whose import raises: its client must read the traceback."""
from fastapi import FastAPI

import module_that_is_not_installed  # noqa: F401

app = FastAPI()
