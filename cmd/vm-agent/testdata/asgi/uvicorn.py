# Hides any uvicorn of the machine running the tests: the launcher must use
# its standard-library server.
raise ImportError("no uvicorn here")
