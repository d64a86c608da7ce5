"""The pieces every stage relies on: atomic outputs, the array module, the communicator, the CLI."""

from __future__ import annotations

import re

import numpy as np
import pytest

from spiscape import backend, cli
from spiscape.errors import InputError
from spiscape.utils.atomic import atomic_path


def test_atomic_path_renames_on_success(tmp_path):
    target = tmp_path / "sub" / "out.h5"
    with atomic_path(target) as tmp:
        assert tmp.suffix == ".h5" and tmp.parent == target.parent
        tmp.write_text("done")
        assert not target.exists()
    assert target.read_text() == "done"
    assert list(target.parent.iterdir()) == [target]


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_array_module_cpu_and_missing_gpu():
    assert backend.get_array_module("cpu") is np
    xp = backend.get_array_module("auto")
    assert xp.__name__ in ("numpy", "cupy")
    if xp is np:
        with pytest.raises(Exception, match="device=gpu"):
            backend.get_array_module("gpu")


def test_serial_comm_allreduce_and_detection(monkeypatch):
    for var in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_STEP_NUM_TASKS", "SPISCAPE_MPI"):
        monkeypatch.delenv(var, raising=False)
    assert not backend.launched_under_mpi()
    comm = backend.get_comm()
    send, recv = np.arange(4.0), np.zeros(4)
    comm.Allreduce(send, recv)
    assert np.array_equal(recv, send)
    assert comm.allreduce(3) == 3 and comm.Get_size() == 1
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    assert backend.launched_under_mpi()
    monkeypatch.setenv("SPISCAPE_MPI", "0")
    assert not backend.launched_under_mpi()


def test_input_error_names_file():
    err = InputError("/data/run7/photons.emc", "truncated")
    assert str(err) == "/data/run7/photons.emc: truncated"


def test_cli_summaries_match_the_modules():
    for name, (_, summary) in cli.COMMANDS.items():
        doc = " ".join(cli.command_module(name).__doc__.strip().split("\n\n")[0].split())
        assert doc.startswith(" ".join(summary.split())), name


def test_cli_lists_every_stage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert name in out
    for name in cli.COMMANDS:
        with pytest.raises(SystemExit) as exit_info:
            cli.main([name, "--help"])
        assert exit_info.value.code == 0


def test_cli_turns_input_errors_into_one_line(tmp_path, capsys):
    bad = tmp_path / "det.h5"
    bad.write_bytes(b"not a detector")
    code = cli.main(
        ["inspect", "--photons", str(bad), "--detector", str(bad), "--out-dir", str(tmp_path / "o")]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("spiscape inspect: error:") and str(bad) in err[0]
    assert not (tmp_path / "o" / "summary.json").exists()


def required_argv(command: str) -> list[str]:
    """A command line with a placeholder for every required argument (nothing is read: the
    outputs are checked before the command starts)."""
    import argparse

    from spiscape.workflow_config import command_parser

    parser = command_parser(command)
    argv = [command]
    chosen = [g._group_actions[0] for g in parser._mutually_exclusive_groups if g.required]
    for action in parser._actions:
        needed = action.required or not action.option_strings or action in chosen
        if isinstance(action, argparse._HelpAction) or not needed:
            continue
        value = "1" if action.type not in (None, str) else "missing-input"
        argv += ([action.option_strings[0]] if action.option_strings else []) + [value]
    return argv


@pytest.mark.parametrize("command", [c for c in cli.COMMANDS if cli.command_module(c).__dict__
                                     .get("OUTPUTS")])
def test_every_output_is_checked_before_the_work(command, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    for name, kind in cli.command_module(command).OUTPUTS.items():
        flag = "--" + name.replace("_", "-")
        for bad, problem in ((tmp_path / "afile" / "out", "is a file, not a folder"),
                             (tmp_path / ("adir" if kind == "file" else "afile"),
                              "is a directory" if kind == "file" else "is a file")):
            capsys.readouterr()
            assert cli.main([*required_argv(command), flag, str(bad)]) == 2, (command, name)
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and f"spiscape {command}: error: {bad}" in err, err
            assert problem in err, err


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_every_subcommand_has_a_plain_help_with_an_example(command, capsys):
    with pytest.raises(SystemExit):
        cli.main([command, "-h"])
    text = capsys.readouterr().out
    example = text.split("Example:", 1)
    assert len(example) == 2 and f"spiscape {command}" in example[1], text
    assert max(len(line) for line in example[1].splitlines()) <= 100  # lines kept as written
    assert "(default: None)" not in text
    assert "``" not in text and ":mod:`" not in text and ":func:`" not in text
    options = text.split("options:", 1)[1].split("Example:", 1)[0]
    entries = re.split(r"\n  (?=-)", options)
    for entry in entries:
        assert entry.count("(default:") <= 1, entry
    from spiscape.workflow_config import command_parser

    for action in command_parser(command)._actions:
        if action.option_strings:
            assert action.help, (command, action.option_strings)


def test_options_are_never_abbreviated(capsys):
    with pytest.raises(SystemExit):
        cli.main(["simulate", "--out-dir", "x", "--num-frame", "10"])
    assert "unrecognized arguments: --num-frame" in capsys.readouterr().err
