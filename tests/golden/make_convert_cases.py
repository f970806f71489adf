import io
import json
import tarfile
import textwrap
from pathlib import Path

G = Path(__file__).resolve().parent / "convert"
cases = {}
def case(name, dockerfile, files=None, args=None):
    cases[name] = (textwrap.dedent(dockerfile).lstrip("\n"), files or {}, args)

case("p01a_from_platform", """
FROM --platform=linux/amd64 python:3.11-slim AS base
RUN python3 --version
""")
case("p01a_from_platform_other_arch", """
FROM --platform=$BUILDPLATFORM golang:1.22 AS build
FROM --platform=linux/arm64 debian:bookworm-slim
COPY --from=build /usr/local/go/bin/go /usr/local/bin/go
""")
case("p01b_nested_arg", """
ARG CUDA=12.1.1
ARG UBUNTU=22.04
ARG BASE=nvidia/cuda:${CUDA}-cudnn8-runtime-ubuntu${UBUNTU}
FROM ${BASE}
RUN nvidia-smi || true
""")
case("p01c_quoted_arg", """
ARG CUDA="9.0"
ARG CUDNN='7'
FROM nvidia/cuda:${CUDA}-cudnn${CUDNN}-devel-ubuntu16.04
""")
case("p01d_default_forms", """
ARG TAG
ARG FLAVOR=slim
FROM python:${PYVER:-3.10}${FLAVOR:+-$FLAVOR}${TAG:+-unused}
""")
case("p01d_unbraced_prefix", """
ARG CUDA=11
ARG CUDA_VERSION=11.8.0
FROM nvidia/cuda:$CUDA_VERSION-base-ubuntu22.04
ENV V=$CUDA.x
""")
case("p01e_lowercase_from", """
from debian:bookworm
run echo hi
""")
case("p01f_scratch", """
FROM busybox:latest AS tools
FROM scratch
COPY --from=tools /bin/busybox /busybox
ENTRYPOINT ["/busybox"]
""")
case("p02a_unnamed_stages", """
FROM python:3.11 AS builder
RUN pip wheel -w /wheels numpy
FROM python:3.11-slim
COPY --from=builder /wheels /wheels
RUN pip install /wheels/*.whl
""")
case("p02a_all_unnamed", """
FROM alpine:3.19
RUN echo one > /one
FROM alpine:3.19
COPY --from=0 /one /one
""")
case("p02b_from_stage", """
FROM rust:1.75 AS chef
RUN cargo install cargo-chef
WORKDIR /app
FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json
FROM chef AS builder
COPY --from=planner /app/recipe.json recipe.json
RUN cargo chef cook --release --recipe-path recipe.json
""", files={"Cargo.toml": "[package]\nname='x'\n"})
case("p02c_global_arg_every_stage", """
ARG PY=3.11
FROM python:${PY} AS a
ARG PY
ENV PYV=${PY}
RUN echo "$PY" > /py.txt
FROM python:${PY}-slim
ARG PY
ENV PYV=${PY}
ENV NOT_REDECLARED=${UNDECLARED:-none}
COPY --from=a /py.txt /py.txt
""")
case("p03_copy_from_index_and_image", """
FROM golang:1.22
RUN go build -o /out/app ./...
FROM debian:bookworm-slim
COPY --from=0 /out/app /usr/local/bin/app
COPY --from=busybox:latest /bin/busybox /bin/
COPY --from=registry.example.invalid/astral-sh/uv:0.4 /uv /bin/uv
""")
case("p04_copy_flags", """
FROM python:3.11-slim AS builder
RUN mkdir /build && echo x > /build/x
FROM python:3.11-slim
COPY --chown=1000:1000 a.txt /opt/a.txt
COPY --chmod=755 run.sh /usr/local/bin/run
COPY --link --chown=app:app b.txt /opt/
COPY --from=builder --chown=1000 /build /opt/build
ADD --chown=1000:1000 a.txt /srv/
""", files={"a.txt": "a\n", "b.txt": "b\n", "run.sh": "#!/bin/sh\necho run\n"})
case("p05a_relative_dest", """
FROM python:3.11-slim
WORKDIR /app
COPY . .
COPY a.txt rel/
COPY a.txt renamed.txt
""", files={"a.txt": "a\n"})
case("p05b_var_in_paths", """
FROM python:3.11-slim
ARG APP=/srv/app
ENV SRC=src
COPY ${SRC}/ $APP/src/
WORKDIR $APP
COPY $SRC/main.py ./
""", files={"src/main.py": "print(1)\n", "src/util.py": "x=1\n"})
case("p05c_dir_contents", """
FROM alpine:3.19
COPY scripts/bin/ /opt/s/bin/
COPY scripts /opt/s
COPY conf/*.yaml /etc/app/
""", files={"scripts/bin/run": "run\n", "scripts/readme": "r\n", "conf/a.yaml": "a: 1\n",
            "conf/b.yaml": "b: 2\n", "conf/c.txt": "no\n"})
case("p06_copy_after_run", """
FROM python:3.11-slim
RUN git clone https://example.invalid/repo.git /app
COPY cfg.py /app/
RUN useradd -m alice && rm -rf /home/alice/.cache
COPY b.txt /home/alice/.cache/b.txt
""", files={"cfg.py": "X=1\n", "b.txt": "b\n"})
case("p07_json_copy", """
FROM alpine:3.19
COPY ["a b.txt", "/opt/"]
ADD ["c.txt", "d.txt", "/data/"]
""", files={"a b.txt": "spaces\n", "c.txt": "c\n", "d.txt": "d\n"})
case("p08a_add_url", """
FROM python:3.11-slim
ADD https://example.invalid/files/model.bin /models/
ADD https://example.invalid/x.tar.gz /opt/x.tar.gz
ADD https://example.invalid/org/repo.git#v1.0 /src/repo
""")
case("p08b_add_archive", """
FROM alpine:3.19
ADD data.tar.gz /opt/data
ADD plain.tar /opt/plain/
ADD notes.txt /opt/
""", files={"notes.txt": "n\n", "data.tar.gz": "@tar.gz", "plain.tar": "@tar"})
case("p09_env_exported", """
FROM debian:bookworm
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1
ENV VERSION=4.5.3
RUN sh -c 'echo ${VERSION}' && apt-get update
""")
case("p10_legacy_env", """
FROM debian:bookworm
ENV GREETING hello big world
ENV A=1 B="two words" C='x $y'
ENV ESC=a\\ b
""")
case("p10b_multiline_legacy_env", """
FROM debian:bookworm
ENV PATH /opt/conda/bin:\\
/usr/local/bin:$PATH
ENV LANG=C.UTF-8 \\
    LC_ALL=C.UTF-8
""")
case("p11_env_refs_arg", """
FROM python:3.11-slim
ARG APP=/opt/app
ENV APP_HOME=$APP
ENV DATA=$APP_HOME/data LOGS=${APP_HOME}/logs
ENV LD_LIBRARY_PATH=/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:${LD_LIBRARY_PATH}}
""")
case("p12a_arg_build_args", """
ARG BASE_TAG
FROM python:${BASE_TAG}
ARG TORCH_VERSION=2.0.0
ARG NO_DEFAULT
RUN pip install torch==${TORCH_VERSION} && echo "[$NO_DEFAULT]"
""", args={"BASE_TAG": "3.12-slim", "TORCH_VERSION": "2.3.1"})
case("p12b_arg_comment", """
FROM debian:bookworm
ARG X=1  # comment here
RUN echo $X
""")
case("p12c_arg_redeclared_and_env_wins", """
ARG VARIANT=cpu
FROM debian:bookworm
ARG VARIANT
ARG SHARED=from-arg
ENV SHARED=from-env
ARG SHARED=again
RUN echo $VARIANT $SHARED
""")
case("p13_user", """
FROM python:3.11-slim
RUN useradd -m alice
USER alice
RUN pip install --user numpy
USER 1000:1000
USER root
RUN apt-get update
""")
case("p14_workdir", """
FROM python:3.11-slim
ENV BASE=/work
WORKDIR $BASE
WORKDIR src
WORKDIR ../data
RUN pwd
CMD ["python", "train.py"]
""")
case("p15_cmd_only", """
FROM python:3.11-slim
CMD ["python","main.py"]
""")
case("p16_entrypoint_cmd", """
FROM python:3.11-slim
ENTRYPOINT ["python", "-m", "train"]
CMD ["--epochs", "10"]
""")
case("p16_cmd_then_entrypoint_same_stage", """
FROM python:3.11-slim
CMD ["kept-cmd"]
ENTRYPOINT ["/bin/sh","-c","echo $HOME && exec python \\"$@\\"","--"]
""")
case("p16_entrypoint_resets_inherited_cmd", """
FROM python:3.11-slim AS base
CMD ["python"]
FROM base
ENTRYPOINT ["tini", "--"]
""")
case("p17_shell_form_entrypoint", """
FROM python:3.11-slim
ENTRYPOINT python -m train
CMD ["--epochs", "10"]
""")
case("p17_shell_form_cmd", """
FROM python:3.11-slim
CMD python a.py && echo done
""")
case("p18_no_cmd", """
FROM jupyter/base-notebook:latest
RUN pip install pandas
""")
case("p19_shell_pipefail", """
FROM ubuntu:22.04
RUN echo before-shell
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN curl -fsSL https://example.invalid/x | bash -s -- --flag 'quoted arg'
CMD echo "via bash"
""")
case("p20_run_heredoc", """
# syntax=docker/dockerfile:1.4
FROM debian:bookworm
RUN <<EOF
apt-get update
apt-get install -y python3
echo done > /heredoc.txt
EOF
RUN cat > /etc/app.conf <<CONF
key = $HOME
CONF
""")
case("p20b_copy_heredoc", """
FROM debian:bookworm
ARG RELEASE=2.1
ENV APP=trainer
COPY <<EOT /etc/motd
Welcome to $APP ${RELEASE}, \\$literal, ${MISSING:-fallback} and $USER
EOT
COPY <<-'EOT' /opt/run.sh
	#!/bin/sh
	echo tabbed
	EOT
""")
case("p20c_heredoc_shebang", """
FROM python:3.11-slim
RUN <<EOF
#!/usr/bin/env python3
import pathlib
pathlib.Path("/py.txt").write_text("python ran")
EOF
""")
case("p21_run_mounts", """
FROM python:3.11-slim
RUN --mount=type=cache,target=/root/.cache/pip pip install numpy
RUN --mount=type=bind,source=requirements.txt,target=/tmp/requirements.txt pip install -r /tmp/requirements.txt
RUN --mount=type=secret,id=hf_token HF_TOKEN=$(cat /run/secrets/hf_token) python -c 'print(1)'
RUN --mount=type=tmpfs,target=/scratch --network=none echo offline
""", files={"requirements.txt": "numpy\n"})
case("p22_comments_in_continuation", """
FROM debian:bookworm
RUN apt-get update && \\
    # the compiler
    apt-get install -y gcc \\
# unindented comment
    make && \\

    echo y
""")
case("p23_exec_run", """
FROM debian:bookworm
RUN ["/bin/bash", "-c", "echo hi && echo 'quoted words'"]
RUN ["echo", "$NOT_EXPANDED"]
""")
case("p24_healthcheck", """
FROM nginx:1.25
HEALTHCHECK --interval=30s --timeout=3s CMD curl -f http://localhost/ || exit 1
FROM nginx:1.25 AS second
HEALTHCHECK NONE
""")
case("p25_onbuild", """
FROM python:3.11-slim
ONBUILD COPY . /app
ONBUILD RUN pip install -r /app/requirements.txt
RUN echo ok
""")
case("p26_labels", """
FROM python:3.11-slim
LABEL maintainer="Jane Doe <jane@x.org>" version="1.0" org.opencontainers.image.source=https://example.invalid/repo
LABEL k=v
LABEL "my key"="a value"
MAINTAINER Old Style <old@x.org>
""")
case("p27_expose_volume_stopsignal", """
FROM python:3.11-slim
EXPOSE 8888/tcp 6006
VOLUME ["/data", "/results"]
VOLUME /cache
STOPSIGNAL SIGINT
""")
case("p28_escape_directive", """
# escape=`
FROM mcr.example.invalid/windows/servercore:ltsc2022
RUN echo one `
    && echo two
COPY a.txt C:/app/
""", files={"a.txt": "a\n"})
case("p29_lowercase", """
from debian:bookworm
env A=1
arg B=2
workdir /x
run echo $A $B
copy a.txt .
cmd ["cat", "a.txt"]
""", files={"a.txt": "a\n"})
case("p30_keyword_in_continuation", """
FROM python:3.11-slim
RUN python -c "import sys; \\
from os import path; \\
print(path.sep)" && \\
run_tests=1 && \\
env | sort
""")
case("p31_dockerignore", """
FROM python:3.11-slim
COPY . /app
COPY data /data
""", files={".dockerignore": ".git\\n**/*.pyc\\ndata/*\\n!data/keep.txt\\ncheckpoints/\\n", "main.py": "x\n",
            "pkg/a.py": "a\n",
            "pkg/a.pyc": "bin\n", "data/big.bin": "big\n", "data/keep.txt": "keep\n", "checkpoints/c.pt": "pt\n",
            ".git/HEAD": "ref\n"})
case("exec_form_quoting", """
FROM python:3.11-slim
CMD ["python3","-c","print('cmd ran')", "a b", "$HOME", "`id`"]
""")
case("copy_multiple_sources", """
FROM alpine:3.19
WORKDIR /app
COPY a.txt b.txt ./
COPY src/ lib/
""", files={"a.txt": "a\n", "b.txt": "b\n", "src/x.py": "x\n"})
case("mixed_ml_stack", """
ARG PYTHON_VERSION=3.10
FROM python:${PYTHON_VERSION}-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 \\
    PYTHONUNBUFFERED=1
WORKDIR /workspace
COPY requirements.txt .
RUN --mount=type=cache,target=/root/.cache/pip \\
    pip install -r requirements.txt
COPY . .
ENTRYPOINT ["python", "train.py"]
CMD ["--config", "configs/default.yaml"]
""", files={"requirements.txt": "torch\n", "train.py": "print('t')\n", "configs/default.yaml": "lr: 1\n"})

for name, (df, files, args) in cases.items():
    d = G / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "Dockerfile").write_text(df)
    for rel, content in files.items():
        p = d / "context" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if content in ("@tar.gz", "@tar"):
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w:gz" if content == "@tar.gz" else "w") as tf:
                data = b"inside\n"
                ti = tarfile.TarInfo("inside.txt")
                ti.size = len(data)
                ti.mtime = 0
                tf.addfile(ti, io.BytesIO(data))
            raw = buf.getvalue()
            if content == "@tar.gz":
                raw = raw[:4] + b"\0\0\0\0" + raw[8:]  # deterministic gzip mtime
            p.write_bytes(raw)
        else:
            p.write_text(content.replace("\\n", "\n") if rel == ".dockerignore" else content)
    if args:
        (d / "build-args.json").write_text(json.dumps(args, indent=2, sort_keys=True) + "\n")
print(len(cases))
