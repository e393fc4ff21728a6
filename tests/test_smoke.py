from conftest import run_cli


def test_cli_help_lists_subcommands():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("train", "evaluate", "plot", "models", "download"):
        assert command in result.stdout
