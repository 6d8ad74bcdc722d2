"""`drgs4d serve`: a job server that runs reconstructions on this machine's GPUs for remote clients (the Slicer
panel).  app.py: the HTTP API; jobs.py: jobs on disk and the worker processes; security.py: token, archives, paths.

FastAPI and uvicorn are imported only by app.py (``pip install drgs4d[serve]``).
"""
