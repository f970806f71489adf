"""``hpcexp init``: scaffold a working project from the packaged template.

The template is the same ``hello`` example experiment the hpcexp repository ships, so a
fresh project builds and runs offline at once (its Python base is built from the
machine's Debian mirror). Existing files are never overwritten: every target is checked
first and, if any exists, nothing at all is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hpcexp.errors import UsageError
from hpcexp.infra import atomic

TEMPLATES = Path(__file__).resolve().parents[1] / "templates"
# Template files stored without their leading dot (package data globs skip dotfiles).
RENAMES = {"gitignore": ".gitignore", "dockerignore": ".dockerignore"}


@dataclass(frozen=True)
class InitResult:
    root: Path
    created: tuple[str, ...]


def template_files() -> dict[str, bytes]:
    """Relative path in the new project -> content."""
    files: dict[str, bytes] = {}
    base = TEMPLATES / "project"
    for path in sorted(base.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            rel = path.relative_to(base)
            name = RENAMES.get(rel.name, rel.name)
            files[str(rel.with_name(name))] = path.read_bytes()
    sbatch = default_sbatch_template()
    if sbatch is not None:
        files["slurm/default.sbatch"] = sbatch.encode("utf-8")
    return files


def default_sbatch_template() -> str | None:
    """The packaged default job template (owned by the Slurm module), if present."""
    candidate = TEMPLATES / "default.sbatch"
    return candidate.read_text(encoding="utf-8") if candidate.is_file() else None


def init_project(target: Path) -> InitResult:
    """Create a project at ``target`` (created if missing). Refuse if any file would be overwritten."""
    target = Path(target).expanduser()
    if target.exists() and not target.is_dir():
        raise UsageError(f"{target} exists and is not a folder")
    files = template_files()
    clashes = sorted(rel for rel in files if (target / rel).exists() or (target / rel).is_symlink())
    if clashes:
        raise UsageError(f"refusing to overwrite existing files in {target}: {', '.join(clashes)}",
                         hint="init into an empty or new folder")
    created = []
    try:
        for rel, data in files.items():
            dest = target / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            perms = 0o755 if rel.endswith((".py", ".sh")) else 0o644
            atomic.write_bytes(dest, data, perms=perms)
            created.append(rel)
        for folder in ("recipes", "experiments/hello/results"):
            (target / folder).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise atomic.storage_error(exc, target) from exc
    return InitResult(root=target.resolve(), created=tuple(created))
