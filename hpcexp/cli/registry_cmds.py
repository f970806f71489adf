"""``hpcexp push`` and ``hpcexp pull``: images through an OCI registry, pinned by digest."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from hpcexp.cli.common import Ctx, arch_option, emit_json, info, json_option, pass_ctx, warn


def _progress(quiet: bool):  # type: ignore[no-untyped-def]
    def progress(kind: str, text: str) -> None:
        if kind == "warn":
            warn(text)
        elif not quiet and kind in ("start", "done", "wait"):
            info(text)
    return progress


@click.command("push")
@click.argument("names", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="Push every experiment with a current image.")
@arch_option
@click.option("--to", "to", metavar="oras://HOST/NAMESPACE", default=None,
              help="Registry and namespace (default: `registry:` in hpcexp.yaml).")
@click.option("--sign", is_flag=True, help="Sign the image with `apptainer sign` first (PGP keyring key, "
              "or --key).")
@click.option("--key", "key_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="PEM private key file to sign with (implies --sign).")
@click.option("-q", "--quiet", is_flag=True, help="No progress messages.")
@json_option
@pass_ctx
def push_cmd(ctx: Ctx, names: tuple[str, ...], all_: bool, arch: str | None, to: str | None, sign: bool,
             key_file: Path | None, quiet: bool, as_json: bool) -> None:
    """Push the current image of NAME and pin it by digest in hpcexp.lock (commit that file).

    \b
    The registry gets the tag ARCH-HASH for people; hpcexp.lock records the digest, and
    every pull is by that digest. Credentials come from `apptainer registry login` or
    APPTAINER_DOCKER_USERNAME / APPTAINER_DOCKER_PASSWORD, never from hpcexp.yaml.
    """
    from hpcexp.app import registry as app

    req = app.PushRequest(names=names, all=all_, arch=arch, to=to, sign=sign, key_file=key_file)
    result = app.push(ctx.project(), req, progress=_progress(quiet),
                      on_outcome=None if as_json else lambda outcome: click.echo(outcome.line))
    if as_json:
        emit_json(result.to_json())


@click.command("pull")
@click.argument("names", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="Pull every image hpcexp.lock pins for this architecture.")
@arch_option
@click.option("-q", "--quiet", is_flag=True, help="No progress messages.")
@json_option
@pass_ctx
def pull_cmd(ctx: Ctx, names: tuple[str, ...], all_: bool, arch: str | None, quiet: bool, as_json: bool) -> None:
    """Pull the image hpcexp.lock pins for NAME, by digest, into the images folder.

    The SIF's sha256 is checked against the lock and its signature against `verify:`
    before it appears under its final name. A pin made for other inputs than the current
    ones is refused (exit 2). `run` and `submit` pull on demand the same way.
    """
    from hpcexp.app import registry as app

    result = app.pull(ctx.project(), app.PullRequest(names=names, all=all_, arch=arch), progress=_progress(quiet),
                      on_outcome=None if as_json else lambda outcome: click.echo(outcome.line))
    if as_json:
        emit_json(result.to_json())
    sys.stdout.flush()
