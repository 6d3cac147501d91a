"""Where things live: the project root, shipped assets, caches and results."""
from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
ASSETS_DIR = PACKAGE_DIR / "assets"


def project_root() -> Path:
    """The repository root (holding conf/ and experiments/).

    `DITQ_ROOT` wins; otherwise the checkout this package is installed from (editable install),
    otherwise the current directory.
    """
    env = os.environ.get("DITQ_ROOT")
    if env:
        return Path(env).resolve()
    candidate = PACKAGE_DIR.parent.parent
    if (candidate / "conf").is_dir():
        return candidate
    return Path.cwd()


def config_dir() -> Path:
    path = project_root() / "conf"
    if not path.is_dir():
        raise FileNotFoundError(
            f"ditq's config directory {path} does not exist. Install ditq from its checkout "
            "(pip install -e .) or set DITQ_ROOT to the repository root."
        )
    return path
