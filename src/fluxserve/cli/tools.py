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
    from ..app import build_engine, build_registry
    from ..engine.base import EngineRequest
    from ..errors import FluxServeError
    from ..outputs import EXTENSIONS, encode_image
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
    for image, image_seed in zip(images, spec.image_seeds(), strict=True):
        path = out / f"{model}-{image_seed}.{EXTENSIONS[output_format]}"
        meta = {"prompt": prompt, "seed": image_seed, "model": label, "steps": spec.steps}
        path.write_bytes(encode_image(image, output_format, 95, meta, png_compress_level=settings.png_compress_level))
        typer.echo(str(path))


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
