"""verify reports and changes nothing; only verify --repair mends."""

import hashlib
import json

from conftest import run


def _snapshot(folder):
    """Every file of the index folder with the hash of its bytes."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _strays(index_dir):
    (index_dir / "seg-000099.vec").write_bytes(b"half a segment of an unfinished commit")
    (index_dir / "seg-000100.vec.tmp").write_bytes(b"")


def test_verify_leaves_a_damaged_index_as_it_is_and_repair_mends_it(index_dir):
    _strays(index_dir)
    (index_dir / "manifest.json").write_text("{ not json")
    before = _snapshot(index_dir)
    out = run("verify", "--index", index_dir, code=1).stdout
    assert "problem: manifest.json of index" in out and "missing or damaged" in out
    assert "note: files left by an unfinished commit" in out
    assert "seg-000099.vec" in out and "seg-000100.vec.tmp" in out
    assert _snapshot(index_dir) == before  # every byte, and no file added or removed

    repaired = run("verify", "--index", index_dir, "--repair").stdout
    assert "repaired: removed files left by an unfinished commit: seg-000099.vec, seg-000100.vec.tmp" in repaired
    assert "repaired: rewrote manifest.json from the metadata" in repaired
    assert repaired.splitlines()[-1].startswith("ok: 50 images")
    again = run("verify", "--index", index_dir).stdout
    assert again.startswith("ok: 50 images") and "note:" not in again


def test_a_stale_manifest_copy_is_reported_not_rewritten(index_dir):
    manifest = json.loads((index_dir / "manifest.json").read_text())
    # A crash between a commit and the rewrite of the copy leaves it behind.
    manifest["revision"] -= 1
    (index_dir / "manifest.json").write_text(json.dumps(manifest))
    before = _snapshot(index_dir)
    out = run("verify", "--index", index_dir).stdout
    assert "note: manifest.json is behind the metadata" in out and out.splitlines()[-1].startswith("ok: ")
    assert _snapshot(index_dir) == before
    assert "repaired: rewrote manifest.json" in run("verify", "--index", index_dir, "--repair").stdout
    assert "note:" not in run("verify", "--index", index_dir).stdout
    # Nothing left to mend: --repair rewrites nothing.
    before = _snapshot(index_dir)
    assert "repaired" not in run("verify", "--index", index_dir, "--repair").stdout
    assert _snapshot(index_dir) == before
