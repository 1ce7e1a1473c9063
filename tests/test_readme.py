"""The README's promises, checked against the code so they cannot drift."""

import json
import re

import click
from click.testing import CliRunner

from imgsearch.cli import main

from conftest import REPO, SAMPLE_DATA

README = (REPO / "README.md").read_text()


def _block_after(marker: str) -> str:
    start = README.index(marker)
    return README[start : README.index("```", start)]


def test_the_example_plugin_works_as_written(tmp_path):
    plugins = tmp_path / "my_plugins"
    plugins.mkdir()
    (plugins / "my_encoders.py").write_text(_block_after("# my_encoders.py"))
    runner = CliRunner()
    listed = runner.invoke(main, ["--plugins-dir", str(plugins), "encoders", "--format", "json"])
    assert listed.exit_code == 0, listed.stderr
    entry = next(json.loads(line) for line in listed.stdout.splitlines() if "colour-histogram" in line)
    assert entry["dim"] == 64 and entry["weights_available"] is True

    ix = tmp_path / "ix"
    built = runner.invoke(main, ["--plugins-dir", str(plugins), "index", str(SAMPLE_DATA / "labelled"),
                                 "--index", str(ix), "--encoder", "colour-histogram"])
    assert built.exit_code == 0, built.stderr
    assert built.stdout.startswith("added 50,")
    found = runner.invoke(main, ["--plugins-dir", str(plugins), "query", str(SAMPLE_DATA / "queries" / "tench.jpg"),
                                 "--index", str(ix), "-k", "3", "--format", "json"])
    assert found.exit_code == 0, found.stderr
    assert len(json.loads(found.stdout)["results"]) == 3


def test_every_option_in_the_synopsis_exists():
    synopsis = _block_after("imgsearch index PATH...")
    commands = {command.name: command for command in main.commands.values()}
    current = None
    for line in synopsis.splitlines():
        words = line.split()
        if words[:1] == ["imgsearch"] and len(words) > 1 and words[1] in commands:
            current = commands[words[1]]
        if current is None:
            continue
        known = {opt for param in current.params for opt in param.opts}
        for option in re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", line):
            if option not in ("--version",):
                assert option in known, f"README mentions {option} for '{current.name}'"
    assert set(commands) == {"index", "optimize", "remove", "verify", "query", "classify", "evaluate",
                             "train-classifier", "dupes", "finetune",
                             "serve-vectorizer",
                             "serve",
                             "export",
                             "info", "encoders"}
    def where(name, text):  # "imgsearch serve" is not "imgsearch serve-vectorizer"
        found = re.search(rf"imgsearch {re.escape(name)}(?![\w-])", text)
        return found.start() if found else None

    for name, command in commands.items():
        assert where(name, synopsis) is not None
        # and the other way round: every option is in the synopsis
        block = synopsis[where(name, synopsis):]
        following = [c for c in commands if c != name and where(c, block) is not None]
        block = block[: min([where(c, block) for c in following] or [len(block)])]
        for param in command.params:
            if isinstance(param, click.Option) and "--help" not in param.opts:
                assert any(opt in block for opt in param.opts), f"{name} {param.opts[0]} missing from README"


def test_environment_variables_in_the_readme_are_read_somewhere():
    sources = "".join(p.read_text() for p in list((REPO / "imgsearch").glob("*.py")) + list((REPO / "plugins").glob("*/*.py")))
    for variable in set(re.findall(r"IMGSEARCH_[A-Z0-9_]+", README)):
        assert variable in sources, variable
