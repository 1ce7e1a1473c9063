"""Kill `imgsearch index` with SIGKILL at random moments until it completes.

Usage:
    python benchmarks/kill_resume.py FOLDER [--commit-every 100] [--min 3] [--max 15] [--seed 0]

Each round starts the same `imgsearch index` command and kills it after a
random delay; a round that finishes by itself ends the run.  After every kill
the index must open with FAISS and the metadata in agreement.  To count work
done twice, the encoder is efficientnet-lite0 wrapped by a plugin (written
to a temporary plugins folder) that logs every batch it embeds.  Prints the
number of kills, the images embedded more than once, and `verify`'s verdict.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COUNTING_PLUGIN = '''
import os

from imgsearch_efficientnet_lite0 import EfficientNetLite0Encoder


class Counted(EfficientNetLite0Encoder):
    name = "efficientnet-lite0-counted"

    # Counted where every runtime passes (OpenVINO bypasses embed_batch).
    def embed_pixels(self, pixels):
        out = super().embed_pixels(pixels)
        with open(os.environ["KILL_RESUME_LOG"], "a") as log:
            log.write(f"{len(pixels)}\\n")
        return out


def register_encoders(register):
    register(Counted)
'''


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--commit-every", type=int, default=100)
    parser.add_argument("--min", type=float, default=3.0, help="shortest delay before a kill, seconds")
    parser.add_argument("--max", type=float, default=15.0, help="longest delay before a kill, seconds")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from imgsearch.images import discover
    from imgsearch.store import Store

    files, _ = discover([args.folder])
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="imgsearch-kill-"))
    try:
        (work / "plugins").mkdir()
        (work / "plugins" / "counted.py").write_text(COUNTING_PLUGIN)
        log = work / "embedded.log"
        index_dir = work / "index"
        env = dict(os.environ, IMGSEARCH_PLUGINS_DIR=str(work / "plugins"), KILL_RESUME_LOG=str(log),
                   TF_CPP_MIN_LOG_LEVEL="3")
        command = [sys.executable, "-m", "imgsearch", "index", str(args.folder), "--index", str(index_dir),
                   "--encoder", "efficientnet-lite0-counted", "--commit-every", str(args.commit_every)]
        kills, started = 0, time.monotonic()
        while True:
            process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            delay = rng.uniform(args.min, args.max)
            try:
                out, err = process.communicate(timeout=delay)
            except subprocess.TimeoutExpired:
                process.kill()
                process.communicate()
                kills += 1
                count = 0
                if (index_dir / "metadata.sqlite").exists():
                    with Store.open(index_dir) as store:  # raises if FAISS and SQLite disagree
                        count = store.count
                print(f"kill {kills} after {delay:.1f} s: {count} images committed", flush=True)
                continue
            if process.returncode != 0:
                raise SystemExit(f"index failed: {err.strip()}")
            print(out.strip().splitlines()[0])
            break
        elapsed = time.monotonic() - started
        embedded = sum(int(line) for line in log.read_text().split())
        check = subprocess.run([sys.executable, "-m", "imgsearch", "verify", "--index", str(index_dir)],
                               env=env, capture_output=True, text=True)
        with Store.open(index_dir) as store:
            final = store.count + len(store.aliases())
        print(f"{len(files)} image files, {kills} kills, {elapsed:.0f} s in all")
        print(f"images embedded: {embedded}; embedded more than once: {embedded - store.count} "
              f"(at most {args.commit_every} + one batch per kill expected: "
              f"{kills * (args.commit_every + 32)})")
        print(f"indexed paths at the end: {final} (images {store.count} + duplicate paths "
              f"{final - store.count})")
        print(f"verify (exit {check.returncode}): {check.stdout.strip().splitlines()[-1]}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
