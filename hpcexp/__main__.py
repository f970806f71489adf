"""``python -m hpcexp`` is the same as the ``hpcexp`` command."""

from hpcexp.cli.main import entry

if __name__ == "__main__":  # pragma: no cover - exercised through subprocess tests
    entry()
