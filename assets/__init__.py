"""The embedded tiny world as package data: installed as ``optimer_assets`` (this folder is ``assets/`` in the
checkout; pyproject.toml maps it), so a wheel carries it and nothing looks for a source checkout.

    import optimer_assets
    optimer_assets.path()          # the folder holding base/, instruct/, corpora/, README.md, build_info.json

Library code reaches it through :func:`optimer_lib.data.assets_dir`, which lets ``$OPTIMER_ASSETS`` override
it. Rebuilt by ``python -m optimer_lib.assets build --out assets`` (``make assets``); see README.md here.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def path() -> Path:
    """The installed folder of the embedded world (a real directory: models are loaded from it by path)."""
    root = files(__name__)
    if not isinstance(root, Path):  # e.g. imported from a zip file: from_pretrained needs a folder
        raise RuntimeError(f"optimer_assets is not installed as a folder ({root!r}): install the wheel "
                           "unzipped (pip does), or set OPTIMER_ASSETS to a copy of the assets folder")
    return root
