"""The rounds' progress bar: off when stderr is no terminal, and never on a log line's line."""

import io
import logging
import re
import sys

from fedkd.config import ExperimentConfig
from server.experiment import _log_above, _progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_no_bar_when_stderr_is_not_a_terminal(monkeypatch):
    """`flwr run` and deployments give the ServerApp a log file or a pipe as stderr, and
    ``progress`` is true by default there: the bar must stay off anyway."""
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    bar = _progress(ExperimentConfig(progress=True, num_rounds=2), 0)
    assert bar.disable
    bar.update(1)
    bar.close()
    assert sys.stderr.getvalue() == ""
    monkeypatch.setattr(sys, "stderr", _Terminal())
    assert not _progress(ExperimentConfig(progress=True, num_rounds=2), 0).disable
    assert _progress(ExperimentConfig(progress=False, num_rounds=2), 0).disable


def test_log_lines_start_on_their_own_line_while_the_bar_is_shown(monkeypatch):
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    log = logging.getLogger("fedkd")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    old = log.handlers[:], log.level, log.propagate
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        bar = _progress(ExperimentConfig(progress=True, num_rounds=2, experiment_name="x"), 0)
        with _log_above(bar):
            for r in (1, 2):
                bar.refresh()  # the bar is on screen when the line is logged
                log.info("round %d/2 done", r)
                bar.update(1)
        bar.close()
    finally:
        log.handlers[:], log.level, log.propagate = old
    text = term.getvalue()
    assert "fedkd x" in text and text.count("INFO round") == 2
    for m in re.finditer(r"INFO round", text):  # what precedes each log line: a line start, never the bar
        assert m.start() == 0 or text[m.start() - 1] in "\r\n", repr(text[max(0, m.start() - 80):m.end()])
    for line in re.split(r"[\r\n]", text):
        assert not ("INFO round" in line and "fedkd x" in line), line
