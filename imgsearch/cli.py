"""The ``imgsearch`` command: a thin layer over the library API.

Commands parse options, call :mod:`imgsearch.index`, and format what comes
back.  Results go to stdout; progress, warnings and errors go to stderr.
Heavy modules are imported inside the commands so that ``--help`` is instant.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import sqlite3
import sys

import click

from . import __version__
from .results import classification_json, hit_rows, query_json
from .tables import columns

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
FORMATS = click.Choice(["table", "json", "csv"])


class _PositiveNumber(click.ParamType):
    """A finite number above zero (click's FloatRange lets nan and inf through)."""

    name = "number"

    def convert(self, value, param, ctx):
        import math

        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not (math.isfinite(number) and number > 0):
            self.fail(f"{value!r} must be a finite number above zero", param, ctx)
        return number


POSITIVE = _PositiveNumber()


class _FormatList(click.ParamType):
    """Comma-separated Pillow format names, checked against those Pillow reads."""

    name = "list"

    def convert(self, value, param, ctx):
        from .errors import UsageError
        from .images import check_formats

        if isinstance(value, tuple):
            return value
        try:
            return check_formats(str(value).split(","))
        except UsageError as exc:
            self.fail(str(exc), param, ctx)


image_formats_option = click.option(
    "--image-formats", "image_formats", type=_FormatList(), default=None, metavar="LIST",
    help="Image formats to read, as Pillow names them, comma-separated (default: "
         "JPEG,PNG,WEBP,BMP,GIF,TIFF); files in other formats are refused. Example: JPEG,PNG,PPM.")


def max_megapixels_option(default: float, help_text: str):
    return click.option("--max-megapixels", type=POSITIVE, default=default, show_default=True,
                        help=help_text + " (decompression-bomb guard).")


class _Failure(click.ClickException):
    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class _Group(click.Group):
    """Turns every failure into one line on stderr and an exit code."""

    def invoke(self, ctx):
        from .errors import DamagedIndexError, ImgsearchError

        try:
            return super().invoke(ctx)
        except DamagedIndexError as exc:
            # The next step.  'info' shows how the index was built whatever
            # the damage, which rebuilding it needs.
            shown = "" if ctx.invoked_subcommand == "info" else "'imgsearch info' still shows how it was built; "
            hint = (f"; {shown}a damaged file cannot be mended in place: restore the folder from a backup, "
                    "or index the images again into a new one")
            raise _Failure(f"{exc}{hint}", exc.exit_code) from None
        except ImgsearchError as exc:
            raise _Failure(str(exc), exc.exit_code) from None
        except KeyboardInterrupt:
            raise _Failure("interrupted", 130) from None
        except (click.ClickException, click.exceptions.Exit, click.Abort, BrokenPipeError):
            raise
        except sqlite3.DatabaseError as exc:
            raise _Failure(f"the index metadata is damaged or unreadable ({exc})", 1) from None
        except Exception as exc:
            # A bug of ours or a library's: still one line, never a traceback
            # (IMGSEARCH_DEBUG=1 shows it).
            if os.environ.get("IMGSEARCH_DEBUG"):
                raise
            raise _Failure(f"unexpected {type(exc).__name__}: {exc}", 1) from None

    def format_commands(self, ctx, formatter):
        # Each command's first sentence whole, wrapped, rather than click's
        # cut at the terminal's width ("Fit a linear classifier on the...").
        rows = []
        for name in self.list_commands(ctx):
            command = self.get_command(ctx, name)
            if command is not None and not command.hidden:
                rows.append((name, command.get_short_help_str(limit=1000)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def main(self, args=None, prog_name=None, **extra):
        extra.pop("standalone_mode", None)
        args = _plugins_dir_first(sys.argv[1:] if args is None else list(args))
        try:
            result = super().main(args, prog_name, standalone_mode=False, **extra)
        except click.UsageError as exc:
            hint = f" (see '{exc.ctx.command_path} -h')" if exc.ctx else ""
            click.echo(f"Error: {exc.format_message()}{hint}", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            _end_open_bars()
            exc.show()
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("Aborted.", err=True)
            sys.exit(1)
        except BrokenPipeError:
            # The reader went away (`| head`): stop quietly, and keep Python
            # from complaining again when it flushes stdout at exit.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            sys.exit(1)
        sys.exit(result if isinstance(result, int) else 0)


class _NoticeHandler(logging.Handler):
    """The library's logged notices (an export under way, a fallback taken)
    on stderr, where the CLI puts everything that is not a result.  Looks
    sys.stderr up on each message, so a replaced stream (tests) is followed."""

    def emit(self, record):
        try:
            click.echo(self.format(record), err=True)
        except Exception:
            self.handleError(record)


def _show_library_notices() -> None:
    logger = logging.getLogger("imgsearch")
    if not any(isinstance(h, _NoticeHandler) for h in logger.handlers):
        handler = _NoticeHandler(logging.WARNING)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)


def _plugins_dir_first(args: list[str]) -> list[str]:
    """``--plugins-dir DIR`` moved before the command, where click takes a
    group's options: users put it after the command as often as before."""
    for number, arg in enumerate(args):
        if arg == "--":
            break
        if arg.startswith("--plugins-dir=") and number:
            return [arg, *args[:number], *args[number + 1:]]
        if arg == "--plugins-dir" and number and number + 1 < len(args):
            return [arg, args[number + 1], *args[:number], *args[number + 2:]]
    return args


def _terminate_as_interrupt() -> None:
    """SIGTERM stops long work the way Ctrl-C does: committed work is kept
    and the user is told how to resume."""
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def _open_errors_csv(path: str, index_dir: str):
    """The --errors file, opened before any work: a wrong place is a usage
    error at once, and the index's own files are never written over."""
    target, index = os.path.realpath(path), os.path.realpath(index_dir)
    if target == index or target.startswith(index.rstrip(os.sep) + os.sep):
        raise click.UsageError(f"--errors {path} is inside the index folder; choose another place")
    try:
        return open(path, "w", newline="", encoding="utf-8")
    except OSError as exc:
        raise click.UsageError(f"cannot write --errors file {path}: {exc.strerror or exc}") from None


# Bars drawn and not finished: a failure (Ctrl-C) ends their line before
# its message, which would otherwise follow the bar on the same line.
_OPEN_BARS: list = []


def _end_open_bars() -> None:
    while _OPEN_BARS:
        _OPEN_BARS.pop()
        click.echo(err=True)


def _html_target(path, index_dir):
    """An --html page path, checked before any work (None when not asked)."""
    if path is None:
        return None
    from .outputs import check_output_file

    return check_output_file(path, "--html", index_dir)


def _progress_bar(label: str):
    """A progress(done, total) callback drawing a bar on stderr."""
    state = {}

    def progress(done, total):
        if "bar" not in state:
            # Nothing to follow when done in one step, and nothing to draw
            # on a pipe or a log file (click would write the label alone).
            if done >= total or not sys.stderr.isatty():
                return
            state["bar"] = click.progressbar(length=total, label=label, file=sys.stderr)
            _OPEN_BARS.append(state["bar"])  # first: Ctrl-C may come while it is drawn
            state["bar"].__enter__()
        state["bar"].update(done - state["bar"].pos)
        if done >= total:
            bar = state.pop("bar")
            _OPEN_BARS.remove(bar)
            bar.__exit__(None, None, None)

    return progress


def _count(number: int, thing: str) -> str:
    """'1 image', '2 images'."""
    return f"{number} {thing}{'' if number == 1 else 's'}"


def _copies(number: int) -> str:
    """Paths of identical files, stored once: '1 identical copy' (a
    'duplicate path' read like a problem)."""
    return f"{number} identical cop{'y' if number == 1 else 'ies'}"


def _warn(message: str) -> None:
    click.echo(f"warning: {message}", err=True)


def _warn_if_random(index) -> None:
    if index.random_weights:
        _warn(
            f"index {index.store.directory} was built with random weights (--weights none); "
            "its results are meaningless"
        )


def _table(rows: list[list[str]], header: list[str]) -> str:
    return columns(header, rows)


def _csv_writer():
    return csv.writer(sys.stdout, lineterminator="\n")


def _index_folder(ctx, param, value):
    """--index, else IMGSEARCH_INDEX, else a .imgsearch index found from
    here upwards, else the per-user default; how is kept for 'info'."""
    from click.core import ParameterSource

    if value is not None:
        source = ctx.get_parameter_source(param.name)
        ctx.meta["index_source"] = "IMGSEARCH_INDEX" if source == ParameterSource.ENVIRONMENT else "--index"
        return value
    from .paths import default_index

    folder, how = default_index()
    ctx.meta["index_source"] = how
    return str(folder)


index_option = click.option(
    "--index", "index_dir", envvar="IMGSEARCH_INDEX", default=None, callback=_index_folder, metavar="DIR",
    type=click.Path(file_okay=False),
    help="Index folder (env IMGSEARCH_INDEX; default: a .imgsearch index in this folder or one above it, "
         "else the per-user index, as 'info' shows).")
weights_option = click.option(
    "--weights", metavar="WEIGHTS", default=None,
    help="'imagenet' (default), a local weights file, or 'none' (random; tests only); for "
         "--encoder saved-model the model: a .keras file, a SavedModel or TF-Hub folder, or a model spec .json.",
)
runtime_option = click.option(
    "--runtime", type=click.Choice(["auto", "openvino", "keras"]), default="auto", show_default=True,
    help="Where the encoder runs: auto picks OpenVINO (exported once, cached) and falls back to Keras.",
)


def precision_option(help_text: str, choices=("fp32", "bf16", "int8")):
    return click.option("--precision", type=click.Choice(list(choices)), default=None, help=help_text)


check_encoder_option = click.option(
    "--encoder", default=None, metavar="NAME",
    help="Encoder to embed with; must be the one the index was built with (the default).",
)
format_option = click.option("--format", "fmt", type=FORMATS, default="table", show_default=True,
                             help="Output format; json is JSON Lines.")
html_option = click.option(
    "--html", "html_path", type=click.Path(dir_okay=False), default=None, metavar="FILE",
    help="Also write a contact sheet: one self-contained HTML page with each image beside its "
         "neighbours (thumbnails embedded).")
images_argument = click.argument("images", nargs=-1, required=True, type=click.Path(exists=True))


def _image_files(images, formats) -> list[str]:
    """The images given, folders replaced by the image files in them (as
    'index' finds them; what it passes over is reported)."""
    from .errors import NoImagesError
    from .images import DEFAULT_FORMATS, discover, suffixes_for

    formats = formats or DEFAULT_FORMATS
    files: list[str] = []
    for image in images:
        if not os.path.isdir(image):
            files.append(image)
            continue
        found, skipped = discover([image], suffixes_for(formats), formats)
        for skip in skipped:
            _warn(f"skipped {skip.path}: {skip.reason}")
        files.extend(str(file.path) for file in found)
    if not files:
        raise NoImagesError("no image files found in " + ", ".join(images))
    return files


def _memory(ctx, param, value):
    if value is None:
        return None
    from .store.ann import parse_memory

    try:
        return parse_memory(value)
    except Exception as exc:  # UsageError: shown as click's own bad-parameter line
        raise click.BadParameter(str(exc)) from None


def index_type_options(command):
    """--index-type, --target-recall and --max-memory, for index and optimize."""
    for option in reversed([
        click.option("--index-type", type=click.Choice(["auto", "flat", "hnsw", "ivf-sq8", "ivf-pq"]),
                     default=None, help="Approximate index for the merged part (default: the index's own; "
                                        "auto for a new one: flat below 50,000 images, else ivf-sq8 or, "
                                        "past the memory budget, ivf-pq)."),
        click.option("--target-recall", type=click.FloatRange(0, 1, min_open=True), default=None,
                     help="Recall@10 against exact search that the search parameters are tuned to "
                          "(default 0.95)."),
        click.option("--max-memory", callback=_memory, default=None, metavar="SIZE",
                     help="Memory budget of the index for auto, e.g. 2G (default: a quarter of RAM, "
                          "at most 4G)."),
    ]):
        command = option(command)
    return command


def _size(value) -> str | None:
    if value is None:
        return None
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024


def _open(ctx, index_dir, encoder=None, weights=None, runtime="auto", precision=None):
    from .index import Index

    return Index.open(index_dir, plugins_dir=ctx.obj["plugins_dir"], encoder=encoder, weights=weights,
                      runtime=runtime, precision=precision)


READ_PRECISION_HELP = ("Precision to embed with (default: the index's own); fp32 works on any index, "
                       "bf16 where the encoder offers it, int8 only on an int8 index.")


@click.group(cls=_Group, context_settings=CONTEXT)
@click.version_option(__version__, "--version", prog_name="imgsearch")
@click.option("--plugins-dir", type=click.Path(file_okay=False), envvar="IMGSEARCH_PLUGINS_DIR",
              help="Folder of extra encoder plugin files (env IMGSEARCH_PLUGINS_DIR).")
@click.pass_context
def main(ctx, plugins_dir):
    """Image similarity search: index a photo collection, then find similar
    images and classify new ones by their labelled neighbours.

    \b
    Quick start:
      imgsearch index photos/ --index my-index
      imgsearch query query.jpg --index my-index -k 5
      imgsearch classify new.jpg --index my-index

    The default encoder, resnet50, downloads its weights on first use;
    offline, index with --encoder efficientnet-lite0 ('imgsearch encoders'
    shows which encoders can run here).
    """
    ctx.ensure_object(dict)
    ctx.obj["plugins_dir"] = plugins_dir
    _show_library_notices()
    # TensorFlow's C++ start-up chatter (CPU features, oneDNN notices) would
    # bury the one line a user needs; a user's own setting still wins.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


@main.command()
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True,
              help="Output format; json is JSON Lines, one object per encoder.")
@click.pass_context
def encoders(ctx, fmt):
    """List the registered encoders and whether their weights are here.

    \b
    Example:
      imgsearch encoders --format json
    """
    from .encoders import load_registry
    from .index import DEFAULT_ENCODER
    from .runtime import exportable

    registry = load_registry(ctx.obj["plugins_dir"])
    default = os.environ.get("IMGSEARCH_ENCODER") or DEFAULT_ENCODER
    rows = []
    for name in registry.names():
        encoder = registry.create(name)
        status = encoder.weights_status()
        # bf16 and int8 run only on an exported Keras model.
        precisions = list(encoder.precisions) if exportable(encoder) else ["fp32"]
        rows.append({
            "name": name, "dim": encoder.dim, "description": encoder.description,
            "weights": encoder.weights, "weights_available": status.available,
            "weights_detail": status.detail, "source": registry.source(name),
            "precisions": precisions, "default": name == default,
        })
    if fmt == "json":
        for row in rows:
            click.echo(json.dumps(row))
        return
    click.echo(_table(
        [[r["name"] + (" (default)" if r["default"] else ""), r["dim"] or "model's",
          "yes" if r["weights_available"] else "no", ",".join(r["precisions"]), r["description"]] for r in rows],
        ["name", "dim", "weights here", "precisions", "description"],
    ))
    for row in rows:
        if not row["weights_available"]:
            click.echo(f"{row['name']}: {row['weights_detail']}", err=True)
    ready = [r["name"] for r in rows if r["weights_available"]]
    chosen = next((r for r in rows if r["default"]), None)
    if chosen is None:
        _warn(f"the default encoder {default!r} (IMGSEARCH_ENCODER) is not registered")
    elif not chosen["weights_available"]:
        others = f"; where they cannot be fetched, pass --encoder {ready[0]}" if ready else ""
        click.echo(f"note: new indexes use {default} unless --encoder says otherwise, and its weights are not "
                   f"here{others}", err=True)


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@index_option
@click.option("--encoder", default=None, metavar="NAME",
              help="Encoder for a new index (default: env IMGSEARCH_ENCODER, else resnet50). "
                   "An existing index keeps its own; naming another is an error.")
@weights_option
@click.option("--labels", "labels_csv", type=click.Path(exists=True, dir_okay=False),
              help="CSV of path,label rows; overrides folder-name labels.")
@runtime_option
@precision_option("Precision of a new index (default fp32): bf16 and int8 are faster and approximate "
                  "fp32; int8 is calibrated on the images being indexed. An existing index keeps its "
                  "own; naming another is an error.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Images per encoder batch.")
@click.option("--commit-every", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Commit to disk after this many new images.")
@max_megapixels_option(100.0, "Skip images larger than this")
@image_formats_option
@click.option("--prune", is_flag=True, help="Also forget indexed files that no longer exist.")
@index_type_options
@click.option("--no-optimize", is_flag=True,
              help="Do not optimize at the end even when it is due (run 'imgsearch optimize' later); small "
                   "segments are still merged among themselves as the run goes.")
@click.option("--errors", "errors_csv", type=click.Path(dir_okay=False, writable=True),
              help="Write every skipped path and its reason to this CSV file.")
@click.option("--strict", is_flag=True, help="Exit with an error when any file was skipped.")
@click.option("--ray", "ray_address", is_flag=False, flag_value="auto", default=None, metavar="[auto|local|HOST:PORT]",
              help="Decode and embed on a Ray cluster (pip install 'imgsearch[ray]'): auto (the default "
                   "when --ray is given alone) joins RAY_ADDRESS or a cluster started here with 'ray start', "
                   "else starts one for this run; local always starts one; HOST:PORT joins that head node. "
                   "Images must be readable "
                   "under the same paths on every node.")
@click.option("--ray-gpus", type=click.FloatRange(min=0), default=0.0, show_default=True, metavar="N",
              help="GPUs per Ray encoding actor (0: CPU actors, one per node).")
@click.option("--backend", default=None, metavar="NAME",
              help="Where a new index keeps its vectors: faiss (the default: files in the index folder) or "
                   "a backend plugin such as milvus (pip install 'imgsearch[milvus]'). An existing index "
                   "keeps its own.")
@click.option("--backend-uri", "--milvus-uri", "backend_uri", default=None, metavar="URI",
              help="Server of a new index's backend, e.g. http://localhost:19530, or a Milvus Lite file "
                   "such as vectors.db; recorded in the index.")
@click.option("--backend-collection", "--milvus-collection", "backend_collection", default=None, metavar="NAME",
              help="Collection of a new index's vectors in the backend (default: made from the index "
                   "folder's name); an existing collection must be empty.")
@click.pass_context
def index(ctx, paths, index_dir, encoder, weights, runtime, precision, labels_csv, batch_size, commit_every,
          max_megapixels, image_formats, prune, index_type, target_recall, max_memory, no_optimize, errors_csv,
          strict, ray_address, ray_gpus, backend, backend_uri, backend_collection):
    """Add the images in PATHS (files and folders, recursively) to an index.

    Images in class folders (ROOT/LABEL/image.jpg) are labelled with the
    folder's name.  Running it again embeds only new or changed files and
    resumes an interrupted run.

    \b
    Examples:
      imgsearch index photos/ --index my-index
      imgsearch index train/ --index pets --encoder efficientnet-lite0
      imgsearch index photos/ --index mine --encoder saved-model --weights my_model.json
      imgsearch index photos/ --index my-index --prune --errors skipped.csv
      imgsearch index /shared/photos --index my-index --ray 10.0.0.5:6379
      imgsearch index photos/ --index my-index --backend milvus --milvus-uri http://localhost:19530
    """
    from .images import check_some_exist
    from .index import Index, read_labels_csv

    check_some_exist(paths)
    if ray_gpus and not ray_address:
        raise click.UsageError("--ray-gpus needs --ray")
    if (backend_uri or backend_collection) and not backend:
        raise click.UsageError("--milvus-uri/--backend-uri and --milvus-collection/--backend-collection need "
                               "--backend (e.g. --backend milvus)")
    options = {key: value for key, value in (("uri", backend_uri), ("collection", backend_collection)) if value}
    _terminate_as_interrupt()
    errors_out = _open_errors_csv(errors_csv, index_dir) if errors_csv else None
    labels = read_labels_csv(labels_csv) if labels_csv else None
    with Index.build(index_dir, encoder=encoder, weights=weights, plugins_dir=ctx.obj["plugins_dir"],
                     default_encoder=os.environ.get("IMGSEARCH_ENCODER"), runtime=runtime,
                     precision=precision, calibration=list(paths), index_type=index_type or "auto",
                     target_recall=target_recall, max_memory=max_memory, backend=backend,
                     backend_options=options) as idx:
        _warn_if_random(idx)
        if ctx.meta.get("index_source") not in ("--index", "IMGSEARCH_INDEX"):
            click.echo(f"index: {index_dir} ({ctx.meta['index_source']}; --index names another)", err=True)
        click.echo(f"encoder: {idx.encoder.name} ({idx.encoder.dim}-d, {idx.encoder.runtime_name})", err=True)
        report = idx.add(paths, labels=labels, batch_size=batch_size, commit_every=commit_every,
                         max_megapixels=max_megapixels, formats=image_formats, progress=_progress_bar("indexing"),
                         ray=ray_address, ray_gpus=ray_gpus)
        pruned = idx.prune() if prune else None
        click.echo(
            f"added {report.added}, updated {report.updated}, moved {report.moved}, "
            f"unchanged {report.unchanged}, duplicates {len(report.duplicates)}, "
            f"skipped {len(report.skipped)} in {report.seconds:.1f} s; "
            f"{index_dir} holds {idx.store.count} images"
        )
        if pruned is not None:
            click.echo(f"pruned {_count(pruned.removed, 'image')} and {_copies(pruned.paths_only)} "
                       "whose files are gone")
        kind, reason = idx.optimize_due() or (None, None)
        if (index_type or target_recall or max_memory) and not idx.store.created_here:
            kind, reason = "optimize", "new search settings"
        if kind == "optimize" and not no_optimize:
            click.echo(f"optimizing: {reason}", err=True)
            _echo_optimized(idx.optimize(index_type=index_type, target_recall=target_recall,
                                         max_memory=max_memory, progress=_stage_bar()))
        if report.relabelled:
            click.echo(f"relabelled {report.relabelled} indexed images from {labels_csv}")
        if report.unmatched_labels:
            count = len(report.unmatched_labels)
            _warn(f"{count} {'row' if count == 1 else 'rows'} of {labels_csv} name no image found here "
                  f"(first: {report.unmatched_labels[0]})")
        # Notices, not results: stderr, as every warning.
        for path, original in report.duplicates:
            click.echo(f"duplicate: {path} (same content as {original})", err=True)
        for skip in report.skipped:
            click.echo(f"skipped: {skip.path}: {skip.reason}", err=True)
        if errors_out:
            with errors_out:
                out = csv.writer(errors_out)
                out.writerow(["path", "reason"])
                out.writerows([str(skip.path), skip.reason] for skip in report.skipped)
        if strict and report.skipped:
            raise _Failure(f"{len(report.skipped)} files were skipped (--strict); the others are indexed", 1)


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@index_option
@click.pass_context
def remove(ctx, paths, index_dir):
    """Forget files, and every file under folders, from an index.

    The files need not exist any more.  To forget every file that no longer
    exists, use 'imgsearch index ... --prune'.

    \b
    Example:
      imgsearch remove photos/2019/ old.jpg --index my-index
    """
    from .index import Index

    with Index.open(index_dir, plugins_dir=ctx.obj["plugins_dir"], writable=True) as idx:
        report = idx.remove(paths)
        for path in report.not_indexed:
            _warn(f"not in the index: {path}")
        if not report.removed and not report.paths_only:
            raise _Failure("none of the given paths is in the index", 1)
        click.echo(f"removed {_count(report.removed, 'image')} and {_copies(report.paths_only)}; "
                   f"{index_dir} holds {idx.store.count} images")


def _stage_bar():
    """A progress callback for work in stages (checking, merging, building)."""
    bars: dict[str, object] = {}

    def progress(stage, done, total):
        if stage not in bars:
            bars[stage] = _progress_bar(stage)
        bars[stage](done, total)

    return progress


def _echo_optimized(report) -> None:
    if not (report.merged or report.rebuilt):
        click.echo(f"nothing to do: {report.vectors} vectors already in one {report.index_type} index")
        return
    recall = "" if report.recall_at_10 is None else f", recall@10 {report.recall_at_10:.3f}"
    params = report.params or {}
    refine = f", re-ranking {params['refine']}x" if "refine" in params else ""
    tuned = f" ({params['name']} {params['value']}{refine})" if "name" in params else ""
    click.echo(f"optimized: {report.vectors} vectors from {report.segments_before} "
               f"segment{'' if report.segments_before == 1 else 's'}, "
               f"{report.tombstones_dropped} removed vectors dropped; index type {report.index_type}"
               f"{tuned}{recall}; {report.seconds:.1f} s")
    if report.recall_at_10 is not None and report.recall_at_10 < report.target_recall:
        _warn(f"recall@10 {report.recall_at_10:.3f} is below the target {report.target_recall} even at the most "
              "thorough setting; a finer index type (flat, ivf-sq8, hnsw) reaches it")


@main.command()
@index_option
@index_type_options
@click.option("--force", is_flag=True, help="Rebuild the approximate index even when nothing changed.")
@click.pass_context
def optimize(ctx, index_dir, index_type, target_recall, max_memory, force):
    """Merge an index's segments into one and build its approximate index.

    Each commit adds a segment that is searched exactly; this folds them
    into one, drops removed vectors, and builds the index type asked for
    (default: what the index records, 'auto' when new), tuned to the target
    recall on the index's own vectors.  'imgsearch index' does this by
    itself when a merge is due.  Interrupting it loses nothing.  It also
    converts an index made by an older imgsearch.

    \b
    Examples:
      imgsearch optimize --index my-index
      imgsearch optimize --index my-index --index-type ivf-pq --target-recall 0.9
    """
    from .index import Index

    _terminate_as_interrupt()
    with Index.open(index_dir, plugins_dir=ctx.obj["plugins_dir"], writable=True) as idx:
        _echo_optimized(idx.optimize(index_type=index_type, target_recall=target_recall,
                                     max_memory=max_memory, force=force, progress=_stage_bar()))


@main.command()
@index_option
@click.option("--repair", is_flag=True,
              help="Mend what can be mended: remove files left by unfinished commits, rewrite a missing, "
                   "damaged or stale manifest.json from the metadata; for a remote backend, also delete "
                   "vectors no image names and forget images whose vector is missing (the next 'imgsearch "
                   "index' embeds their files again).  Without it, verify changes nothing.")
@click.pass_context
def verify(ctx, index_dir, repair):
    """Check an index: metadata, vectors and manifest against each other.

    Exits with 1 when something is wrong.

    \b
    Example:
      imgsearch verify --index my-index
    """
    from .store import Store

    # Checked under the writer lock: a commit landing halfway through the
    # checks would look like damage.  Without --repair nothing is written.
    store = Store.open(index_dir, writable=repair, exclusive=True, check_manifest=False)
    with store:
        if repair:
            if store.cleaned:
                click.echo(f"repaired: removed files left by an unfinished commit: {', '.join(sorted(store.cleaned))}")
            if store.repair_manifest_copy():
                click.echo("repaired: rewrote manifest.json from the metadata")
            for done in store.backend.repair():
                click.echo(f"repaired: {done}")
        problems, notes = store.verify(progress=_progress_bar("verifying"))
        for note in notes:
            click.echo(f"note: {note}")
        for problem in problems:
            click.echo(f"problem: {problem}")
        if problems:
            raise _Failure(f"index {index_dir} has {len(problems)} problems", 1)
        click.echo(f"ok: {_count(store.count, 'image')} and {_copies(store.alias_count())} (stored once), "
                   f"dimension {store.dim}, {_count(len(store.segments), 'segment')}")


@main.command()
@images_argument
@index_option
@click.option("-k", type=click.IntRange(min=1), default=10, show_default=True, help="Neighbours per image.")
@click.option("--include-self", is_flag=True, help="Allow an indexed image to be its own neighbour.")
@check_encoder_option
@weights_option
@runtime_option
@precision_option(READ_PRECISION_HELP)
@image_formats_option
@max_megapixels_option(100.0, "Refuse larger query images")
@click.option("--min-score", type=click.FloatRange(-1, 1), default=None,
              help="Leave out neighbours less similar than this (cosine, -1 to 1).")
@click.option("--label", "only_label", default=None, metavar="LABEL",
              help="Only neighbours with this label.")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv", "paths"]), default="table",
              show_default=True, help="Output format; json is JSON Lines; paths prints the neighbours' paths "
                                      "alone, one a line, for other tools.")
@html_option
@click.pass_context
def query(ctx, images, index_dir, k, include_self, encoder, weights, runtime, precision, image_formats,
          max_megapixels, min_score, only_label, fmt, html_path):
    """Find the indexed images most similar to each of IMAGES (files, or
    folders of them).

    \b
    Examples:
      imgsearch query photo.jpg --index my-index -k 5
      imgsearch query a.jpg b.jpg --index my-index --format json
      imgsearch query new-photos/ --index my-index --min-score 0.8 --label beach --format paths
      imgsearch query *.jpg --index my-index --html sheet.html
    """
    html_path = _html_target(html_path, index_dir)
    with _open(ctx, index_dir, encoder, weights, runtime, precision) as idx:
        _warn_if_random(idx)
        idx.formats = image_formats or idx.formats
        idx.max_megapixels = max_megapixels
        if idx.store.count == 0:
            raise _Failure(f"index {index_dir} is empty; add images with 'imgsearch index'", 1)
        if k > idx.store.count:
            _warn(f"k={k} but the index holds {idx.store.count} images")
        if only_label is not None and only_label not in idx.store.labels():
            _warn(f"no indexed image has the label {only_label!r}")
        results = idx.query(_image_files(images, image_formats), k=k, include_self=include_self,
                            min_score=min_score, label=only_label, progress=_progress_bar("embedding"))
    if html_path:
        from .sheets import write_page
        from .sheets.contact import query_sheet

        write_page(html_path, query_sheet(results, idx))
    if fmt == "paths":
        for result in results:
            for hit in result.hits:
                click.echo(hit.entry.path)
        return
    if fmt == "json":
        for result in results:
            click.echo(json.dumps(query_json(result)))
    elif fmt == "csv":
        out = _csv_writer()
        out.writerow(["query", "rank", "path", "score", "label"])
        for result in results:
            for row in hit_rows(result.hits):
                out.writerow([result.query, row["rank"], row["path"], f"{row['score']:.6f}", row["label"] or ""])
    else:
        for number, result in enumerate(results):
            if number:
                click.echo()
            click.echo(f"query: {result.query}")
            click.echo(_table(
                [[r["rank"], f"{r['score']:.4f}", r["label"] or "", r["path"]] for r in hit_rows(result.hits)],
                ["rank", "score", "label", "path"],
            ))


@main.command()
@images_argument
@index_option
@click.option("-k", type=click.IntRange(min=1), default=20, show_default=True, help="Neighbours that vote.")
@click.option("--vote", type=click.Choice(["weighted", "majority"]), default="weighted", show_default=True,
              help="weighted: each neighbour counts exp(similarity / T); majority: one each.")
@click.option("--temperature", type=POSITIVE, default=0.07, show_default=True,
              help="T of the weighted vote.")
@click.option("--include-self", is_flag=True, help="Let an indexed image vote for itself.")
@click.option("--method", type=click.Choice(["knn", "linear"]), default="knn", show_default=True,
              help="knn: neighbours vote; linear: the classifier of 'imgsearch train-classifier'.")
@check_encoder_option
@weights_option
@runtime_option
@precision_option(READ_PRECISION_HELP)
@image_formats_option
@max_megapixels_option(100.0, "Refuse larger images")
@format_option
@html_option
@click.pass_context
def classify(ctx, images, index_dir, k, vote, temperature, include_self, method, encoder, weights, runtime,
             precision, image_formats, max_megapixels, fmt, html_path):
    """Label each of IMAGES (files, or folders of them) by a vote of its k
    nearest labelled neighbours.

    \b
    Examples:
      imgsearch classify new.jpg --index my-index
      imgsearch classify *.jpg --index my-index -k 10 --vote majority --format csv
      imgsearch classify *.jpg --index my-index --html labels.html
    """
    html_path = _html_target(html_path, index_dir)
    with _open(ctx, index_dir, encoder, weights, runtime, precision) as idx:
        _warn_if_random(idx)
        idx.formats = image_formats or idx.formats
        idx.max_megapixels = max_megapixels
        results = idx.classify(_image_files(images, image_formats), k=k, vote=vote, temperature=temperature,
                               include_self=include_self, method=method, progress=_progress_bar("classifying"))
    if html_path:
        from .sheets import write_page
        from .sheets.contact import classify_sheet

        write_page(html_path, classify_sheet(results, idx))
    if fmt == "json":
        for r in results:
            click.echo(json.dumps(classification_json(r)))
    elif fmt == "csv":
        out = _csv_writer()
        out.writerow(["path", "label", "confidence", "nearest_path", "nearest_score", "nearest_label"])
        for r in results:
            top = r.neighbours[0] if r.neighbours else None
            out.writerow([r.path, r.label or "", f"{r.confidence:.6f}",
                          top.entry.path if top else "", f"{top.score:.6f}" if top else "",
                          (top.entry.label or "") if top else ""])
    else:
        rows = []
        for r in results:
            nearest = ", ".join(f"{h.entry.label or '?'} {h.score:.2f}" for h in r.neighbours[:3])
            rows.append([r.path, r.label or "(none)", f"{r.confidence:.3f}", nearest])
        click.echo(_table(rows, ["image", "label", "confidence", "nearest neighbours"]))


def _k_list(ctx, param, value):
    try:
        # int() refuses an empty part, so "1,,5" is an error, not a typo let through.
        ks = sorted({int(part) for part in str(value).split(",")})
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of numbers") from None
    if not ks or ks[0] < 1:
        raise click.BadParameter("k values must be whole numbers of at least 1")
    return ks


@main.command()
@index_option
@click.option("--test", "test_paths", multiple=True, type=click.Path(exists=True),
              help="Held-out labelled images (class folders); repeat for several paths.")
@click.option("--cv", "cv_folds", type=click.IntRange(min=2), default=None, metavar="K",
              help="Stratified K-fold cross-validation over the labelled index.")
@click.option("--leave-one-out", is_flag=True, help="Classify each labelled image by all the others.")
@click.option("--labels", "labels_csv", type=click.Path(exists=True, dir_okay=False),
              help="CSV of path,label rows for the --test images.")
@click.option("-k", "ks", default="1,5,10,20", show_default=True, callback=_k_list,
              help="Neighbour counts to evaluate, comma-separated.")
@click.option("--vote", "votes", type=click.Choice(["weighted", "majority", "both"]), default="weighted",
              show_default=True, help="How the k neighbours vote (see 'classify'); both evaluates each.")
@click.option("--temperature", type=POSITIVE, default=0.07, show_default=True,
              help="T of the weighted vote: each neighbour counts exp(similarity / T).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the cross-validation folds.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True,
              help="json: JSON Lines, one object per evaluated setting.")
@click.option("--report", "report_dir", type=click.Path(file_okay=False),
              help="Write predictions, confusion matrices (CSV and PNG), metrics and a page of them "
                   "(index.html) here.")
@runtime_option
@precision_option(READ_PRECISION_HELP + " Used for --test images.")
@max_megapixels_option(100.0, "Skip larger --test images")
@click.pass_context
def evaluate(ctx, index_dir, test_paths, cv_folds, leave_one_out, labels_csv, ks, votes, temperature, seed,
             fmt, report_dir, runtime, precision, max_megapixels):
    """Measure how accurate classification and retrieval are on labelled images.

    Choose one: --test (held-out labelled folders), --cv K, or --leave-one-out.
    Prints top-1/top-5 and balanced accuracy, precision@k and mAP@k for each
    k, per-class precision/recall/F1, the most frequent confusions, and how
    many test images have a near-duplicate in the index.  A linear classifier
    trained with 'imgsearch train-classifier' is compared side by side.

    \b
    Examples:
      imgsearch evaluate --index pets --leave-one-out -k 1,5,10,20 --vote both
      imgsearch evaluate --index train-ix --test val/ --report eval-report/
    """
    from .evaluation import evaluate as run_evaluation
    from .index import read_labels_csv
    from .report import format_table, write_report

    chosen = [bool(test_paths), cv_folds is not None, leave_one_out]
    if sum(chosen) != 1:
        raise click.UsageError("choose exactly one of --test, --cv K and --leave-one-out")
    if labels_csv and not test_paths:
        raise click.UsageError("--labels labels the --test images; the index has its own labels")
    if (precision or runtime != "auto") and not test_paths:
        raise click.UsageError("--precision and --runtime embed the --test images; --cv and "
                               "--leave-one-out use the vectors already in the index")
    if report_dir:
        from .outputs import check_output_folder

        check_output_folder(report_dir, "--report", index_dir)
    mode = "held-out" if test_paths else "cv" if cv_folds is not None else "leave-one-out"
    with _open(ctx, index_dir, runtime=runtime, precision=precision) as idx:
        _warn_if_random(idx)
        idx.max_megapixels = max_megapixels
        labelled = sum(idx.store.labels().values())
        if ks[-1] > labelled:
            _warn(f"k={ks[-1]} but the index holds {labelled} labelled images")
        result = run_evaluation(
            idx, mode=mode, test_paths=list(test_paths), folds=cv_folds or 5, ks=ks,
            labels=read_labels_csv(labels_csv) if labels_csv else None,
            votes=("weighted", "majority") if votes == "both" else (votes,),
            temperature=temperature, seed=seed, progress=_progress_bar("embedding test images"))
        if report_dir:
            # Inside: the page looks up the neighbours' paths in the index.
            try:
                written = write_report(result, report_dir, idx.store.entries_by_id)
            except OSError as exc:  # a full disk, or the folder changed since it was checked
                raise _Failure(f"cannot write the report in {report_dir}: {exc.strerror or exc}", 1) from None
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
    for skip in result.skipped:
        _warn(f"skipped {skip.path}: {skip.reason}")
    if fmt == "json":
        for scores in result.scores:
            click.echo(json.dumps({**scores.summary(), "mode": result.mode,
                                   "near_duplicates": result.near_duplicates}))
    else:
        click.echo(format_table(result))
    if report_dir:
        click.echo(f"report: {len(written)} files in {report_dir} (open index.html)", err=True)


@main.command("train-classifier")
@index_option
@click.option("--method", type=click.Choice(["logreg", "svm"]), default="logreg", show_default=True,
              help="Logistic regression or a linear SVM.")
@click.option("--C", "c_value", default="auto", show_default=True,
              help="Regularisation; 'auto' chooses from 0.01..1000 by cross-validation.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the cross-validation folds that choose C (and of the SVM's solver).")
@click.pass_context
def train_classifier(ctx, index_dir, method, c_value, seed):
    """Fit a linear classifier on the labelled index's features.

    It is saved in the index folder with the index state it was fit on, and
    'imgsearch classify --method linear' uses it (until the index changes).
    Needs scikit-learn: pip install 'imgsearch[linear]'.

    \b
    Example:
      imgsearch train-classifier --index pets --method logreg
    """
    from .index import Index

    if c_value != "auto":
        try:
            c_value = POSITIVE.convert(c_value, None, ctx)
        except click.BadParameter as exc:
            exc.param_hint = "'--C'"  # converted here, so click does not know the option
            raise
    with Index.open(index_dir, plugins_dir=ctx.obj["plugins_dir"], writable=True) as idx:
        _warn_if_random(idx)
        model = idx.train_classifier(method=method, C=c_value, seed=seed, progress=_progress_bar("choosing C"))
    chosen = f", cross-validated accuracy {model.cv_accuracy:.4f}" if model.cv_accuracy is not None else ""
    click.echo(f"trained {model.method} on {len(model.classes)} labels with C={model.C:g}{chosen}; "
               f"saved in {index_dir}")


@main.command()
@click.argument("paths", nargs=-1, type=click.Path(exists=True))
@click.option("--index", "index_dir", type=click.Path(file_okay=False, exists=True), metavar="DIR",
              help="Train on this index's labelled images (its encoder is the default base).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), metavar="DIR",
              help="New folder for the fine-tuned encoder (model.keras and its model spec model.json).")
@click.option("--encoder", default=None, metavar="NAME", help="Base encoder (default: the index's, else "
              "IMGSEARCH_ENCODER or resnet50); it must offer a Keras model.")
@weights_option
@click.option("--input-size", type=click.IntRange(16, 1024), default=None, metavar="PX",
              help="Train and embed at this input size (default: the base's); smaller is much faster on a "
                   "CPU, and enough for small images.")
@click.option("--unfreeze", type=click.IntRange(min=0), default=0, show_default=True, metavar="N",
              help="After the head, also train the base's top N layers with weights (batch-norm layers "
                   "stay frozen) at --finetune-lr.")
@click.option("--embedding-dim", type=click.IntRange(min=0), default=256, show_default=True, metavar="D",
              help="Size of the learned embedding layer on the base's features (0: none; the vectors are "
                   "then the base's own features).")
@click.option("--epochs", type=click.IntRange(min=1), default=30, show_default=True, help="Most epochs of the head.")
@click.option("--finetune-epochs", type=click.IntRange(min=0), default=20, show_default=True,
              help="Epochs of the unfrozen layers; their learning rate falls along a cosine from --finetune-lr "
                   "to zero over them, and all of them run.")
@click.option("--lr", type=POSITIVE, default=1e-3, show_default=True, help="Learning rate of the head (Adam).")
@click.option("--finetune-lr", type=POSITIVE, default=5e-4, show_default=True,
              help="Starting learning rate once layers are unfrozen.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="Images per training step.")
@click.option("--validation", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.2,
              show_default=True, help="Share of each label's images held out for validation and early stopping.")
@click.option("--patience", type=click.IntRange(min=1), default=5, show_default=True,
              help="Stop the head's training after this many epochs without a better validation accuracy.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the split, the shuffling and the "
              "initial weights: the same seed gives the same model.")
@click.option("--keep-head", is_flag=True, help="Export the class probabilities as the vectors instead of "
              "the embedding.")
@click.pass_context
def finetune(ctx, paths, index_dir, out_dir, encoder, weights, input_size, unfreeze, embedding_dim, epochs,
             finetune_epochs, lr, finetune_lr, batch_size, validation, patience, seed, keep_head):
    """Fine-tune an encoder on labelled images and save it as a saved-model encoder.

    Trains a head (an embedding and a classifier) on the base encoder's
    frozen features, computed once, then with --unfreeze N the base's top N
    layers at a low, decaying learning rate.  Each stage keeps its best
    epoch on a validation split (the head's stops early); Ctrl-C stops
    training and saves the best model so far.  Index with the result as
    with any encoder.

    \b
    Examples:
      imgsearch finetune train/ --out my-encoder --encoder efficientnet-lite0 --unfreeze 25
      imgsearch finetune --index pets --out pets-encoder --input-size 128
      imgsearch index train/ --index tuned --encoder saved-model --weights my-encoder/model.json
    """
    from .finetune import FinetuneOptions, base_and_examples
    from .finetune import finetune as run_finetune

    options = FinetuneOptions(input_size=input_size, unfreeze=unfreeze, embedding_dim=embedding_dim,
                              epochs=epochs, finetune_epochs=finetune_epochs, learning_rate=lr,
                              finetune_learning_rate=finetune_lr, batch_size=batch_size, validation=validation,
                              patience=patience, seed=seed, keep_head=keep_head)
    _terminate_as_interrupt()
    base, examples = base_and_examples(index_dir=index_dir, paths=paths, encoder=encoder, weights=weights,
                                       default_encoder=os.environ.get("IMGSEARCH_ENCODER"),
                                       plugins_dir=ctx.obj["plugins_dir"])
    click.echo(f"fine-tuning {base.name} on {len(examples)} labelled images", err=True)
    report = run_finetune(base, examples, out_dir, options, progress=_training_bar())
    for skip in report.skipped:
        _warn(f"skipped {skip.path}: {skip.reason}")
    for stage in report.stages:
        click.echo(f"{stage.name}: best epoch {stage.best_epoch} of {stage.epochs_run}, validation accuracy "
                   f"{stage.val_accuracy:.4f}, {stage.seconds:.0f} s", err=True)
    click.echo(f"saved {report.spec} ({report.dim}-d, {report.input_size} px, {len(report.classes)} labels, "
               f"{report.train} training and {report.validation} validation images); use it with "
               f"--encoder saved-model --weights {report.spec}")


def _training_bar():
    """A progress callback for finetune: a bar per epoch with the running
    loss and accuracy, then one line with the validation figures."""
    from .finetune import TrainingProgress

    features = _progress_bar("computing features")
    state = {}

    def progress(event: TrainingProgress):
        if event.stage == "features":
            features(event.step, event.steps)
            return
        key = (event.stage, event.epoch)
        if state.get("key") != key:
            if "bar" in state:
                state.pop("bar").__exit__(None, None, None)
            state["key"] = key
            state["bar"] = click.progressbar(length=event.steps, label=f"{event.stage} epoch {event.epoch}/{event.epochs}",
                                             file=sys.stderr, item_show_func=lambda text: text)
            state["bar"].__enter__()
        bar = state["bar"]
        bar.update(event.step - bar.pos, f"loss {event.loss:.4f} accuracy {event.accuracy:.4f}")
        if event.val_accuracy is not None:
            state.pop("bar").__exit__(None, None, None)
            click.echo(f"{event.stage} epoch {event.epoch}: loss {event.loss:.4f}, accuracy {event.accuracy:.4f}; "
                       f"validation loss {event.val_loss:.4f}, accuracy {event.val_accuracy:.4f}"
                       + (" (best)" if event.best else ""), err=True)

    return progress


@main.command("serve-vectorizer")
@click.option("--encoder", envvar="IMGSEARCH_ENCODER", default="resnet50", show_default=True, metavar="NAME",
              help="Encoder to serve (env IMGSEARCH_ENCODER).")
@weights_option
@runtime_option
@precision_option("Precision (default fp32); int8 needs --calibration.")
@click.option("--calibration", "calibration_paths", multiple=True, type=click.Path(exists=True),
              metavar="PATH", help="Images (files or folders; repeatable) that calibrate --precision int8.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; 0.0.0.0 makes the service reachable from other machines.")
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True,
              help="TCP port to listen on.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Worker processes, each with its own copy of the model.")
@click.option("--max-body-mb", type=POSITIVE, default=20.0, show_default=True,
              help="Largest request body accepted, in MiB.")
@max_megapixels_option(40.0, "Refuse larger images")
@image_formats_option
@click.option("--max-decode-mb", type=POSITIVE, default=512.0, show_default=True,
              help="Memory for decoding images, all requests together (estimated from each image's header); "
                   "requests wait for their share, then get 503.")
@click.option("--max-connections", type=click.IntRange(min=1), default=64, show_default=True,
              help="Open connections per worker (idle keep-alive ones count); more get 503.")
@click.option("--read-timeout", type=POSITIVE, default=30.0, show_default=True,
              help="Seconds allowed for a request's headers, and again for its body.")
@click.option("--batch-window-ms", type=click.FloatRange(min=0), default=5.0, show_default=True,
              help="How long a request may wait for others to share its encoder batch.")
@click.option("--max-batch", type=click.IntRange(min=1), default=None,
              help="Most images in one encoder batch (default: the encoder's batch size).")
@click.pass_context
def serve_vectorizer(ctx, encoder, weights, runtime, precision, calibration_paths, host, port, workers,
                     max_body_mb, max_megapixels, image_formats, max_decode_mb, max_connections, read_timeout,
                     batch_window_ms, max_batch):
    """Serve an encoder over HTTP as a Weaviate img2vec-neural inference service.

    POST /vectors with {"id": ..., "image": "<base64 file bytes>"} returns the
    vector 'imgsearch index' would store for that file.  Point Weaviate at
    it with IMAGE_INFERENCE_API=http://HOST:PORT.  Needs the extra:
    pip install 'imgsearch[serve]'.

    \b
    Example:
      imgsearch serve-vectorizer --encoder efficientnet-lite0 --port 8081
    """
    from .encoders import load_registry
    from .images import DEFAULT_FORMATS
    from .runtime import Calibration, RuntimeOptions, check_choice, check_offered
    from .serve import run

    if calibration_paths and precision != "int8":
        raise click.UsageError("--calibration calibrates --precision int8 only")
    model = load_registry(ctx.obj["plugins_dir"]).create(encoder, weights)
    # Refused here, not after the service is up and answering 503.
    check_choice(runtime, precision)
    check_offered(model, precision or "fp32", runtime)
    if precision == "int8":
        if not calibration_paths:
            raise click.UsageError("--precision int8 needs --calibration PATH (images like those you will serve)")
        model.use_runtime(Calibration.from_paths(calibration_paths, model.preprocessing).options(runtime))
    else:
        model.use_runtime(RuntimeOptions(runtime, precision or "fp32"))
    run(model, host, port, workers, max_body_bytes=int(max_body_mb * 1024 * 1024), max_megapixels=max_megapixels,
        formats=image_formats or DEFAULT_FORMATS, max_decode_bytes=int(max_decode_mb * 1024 * 1024),
        max_connections=max_connections, read_timeout_s=read_timeout,
        batch_window_s=batch_window_ms / 1000.0, max_batch=max_batch, plugins_dir=ctx.obj["plugins_dir"])


def _show_recorded_manifest(index_dir, fmt) -> None:
    """What manifest.json records, for an index too damaged to open: how it
    was built is worth knowing before rebuilding it."""
    try:
        with open(os.path.join(index_dir, "manifest.json"), encoding="utf-8") as handle:
            manifest = json.load(handle)
        encoder = manifest["encoder"]
        facts = {"path": str(index_dir), "damaged": True, "count": manifest.get("count"),
                 "encoder": encoder.get("name"), "dim": manifest.get("dim"), "weights": encoder.get("weights"),
                 "precision": encoder.get("precision", "fp32"), "created": manifest.get("created"),
                 "updated": manifest.get("updated")}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return  # the manifest is damaged too: the error says so
    if fmt == "json":
        click.echo(json.dumps(facts))
        return
    click.echo("as recorded in manifest.json (the index could not be opened):")
    for key, value in facts.items():
        if value is not None and key != "damaged":
            click.echo(f"{key + ':':<21}{value}")


@main.command()
@index_option
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; 0.0.0.0 makes the page reachable from other machines.")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True,
              help="Port to listen on.")
@click.option("--max-upload-mb", type=POSITIVE, default=20.0, show_default=True,
              help="Largest image file accepted as a query, in MiB.")
@click.option("--max-megapixels", type=POSITIVE, default=40.0, show_default=True,
              help="Refuse larger query images (decompression-bomb guard).")
@image_formats_option
@click.option("--max-decode-mb", type=POSITIVE, default=512.0, show_default=True,
              help="Memory for decoding query images and thumbnails, all requests together.")
@click.option("--max-connections", type=click.IntRange(min=1), default=64, show_default=True,
              help="Open connections (idle keep-alive ones count); more get 503.")
@click.option("--read-timeout", type=POSITIVE, default=30.0, show_default=True,
              help="Seconds allowed for a request's headers, and again for its body.")
@runtime_option
@precision_option(READ_PRECISION_HELP)
@click.pass_context
def serve(ctx, index_dir, host, port, max_upload_mb, max_megapixels, image_formats, max_decode_mb,
          max_connections, read_timeout, runtime, precision):
    """Serve a web page and JSON API to search an index by image.

    Drop, paste or pick an image to see its nearest indexed images and their
    labels' vote, click any result for more like it, and browse the index by
    label.  The API is described at /openapi.json.  Images are served only
    by indexed id.  Needs the extra: pip install 'imgsearch[serve]'.

    \b
    Example:
      imgsearch serve --index my-index --port 8000
    """
    from .images import DEFAULT_FORMATS
    from .web.app import run

    with _open(ctx, index_dir, runtime=runtime, precision=precision) as idx:
        _warn_if_random(idx)
        click.echo(f"serving index {index_dir} ({idx.store.count} images) on http://{host}:{port}", err=True)
        run(idx, host, port, max_upload_bytes=int(max_upload_mb * 1024 * 1024), max_megapixels=max_megapixels,
            formats=image_formats or DEFAULT_FORMATS, max_decode_bytes=int(max_decode_mb * 1024 * 1024),
            max_connections=max_connections, read_timeout_s=read_timeout)


@main.command()
@index_option
@click.option("--threshold", type=click.FloatRange(0, 1, min_open=True), default=None, metavar="COS",
              help="Cosine similarity at or above which two images are near-duplicates (default 0.9).")
@format_option
@click.option("--html", "html_path", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="Also write one self-contained HTML page of the groups (thumbnails embedded).")
@click.pass_context
def dupes(ctx, index_dir, threshold, fmt, html_path):
    """Find groups of near-duplicate images in an index.

    Resized, recompressed, slightly cropped or mirrored versions of one
    photo land in one group, found by a range search of the index against
    itself; identical files (stored once) are listed as exact copies.

    \b
    Examples:
      imgsearch dupes --index my-index
      imgsearch dupes --index my-index --threshold 0.95 --format csv > dupes.csv
      imgsearch dupes --index my-index --html dupes.html
    """
    from . import dupes as duplicates

    threshold = duplicates.DEFAULT_THRESHOLD if threshold is None else threshold
    html_path = _html_target(html_path, index_dir)
    with _open(ctx, index_dir) as idx:
        _warn_if_random(idx)
        groups = duplicates.find(idx.store, threshold, progress=_progress_bar("searching"))
    click.echo(f"{len(groups)} groups, {sum(g.size for g in groups)} paths in them, at cosine >= {threshold:g}",
               err=True)
    if html_path:
        from .sheets import write_page
        from .sheets.groups import dupes_page

        write_page(html_path, dupes_page(groups, idx, threshold))
    if fmt == "json":
        for number, group in enumerate(groups, start=1):
            click.echo(json.dumps({"group": number, "size": group.size, "images": [
                {"path": m.entry.path, "label": m.entry.label, "score": round(m.score, 6),
                 "width": m.entry.width, "height": m.entry.height, "copies": list(m.copies)}
                for m in group.members]}))
    elif fmt == "csv":
        out = _csv_writer()
        out.writerow(["group", "path", "label", "score", "copy_of"])
        for number, group in enumerate(groups, start=1):
            for m in group.members:
                out.writerow([number, m.entry.path, m.entry.label or "", f"{m.score:.6f}", ""])
                out.writerows([number, copy, m.entry.label or "", f"{1:.6f}", m.entry.path] for copy in m.copies)
    else:
        rows = []
        for number, group in enumerate(groups, start=1):
            for m in group.members:
                rows.append([number, f"{m.score:.4f}", m.entry.label or "", m.entry.path])
                rows += [[number, "copy", m.entry.label or "", copy] for copy in m.copies]
        if rows:
            click.echo(_table(rows, ["group", "score", "label", "path"]))


@main.command()
@index_option
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True,
              help="Output format; json is one object.")
@click.pass_context
def info(ctx, index_dir, fmt):
    """Show how an index was built, its size and its labels.

    \b
    Example:
      imgsearch info --index my-index --format json
    """
    from .errors import DamagedIndexError

    try:
        with _open(ctx, index_dir) as idx:
            _warn_if_random(idx)
            facts = idx.info()
    except DamagedIndexError:
        _show_recorded_manifest(index_dir, fmt)
        raise
    facts["index_source"] = ctx.meta.get("index_source", "--index")
    if fmt == "json":
        click.echo(json.dumps(facts))
        return
    shown = dict(facts, path=f"{facts['path']} ({ctx.meta.get('index_source', '--index')})",
                 memory_bytes=_size(facts["memory_bytes"]), disk_bytes=_size(facts["disk_bytes"]),
                 search_params=", ".join(f"{k} {v}" for k, v in (facts["search_params"] or {}).items()) or None)
    for key in ("path", "backend", "backend_uri", "backend_collection", "count", "encoder", "dim", "metric", "weights", "weights_fingerprint", "precision",
                "calibration", "format_version", "index_type", "search_params", "recall_at_10", "target_recall",
                "memory_bytes", "segments", "unmerged", "tombstones", "disk_bytes", "created", "updated"):
        if shown.get(key) is not None:
            click.echo(f"{key.removesuffix('_bytes') + ':':<21}{shown[key]}")
    labels = facts["labels"]
    click.echo(f"{'labels:':<21}{len(labels)}")
    for label, count in labels.items():
        click.echo(f"  {label:<19}{count}")
    click.echo(f"{'unlabelled:':<21}{facts['unlabelled']}")
    classifier = facts["classifier"]
    if classifier is None:
        state = "none (imgsearch train-classifier)"
    elif classifier["damaged"]:
        state = "damaged; train it again"
    else:
        state = (f"{classifier['method']} on {classifier['labels']} labels, "
                 + ("current" if classifier["current"] else "stale: the index changed since; train it again"))
    click.echo(f"{'classifier:':<21}{state}")


@main.command()
@click.argument("target", metavar="OUTPUT")
@index_option
@click.option("--format", "fmt", type=click.Choice(["jsonl", "npy", "parquet"]), default="jsonl",
              show_default=True, help="jsonl: a JSON object per image (OUTPUT '-' is stdout); npy: a folder "
                                      "with vectors.npy and metadata.jsonl; parquet: one table (pip install "
                                      "'imgsearch[export]').")
@click.option("--no-vectors", is_flag=True, help="Leave the vectors out: a listing of what the index holds "
                                                 "(jsonl only).")
@click.pass_context
def export(ctx, target, index_dir, fmt, no_vectors):
    """Write an index's images, metadata and vectors out for other tools.

    One record per indexed image: id, path, label, sha256, width, height,
    the other paths of identical files (also_at) and the unit vector.

    \b
    Examples:
      imgsearch export - --index my-index --no-vectors | head
      imgsearch export vectors/ --index my-index --format npy
      imgsearch export my-index.parquet --index my-index --format parquet
    """
    from .export import check_target, export as write_export

    if no_vectors and fmt != "jsonl":
        raise click.UsageError("--no-vectors lists the index as jsonl; leave out --format or choose jsonl")
    check_target(target, fmt, index_dir)  # before the index is read
    with _open(ctx, index_dir) as idx:
        written = write_export(idx, target, fmt, vectors=not no_vectors, progress=_progress_bar("exporting"))
    if target != "-":
        click.echo(f"exported {_count(written, 'image')} from {index_dir} to {target} ({fmt})", err=True)


if __name__ == "__main__":  # pragma: no cover
    main()
