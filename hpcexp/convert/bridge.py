"""The one door to spython: a lazy import, its logger kept off the terminal, its failures as ConvertError.

spython does what it does right (splitting ``KEY=VALUE`` pairs of ENV/LABEL lines, writing
the ``%files``/``%labels``/``%environment`` sections), so the interpreter and the writer
both call it; every call goes through :func:`_spython`, which turns an exception or
``sys.exit`` into a ConvertError naming the Dockerfile line. Kept apart from both so that
neither owns the other's import, and so that tests can patch spython in one place.
"""

from __future__ import annotations

import io
from typing import Any, Callable

from hpcexp.errors import ConvertError

_SPY: dict[str, Any] = {}   # bot, parser, writer once imported (tests patch spython through it)


def _spython_mod() -> dict[str, Any]:
    """Import spython lazily (it is slow to import) and silence its logger for good."""
    if not _SPY:
        try:
            from spython.logger import bot
            from spython.main.parse.parsers.docker import DockerParser
            from spython.main.parse.writers import singularity as writer
        except Exception as exc:  # noqa: BLE001 - any import failure is an environment problem
            from hpcexp.errors import EnvironmentProblem

            raise EnvironmentProblem(f"cannot import spython: {exc}",
                                     hint="pip install 'spython>=0.3.14'") from None
        bot.level = -3                      # errors only, and only into our buffer (never the terminal)
        bot.colorize = False
        bot.errorStream = io.StringIO()
        bot.outputStream = io.StringIO()
        _SPY.update(bot=bot, parser=DockerParser(filename=None, load=False), writer=writer)
    return _SPY


def _spython(label: str, line: int, what: str, fn: Callable[..., Any], *args: Any) -> Any:
    """Call spython; an exception or sys.exit becomes a ConvertError naming the line."""
    bot = _SPY.get("bot")
    try:
        return fn(*args)
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - spython raises anything, or exits
        said = ""
        if bot is not None and isinstance(bot.errorStream, io.StringIO):
            last = bot.errorStream.getvalue().strip().splitlines()[-1:]
            said = last[0].removeprefix("ERROR").strip() if last else ""
            bot.errorStream.seek(0)
            bot.errorStream.truncate()
        detail = said or (f"exit {exc.code}" if isinstance(exc, SystemExit) else f"{type(exc).__name__}: {exc}")
        raise ConvertError(f"{label}:{line}: spython failed on {what}: {detail}") from None
