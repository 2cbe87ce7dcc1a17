"""The schema (`fluxserve db upgrade`), one-off images (`generate`), the settings reference (`config`) and
the demo model (`demo-model`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import DataDir, app, db_app, settings_from
from .options import SERVE_FIELDS, WORKER_FIELDS, reference


@db_app.command("upgrade")
def db_upgrade(
    data_dir: DataDir = None,
    database: Annotated[str | None, typer.Option(help="SQLAlchemy URL [default: SQLite in the data dir].")] = None,
) -> None:
    """Bring the database schema to this version's (idempotent: applies only the missing steps)."""
    from ..migrations import LATEST, upgrade
    from ..store import Store

    settings = settings_from(data_dir=data_dir, database_url=database)
    store = Store(settings.database)
    try:
        applied = upgrade(store.engine)
    finally:
        store.close()
    for step in applied:
        typer.echo(f"applied {step}")
    typer.echo(f"schema at version {LATEST}")


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="What to draw.")],
    model: Annotated[str, typer.Option(help="Model name.")] = "flux",
    size: Annotated[str, typer.Option(help="WxH, multiples of 16.")] = "1024x1024",
    n: Annotated[int, typer.Option("-n", "--n", min=1, max=10, help="Number of images.")] = 1,
    seed: Annotated[int | None, typer.Option(help="Seed of the first image (image i uses seed + i).")] = None,
    steps: Annotated[int | None, typer.Option(help="Denoising steps [model default].")] = None,
    guidance: Annotated[float | None, typer.Option(help="Guidance [model default].")] = None,
    output_format: Annotated[str, typer.Option("--format", help="png, jpeg or webp.")] = "png",
    out: Annotated[Path, typer.Option(help="Folder for the images.")] = Path("."),
    demo: Annotated[bool | None, typer.Option("--demo", help="Use the demo model.")] = None,
    model_config: Annotated[Path | None, typer.Option("--model-config", help="TOML: model names -> weights.")] = None,
    data_dir: DataDir = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:1, mps.")] = None,
) -> None:
    """Generate images in this process, without a server, and print the files written."""
    from ..app import build_engine, build_provenance, build_registry, server_secret
    from ..engine.base import EngineRequest
    from ..errors import FluxServeError
    from ..job import new_job_id
    from ..migrations import open_store
    from ..outputs import EXTENSIONS
    from ..spec import parse_size

    settings = settings_from(demo=demo, model_config_file=model_config, data_dir=data_dir, device=device)
    registry = build_registry(settings)
    try:
        if output_format not in EXTENSIONS:
            raise typer.BadParameter(f"--format must be one of {', '.join(EXTENSIONS)}", param_hint="--format")
        width, height = parse_size(size, param="--size")
        spec = registry.get(model, param="--model").make_spec(
            prompt=prompt,
            width=width,
            height=height,
            num_images=n,
            steps=steps,
            guidance=guidance,
            seed=seed,
            output_format=output_format,  # type: ignore[arg-type]
            params={"size": "--size", "steps": "--steps", "guidance": "--guidance", "seed": "--seed"},
        )
    except FluxServeError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(2) from exc
    engine = build_engine(settings, registry)
    engine.load()
    [images] = engine.generate(
        [EngineRequest(spec)], lambda done, total, _p: typer.echo(f"step {done}/{total}", err=True)
    )
    out.mkdir(parents=True, exist_ok=True)
    label = registry.get(model).label
    store = open_store(settings.database)
    try:  # marked like the server's images, signed with the same certificate (its secret's, or the operator's)
        provenance = build_provenance(settings, server_secret(settings, store))
    finally:
        store.close()
    for image, image_seed in zip(images, spec.image_seeds(), strict=True):
        path = out / f"{model}-{image_seed}.{EXTENSIONS[output_format]}"
        meta: dict[str, object] = {"prompt": prompt, "seed": image_seed, "model": label, "steps": spec.steps}
        data = provenance.output(
            image,
            new_job_id(),  # no job row: its mark resolves to none
            fmt=output_format,
            quality=95,
            meta=meta,
            png_level=settings.png_compress_level,
            model=model,
            prompt=prompt,
        )
        path.write_bytes(data)
        typer.echo(str(path))


@app.command()
def verify(
    files: Annotated[list[Path], typer.Argument(help="Image files to check.", exists=True, dir_okay=False)],
    data_dir: DataDir = None,
    database: Annotated[str | None, typer.Option(help="SQLAlchemy URL: name the job each mark belongs to.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per file.")] = False,
) -> None:
    """Read each image's provenance marks (C2PA manifest, watermark); exit 0 only when every file is marked."""
    import json

    from ..errors import FluxServeError
    from ..migrations import open_store
    from ..provenance.check import check

    settings = settings_from(data_dir=data_dir, database_url=database)
    store = open_store(settings.database) if database or (settings.data_dir / "fluxserve.db").is_file() else None
    unmarked = 0
    try:
        for path in files:
            try:
                found = check(path.read_bytes(), param=str(path))
            except FluxServeError as exc:
                typer.echo(f"{path}: not an image this server reads: {exc.message}", err=True)
                unmarked += 1
                continue
            mark = found.job_mark
            job = store.find_by_mark(None, f"{mark:012x}") if store is not None and mark is not None else None
            c2pa = found.c2pa
            view = {
                "file": str(path),
                "marked": found.marked,
                "c2pa": {"state": c2pa.state, "issuer": c2pa.issuer, "model": c2pa.model, "at": c2pa.generated_at},
                "watermark": None if found.mark is None else f"{found.mark:012x}",
                "job": job.id if job is not None else None,
            }
            unmarked += not found.marked
            if as_json:
                typer.echo(json.dumps(view))
                continue
            said = f"C2PA {c2pa.state}" + (
                f" ({c2pa.issuer}; {c2pa.model}; {c2pa.generated_at})" if c2pa.issuer else ""
            )
            said += f", watermark {view['watermark'] or 'not found'}" + (f" (job {view['job']})" if job else "")
            typer.echo(f"{path}: {'marked' if found.marked else 'NOT marked'}: {said}")
    finally:
        if store is not None:
            store.close()
    raise typer.Exit(1 if unmarked else 0)


@app.command("config")
def config_reference() -> None:
    """Print every setting (flag, environment variable, default, meaning) as a Markdown table."""
    typer.echo(reference(set(SERVE_FIELDS) | set(WORKER_FIELDS)), nl=False)


@app.command("demo-model")
def demo_model(path: Annotated[Path, typer.Argument(help="Folder to write the demo model to.")]) -> None:
    """Build the demo model (random weights, real FLUX geometry) offline."""
    from ..engine.demo import build_demo_model

    build_demo_model(path)
    typer.echo(str(path))
