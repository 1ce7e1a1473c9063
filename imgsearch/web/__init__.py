"""``imgsearch serve``: a local web page and JSON API over an index.

The page's HTML, CSS and script are package files under ``static/``; the
server is :mod:`imgsearch.web.app` (FastAPI, from the ``serve`` extra),
thumbnails are :mod:`imgsearch.web.thumbnails`.
"""
