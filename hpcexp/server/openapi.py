"""The OpenAPI 3.1 document of the dashboard's JSON API, written out by hand.

Starlette has no schema layer; the shapes are those of the CLI's ``--json`` output, so
they are described here once, loosely where a record keeps unknown keys.
"""

from __future__ import annotations

from typing import Any

_ERR = {"description": "error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
_AUTH_ERRORS = {"401": {"description": "no access token"}, "403": {"description": "wrong token, CSRF or Host"}}


def _ok(schema: dict[str, Any], what: str = "OK") -> dict[str, Any]:
    return {"description": what, "content": {"application/json": {"schema": schema}}}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _arr(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "array", "items": schema}


REF_PARAM = {"name": "ref", "in": "path", "required": True,
             "description": "run id, unique prefix, experiment name (its latest run), @last or sweep id",
             "schema": {"type": "string", "minLength": 1}}


def _action(summary: str, body: str, response: dict[str, Any], code: str = "202") -> dict[str, Any]:
    return {"post": {"summary": summary,
                     "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(body)}}},
                     "responses": {code: response, "400": _ERR, "404": _ERR, **_AUTH_ERRORS}}}


def document(version: str) -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {"title": "hpcexp dashboard API", "version": version,
                 "description": "The shapes of the CLI's --json output. Authenticate with "
                                "`Authorization: Bearer TOKEN` (the token `hpcexp serve` printed)."},
        "components": {
            "securitySchemes": {"token": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {"type": "object", "required": ["error"],
                          "properties": {"error": {"type": "string"}, "hint": {"type": ["string", "null"]}}},
                "Experiment": {"type": "object", "description": "an element of `hpcexp list --json`",
                               "required": ["name", "path", "dockerfiles", "arches", "recipe", "image"],
                               "properties": {
                                   "name": {"type": "string"}, "path": {"type": "string"},
                                   "declared": {"type": "boolean"}, "ref": {"type": ["string", "null"]},
                                   "code": {"type": ["string", "null"]},
                                   "dockerfiles": {"type": "object", "additionalProperties": {"type": "string"}},
                                   "arches": _arr({"type": "string"}),
                                   "recipe": {"type": "object", "additionalProperties": {"type": "string"}},
                                   "image": {"type": "object", "additionalProperties": {"type": "string"}}}},
                "Run": {"type": "object", "description": "a run record, as in `hpcexp status --json`",
                        "required": ["run_id", "experiment", "state", "dir"], "additionalProperties": True,
                        "properties": {
                            "run_id": {"type": "string"}, "experiment": {"type": "string"},
                            "state": {"type": "string"}, "executor": {"type": "string"},
                            "created_at": {"type": "string"}, "started_at": {"type": ["string", "null"]},
                            "ended_at": {"type": ["string", "null"]}, "exit_code": {"type": ["integer", "null"]},
                            "params": {"type": "object", "additionalProperties": {"type": "string"}},
                            "sweep_id": {"type": ["string", "null"]}, "task_index": {"type": ["integer", "null"]},
                            "attempt": {"type": "integer"}, "dir": {"type": "string"}}},
                "Image": {"type": "object", "description": "an element of `hpcexp images --json`",
                          "additionalProperties": True,
                          "properties": {"experiment": {"type": "string"}, "arch": {"type": "string"},
                                         "path": {"type": "string"}, "size": {"type": "integer"},
                                         "state": {"type": "string"}}},
                "Job": {"type": "object", "required": ["id", "kind", "state"],
                        "properties": {"id": {"type": "string"}, "kind": {"enum": ["build", "run", "submit"]},
                                       "experiment": {"type": "string"},
                                       "state": {"enum": ["running", "succeeded", "failed"]},
                                       "lines": _arr({"type": "string"}), "error": {"type": ["string", "null"]},
                                       "hint": {"type": ["string", "null"]}, "result": {},
                                       "run_ids": _arr({"type": "string"})}},
                "BuildRequest": {"type": "object", "required": ["experiment"],
                                 "properties": {"experiment": {"type": "string"},
                                                "arch": {"enum": ["amd64", "arm64"]}, "force": {"type": "boolean"}}},
                "RunRequest": {"type": "object", "required": ["experiment"],
                               "properties": {"experiment": {"type": "string"}, "arch": {"enum": ["amd64", "arm64"]},
                                              "params": {"oneOf": [_arr({"type": "string"}),
                                                                   {"type": "object",
                                                                    "additionalProperties": {"type": "string"}}]}}},
                "SubmitRequest": {"type": "object", "required": ["experiment"],
                                  "properties": {"experiment": {"type": "string"},
                                                 "arch": {"enum": ["amd64", "arm64"]},
                                                 "params": _arr({"type": "string"}),
                                                 "sweeps": _arr({"type": "string", "description": "KEY=V1,V2"})}},
                "StopRequest": {"type": "object", "required": ["refs"],
                                "properties": {"refs": _arr({"type": "string"})}},
            },
        },
        "security": [{"token": []}],
        "paths": {
            "/api/experiments": {"get": {"summary": "experiments (hpcexp list --json)",
                                         "responses": {"200": _ok(_arr(_ref("Experiment"))), **_AUTH_ERRORS}}},
            "/api/runs": {"get": {"summary": "runs (hpcexp status --json), filtered",
                                  "parameters": [{"name": n, "in": "query", "required": False,
                                                  "schema": {"type": "string"}}
                                                 for n in ("experiment", "state", "sweep")],
                                  "responses": {"200": _ok(_arr(_ref("Run"))), "400": _ERR, "404": _ERR,
                                                **_AUTH_ERRORS}}},
            "/api/runs/{ref}": {"get": {"summary": "the runs REF names (hpcexp status REF --json)",
                                        "parameters": [REF_PARAM],
                                        "responses": {"200": _ok(_arr(_ref("Run"))), "400": _ERR, "404": _ERR,
                                                      **_AUTH_ERRORS}}},
            "/api/runs/{ref}/archive.{fmt}": {"get": {
                "summary": "streamed archive (hpcexp archive REF), with MANIFEST.json",
                "parameters": [REF_PARAM, {"name": "fmt", "in": "path", "required": True,
                                           "schema": {"enum": ["zip", "tar.gz"]}}],
                "responses": {"200": {"description": "the archive",
                                      "content": {"application/zip": {}, "application/gzip": {}}},
                              "400": _ERR, "404": _ERR, **_AUTH_ERRORS}}},
            "/api/runs/{ref}/log/{stream}/events": {"get": {
                "summary": "follow a log (hpcexp logs -f) as Server-Sent Events: `attempt`, data (JSON text), `end`",
                "parameters": [REF_PARAM, {"name": "stream", "in": "path", "required": True,
                                           "schema": {"enum": ["stdout", "stderr"]}},
                               {"name": "tail", "in": "query", "required": False,
                                "schema": {"type": "integer", "minimum": 0}}],
                "responses": {"200": {"description": "event stream", "content": {"text/event-stream": {}}},
                              "400": _ERR, "404": _ERR, **_AUTH_ERRORS}}},
            "/api/images": {"get": {"summary": "images (hpcexp images --json)",
                                    "responses": {"200": _ok(_arr(_ref("Image"))), **_AUTH_ERRORS}}},
            "/api/jobs/{job}": {"get": {"summary": "a background action's progress",
                                        "parameters": [{"name": "job", "in": "path", "required": True,
                                                        "schema": {"type": "string"}}],
                                        "responses": {"200": _ok(_ref("Job")), "404": _ERR, **_AUTH_ERRORS}}},
            "/api/build": _action("build an image (hpcexp build NAME)", "BuildRequest", _ok(_ref("Job"), "started")),
            "/api/run": _action("start a detached local run (hpcexp run NAME --detach)", "RunRequest",
                                _ok(_ref("Job"), "started")),
            "/api/submit": _action("submit to Slurm, a sweep as one job array (hpcexp submit)", "SubmitRequest",
                                   _ok(_ref("Job"), "started")),
            "/api/stop": _action("stop runs (hpcexp stop REF... --json)", "StopRequest",
                                 _ok(_arr(_ref("Run")), "the final records"), code="200"),
        },
    }
