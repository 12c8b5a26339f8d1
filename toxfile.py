"""In-tree tox plugin: every tox env sees the project venv's torch instead of installing its own.

A plain tox env re-installs torch (5.5 GB, 80-100 s per env). Before tox installs anything into
an env, this hook writes ``dg_quant_shared_venv.pth`` into the env's site-packages; it holds one
line, the project venv's site-packages, which Python appends to ``sys.path``. pip then finds
torch, torchvision, timm, ... already installed and only installs what is missing (the
dg-quant wheel itself, extra deps), so an env costs seconds. The env's own packages come first
on ``sys.path``, so the wheel under test wins over the venv's editable copy of dg-quant.

Environments with ``skip_install`` (``lint``) are left alone. The shared venv is
``$DGQ_SHARED_VENV`` or ``.venv`` beside this file; it is only linked when its
Python version matches the env's (compiled extensions are version-specific).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from tox.plugin import impl
from tox.tox_env.api import ToxEnv

PTH_NAME = "dg_quant_shared_venv.pth"


def shared_site_packages(version: tuple[int, int]) -> Path | None:
    """The shared venv's site-packages for Python ``version``, if there is one."""
    venv = Path(os.environ.get("DGQ_SHARED_VENV") or Path(__file__).resolve().parent / ".venv")
    site = venv / "lib" / f"python{version[0]}.{version[1]}" / "site-packages"
    return site if site.is_dir() else None


def _skips_install(tox_env: ToxEnv) -> bool:
    try:
        return bool(tox_env.conf["skip_install"])
    except KeyError:
        return False


@impl
def tox_on_install(tox_env: ToxEnv, arguments: Any, section: str, of_type: str) -> None:
    env_site = getattr(tox_env, "env_site_package_dir", None)
    base = getattr(tox_env, "base_python", None)
    if env_site is None or base is None:
        return  # not a Python virtualenv-style environment
    if _skips_install(tox_env):
        return  # e.g. lint: needs no torch, and its tools must install their own scripts
    info = base.version_info
    shared = shared_site_packages((info.major, info.minor))
    if shared is None:
        print(
            f"toxfile: no shared venv for Python {info.major}.{info.minor}; {tox_env.name} installs its own torch",
            file=sys.stderr,
        )
        return
    target = Path(env_site()) / PTH_NAME
    if not target.exists() or target.read_text().strip() != str(shared):
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(f"{shared}\n")
