"""The optional extras (pyproject.toml's optional dependencies): the command that installs one, for the
error a missing one gives.

No distribution named captioner is published, so `pip install 'captioner[onnx]'` installs nothing. The
command must match how this copy was installed: from a checkout (an editable install, or the source on the
path), its venv's pip with `-e` on the checkout; otherwise the extra's packages themselves, as this
installation's metadata lists them.
"""
from __future__ import annotations

import os
import shlex
import sys
from importlib import metadata
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent  # the source tree, when pyproject.toml is there


def install_hint(extra: str) -> str:
    """The shell command that installs `extra` into the environment running captioner."""
    if (CHECKOUT / "pyproject.toml").is_file():
        return f"{_pip()} install -e {shlex.quote(f'{_shown(CHECKOUT)}[{extra}]')}"
    packages = extra_requirements(extra)
    if not packages:
        return f"install the packages of captioner's {extra!r} extra (pyproject.toml)"
    return f"{_pip()} install {' '.join(shlex.quote(p) for p in packages)}"


def extra_requirements(extra: str) -> list[str]:
    """The requirements (`onnx>=1.16`, ...) that the installed captioner's metadata lists for `extra`."""
    try:
        requires = metadata.requires("captioner") or []
    except metadata.PackageNotFoundError:
        return []
    marker = f'extra == "{extra}"'
    return [req.partition(";")[0].strip() for req in requires if marker in req.partition(";")[2]]


def _pip() -> str:
    """This interpreter's pip: the environment's bin/pip (Scripts\\pip.exe on Windows) or `python -m pip`."""
    pip = Path(sys.prefix).resolve() / ("Scripts/pip.exe" if os.name == "nt" else "bin/pip")
    return shlex.quote(_shown(pip)) if pip.exists() else f"{shlex.quote(sys.executable)} -m pip"


def _shown(path: Path) -> str:
    """`path` (absolute) as the user would type it here: relative under the working folder, else as it is."""
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)
