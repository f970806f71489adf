"""``hpcexp serve``: the web dashboard of this project (needs the extra ``hpcexp[web]``)."""

from __future__ import annotations

import click

from hpcexp.cli.common import pass_ctx


@click.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Anything but loopback needs --allow-remote and TLS.")
@click.option("--port", type=click.IntRange(0, 65535), default=0, help="Port (default: a free one).")
@click.option("--socket", "socket_path", metavar="PATH", default=None,
              help="Listen on a unix socket (mode 0600) instead of a port: for ssh forwarding or a site portal.")
@click.option("--read-only", is_flag=True, help="No actions (build, run, submit, stop): pages and downloads only.")
@click.option("--open", "open_browser", is_flag=True, help="Open the URL in a browser on this machine.")
@click.option("--certfile", default=None, metavar="FILE", help="TLS certificate (PEM).")
@click.option("--keyfile", default=None, metavar="FILE", help="TLS private key (PEM).")
@click.option("--allow-remote", is_flag=True, help="Allow a non-loopback --host (with --certfile/--keyfile).")
@pass_ctx
def serve_cmd(ctx, host: str, port: int, socket_path: str | None, read_only: bool, open_browser: bool,
              certfile: str | None, keyfile: str | None, allow_remote: bool) -> None:
    """Serve a web dashboard of this project: experiments, runs, live logs, downloads, actions.

    \b
    Prints one URL carrying a random access token (open it; it sets a cookie). Every
    route needs that token; nothing runs as anyone but you. Ctrl-C stops it.
      hpcexp serve                          http://127.0.0.1:PORT/?token=...
      hpcexp serve --socket ~/.hpcexp.sock  then from a laptop:
        ssh -L 8888:$HOME/.hpcexp.sock login-node   and open http://localhost:8888/?token=...
    """
    import sys

    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        from hpcexp.errors import EnvironmentProblem

        raise EnvironmentProblem("hpcexp serve needs Starlette and uvicorn, which are not installed",
                                 hint="pip install 'hpcexp[web]'") from None
    from hpcexp.server import runner
    from hpcexp.server.app import Settings, create_app

    runner.check_bind(host, socket_path, certfile, keyfile, allow_remote)
    project = ctx.project()
    token = runner.new_token()
    loopback = socket_path is not None or runner.is_loopback(host)
    settings = Settings(project_root=project.root, token=token, read_only=read_only, check_host=loopback,
                        secure=bool(certfile))
    app = create_app(settings)
    scheme = "https" if certfile else "http"
    if socket_path is not None:
        sock = runner.unix_socket(socket_path)
        url = f"{scheme}://localhost:8888/?token={token}"
        where = (f"unix socket {socket_path} (mode 0600); forward it with "
                 f"`ssh -L 8888:{socket_path} THIS_HOST`, then open")
    else:
        sock = runner.tcp_socket(host, port)
        bound_port = sock.getsockname()[1]
        shown = f"[{host}]" if ":" in host else host
        url = f"{scheme}://{shown}:{bound_port}/?token={token}"
        where = f"{scheme}://{shown}:{bound_port}"

    def ready() -> None:
        click.echo(f"hpcexp: serving {project.root} at {where}" + (" (read-only)" if read_only else "")
                   + "; Ctrl-C stops it", err=True)
        click.echo(url)
        sys.stdout.flush()
        if open_browser and socket_path is None:  # a socket's URL is for the far end of `ssh -L`
            import webbrowser

            webbrowser.open(url)

    try:
        runner.serve(app, sock, certfile=certfile, keyfile=keyfile, on_ready=ready,
                     log_level="info" if ctx.debug else "warning")
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it shut down on: stopping is the normal end
        pass
    finally:
        sock.close()
        if socket_path is not None:
            import contextlib
            import os

            with contextlib.suppress(OSError):
                os.unlink(socket_path)
    click.echo("hpcexp: stopped", err=True)
