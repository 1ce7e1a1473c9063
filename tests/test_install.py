"""The installed package imports the same from any working folder."""

import subprocess
import sys


def test_a_folder_named_like_the_package_does_not_shadow_it(tmp_path):
    # A clone of the repository is a folder named imgsearch/ without an
    # __init__.py; run from its parent, Python's path finder takes it for a
    # namespace package unless the real package is on the path too
    # (scripts/source_path.py, run by 'make install').
    (tmp_path / "imgsearch").mkdir()
    imported = subprocess.run([sys.executable, "-c", "from imgsearch import Index; print(Index.__name__)"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.strip() == "Index"
    helped = subprocess.run([sys.executable, "-m", "imgsearch", "--help"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith("Usage: imgsearch [OPTIONS] COMMAND")
