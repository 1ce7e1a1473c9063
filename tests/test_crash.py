"""Kill a real `imgsearch index` with SIGKILL at many moments, including in
the middle of writing a commit, and check that the index always opens with
FAISS and the metadata in agreement, and that a re-run resumes."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from conftest import kill_when, sqlite_writing
from imgsearch.store import Store

pytestmark = pytest.mark.slow

# A test encoder with wide vectors, so that each commit writes a few
# megabytes and a kill can land inside the write. It logs every batch it
# embeds, which is how the test counts work done twice.
WIDE_PLUGIN = '''
import os
import time
import numpy as np
from imgsearch import Encoder, Preprocessing, WeightsStatus

_PROJECTION = np.random.default_rng(0).standard_normal((48, 4096)).astype(np.float32)


class Wide(Encoder):
    name = "wide-test"
    dim = 4096
    preprocessing = Preprocessing(input_size=32, resize="stretch")
    default_weights = "builtin"
    batch_size = 5

    def weights_status(self):
        return WeightsStatus(True, "no weights")

    def weights_fingerprint(self):
        return "wide-test-1"

    def load(self):
        pass

    def embed_batch(self, pixels):
        # An optional pause per batch keeps a run long enough to be signalled.
        time.sleep(float(os.environ.get("WIDE_TEST_DELAY", "0")))
        with open(os.environ["WIDE_TEST_LOG"], "a") as log:
            log.write(f"{len(pixels)}\\n")
        cells = pixels.reshape(len(pixels), 4, 8, 4, 8, 3).mean(axis=(2, 4)).reshape(len(pixels), 48)
        return cells @ _PROJECTION


def register_encoders(register):
    register(Wide)
'''
N_IMAGES = 400
COMMIT_EVERY = 20


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    photos = root / "photos" / "noise"
    photos.mkdir(parents=True)
    rng = np.random.default_rng(3)
    for i in range(N_IMAGES):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(photos / f"{i:04d}.png")
    plugins = root / "plugins"
    plugins.mkdir()
    (plugins / "wide.py").write_text(WIDE_PLUGIN)
    return root


def _start(corpus, index_dir, log, delay=0.0, commit_every=COMMIT_EVERY):
    env = dict(os.environ, IMGSEARCH_PLUGINS_DIR=str(corpus / "plugins"), WIDE_TEST_LOG=str(log),
               WIDE_TEST_DELAY=str(delay))
    return subprocess.Popen(
        [sys.executable, "-m", "imgsearch", "index", str(corpus / "photos"), "--index", str(index_dir),
         "--encoder", "wide-test", "--commit-every", str(commit_every)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # A test run started in the background (nohup, `cmd &` in a script)
        # inherits an ignored SIGINT, which Python then keeps: restore the
        # default so the child gets Ctrl-C the way a terminal user's would.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def _check_consistent(index_dir):
    if not (index_dir / "metadata.sqlite").exists():
        return 0  # killed before the index existed: nothing to check
    with Store.open(index_dir) as store:  # refuses to open when FAISS and SQLite disagree
        problems, _ = store.verify(check_files=False)
        assert problems == [], problems
        ids = [e.id for e in store.entries()]
        assert len(ids) == len(set(ids)) == store.count
        return store.count


def test_sigkill_at_any_moment_loses_at_most_the_uncommitted_batch(corpus, tmp_path):
    index_dir = tmp_path / "ix"
    log = tmp_path / "embedded.log"

    def tmp_file_exists():
        return index_dir.exists() and any(name.endswith(".tmp") for name in os.listdir(index_dir))

    journal_exists = sqlite_writing(index_dir)  # inside SQLite's commit

    def generation_at_least(g):
        def check():
            try:
                with Store.open(index_dir) as store:
                    return int(store.manifest["generation"]) >= g
            except Exception:
                return False
        return check

    kills = 0
    counts = []
    # Alternately in the middle of writing a commit (its temporary file
    # exists) and right after a given number of commits.
    plans = [tmp_file_exists, generation_at_least(2), journal_exists, tmp_file_exists, generation_at_least(6),
             journal_exists, tmp_file_exists, generation_at_least(10), tmp_file_exists]
    for plan in plans:
        # A short pause per batch: without it a run of the tiny encoder can
        # finish between two looks at a condition (a look opens the index),
        # leaving the remaining plans nothing to interrupt.
        process = _start(corpus, index_dir, log, delay=0.02)
        if kill_when(process, plan):
            kills += 1
        counts.append(_check_consistent(index_dir))
    assert counts == sorted(counts), "a kill lost committed work"

    process = _start(corpus, index_dir, log)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    with Store.open(index_dir) as store:
        assert store.count == N_IMAGES
        problems, notes = store.verify()
        assert problems == [] and notes == []
    embedded = sum(int(line) for line in log.read_text().split())
    # Each kill may cost the images embedded but not yet committed: at most
    # one commit interval plus the batch in flight.
    print(f"kills {kills}, images embedded {embedded} for {N_IMAGES}, counts after each kill {counts}")
    assert kills >= 5
    assert embedded - N_IMAGES <= kills * (COMMIT_EVERY + 5), (embedded, kills)


def _embedded(log):
    try:
        return sum(int(line) for line in log.read_text().split())
    except FileNotFoundError:
        return 0


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_ctrl_c_and_sigterm_commit_what_is_embedded_and_say_how_to_resume(corpus, tmp_path, signum):
    index_dir = tmp_path / "ix"
    log = tmp_path / "log"
    # A commit interval larger than the corpus: no regular commit ever runs,
    # so whatever the index holds afterwards was committed at interrupt time.
    # 80 batches of at least 50 ms: the signal always lands mid-run.
    process = _start(corpus, index_dir, log, delay=0.05, commit_every=10 * N_IMAGES)

    end = time.monotonic() + 60
    while _embedded(log) < 30 and process.poll() is None and time.monotonic() < end:
        time.sleep(0.01)
    assert process.poll() is None, "the run ended before it could be signalled"
    embedded_at_signal = _embedded(log)
    assert embedded_at_signal >= 30
    process.send_signal(signum)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("Error: interrupted: ") and "run the same command again to resume" in last
    committed = _check_consistent(index_dir)
    # Every batch the encoder had finished when the signal came, except the
    # one it may have been handing back, is in the index.
    assert committed >= embedded_at_signal - 5, (committed, embedded_at_signal)
    assert committed <= _embedded(log)
    assert f"interrupted: {committed} new images committed in this run, the index holds {committed};" in last

    # The same command again resumes: the rest is added, nothing twice.
    process = _start(corpus, index_dir, log)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    assert _check_consistent(index_dir) == N_IMAGES


def test_readers_see_committed_states_while_a_writer_works(corpus, tmp_path):
    index_dir = tmp_path / "ix"
    process = _start(corpus, index_dir, tmp_path / "log")
    seen = []
    query = np.ones((1, 4096), np.float32) / 64.0
    while process.poll() is None:
        if not (index_dir / "metadata.sqlite").exists():
            continue
        with Store.open(index_dir) as store:  # never a damaged or half-written state
            hits = store.search(query, 5)[0]
            assert len(hits) == min(5, store.count)
            seen.append(store.count)
    assert process.returncode == 0
    assert seen == sorted(seen) and len(set(seen)) >= 3, seen
