"""API keys (`fluxserve keys ...`) and the usage report (`fluxserve usage`)."""

from __future__ import annotations

from typing import Annotated

import typer

from .common import DataDir, app, keys_app, store_at

MaxQueued = Annotated[
    int | None, typer.Option("--max-queued", min=0, help="Jobs queued or running at once (0: no limit).")
]
Rpm = Annotated[int | None, typer.Option("--rpm", min=0, help="Creates per minute (0: no limit).")]
ImagesPerDay = Annotated[int | None, typer.Option("--images-per-day", min=0, help="Images per UTC day (0: no limit).")]


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option("--name", help="A label for the key.")],
    max_queued: MaxQueued = None,
    rpm: Rpm = None,
    images_per_day: ImagesPerDay = None,
    admin: Annotated[
        bool, typer.Option("--admin", help="The key may also put the engine to sleep and wake it (POST /sleep).")
    ] = False,
    data_dir: DataDir = None,
    database: Annotated[str | None, typer.Option()] = None,
) -> None:
    """Create a key and print it alone on stdout (it is stored hashed: save it now).
    Limits not given follow the server's defaults (FLUXSERVE_*_PER_KEY)."""
    from ..auth import create_key
    from ..limits import Limits

    store = store_at(data_dir, database)
    new = create_key(store, name, admin=admin)
    store.set_key_limits(new.id, Limits(max_queued, rpm, images_per_day))
    store.close()
    typer.echo(new.key)


@keys_app.command("update")
def keys_update(
    key: Annotated[str, typer.Argument(help="Key id or name.")],
    max_queued: MaxQueued = None,
    rpm: Rpm = None,
    images_per_day: ImagesPerDay = None,
    credits: Annotated[
        float | None, typer.Option("--credits", min=0, help="Set the key's balance (priced models charge it).")
    ] = None,
    unmetered: Annotated[bool, typer.Option("--unmetered", help="Remove the key's balance: no credit check.")] = False,
    data_dir: DataDir = None,
    database: Annotated[str | None, typer.Option()] = None,
) -> None:
    """Change a key's limits or credits; they hold at once on every node sharing the database."""
    from ..limits import Limits

    limits = Limits(max_queued, rpm, images_per_day)
    if not any(v is not None for v in vars(limits).values()) and credits is None and not unmetered:
        typer.echo("Nothing to change: give --max-queued, --rpm, --images-per-day, --credits or --unmetered.", err=True)
        raise typer.Exit(2)
    store = store_at(data_dir, database)
    n = store.set_key_limits(key, limits)
    if credits is not None or unmetered:
        n = max(n, store.set_key_credits(key, None if unmetered else credits))
    store.close()
    if n == 0:
        typer.echo(f"No active key with id or name {key!r}.", err=True)
        raise typer.Exit(1)
    typer.echo(f"Updated {n} key(s).", err=True)


@app.command("usage")
def usage_report(
    key: Annotated[str | None, typer.Option("--key", help="Only this key (id or name).")] = None,
    since: Annotated[str | None, typer.Option(help="From this UTC day, YYYY-MM-DD [default: today].")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines instead of a table.")] = False,
    by_end_user: Annotated[
        bool, typer.Option("--by-end-user", help="Split by each request's end user (safety_identifier or user).")
    ] = False,
    licensing: Annotated[
        bool, typer.Option("--licensing", help="BFL licence usage instead: per slug and day, reported and waiting.")
    ] = False,
    data_dir: DataDir = None,
    database: Annotated[str | None, typer.Option()] = None,
) -> None:
    """Usage per key, model and UTC day: jobs, images, megapixels, worker seconds."""
    import json

    if licensing:
        store = store_at(data_dir, database)
        report = store.usage_report()
        store.close()
        for row in report if as_json else ():
            typer.echo(json.dumps(row))
        if not as_json:
            typer.echo(f"{'day':<10}  {'slug':<22}  {'generations':>11}  {'reported':>8}  {'waiting':>7}  last error")
            for r in report:
                typer.echo(
                    f"{r['day']:<10}  {str(r['slug'])[:22]:<22}  {r['generations']:>11}  {r['reported']:>8}  "
                    f"{r['pending']:>7}  {r['last_error'] or '-'}"
                )
        return

    from ..errors import InvalidInput
    from ..usage import parse_since, usage

    try:
        start = parse_since(since, param="--since")
    except InvalidInput as exc:
        typer.echo(f"fluxserve: {exc.message}", err=True)
        raise typer.Exit(2) from None
    store = store_at(data_dir, database)
    owner = None
    if key is not None:
        match = [row.id for row in store.list_keys() if key in (row.id, row.name)]
        if not match:
            typer.echo(f"No key with id or name {key!r}.", err=True)
            raise typer.Exit(1)
        owner = match[0]
    rows = usage(store, start, owner, by_end_user=by_end_user)
    store.close()
    if as_json:
        for row in rows:
            typer.echo(json.dumps(row.to_dict()))
        return
    head = f"{'day':<10}  {'key':<20}  {'model':<20}  {'jobs':>6}  {'images':>7}  {'MP':>9}  {'worker s':>9}"
    typer.echo(f"{head}  {'cost':>9}" + ("  end user" if by_end_user else ""))
    for r in rows:
        typer.echo(
            f"{r.day:<10}  {r.key[:20]:<20}  {r.model[:20]:<20}  {r.jobs:>6}  {r.images:>7}  "
            f"{r.megapixels:>9.2f}  {r.worker_seconds:>9.1f}  {r.cost:>9.4g}"
            + (f"  {r.end_user or '-'}" if by_end_user else "")
        )


@keys_app.command("list")
def keys_list(data_dir: DataDir = None, database: Annotated[str | None, typer.Option()] = None) -> None:
    """List keys (id, name, prefix, state, limits; '-' follows the server default, 0 is no limit)."""
    store = store_at(data_dir, database)
    for row in store.list_keys():
        state = "revoked" if row.revoked_at else "active"
        names = ("max_queued", "rpm", "images_per_day")
        limits = " ".join(f"{n}={'-' if getattr(row, n) is None else getattr(row, n)}" for n in names)
        credits = "-" if row.credits is None else f"{row.credits:g}"
        admin = " admin" if row.admin else ""
        typer.echo(f"{row.id}\t{row.name}\t{row.prefix}...\t{state}\t{limits} credits={credits}{admin}")
    store.close()


@keys_app.command("revoke")
def keys_revoke(
    key: Annotated[str, typer.Argument(help="Key id or name.")],
    data_dir: DataDir = None,
    database: Annotated[str | None, typer.Option()] = None,
) -> None:
    """Revoke a key by id or name."""
    store = store_at(data_dir, database)
    n = store.revoke_key(key)
    store.close()
    if n == 0:
        typer.echo(f"No active key with id or name {key!r}.", err=True)
        raise typer.Exit(1)
    typer.echo(f"Revoked {n} key(s).", err=True)
