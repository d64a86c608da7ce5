# Configuration, validation and input functions shared by every stage.
import os
import re
import shlex

from snakemake.utils import validate

import spiscape

validate(config, schema="../schemas/config.schema.yaml")

RESULTS = config["results"]
DATASETS = config["datasets"]
SPISCAPE = config["spiscape_command"]

if not DATASETS:
    raise ValueError("config: 'datasets' is empty; name at least one dataset to process")


wildcard_constraints:
    ds="|".join(map(re.escape, DATASETS)) if DATASETS else "[^/]+",


def dataset(ds):
    return DATASETS[ds]


def is_simulated(ds):
    return "simulate" in dataset(ds)


def simulated_datasets():
    return [ds for ds in DATASETS if is_simulated(ds)]


def _config_path(path):
    """Photon and detector paths in the config are relative to the working directory."""
    return os.path.normpath(os.path.expandvars(os.path.expanduser(str(path))))


def photons_input(wildcards):
    """The photon files of a dataset: simulated by the workflow, or named in the config."""
    ds = wildcards.ds
    if is_simulated(ds):
        return [f"{RESULTS}/{ds}/data/photons.h5"]
    photons = dataset(ds)["photons"]
    return [_config_path(p) for p in ([photons] if isinstance(photons, str) else photons)]


def detector_input(wildcards):
    ds = wildcards.ds
    if is_simulated(ds):
        return f"{RESULTS}/{ds}/data/detector.h5"
    return _config_path(dataset(ds)["detector"])


def truth_input(wildcards):
    """truth.h5 for simulated datasets (ground-truth scores), nothing for measured ones."""
    ds = wildcards.ds
    if is_simulated(ds):
        return f"{RESULTS}/{ds}/data/truth.h5"
    truth = dataset(ds).get("truth")
    return [_config_path(truth)] if truth else []


def cli_flags(options):
    """Turn a config mapping into command-line flags: {num_frames: 10} -> '--num-frames 10'.

    Mappings become 'key=value' pairs and lists become several values, so that every stage's
    options live in the config and reach the command line unchanged.
    """
    words = []
    for key, value in options.items():
        name = key.replace("_", "-")
        flag = f"--{name}"
        if value is None:
            continue
        if isinstance(value, bool):
            words.append(flag if value else f"--no-{name}")
            continue
        words.append(flag)
        if isinstance(value, dict):
            words.extend(f"{k}={v}" for k, v in value.items())
        elif isinstance(value, (list, tuple)):
            words.extend(str(v) for v in value)
        else:
            words.append(str(value))
    return " ".join(shlex.quote(w) for w in words)


def stage_version(stage):
    """A param that changes with the package version, so a new release reruns the stage."""
    return f"spiscape-{spiscape.__version__}"


def stage_config(ds, stage):
    """A stage's config section with the dataset's own overrides merged over it.

    The stage's `options` (flags of its `spiscape` subcommand) are merged key by key, so a dataset
    can change one option and keep the rest.
    """
    merged = dict(config[stage])
    override = dataset(ds).get(stage, {})
    merged.update({k: v for k, v in override.items() if k != "options"})
    merged["options"] = {**config[stage].get("options", {}), **override.get("options", {})}
    return merged


def replicates(ds):
    return list(range(stage_config(ds, "classify2d")["replicates"]))


def replicate_files(wildcards):
    """The classify2d replicate files of a dataset."""
    return expand(
        f"{RESULTS}/{{ds}}/classify2d/rep{{rep}}.h5",
        ds=wildcards.ds,
        rep=replicates(wildcards.ds),
    )


def truth_flag(input):
    """--truth for stages that score against the simulator's truth when there is one."""
    return f"--truth {input.truth}" if input.truth else ""


def all_targets():
    targets = []
    for ds in DATASETS:
        targets.append(f"{RESULTS}/{ds}/inspect/summary.json")
        targets.append(f"{RESULTS}/{ds}/frames.h5")
    return targets
