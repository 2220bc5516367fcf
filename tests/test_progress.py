"""Progress bars in logs: plain lines, rate-limited, silent for short jobs."""

from __future__ import annotations

import time

import acgraph.progress as progress


def test_log_lines_when_stderr_is_not_a_terminal(capsys, monkeypatch):
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.01)
    bar = progress.progress_bar(total=4, desc="acg: job", unit="step")
    for i in range(4):
        time.sleep(0.03)
        bar.set_postfix(loss=f"{i:.1f}", refresh=False)
        bar.update(1)
    bar.close()
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert lines and all(line.startswith("acg: job: ") for line in lines)
    assert "4/4" in lines[-1] and "loss=3.0" in lines[-1]
    assert sum("4/4" in line for line in lines) == 1  # close() does not repeat the last line


def test_short_jobs_and_disabled_bars_print_nothing(capsys):
    assert sum(progress.progress_bar(range(50), desc="quick")) == sum(range(50))
    assert list(progress.progress_bar(range(3), desc="off", enabled=False)) == [0, 1, 2]
    assert capsys.readouterr().err == ""
