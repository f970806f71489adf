"""The thin Click layer over the hpcexp library (``hpcexp.cli.main:main``)."""
