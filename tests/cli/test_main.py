"""The ``megatron-sl`` dispatcher: help, unknown commands, and the deepspeed launcher's argv."""

from megatron_sl.cli import main as cli


def test_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in cli.SUBCOMMANDS:
        assert name in out


def test_unknown_command(capsys):
    assert cli.main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err


def test_launcher_local_rank_is_dropped():
    argv = ["--local_rank=1", "train", "--config", "c.yaml", "--local-rank", "0", "x=1"]
    assert cli.strip_launcher_args(argv) == ["train", "--config", "c.yaml", "x=1"]
