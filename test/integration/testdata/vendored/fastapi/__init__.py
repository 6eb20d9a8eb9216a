"""A stand-in that shadows the runtime's FastAPI: the program must get it."""
MARK = "vendored"
