"""Files shipped inside the package: the training configs and the DeepSpeed templates.

Found with ``importlib.resources``, so they work from a source checkout, an editable install and
a wheel alike. A ``--config`` path that does not exist on disk but names a shipped config
(``configs/tiny_sl.yaml`` or ``tiny_sl.yaml``) resolves to the shipped file, so the documented
commands work from any directory.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Optional

from .constants import CONFIG_DIR, DS_TEMPLATE_DIR

# ZeRO stage -> template: stages 1 and 2 share their settings (the stage itself and bf16 are
# written from the training config at launch)
DS_TEMPLATES = {0: "zero0.json", 1: "zero12.json", 2: "zero12.json", 3: "zero3.json"}


def _package_dir(name: str) -> Path:
    return Path(str(files("megatron_sl").joinpath(name)))


def config_dir() -> Path:
    """The directory of the shipped training configs."""
    return _package_dir(CONFIG_DIR)


def shipped_config(path: str | Path) -> Optional[Path]:
    """The shipped config that ``path`` names (``configs/NAME.yaml`` or ``NAME.yaml``), if any."""
    p = Path(path)
    if p.is_absolute() or p.parent not in (Path("."), Path(CONFIG_DIR)):
        return None
    candidate = config_dir() / p.name
    return candidate if candidate.is_file() else None


def resolve_config(path: str | Path) -> Path:
    """``path`` itself when it exists, else the shipped config it names, else ``path`` unchanged
    (so the caller's "does not exist" message names what the user typed)."""
    p = Path(path)
    if p.exists():
        return p
    return shipped_config(p) or p


def ds_template(zero_stage: int) -> Path:
    """The shipped DeepSpeed template for a ZeRO stage."""
    return _package_dir(DS_TEMPLATE_DIR) / DS_TEMPLATES[zero_stage]
