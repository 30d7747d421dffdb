"""Local runs' progress: every line says learning rate, gradient norm and tokens/s; on a terminal, one tqdm bar."""

from __future__ import annotations

import io

import pytest
from tqdm import tqdm

from kubetune.api.finetunejob import Progress
from kubetune.contract.progress import Bar, ConsoleReporter

STEP_12 = Progress(epoch=1, total_epochs=3, step=12, total_steps=60, train_loss=1.23456, learning_rate=2e-4,
                   grad_norm=1.2345, tokens_per_second=95.4, eta_seconds=185)


def test_a_progress_line_has_loss_learning_rate_grad_norm_and_tokens_per_second(
        capsys: pytest.CaptureFixture[str]) -> None:
    ConsoleReporter().progress(STEP_12)
    assert capsys.readouterr().out == (
        "epoch 1/3  step 12/60, train loss 1.2346, lr 2.00e-04, grad norm 1.23, 95 tok/s, eta 3m05s\n")


def test_a_metric_not_known_is_left_out_of_the_line(capsys: pytest.CaptureFixture[str]) -> None:
    ConsoleReporter().progress(STEP_12.model_copy(update={"grad_norm": None}))
    line = capsys.readouterr().out
    assert "grad norm" not in line and "lr 2.00e-04, 95 tok/s" in line


def test_with_a_bar_the_steps_advance_one_bar_and_no_line_is_printed(capsys: pytest.CaptureFixture[str]) -> None:
    terminal = io.StringIO()
    bars: list[tqdm] = []

    def bar(total: int, initial: int) -> Bar:
        bars.append(tqdm(total=total, initial=initial, file=terminal, mininterval=0))
        return bars[-1]

    reporter = ConsoleReporter(bar=bar)
    reporter.progress(STEP_12)
    reporter.progress(STEP_12.model_copy(update={"step": 17, "learning_rate": 1.5e-4}))
    assert len(bars) == 1 and bars[0].n == 17 and bars[0].total == 60
    assert "lr 1.50e-04, grad norm 1.23, 95 tok/s" in bars[0].desc
    reporter.close()
    assert "17/60" in terminal.getvalue()
    assert capsys.readouterr().out == ""
