"""`imgsearch serve`: the JSON API over an index, tested over HTTP against
the real uvicorn server, a real index (tiny-color test encoder) and the
CLI's own JSON output; and that no request can read a file that is not an
indexed image.  The page in a real browser is tests/test_web_browser.py.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
from PIL import Image

from conftest import PLUGINS_DIR, SAMPLE_DATA, run
from imgsearch.store import Store
from test_serve import HAVE_STACK, Running, _free_port, png_bomb

pytestmark = pytest.mark.skipif(not HAVE_STACK, reason="FastAPI and uvicorn are not installed")

QUERY = SAMPLE_DATA / "queries" / "tench.jpg"


def request(port, method, path, body=None, headers=None, timeout=60):
    """(status, headers, raw body) of one request on a new connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def get_json(port, path, method="GET", body=None, headers=None):
    status, head, data = request(port, method, path, body, headers)
    assert head.get("content-type", "").startswith("application/json"), (status, head, data[:200])
    return status, json.loads(data)


def serving(index_dir, **limits):
    from imgsearch import Index
    from imgsearch.web.app import allowed_hosts_for, create_app

    index = Index.open(index_dir, plugins_dir=PLUGINS_DIR)
    running = Running(create_app(index, allowed_hosts=allowed_hosts_for("127.0.0.1"), **limits))
    running.index = index
    return running


def wait_ready(port):
    deadline = time.monotonic() + 30
    while True:
        status, info = get_json(port, "/api/info")
        assert status == 200, info
        if info["server"]["ready"]:
            return info
        assert time.monotonic() < deadline, "the encoder did not load"
        time.sleep(0.05)


def without_web_fields(rows):
    """The rows as the CLI prints them: the API adds ids and thumbnails."""
    return [{key: value for key, value in row.items() if key not in ("id", "thumbnail")} for row in rows]


@pytest.fixture
def server(index_dir):
    with serving(index_dir) as running:
        wait_ready(running.port)
        yield running
    running.index.close()


# -- the API speaks as the CLI does ------------------------------------------------

def test_query_and_classify_of_an_upload_equal_the_cli_json(server, index_dir):
    data = QUERY.read_bytes()
    status, answer = get_json(server.port, "/api/query?k=5&name=tench.jpg", "POST", data)
    assert status == 200, answer
    cli = json.loads(run("query", QUERY, "--index", index_dir, "-k", 5, "--format", "json").stdout)
    assert answer["query"] == "tench.jpg"
    assert without_web_fields(answer["results"]) == cli["results"]
    for row in answer["results"]:
        assert row["thumbnail"].startswith(f"/api/images/{row['id']}/thumbnail?v=")

    status, answer = get_json(server.port, "/api/classify?k=7&vote=majority", "POST", data)
    assert status == 200, answer
    cli = json.loads(run("classify", QUERY, "--index", index_dir, "-k", 7, "--vote", "majority",
                         "--format", "json").stdout)
    assert (answer["label"], answer["confidence"]) == (cli["label"], cli["confidence"])
    assert without_web_fields(answer["neighbors"]) == cli["neighbors"]
    # The vote breakdown: each label's share of the 7 neighbours, largest first.
    counts = {}
    for row in cli["neighbors"]:
        counts[row["label"]] = counts.get(row["label"], 0) + 1
    assert answer["votes"] == {label: round(n / 7, 6) for label, n in
                               sorted(counts.items(), key=lambda item: -item[1])}
    assert next(iter(answer["votes"])) == answer["label"]


def test_info_is_the_cli_info_plus_the_server_limits(server, index_dir):
    status, info = get_json(server.port, "/api/info")
    assert status == 200
    cli = json.loads(run("info", "--index", index_dir, "--format", "json").stdout)
    server_facts = info.pop("server")
    assert cli.pop("index_source") == "--index"  # how the command line chose the index
    assert info == cli
    assert server_facts["ready"] is True and server_facts["max_megapixels"] == 40.0


def test_query_by_indexed_id_leaves_the_image_itself_out(server, index_dir):
    from imgsearch import Index

    path = sorted((SAMPLE_DATA / "labelled" / "parachute").glob("*.jpg"))[0]
    with Store.open(index_dir) as store:  # the server's own is used by its thread
        entry = store.entry_at(str(path))
    status, answer = get_json(server.port, f"/api/images/{entry.id}/similar?k=4")
    assert status == 200, answer
    with Index.open(index_dir, plugins_dir=PLUGINS_DIR) as index:
        expected = index.query([path], k=4)[0]
    assert answer["id"] == entry.id and answer["query"] == str(path)
    assert [row["id"] for row in answer["results"]] == [hit.entry.id for hit in expected.hits]
    assert entry.id not in [row["id"] for row in answer["results"]]
    status, answer = get_json(server.port, f"/api/images/{entry.id}/similar?k=4&include_self=true")
    assert answer["results"][0]["id"] == entry.id and answer["results"][0]["score"] == pytest.approx(1.0, abs=1e-5)

    status, answer = get_json(server.port, f"/api/images/{entry.id}/classify?k=5")
    assert status == 200 and answer["label"] is not None
    assert abs(sum(answer["votes"].values()) - 1) < 1e-5


def test_listing_pages_through_a_label(server):
    seen = []
    after = -1
    while after is not None:
        status, page = get_json(server.port, f"/api/images?label=tench&limit=3&after={after}")
        assert status == 200 and page["total"] == 10
        assert all(row["label"] == "tench" for row in page["images"])
        seen += [row["id"] for row in page["images"]]
        after = page["next"]
    assert len(seen) == 10 and seen == sorted(set(seen))
    status, page = get_json(server.port, "/api/images?limit=500")
    assert page["total"] == 50 and len(page["images"]) == 50 and page["next"] is None
    status, one = get_json(server.port, f"/api/images/{seen[0]}")
    assert one["id"] == seen[0] and one["label"] == "tench" and one["also_at"] == []


def test_thumbnails_are_small_jpegs_of_the_indexed_image_and_cached(server):
    status, page = get_json(server.port, "/api/images?limit=1")
    row = page["images"][0]
    status, head, data = request(server.port, "GET", row["thumbnail"])
    assert status == 200 and head["content-type"] == "image/jpeg"
    assert "immutable" in head["cache-control"] and head["x-content-type-options"] == "nosniff"
    thumb = Image.open(io.BytesIO(data))
    assert thumb.format == "JPEG" and max(thumb.size) <= 256
    with Image.open(row["path"]) as original:
        assert thumb.size[0] / thumb.size[1] == pytest.approx(original.size[0] / original.size[1], rel=0.02)
    search = server.app.state.search
    made = len(search.thumbnails)
    assert request(server.port, "GET", row["thumbnail"])[2] == data
    assert len(search.thumbnails) == made  # the second answer came from the cache
    # Without the content's version in the URL the browser must ask again.
    assert "no-cache" in request(server.port, "GET", f"/api/images/{row['id']}/thumbnail")[1]["cache-control"]


# -- bad requests --------------------------------------------------------------------

def test_bad_requests_get_a_json_error_and_the_server_goes_on(index_dir):
    with serving(index_dir, max_upload_bytes=64 * 1024) as running:
        wait_ready(running.port)
        tiff = io.BytesIO()
        Image.new("RGB", (8, 8)).save(tiff, "TIFF")
        cases = [
            ("POST", "/api/query", b"", 400, "empty"),
            ("POST", "/api/query", b"not an image at all", 422, "not an image"),
            ("POST", "/api/query", b"\xff" * (65 * 1024), 413, "too large"),
            ("POST", "/api/query", png_bomb(), 413, "too large"),
            ("POST", "/api/classify", png_bomb(), 413, "too large"),
            ("POST", "/api/query?k=0", QUERY.read_bytes(), 422, "k"),
            ("POST", "/api/query?k=99999", QUERY.read_bytes(), 422, "k"),
            ("POST", "/api/query?k=ten", QUERY.read_bytes(), 422, "k"),
            ("POST", "/api/classify?vote=loudest", QUERY.read_bytes(), 422, "vote"),
            ("POST", "/api/classify?temperature=-1", QUERY.read_bytes(), 422, "temperature"),
            ("GET", "/api/images?limit=0", None, 422, "limit"),
            ("GET", "/api/images/1/similar?k=-3", None, 422, "k"),
            ("GET", "/api/query", None, 405, "Method Not Allowed"),
            ("DELETE", "/api/images/1", None, 405, "Method Not Allowed"),
        ]
        for method, path, body, status, words in cases:
            got, answer = get_json(running.port, path, method, body)
            assert (got, words.lower() in answer["error"].lower()) == (status, True), (path, answer)
        # A format outside --image-formats is refused from its header.
        with serving(index_dir, formats=["JPEG", "PNG"]) as strict:
            wait_ready(strict.port)
            got, answer = get_json(strict.port, "/api/query", "POST", tiff.getvalue())
            assert got == 415, answer
        status, answer = get_json(running.port, "/api/query?k=3", "POST", QUERY.read_bytes())
        assert status == 200 and len(answer["results"]) == 3
    running.index.close()


def test_classify_without_labels_says_so(tmp_path):
    folder = tmp_path / "flat"
    folder.mkdir()
    for photo in sorted((SAMPLE_DATA / "labelled" / "church").glob("*.jpg"))[:3]:
        shutil.copy(photo, folder / photo.name)
    run("index", folder, "--index", tmp_path / "ix", "--encoder", "tiny-color")
    with serving(tmp_path / "ix") as running:
        wait_ready(running.port)
        status, answer = get_json(running.port, "/api/classify", "POST", QUERY.read_bytes())
        assert status == 422 and "has no labels" in answer["error"]
    running.index.close()


def test_requests_for_another_host_name_are_refused(server):
    # A page elsewhere that points its own name at 127.0.0.1 (DNS rebinding)
    # sends its own name as the Host.
    status, answer = get_json(server.port, "/api/info", headers={"Host": "attacker.example:8000"})
    assert status == 421 and "attacker.example" in answer["error"]
    for name in ("localhost:8000", "127.0.0.1", "[::1]:8000"):
        assert get_json(server.port, "/api/info", headers={"Host": name})[0] == 200


def test_the_page_loads_nothing_from_elsewhere(server):
    status, head, html = request(server.port, "GET", "/")
    assert status == 200 and head["content-type"].startswith("text/html")
    policy = head["content-security-policy"]
    assert "default-src 'none'" in policy and "http" not in policy
    assets = [html]
    for url in re.findall(rb'(?:src|href)="([^"]+)"', html):
        status, _, data = request(server.port, "GET", url.decode())
        assert status == 200, url
        assets.append(data)
    assert len(assets) == 3  # the page, its script and its style
    for data in assets:
        assert not re.search(rb"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", data, re.I), "an external address"


# -- no request reads a file that is not an indexed image --------------------------------

def test_no_request_reads_a_file_that_is_not_an_indexed_image(tmp_path):
    corpus = tmp_path / "photos"
    shutil.copytree(SAMPLE_DATA / "labelled" / "tench", corpus / "tench")
    photos = sorted((corpus / "tench").glob("*.jpg"))
    secret_dir = tmp_path / "private"
    secret_dir.mkdir()
    secret = secret_dir / "secret.jpg"
    shutil.copy(SAMPLE_DATA / "queries" / "church.jpg", secret)
    (secret_dir / "passwords.txt").write_text("hunter2\n")
    # A link made before indexing is an indexed image like any other.
    (corpus / "tench" / "linked.jpg").symlink_to(SAMPLE_DATA / "queries" / "parachute.jpg")
    index_dir = tmp_path / "ix"
    run("index", corpus, "--index", index_dir, "--encoder", "tiny-color")

    with serving(index_dir) as running, Store.open(index_dir) as store:
        port = running.port
        linked = store.entry_at(str(corpus / "tench" / "linked.jpg"))
        assert request(port, "GET", f"/api/images/{linked.id}/thumbnail")[0] == 200

        # After indexing: a new link to the secret (never indexed, so no id
        # names it), an indexed file replaced by a link to the secret, one
        # replaced by another picture, and one by a pipe.
        (corpus / "tench" / "new-link.jpg").symlink_to(secret)
        relinked, recopied, piped = (store.entry_at(str(p)) for p in photos[:3])
        os.unlink(photos[0])
        photos[0].symlink_to(secret)
        shutil.copy(secret, photos[1])
        os.unlink(photos[2])
        os.mkfifo(photos[2])
        for entry in (relinked, recopied, piped):
            status, head, body = request(port, "GET", f"/api/images/{entry.id}/thumbnail", timeout=10)
            assert status == 404 and b"not on disk as it was indexed" in body

        attempts = [
            "/api/images/..%2F..%2Fprivate%2Fsecret.jpg/thumbnail",
            "/api/images/../../private/secret.jpg",
            f"/api/images/{secret}/thumbnail",
            f"/api/images/%2F{str(secret).lstrip('/').replace('/', '%2F')}/thumbnail",
            "/static/../../private/passwords.txt",
            "/static/..%2F..%2F..%2Fprivate%2Fpasswords.txt",
            "/static/%2e%2e/app.py",
            "/static/app.py",
            "/static/",
            "/api/images/-1/thumbnail",
            "/api/images/0/thumbnail",
            f"/api/images/{store.next_id}/thumbnail",
            "/api/images/99999999999999999999999/thumbnail",
            "/api/images/1.5/thumbnail",
            "/api/images/0x1/thumbnail",
            "/api/images/1%00/thumbnail",
            "/api/images/1/thumbnail/../../../../private/secret.jpg",
            f"/{secret}",
            "/api/query?name=../../private/secret.jpg",
        ]
        secret_bytes = secret.read_bytes()
        # A label is a name to look up, never a folder.
        assert get_json(port, "/api/images?label=../../private")[1]["images"] == []
        for path in attempts:
            status, head, body = request(port, "GET", path)
            assert status in (404, 405, 422), (path, status)
            assert head["content-type"].startswith("application/json"), path
            assert b"hunter2" not in body and secret_bytes[:64] not in body
        # Every thumbnail the server makes now is of an indexed picture,
        # never of the secret: the ones still on disk as indexed, and no other.
        served = set()
        for entry in store.entries():
            status, head, body = request(port, "GET", f"/api/images/{entry.id}/thumbnail")
            if status == 200:
                served.add(entry.id)
        assert served == {e.id for e in store.entries()} - {relinked.id, recopied.id, piped.id}
    running.index.close()


# -- the index changes while the page runs --------------------------------------------

def test_the_server_sees_each_new_commit(tmp_path):
    corpus = tmp_path / "photos"
    shutil.copytree(SAMPLE_DATA / "labelled" / "church", corpus / "church")
    index_dir = tmp_path / "ix"
    run("index", corpus, "--index", index_dir, "--encoder", "tiny-color")
    with serving(index_dir) as running:
        port = running.port
        wait_ready(port)
        assert get_json(port, "/api/info")[1]["count"] == 10
        before = get_json(port, "/api/query?k=3&include_self=true", "POST", QUERY.read_bytes())[1]
        assert all(row["label"] == "church" for row in before["results"])

        # `imgsearch index` adds to the index while the server runs (the
        # writer takes the lock; the server only reads).
        shutil.copytree(SAMPLE_DATA / "labelled" / "tench", corpus / "tench")
        shutil.copy(QUERY, corpus / "tench" / "the-query.jpg")
        run("index", corpus, "--index", index_dir, "--encoder", "tiny-color")

        info = get_json(port, "/api/info")[1]
        assert info["count"] == 21 and info["labels"] == {"church": 10, "tench": 11}
        assert get_json(port, "/api/images?label=tench")[1]["total"] == 11
        after = get_json(port, "/api/query?k=3&include_self=true", "POST", QUERY.read_bytes())[1]
        assert after["results"][0]["path"] == str(corpus / "tench" / "the-query.jpg")
        assert after["results"][0]["score"] == pytest.approx(1.0, abs=1e-5)
        new_id = after["results"][0]["id"]
        assert request(port, "GET", f"/api/images/{new_id}/thumbnail")[0] == 200
        assert get_json(port, f"/api/images/{new_id}/similar?k=2")[0] == 200

        # And removals: the image's id is gone.
        run("remove", corpus / "tench" / "the-query.jpg", "--index", index_dir)
        assert get_json(port, "/api/info")[1]["count"] == 20
        assert get_json(port, f"/api/images/{new_id}/similar")[0] == 404
        assert request(port, "GET", f"/api/images/{new_id}/thumbnail")[0] == 404
    running.index.close()


# -- the command ----------------------------------------------------------------------

def _an_address_besides_loopback() -> str | None:
    """This machine's address on its default route, if it has one (a UDP
    "connection" only picks the route; nothing is sent)."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.1", 9))  # TEST-NET-1, never routed anywhere real
        address = probe.getsockname()[0]
    except OSError:
        return None
    finally:
        probe.close()
    return None if address.startswith("127.") else address


@pytest.mark.slow
def test_the_serve_command_listens_on_loopback_and_stops_on_sigterm(index_dir):
    exe = shutil.which("imgsearch", path=os.path.dirname(sys.executable)) or shutil.which("imgsearch")
    port = _free_port()
    process = subprocess.Popen([exe, "--plugins-dir", str(PLUGINS_DIR), "serve", "--index", str(index_dir),
                                "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:  # uvicorn's log line, once it listens
            assert time.monotonic() < deadline and process.poll() is None, process.stderr.read()
            address = re.search(r"imgsearch: serving index .* on http://(\S+):(\d+) ", process.stderr.readline())
            if address:
                break
        assert address.groups() == ("127.0.0.1", str(port))
        while True:  # the line comes as the socket is bound, moments before it listens
            try:
                assert get_json(port, "/api/info")[1]["count"] == 50
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        other = _an_address_besides_loopback()
        if other is not None:  # nothing listens there
            with pytest.raises(OSError):
                socket.create_connection((other, port), timeout=5).close()
    finally:
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert "Traceback" not in err


def test_the_serve_command_refuses_a_missing_index(tmp_path):
    result = run("serve", "--index", tmp_path / "nothing", code=1)
    assert "no index at" in result.stderr


def test_the_thumbnail_cache_drops_the_least_recently_used_beyond_its_size():
    from imgsearch.web.thumbnails import ThumbnailCache

    cache = ThumbnailCache(max_bytes=10)
    cache.put((1, "a"), b"1234")
    cache.put((2, "b"), b"5678")
    assert cache.get((1, "a")) == b"1234"  # now the most recently used
    cache.put((3, "c"), b"90ab")  # 12 bytes: one must go, the least recently used
    assert (cache.get((2, "b")), cache.get((1, "a")), cache.get((3, "c"))) == (None, b"1234", b"90ab")
    assert cache.bytes == 8 and len(cache) == 2
    cache.put((4, "d"), b"x" * 11)  # larger than the whole cache: kept by nobody
    assert len(cache) == 0 and cache.bytes == 0


def test_without_its_encoder_the_page_still_browses_and_says_why_uploads_fail(index_dir):
    from imgsearch import Index
    from imgsearch.web.app import create_app

    # Opened without the test plugins: the index's encoder is unknown here.
    index = Index.open(index_dir)
    with Running(create_app(index)) as running:
        deadline = time.monotonic() + 30
        while (info := get_json(running.port, "/api/info")[1])["server"]["load_error"] is None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert "tiny-color" in info["server"]["load_error"] and not info["server"]["ready"]
        status, page = get_json(running.port, "/api/images?limit=5")
        assert status == 200 and len(page["images"]) == 5
        assert request(running.port, "GET", page["images"][0]["thumbnail"])[0] == 200
        assert get_json(running.port, f"/api/images/{page['images'][0]['id']}/similar")[0] == 200
        status, answer = get_json(running.port, "/api/query", "POST", QUERY.read_bytes())
        assert status == 503 and "tiny-color" in answer["error"]
    index.close()
