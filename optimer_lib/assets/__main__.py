"""``python -m optimer_lib.assets build --out DIR [--quick]`` and ``python -m optimer_lib.assets readme --out DIR``.

``--out`` is required: the builder writes only where it is told (``make assets`` passes ``--out assets``, the
checkout's folder that ships as the ``optimer_assets`` package). To use a tree built elsewhere, set
``OPTIMER_ASSETS=DIR``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from optimer_lib.errors import OptimerError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m optimer_lib.assets", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["build", "readme"])
    p.add_argument("--out", type=Path, required=True,
                   help="folder to build into (the checkout's assets/ to update the shipped world)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (seconds), for testing the builder")
    args = p.parse_args(argv)
    try:
        if args.command == "build":
            from optimer_lib.assets.build import BuildConfig, build

            build(args.out, BuildConfig.quick() if args.quick else BuildConfig())
        from optimer_lib.assets.readme import write_readme

        write_readme(args.out)
    except OptimerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
