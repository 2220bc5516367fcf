"""`acg hypothesis fit|test` and `acg coverage` end to end on the organism, and their errors."""

from __future__ import annotations

import json
import re

import pytest

from acgraph.cli import main

SMALL = ["--contexts", "4", "--batch-size", "4"]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    out = tmp_path_factory.mktemp("hyp") / "fitted.py"
    assert main(["hypothesis", "fit", "--out", str(out), "--layers", "0,1", *SMALL]) == 0
    return out


def test_fit_writes_editable_python(fitted):
    text = fitted.read_text()
    assert text.startswith('"""Built-in hypotheses fitted by `acg hypothesis fit`')
    assert "@head(0, 0," in text and "@feature(1, " in text and "@feature(2, " not in text


def test_test_cli_reports_and_exits_by_verdict(fitted, tmp_path, capsys):
    good = tmp_path / "good.py"
    good.write_text(
        "from acgraph.hypotheses import feature\n"
        "@feature(1, 0)\ndef f(ctx):\n    return ctx.zeros()\n"
    )
    argv = ["hypothesis", "test", str(good), "--report", str(tmp_path), "--per-domain", "2"]
    rc = main([*argv, "--max-fvu", "1000", "--max-delta-ce", "1000", *SMALL])
    out = capsys.readouterr().out
    assert rc == 0 and "verdict: ACCEPTED" in out and "L1/0" in out
    report = json.loads((tmp_path / "hypothesis_test.json").read_text())
    assert report["accepted"] and report["hypotheses"][0]["source"] == str(good)
    rc = main([*argv, "--max-fvu", "0", "--max-delta-ce", "0", *SMALL])
    assert rc == 1 and "verdict: REJECTED" in capsys.readouterr().out


def test_coverage_cli_writes_json_markdown_and_png(fitted, tmp_path, capsys):
    argv = ["coverage", str(fitted), "--report", str(tmp_path), "--budget", "100", *SMALL]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "# Understanding coverage" in out
    report = json.loads((tmp_path / "coverage.json").read_text())
    # layers 0 and 1 fitted, layer 2 has no hypotheses at all
    assert report["understood_up_to_layer"] == 1
    assert report["blocked_by"] == "layer 2: 384 features and 4 heads have no hypothesis"
    assert (tmp_path / "coverage.md").read_text() == out.rstrip("\n") + "\n"
    assert (tmp_path / "coverage.png").stat().st_size > 0


@pytest.mark.parametrize(
    "body, message",
    [
        (None, "no such hypothesis file"),
        ("from acgraph.hypotheses import feature\n@feature(1, 999)\ndef f(c):\n    return 0\n",
         "layer 1 has only 384 features"),
        ("from acgraph.hypotheses import head\n@head(0, 9)\ndef f(c):\n    return c.bos()\n",
         "the model has 4 heads"),
        ("from acgraph.hypotheses import feature\n@feature(7, 1)\ndef f(c):\n    return 0\n",
         "past the model's last transcoder layer"),
        ("from acgraph.hypotheses import feature\n@feature(1, 1)\ndef f(c):\n    return 1 / 0\n",
         r"failed: ZeroDivisionError"),
        ("from acgraph.hypotheses import feature\n@feature(1, 1)\n"
         "def f(c):\n    return c.feature(2, 0)\n", "not upstream"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, body, message):
    path = tmp_path / "h.py"
    if body is not None:
        path.write_text(body)
    assert main(["hypothesis", "test", str(path), *SMALL, "--per-domain", "0"]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # (model loading may print a progress bar first)
    assert last.startswith("acg: error: ") and "Traceback" not in err
    assert re.search(message, last)


def test_fit_refuses_bad_options(tmp_path, capsys):
    assert main(["hypothesis", "fit", "--out", str(tmp_path / "x.txt")]) == 2
    assert "--out must be a .py file" in capsys.readouterr().err
    assert main(["hypothesis", "fit", "--out", str(tmp_path / "x.py"), "--layers", "5"]) == 2
    assert "out of range" in capsys.readouterr().err
    assert main(["hypothesis", "fit", "--out", str(tmp_path / "x.py"), "--families", "magic"]) == 2
    assert "unknown families" in capsys.readouterr().err
