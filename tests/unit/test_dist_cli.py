"""The command line under torchrun: errors name their rank, an error decided together is printed by
rank 0 alone, a vanished peer is one line; ``python -m selftrain`` is the CLI."""

from __future__ import annotations

import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from selftrain import dist
from selftrain.cli import user_errors
from selftrain.errors import DataError


def command(exc: BaseException) -> click.Command:
    @click.command()
    @user_errors
    def fails() -> None:
        raise exc

    return fails


@pytest.mark.parametrize("rank", ["0", "1"])
def test_a_known_error_names_its_rank_and_exits_2(monkeypatch, rank):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", rank)
    result = CliRunner().invoke(command(DataError("image 3 is corrupt; replace it")))
    assert result.exit_code == 2
    assert result.output.strip() == f"error: rank {rank}: image 3 is corrupt; replace it"


@pytest.mark.parametrize("rank,printed", [("0", True), ("1", False)])
def test_an_error_raised_on_every_rank_is_printed_by_rank_zero_only(monkeypatch, rank, printed):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", rank)
    exc = dist.stopped_everywhere(FloatingPointError("non-finite loss at step 3 on rank 1: src/ce=nan"))
    result = CliRunner().invoke(command(exc))
    assert result.exit_code == 1
    assert (result.output != "") == printed
    if printed:
        assert result.output.startswith("error: rank 0: non-finite loss at step 3 on rank 1")


def test_a_vanished_peer_is_one_line_without_the_backends_source_location(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    exc = RuntimeError("[/src/gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:30633. "
                       "This is typically caused by a remote worker crashing.")
    result = CliRunner().invoke(command(exc))
    assert result.exit_code == 1
    assert result.output.strip() == ("error: rank 0: another process of this run stopped (Connection closed by peer "
                                     "[127.0.0.1]:30633); its own error line, or torchrun's report, names the cause")


def test_one_process_errors_keep_their_form(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    result = CliRunner().invoke(command(dist.stopped_everywhere(DataError("bad; fix it"))))
    assert result.exit_code == 2 and result.output.strip() == "error: bad; fix it"


@pytest.mark.slow
def test_python_dash_m_selftrain_is_the_command_line():
    done = subprocess.run([sys.executable, "-m", "selftrain", "list", "policies"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "cbst" in done.stdout
