# Tracking server for the MLflow export tests (sourced by scripts/provision-test-env).
#
# The tests start their own `mlflow server` on 127.0.0.1 (SQLite, and once PostgreSQL),
# so nothing is started here. Installed:
#  - the full `mlflow` server package in its own venv (it pins many libraries; keeping it
#    out of the test venv means hpcexp's tests import only the light client, mlflow-skinny,
#    exactly as users get it with `pip install hpcexp[mlflow]`), plus psycopg2-binary for
#    the PostgreSQL backend store;
#  - Debian's postgresql: the test runs initdb/pg_ctl from /usr/lib/postgresql/*/bin as
#    the ordinary user, with its own data folder and socket folder, and stops it again.
# Idempotent: a venv whose stamp matches the wanted list is left alone.

MLFLOW_VENV=/opt/hpcexp-test/mlflow
# SQLAlchemy 2.1 dropped a pool class MLflow 2.x imports: keep 2.0
MLFLOW_REQS="mlflow>=2.9,<3 sqlalchemy>=2.0,<2.1 psycopg2-binary>=2.9"

need_pkgs postgresql python3-venv

if [ "$(cat "$MLFLOW_VENV/.hpcexp-reqs" 2>/dev/null)" != "$MLFLOW_REQS" ] || [ ! -x "$MLFLOW_VENV/bin/mlflow" ]; then
    log "installing the MLflow server into $MLFLOW_VENV"
    mkdir -p "$(dirname "$MLFLOW_VENV")"
    [ -x "$MLFLOW_VENV/bin/python3" ] || /usr/bin/python3 -m venv "$MLFLOW_VENV"
    # shellcheck disable=SC2086 # the list is split on purpose
    "$MLFLOW_VENV/bin/pip" install -q --disable-pip-version-check $MLFLOW_REQS \
        || die "pip could not install $MLFLOW_REQS into $MLFLOW_VENV"
    printf "%s" "$MLFLOW_REQS" > "$MLFLOW_VENV/.hpcexp-reqs"
fi
# readable and executable by the test user, writable by root only
chmod -R go+rX,go-w "$MLFLOW_VENV"
"$MLFLOW_VENV/bin/mlflow" --version >/dev/null 2>&1 || die "$MLFLOW_VENV/bin/mlflow does not run"
log "mlflow server: $("$MLFLOW_VENV/bin/mlflow" --version 2>/dev/null)"
