"""``hpcexp serve``: a web dashboard for a project (experiments, runs, live logs, downloads, actions).

Layout of the package
    backend.py    every call into the rest of hpcexp (one place to rewire to the application layer)
    app.py        the Starlette application: pages, JSON API, downloads, actions
    security.py   access token, cookie, Host check, CSRF, security headers (an ASGI middleware)
    files.py      safe opening of files inside a run folder (no ``..``, no links out, no special files)
    bridge.py     a bounded hand-over from a worker thread to the async response (backpressure)
    jobs.py       background actions (build, run, submit) and their progress
    openapi.py    the OpenAPI document of the JSON API
    runner.py     binding (loopback port, unix socket, TLS) and running uvicorn

Starlette and uvicorn come with the optional extra ``hpcexp[web]``; nothing here is
imported by the CLI unless ``hpcexp serve`` runs.
"""
