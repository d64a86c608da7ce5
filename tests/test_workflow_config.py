"""The workflow's config: strict (typos name their field), checked against the commands' own
parsers, and no config value reaching a shell unquoted."""

from __future__ import annotations

import re
import shutil

import pytest
import yaml

from spiscape.errors import ConfigError
from spiscape.workflow_config import (
    RULE_FLAGS,
    STAGE_COMMANDS,
    check_config,
    shell_words,
    split_photon_cell,
    with_defaults,
)
from tests.conftest import REPO
from tests.test_workflow import TINY_EMC, planned_jobs, snakemake, write_config

SCHEMA = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())
DEFAULTS = yaml.safe_load((REPO / "config/config.yaml").read_text())
SIM = {"simulate": {"num_frames": 10}}


def checked(**changes):
    config = with_defaults({"datasets": {"d": SIM}, **changes}, DEFAULTS)
    check_config(config, SCHEMA)
    return config


def test_the_default_config_passes():
    check_config(DEFAULTS, SCHEMA)
    config = checked(classify2d={"options": {"num_classes": 7}})
    assert config["classify2d"]["options"]["num_classes"] == 7
    assert config["classify2d"]["options"]["num_rot"] == 36  # the default, merged under it
    assert list(config["datasets"]) == ["d"]  # not the default file's demo


@pytest.mark.parametrize("changes, message", [
    ({"clasify2d": {}}, "(top level): unknown key 'clasify2d' (did you mean 'classify2d'?)"),
    ({"vae": {"rn": False}}, "vae: unknown key 'rn' (did you mean 'run'?)"),
    ({"classify2d": {"options": {"num_classes": 0}}},
     "classify2d.options.num_classes: '0': expected an integer >= 1"),
    ({"classify2d": {"options": {"num_classes": "ten"}}},
     "classify2d.options.num_classes: 'ten': expected an integer"),
    ({"classify2d": {"options": {"num_clases": 3}}},
     "classify2d.options.num_clases: not an option of `spiscape classify2d` (did you mean "
     "'num_classes'?)"),
    ({"classify2d": {"options": {"out": "x.h5"}}}, "classify2d.options.out: set by the workflow"),
    ({"classify2d": {"options": {"friedel": 3}}}, "classify2d.options.friedel: a switch"),
    ({"embed": {"options": {"method": "pcaa"}}}, "embed.options.method: 'pcaa' is not one of"),
    ({"phase": {"options": {"starts": [1, 2]}}}, "phase.options.starts: takes one value"),
    ({"orient": {"options": {"step_deg": 0}}},
     "orient.options.step_deg: '0': expected a number in (0, 90]"),
    ({"datasets": {"x": {"photons": "a.h5", "detetor": "d.h5"}}},
     "datasets.x: unknown key 'detetor' (did you mean 'detector'?)"),
    ({"datasets": {"x": {"photons": "a.h5"}}}, "datasets.x.detector: missing"),
    ({"datasets": {}}, "datasets: {} should be non-empty"),
    ({"datasets": {"x": {"simulate": {"num_frames": -5}}}},
     "datasets.x.simulate.num_frames: '-5': expected an integer >= 1"),
    ({"datasets": {"bad/name": SIM}}, "datasets: 'bad/name' does not match"),
    ({"datasets": {"x": {**SIM, "photons": "a.h5", "detector": "d.h5"}}},
     "datasets.x: give either 'simulate' or 'photons'"),
    ({"datasets": {"x": {**SIM, "reference": "nowhere"}}},
     "datasets.x.reference: 'nowhere' is not another dataset"),
    ({"datasets": {"x": {**SIM}, "y": {**SIM, "reference": "x"}, "z": {**SIM, "reference": "y"}}},
     "datasets.z.reference: 'y' is itself placed"),
    ({"datasets": {"x": {"simulate": {"num_frame": 300}}}},
     "datasets.x.simulate.num_frame: not an option of `spiscape simulate` (did you mean "
     "'num_frames'?)"),
    ({"datasets": {"x": {**SIM, "classify2d": {"options": {"iterations": -1}}}}},
     "datasets.x.classify2d.options.iterations: '-1': expected an integer >= 1"),
    ({"datasets": {"x": {**SIM, "embed": {"run": False}}}}, "datasets.x.embed: unknown key 'run'"),
])
def test_typos_and_impossible_values_name_their_field(changes, message):
    with pytest.raises(ConfigError) as err:
        checked(**changes)
    assert str(err.value).startswith("config: ") and "\n" not in str(err.value)
    assert message in str(err.value)


def rule_shells():
    """(command, flags) of every rule's shell command."""
    for path in (REPO / "workflow/rules").glob("*.smk"):
        for block in re.findall(r"    shell:\n((?:        \".*\"\n?)+)", path.read_text()):
            text = "".join(re.findall(r'"(.*)"', block))
            command = re.search(r"\{params\.(?:cmd|launcher)\} ([a-z0-9-]+)", text).group(1)
            yield command, {f.replace("-", "_") for f in re.findall(r"--([a-z-]+)", text)}


def test_rule_flags_are_reserved_from_the_options():
    seen = set()
    for command, flags in rule_shells():
        if command in RULE_FLAGS:
            seen.add(command)
            assert flags <= RULE_FLAGS[command], (command, flags - RULE_FLAGS[command])
    assert set(STAGE_COMMANDS.values()) | {"simulate"} <= seen


def test_commands_and_photon_cells_become_plain_words():
    assert shell_words("mpiexec -n 4") == "mpiexec -n 4"
    assert shell_words("srun $(touch x); rm -rf y") == "srun '$(touch' 'x);' rm -rf y"
    assert split_photon_cell("/a/b.h5;/c d/e.h5") == ["/a/b.h5", "/c d/e.h5"]
    assert split_photon_cell('"/c d/e.h5" /f.h5') == ["/c d/e.h5", "/f.h5"]
    with pytest.raises(ConfigError, match="photons cell"):
        split_photon_cell('"/c d/e.h5')


def test_dry_runs_refuse_typos_with_one_line(tmp_path):
    config = write_config(tmp_path / "c.yaml", {"d": SIM}, clasify2d={})
    proc = snakemake(tmp_path, "--configfile", str(config), "-n", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    line = next(x for x in proc.stderr.splitlines() if "config:" in x)
    assert line == ("spiscape workflow: config: (top level): unknown key 'clasify2d' (did you "
                    "mean 'classify2d'?) (allowed: amortise, classify2d, commonlines, datasets, "
                    "datasets_table, embed, emc3d, inspect, orient, phase, results, "
                    "spiscape_command, vae)")
    # elsewhere, with only --configfile: the defaults beside the Snakefile, and a word about it
    config = write_config(tmp_path / "ok.yaml", {"d": SIM})
    proc = snakemake(tmp_path, "--configfile", str(config), "-n", "-p")
    assert "stage defaults from" in proc.stderr
    assert "--sharpen-iterations 20" in proc.stdout  # a default the config did not give


def test_no_config_value_reaches_a_shell_unquoted(tmp_path, tiny_dataset, env_with_venv_path):
    # a measured dataset whose folder holds a space, quotes and a command substitution, and a
    # results folder that tries the same: every job runs on those paths as they are, and no
    # command in them runs
    weird = tmp_path / "run 7 $(touch marker) 'x'"
    weird.mkdir()
    for name in ("photons.h5", "detector.h5"):
        shutil.copy(tiny_dataset / name, weird / name)
    config = write_config(
        tmp_path / "c.yaml",
        {"odd": {"photons": str(weird / "photons.h5"), "detector": str(weird / "detector.h5")}},
        results="out $(touch marker2)",
        classify2d={**TINY_EMC, "replicates": 1},
    )
    plan = planned_jobs(snakemake(tmp_path, "--configfile", str(config), "-n"))
    assert plan["classify2d"] == 1 and "vae" not in plan  # no q scale: no 3D stages
    snakemake(tmp_path, "--configfile", str(config), "--cores", "2", env=env_with_venv_path)
    assert not list(tmp_path.rglob("marker*"))
    frames = tmp_path / "out $(touch marker2)" / "odd" / "frames.h5"
    assert frames.exists(), list((tmp_path / "out $(touch marker2)" / "logs").rglob("*"))
