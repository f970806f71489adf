"""Experiment tracking: hpcexp runs exported to a tracking server (MLflow).

Layout of the package
  ``export``  neutral and light (standard library only): the export state kept in each
              run folder (what was sent where, so nothing is sent twice), the metrics
              file convention, the artifact selection with its size cap, URI redaction,
              the server probe, and the cheap "is anything waiting?" check ``status`` uses.
  ``mlflow``  the MLflow exporter. Only this module imports the MLflow client (the
              optional extra ``hpcexp[mlflow]``, on ``mlflow-skinny``), so start-up and
              runs without tracking never import it.

Nothing here ever writes ``run.json``: an export failure cannot change a run's record.
"""

from __future__ import annotations
