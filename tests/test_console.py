"""What a run prints off a terminal (logs, CI, ``| tee``): whole plain progress lines."""

from __future__ import annotations

import pytest


@pytest.fixture
def fake_clock(monkeypatch):
    """perf_counter as a settable number (the progress line's elapsed time and ETA)."""
    from vqgan_cli import console as C

    now = {"t": 1000.0}
    monkeypatch.setattr(C.time, "perf_counter", lambda: now["t"])
    return now


def test_progress_off_a_terminal_prints_whole_lines_when_the_numbers_change(capsys, fake_clock):
    from vqgan_cli.console import TrainProgress, console

    assert not console.is_terminal and console.width <= 80  # captured: rich would squeeze a bar to 80
    info = "loss 0.1234 usage 0.55 " + " ".join(f"term_{i} {i / 7:.5f}" for i in range(12))
    with TrainProgress(1200, 0, "train-tokenizer quickstart") as bar:
        fake_clock["t"] += 10.0
        bar.update(20, 2.125, "img", info)
        bar.update(21, 2.5, "img", info)  # same numbers: no new line (throttled to train.log_every)
        fake_clock["t"] += 3590.0
        bar.update(600, 0.7, "img", "loss 0.05")
    lines = capsys.readouterr().err.splitlines()
    # 20 steps in 10 s: 1180 to go take 590 s; 600 in an hour: 600 more take another hour
    assert lines == [f"train-tokenizer quickstart 20/1200 (1%) 2.1 img/s elapsed 0:00:10 eta 0:09:50 {info}",
                     "train-tokenizer quickstart 600/1200 (50%) 0.7 img/s elapsed 1:00:00 eta 1:00:00 loss 0.05"]
    assert len(lines[0]) > 200 and "…" not in "".join(lines)


def test_progress_of_a_resumed_run_times_only_this_runs_steps(capsys, fake_clock):
    from vqgan_cli.console import TrainProgress

    with TrainProgress(100, 40, "train-prior run") as bar:
        fake_clock["t"] += 30.0
        bar.update(50, 9.0, "tok", "loss [1.5]")  # brackets are text, not rich markup
    # 10 steps in 30 s since the resume at 40: 50 to go take 150 s
    assert capsys.readouterr().err == "train-prior run 50/100 (50%) 9.0 tok/s elapsed 0:00:30 eta 0:02:30 loss [1.5]\n"


def test_progress_prints_nothing_on_other_ranks(capsys):
    from vqgan_cli.console import TrainProgress

    with TrainProgress(10, 0, "train-tokenizer run", enabled=False) as bar:
        bar.update(5, 1.0, "img", "loss 1")
        bar.log("hidden")
    assert capsys.readouterr().err == ""


def test_progress_without_new_numbers_prints_its_last_state_once_at_the_end(capsys, fake_clock):
    from vqgan_cli.console import TrainProgress

    with TrainProgress(6, 0, "sample") as bar:  # sampling passes no info: nothing until the end
        fake_clock["t"] += 2.0
        bar.update(2, 1.0, "images", "")
        fake_clock["t"] += 4.0
        bar.update(6, 1.0, "images", "")
        assert capsys.readouterr().err == ""
    assert capsys.readouterr().err == "sample 6/6 (100%) 1.0 images/s elapsed 0:00:06 eta 0:00:00\n"
    with pytest.raises(KeyError), TrainProgress(6, 0, "sample") as bar:
        bar.update(1, 1.0, "images", "")
        raise KeyError("a failed run")  # its error is the last word, not a progress line
    assert capsys.readouterr().err == ""
