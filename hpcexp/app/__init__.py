"""The application layer: one function per use case; the CLI and the web server both call these.

Each use case takes a typed request (a frozen dataclass) and returns a typed result,
raises :mod:`hpcexp.errors` types, never prints (progress goes through a callback),
never changes the working directory and keeps no state between calls, so a
long-running server can call it as well as the one-shot CLI. Modules are grouped by
noun: :mod:`.project` (init, list, doctor), :mod:`.convert`, :mod:`.build` (build,
images, clean), :mod:`.runs` (run, status, runs, logs, stop), :mod:`.submit` (submit,
resubmit, wait), :mod:`.archive` (archive, verify, extract), :mod:`.registry` (push,
pull), :mod:`.tracking` (the payload's tracking environment, exports); :mod:`.views`
says how runs, sizes and ages are shown, as plain data for both edges. Validation of a
request happens once, here.

This package face stays empty on purpose: ``hpcexp list --json`` imports only
:mod:`.project`, and importing this package must not pull in the others.
"""
