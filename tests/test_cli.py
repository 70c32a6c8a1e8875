"""The command line's shared behaviour: help, and how input errors reach the user."""

from typer.testing import CliRunner

from sparsearch.cli import app

runner = CliRunner()


def test_help_lists_every_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("study", "report", "prune", "convert"):
        assert command in result.output


def test_error_message_keeps_bracketed_text_and_exits_2(tmp_path):
    missing = tmp_path / "runs[1]" / "study.sqlite"
    result = runner.invoke(app, ["report", str(missing)])
    assert result.exit_code == 2
    assert "runs[1]" in result.output
    assert "Traceback" not in result.output
