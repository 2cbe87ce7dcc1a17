"""MkDocs hooks: the pages and pictures generated from the code when the site is built.

- reference/cli.md from the Typer app (every command, argument and option, with its variable and default);
- reference/configuration.md from `Settings` (the table `fluxserve config` prints);
- reference/http-api.md and openapi.json from the app's own OpenAPI document;
- the benchmark tables and plots of performance.md from bench/results/*/*.json (matplotlib);
- llms.txt at the site root: every page of the nav with one line each.

Nothing here is kept by hand: a flag, setting or route added to the code shows up at the next build.
"""

from __future__ import annotations

import io
import json
import re
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
BENCH_MARK = "<!-- bench-results -->"


# --- references -------------------------------------------------------------------------------------------


def cli_reference() -> str:
    import typer.main

    from fluxserve.cli import app

    root = typer.main.get_command(app)
    out = [
        "# CLI reference",
        "",
        "Generated from the `fluxserve` Typer app when this site is built. Flags win over `FLUXSERVE_*`",
        "variables, which win over the TOML file named by `FLUXSERVE_CONFIG`.",
        "",
    ]

    # Typer vendors its own click (typer._click): commands and parameters are read by their attributes.
    def walk(cmd: Any, path: list[str]) -> None:
        if hasattr(cmd, "commands"):
            for name in sorted(cmd.commands):
                walk(cmd.commands[name], [*path, name])
            return
        name = " ".join(path)
        out.extend([f"## `fluxserve {name}`", "", (cmd.help or "").strip(), ""])
        params = [p for p in cmd.params if p.name != "help"]
        args = [p for p in params if p.param_type_name == "argument"]
        opts = [p for p in params if p.param_type_name == "option"]
        for arg in args:
            out.append(f"Argument `{(arg.name or '').upper()}`{' (required)' if arg.required else ''}.")
            out.append("")
        if opts:
            out.extend(["| option | environment | default | meaning |", "|---|---|---|---|"])
            for opt in opts:
                out.append(_option_row(opt))
            out.append("")

    walk(root, [])
    return "\n".join(out) + "\n"


def _option_row(opt: Any) -> str:
    flags = ", ".join(f"`{o}`" for o in [*opt.opts, *opt.secondary_opts])
    env = opt.envvar if isinstance(opt.envvar, str) else ", ".join(opt.envvar or [])
    default = "" if opt.default is None or opt.required or callable(opt.default) else opt.default
    if opt.is_flag and not opt.default:
        default = "off"
    help_text = (opt.help or "").replace("|", "/").replace("\n", " ")
    # Options generated from Settings carry their default and variable in the help text: shown in columns.
    generated = re.search(r"\s*\((?:default (.*?); )?env (FLUXSERVE_\w+)\)$", help_text)
    if generated:
        help_text = help_text[: generated.start()]
        default = generated.group(1) or default
        env = generated.group(2)
    required = " (required)" if opt.required else ""
    shown_env = f"`{env}`" if env else ""
    shown_default = f"`{default}`" if default != "" else ""
    return f"| {flags}{required} | {shown_env} | {shown_default} | {help_text} |"


def config_reference() -> str:
    from fluxserve.cli.options import SERVE_FIELDS, WORKER_FIELDS, reference

    return (
        "# Configuration reference\n\n"
        "Every setting, generated from `Settings` when this site is built (`fluxserve config` prints the same\n"
        "table). The flag column shows the flag where `serve` or `worker` takes one; every setting has its\n"
        "`FLUXSERVE_*` variable and may be a key of the TOML file named by `FLUXSERVE_CONFIG`. Defaults that\n"
        "depend on the machine (the data folder) are shown as they were where the site was built.\n\n"
        + reference(set(SERVE_FIELDS) | set(WORKER_FIELDS))
    )


def openapi() -> dict[str, Any]:
    from fluxserve.app import create_app
    from fluxserve.settings import Settings

    with tempfile.TemporaryDirectory() as tmp:  # the app is built, never started: nothing is written there
        return create_app(Settings(data_dir=Path(tmp), demo=True)).openapi()


def http_reference(doc: dict[str, Any]) -> str:
    out = [
        "# HTTP API reference",
        "",
        f"Generated from the app's own OpenAPI document (version {doc['info']['version']}) when this site is built;",
        "the document itself is at [openapi.json](../openapi.json), and a running server serves it at",
        "`/openapi.json` with its interactive form at `/docs`. MCP's `/mcp` is described in [MCP](../mcp.md).",
        "",
        "| method | path | what it does | body |",
        "|---|---|---|---|",
    ]
    for path, item in doc["paths"].items():
        for method, op in item.items():
            summary = (op.get("description") or op.get("summary") or "").strip().split("\n")[0].replace("|", "/")
            content = (op.get("requestBody") or {}).get("content", {})
            body = ", ".join(f"`{t}`" for t in content)
            out.append(f"| `{method.upper()}` | `{path}` | {summary} | {body} |")
    return "\n".join(out) + "\n"


# --- benchmarks -------------------------------------------------------------------------------------------

_PREFERRED = ("end_to_end_s", "p50_ms", "images_per_s", "create_cpu_ms", "seconds", "keep", "median_s")


def _flatten(d: Any, prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    if isinstance(d, dict):
        for k, v in d.items():
            rows += _flatten(v, f"{prefix}{k}.")
    elif isinstance(d, list) and d and all(isinstance(x, dict) for x in d):
        for i, x in enumerate(d):
            label = x.get("mode") or x.get("name") or str(i)
            rows += _flatten({k: v for k, v in x.items() if k not in ("mode", "name")}, f"{prefix}{label}.")
    elif isinstance(d, list):
        shown = ", ".join(str(x) for x in d[:12]) + (", ..." if len(d) > 12 else "")
        rows.append((prefix[:-1], shown))
    else:
        rows.append((prefix[:-1], d))
    return rows


def _bars(d: dict[str, Any]) -> tuple[str, dict[str, float]] | None:
    """The first group of sibling results that share a headline figure: (its name, label -> value)."""
    rows = d.get("rows")
    if isinstance(rows, list) and rows and all(isinstance(r, dict) and "mode" in r for r in rows):
        key = next((k for k in _PREFERRED if all(isinstance(r.get(k), int | float) for r in rows)), None)
        if key:
            return key, {str(r["mode"]): float(r[key]) for r in rows}
    groups = [d] + [v for v in d.values() if isinstance(v, dict)]
    for group in groups:
        children = {k: v for k, v in group.items() if isinstance(v, dict)}
        for key in _PREFERRED:
            values = {k: float(v[key]) for k, v in children.items() if isinstance(v.get(key), int | float)}
            if len(values) >= 2:
                return key, values
    if isinstance(d.get("plain_s"), list) and isinstance(d.get("fluxserve_s"), list):
        med = {k: sorted(d[k])[len(d[k]) // 2] for k in ("plain_s", "fluxserve_s")}
        return "median seconds per request", {"plain diffusers": med["plain_s"], "fluxserve": med["fluxserve_s"]}
    return None


def _plot(title: str, key: str, values: dict[str, float]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.45 * len(values) + 1.2), dpi=110)
    labels = list(values)[::-1]
    ax.barh(labels, [values[k] for k in labels], color="#4c72b0")
    for i, label in enumerate(labels):
        ax.text(values[label], i, f" {values[label]:g}", va="center", fontsize=8)
    ax.set_xlabel(key)
    ax.set_title(title, fontsize=10)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def bench_results(results: Path = ROOT / "bench" / "results") -> tuple[str, dict[str, bytes]]:
    """performance.md's results: per run folder, each JSON as a table of its figures and, where its results
    share a headline figure, a plot of it. Returns the Markdown and the pictures (site path -> PNG)."""
    out: list[str] = []
    pictures: dict[str, bytes] = {}
    for folder in sorted(p for p in results.iterdir() if p.is_dir()):
        files = sorted(folder.glob("*.json"))
        if not files:
            continue
        out += [f"### {folder.name}", ""]
        for path in files:
            data = json.loads(path.read_text())
            name = f"{folder.name}/{path.stem}"
            out += [f"#### `{path.stem}`", ""]
            if isinstance(data, dict) and isinstance(data.get("machine"), str):
                out += [f"Machine: {data['machine']}.", ""]
            bars = _bars(data) if isinstance(data, dict) else None
            if bars is not None:
                picture = f"assets/generated/{re.sub(r'[^A-Za-z0-9_.-]', '-', name)}.png"
                pictures[picture] = _plot(name, *bars)
                out += [f"![{name}: {bars[0]}]({picture})", ""]
            out += ["| figure | value |", "|---|---|"]
            out += [f"| `{k}` | {str(v).replace('|', '/')} |" for k, v in _flatten(data) if k != "machine"]
            out.append("")
    return "\n".join(out) + "\n", pictures


# --- MkDocs hooks -----------------------------------------------------------------------------------------


def on_files(files: Any, config: Any) -> Any:
    from mkdocs.structure.files import File

    doc = openapi()
    generated: dict[str, str | bytes] = {
        "reference/cli.md": cli_reference(),
        "reference/configuration.md": config_reference(),
        "reference/http-api.md": http_reference(doc),
        "openapi.json": json.dumps(doc, indent=1),
    }
    _, pictures = bench_results()
    generated.update(pictures)
    for path, content in generated.items():
        files.append(File.generated(config, path, content=content))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if BENCH_MARK in markdown:
        return markdown.replace(BENCH_MARK, bench_results()[0])
    return markdown


def on_post_build(config: Any) -> None:
    """llms.txt (llmstxt.org): the site's name, what it is, and each page of the nav with its first line."""
    site = Path(config["site_dir"])
    docs = Path(config["docs_dir"])
    lines = [f"# {config['site_name']}", "", f"> {config['site_description']}", ""]
    for section, pages in _nav_pages(config["nav"]):
        lines += [f"## {section}", ""]
        for title, src in pages:
            url = (
                (config["site_url"] or "/")
                + re.sub(r"(index)?\.md$", "", src).rstrip("/")
                + ("/" if not src.endswith("index.md") else "")
            )
            lines.append(f"- [{title}]({url}): {_first_line(docs / src)}")
        lines.append("")
    (site / "llms.txt").write_text("\n".join(lines))


def _nav_pages(nav: list[Any]) -> list[tuple[str, list[tuple[str, str]]]]:
    sections: list[tuple[str, list[tuple[str, str]]]] = []
    for entry in nav:
        for title, target in entry.items():
            if isinstance(target, str):
                sections.append((title, [(title, target)]))
            else:
                sections.append((title, [(t, s) for item in target for t, s in item.items()]))
    return sections


def _first_line(path: Path) -> str:
    """The page's first sentence of prose (generated pages: their own description)."""
    if not path.exists():
        return {
            "reference/cli.md": "every command and option of `fluxserve`, generated from the Typer app.",
            "reference/configuration.md": "every setting, flag and FLUXSERVE_* variable, generated from Settings.",
            "reference/http-api.md": "every HTTP route, generated from the app's OpenAPI document.",
        }.get(path.relative_to(path.parents[1]).as_posix(), "")
    paragraph: list[str] = []
    fenced = False
    for line in path.read_text().split("\n"):
        text = line.strip()
        if text.startswith("```"):
            fenced = not fenced
            continue
        if fenced or (not paragraph and (not text or text.startswith(("#", "|", "<!--", "!", "-", ">")))):
            continue
        if not text:
            break
        paragraph.append(text)
    if paragraph:
        sentence = re.split(r"(?<=[.:;])\s", " ".join(paragraph))[0]
        return sentence.rstrip(".:;") + "."
    return ""
