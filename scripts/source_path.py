"""Put this checkout's source folders on the running Python's path, after
``pip install -e .``, so that ``imgsearch`` imports the same from any folder.

Why: setuptools' editable install finds our packages with a meta-path finder
that Python consults only after its ordinary path finder.  Run from the
folder that holds a clone named ``imgsearch/``, the path finder takes that
clone folder for a namespace package, and ``from imgsearch import Index``
fails.  With the checkout itself on ``sys.path`` (a ``.pth`` file in
site-packages) the path finder finds the real package there, and a regular
package always wins over a namespace folder.

Usage: ``python scripts/source_path.py`` with the environment's python
(``make install`` runs it).
"""

from __future__ import annotations

import sys
import sysconfig
from pathlib import Path

PTH_NAME = "imgsearch-source.pth"


def main() -> int:
    root = Path(__file__).resolve().parent.parent
    entries = [root, root / "plugins"]  # the package, and the built-in encoder plugins
    target = Path(sysconfig.get_path("purelib")) / PTH_NAME
    target.write_text("".join(f"{entry}\n" for entry in entries), encoding="utf-8")
    print(f"wrote {target}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
