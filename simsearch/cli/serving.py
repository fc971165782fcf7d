"""`simsearch serve`: the HTTP API and the web page over an index."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from simsearch.cli.common import (
    backend_option,
    cli,
    device_option,
    index_option,
    precision_option,
)

log = logging.getLogger("simsearch")

DEFAULT_PORT = 8000
MAX_UPLOAD_MB = 20


@cli.command()
@index_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=DEFAULT_PORT, show_default=True)
@click.option(
    "--token",
    envvar="SIMSEARCH_TOKEN",
    show_envvar=True,
    help="Every request must carry it (Authorization: Bearer T, or ?token=T once in the "
    "browser). Required when --host is not a loopback address.",
)
@click.option(
    "--model",
    envvar="SIMSEARCH_MODEL",
    show_envvar=True,
    help="Where the index's model is now, if its folder moved.",
)
@device_option
@precision_option
@backend_option
@click.option(
    "--move-to",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder that duplicates moved from the web page or the API go to (with a manifest "
    "to undo). Without it, moving is off.",
)
@click.option(
    "--max-upload-mb",
    type=click.FloatRange(min=0.001),
    default=MAX_UPLOAD_MB,
    show_default=True,
    help="Largest request body; bigger uploads get 413.",
)
@click.option(
    "--cors",
    "cors",
    multiple=True,
    metavar="ORIGIN",
    help="Allow pages from ORIGIN (e.g. https://photos.example.com) to call the API; "
    "repeatable. Off by default.",
)
@click.pass_obj
def serve(
    obj, index_path, host, port, token, model, device, precision, backend, move_to,
    max_upload_mb, cors,
):  # fmt: skip
    """Serve an index over HTTP: a JSON API and a web page, with the model loaded once.

    Open http://127.0.0.1:8000 for the page: drop an image to see the most similar ones,
    browse clusters, review duplicate groups, follow an index run. The API is described
    at /openapi.json and /api/docs; queries by id never touch the model, and uploads
    from concurrent clients are embedded together in batches.

    Binds 127.0.0.1 (this machine only) unless --host says otherwise; any other address
    needs --token. Stop with Ctrl-C.

    \b
    Examples:
      simsearch serve --index indexes/photos
      simsearch serve --host 0.0.0.0 --token "$(openssl rand -hex 16)"
      curl -s 'http://127.0.0.1:8000/api/search?id=42&k=5' | jq '.results[0].hits'
      curl -s -F images=@query.jpg -F k=5 http://127.0.0.1:8000/api/search
    """
    try:
        import uvicorn

        from simsearch.server.app import create_app
        from simsearch.server.guard import is_loopback
        from simsearch.server.state import Settings
    except ImportError as exc:
        raise click.ClickException(
            f"serving needs {exc.name}: pip install 'simsearch[server]'"
        ) from None
    if not is_loopback(host) and not token:
        raise click.UsageError(
            f"--host {host} serves other machines: give --token (or SIMSEARCH_TOKEN) too"
        )
    settings = Settings(
        index=index_path, host=host, model=model, device=device, precision=precision,
        backend=backend, token=token or None, max_upload=int(max_upload_mb * 2**20),
        cors=tuple(cors), move_to=move_to,
    )  # fmt: skip
    app = create_app(settings)
    shown = f"[{host}]" if ":" in host else host
    if not obj["quiet"]:
        click.echo(f"serving {index_path} at http://{shown}:{port}/ (Ctrl-C stops)", err=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
