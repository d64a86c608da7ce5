"""The workflow's configuration, checked before any job runs (by ``workflow/rules/common.smk``).

Three layers, each failing with one line that names the field:

1. the JSON schema (``workflow/schemas/config.schema.yaml``): every level closed
   (``additionalProperties: false``), so a misspelt key (``clasify2d``, ``detetor``, ``vae: {rn:
   ...}``) is refused instead of ignored;
2. a dataset is either simulated (``simulate:``) or measured (``photons`` and ``detector``);
3. every stage's ``options`` (and a dataset's ``simulate`` section) against the argument parser of
   the ``spiscape`` subcommand that receives them, so the config and the command line never
   drift: an unknown option, a value of the wrong type or outside the choices, a switch given a
   value, or a flag the rule sets itself is refused.

The stage defaults (``config/config.yaml`` beside the Snakefile) are merged under the user's
config, whatever the working directory: ``--directory elsewhere --configfile mine.yaml`` keeps
every default that ``mine.yaml`` does not change.
"""

from __future__ import annotations

import argparse
import difflib
import shlex
from pathlib import Path

from spiscape.errors import ConfigError

#: config section -> the subcommand its options go to
STAGE_COMMANDS = {
    "inspect": "inspect",
    "classify2d": "classify2d",
    "commonlines": "commonlines",
    "embed": "embed",
    "orient": "orient",
    "vae": "vae",
    "phase": "phase",
    "emc3d": "emc3d",
    "amortise": "amortise",
}

#: flags the workflow's rules set themselves (inputs, outputs, the replicate, tiles): an option
#: of the same name in the config would be passed twice. tests/test_workflow_config.py checks
#: this against the rules' shell commands.
RULE_FLAGS = {
    "simulate": {"out_dir"},
    "inspect": {"photons", "detector", "truth", "out_dir"},
    "classify2d": {"photons", "detector", "out", "replicate", "fraction", "resume"},
    "commonlines": {"averages", "out", "tile", "num_tiles", "threads"},
    "embed": {"commonlines", "averages", "replicates", "truth", "out", "model", "figure_dir"},
    "orient": {"averages", "detector", "truth", "q_per_pixel", "out", "figure"},
    "vae": {"averages", "orientation", "detector", "embedding", "commonlines", "replicates",
            "photons", "truth", "q_per_pixel", "out_dir", "figure_dir", "resume"},
    "phase": {"volumes", "out", "curve", "figure_dir", "mrc_dir"},
    "place": {"reference", "photons", "detector", "out", "figure"},
    "emc3d": {"photons", "detector", "out", "maps", "figure", "convergence", "volumes",
              "init_labels", "truth", "q_per_pixel", "resume", "from_model"},
    "amortise": {"photons", "detector", "out_dir", "init_vae", "init_volume", "landscape",
                 "truth", "q_per_pixel", "resume"},
}
COMMON_FLAGS = {"log_file", "help", "version"}


def deep_merge(base, override):
    """``override`` merged over ``base`` (mappings key by key, anything else replaced)."""
    if not isinstance(base, dict) or not isinstance(override, dict):
        return override
    merged = dict(base)
    for key, value in override.items():
        merged[key] = deep_merge(base.get(key), value) if key in base else value
    return merged


def with_defaults(config: dict, defaults: dict) -> dict:
    """The config with the default file's stage sections under it (its datasets are not
    added: they are the default file's own example)."""
    merged = dict(config)
    for key, value in defaults.items():
        if key in ("datasets", "datasets_table"):
            continue
        merged[key] = deep_merge(value, config[key]) if key in config else value
    return merged


def _where(path) -> str:
    return ".".join(str(p) for p in path) or "(top level)"


def check_schema(config: dict, schema: dict) -> None:
    """The first schema violation as one line, e.g. ``config: datasets.x: 'detetor' is not
    allowed (allowed: photons, detector, ...)``."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: (len(e.absolute_path), e.path))
    if not errors:
        return
    error = jsonschema.exceptions.best_match(errors)
    where = _where(error.absolute_path)
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(allowed))
        hints = [f"{k!r}" + _suggest(k, allowed) for k in extra]
        raise ConfigError(f"config: {where}: unknown key {', '.join(hints)} (allowed: "
                          f"{', '.join(allowed)})")
    raise ConfigError(f"config: {where}: {error.message}")


def _suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_datasets(datasets: dict) -> None:
    for name, entry in datasets.items():
        simulated, measured = "simulate" in entry, "photons" in entry
        if simulated and measured:
            raise ConfigError(f"config: datasets.{name}: give either 'simulate' or 'photons' "
                              "and 'detector', not both")
        if not simulated and not measured:
            raise ConfigError(f"config: datasets.{name}: needs 'simulate' (a simulated dataset) "
                              "or 'photons' and 'detector' (measured)")
        if measured and "detector" not in entry:
            raise ConfigError(f"config: datasets.{name}.detector: missing (the detector file "
                              "that goes with the photons)")
        reference = entry.get("reference")
        if reference is not None:
            if reference == name or reference not in datasets:
                raise ConfigError(f"config: datasets.{name}.reference: {reference!r} is not "
                                  "another dataset of the config")
            if "reference" in datasets[reference]:
                raise ConfigError(f"config: datasets.{name}.reference: {reference!r} is itself "
                                  "placed on another landscape; name the dataset that has one")


def command_parser(command: str) -> argparse.ArgumentParser:
    """The argument parser of one ``spiscape`` subcommand."""
    from spiscape.cli import build_parser

    parser = build_parser(command)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def option_words(value) -> list[str]:
    """How :func:`cli_flags` writes a value after its flag (mappings as key=value pairs, lists
    as several words)."""
    if isinstance(value, dict):
        return [f"{k}={v}" for k, v in value.items()]
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [str(value)]


def check_options(command: str, options: dict, where: str) -> None:
    """Each option of a config section against ``spiscape <command>``'s parser."""
    if not isinstance(options, dict):
        raise ConfigError(f"config: {where}: expected a mapping of options, got {options!r}")
    parser = command_parser(command)
    actions = {opt: a for a in parser._actions for opt in a.option_strings}
    known = sorted(o[2:].replace("-", "_") for o in actions
                   if o.startswith("--") and not o.startswith("--no-"))
    reserved = RULE_FLAGS.get(command, set()) | COMMON_FLAGS
    for key, value in options.items():
        field = f"{where}.{key}"
        name = str(key).replace("_", "-")
        action = actions.get(f"--{name}")
        if action is None or str(key) in reserved:
            if str(key) in reserved:
                raise ConfigError(f"config: {field}: set by the workflow itself, not an option")
            allowed = [k for k in known if k not in reserved]
            raise ConfigError(f"config: {field}: not an option of `spiscape {command}`"
                              f"{_suggest(str(key), allowed)}")
        if value is None:
            continue
        switch = action.nargs == 0
        if isinstance(value, bool):
            negatable = f"--no-{name}" in actions
            if not switch or (value is False and not negatable):
                what = "a value, not true/false" if not switch else "true, or leave it out"
                raise ConfigError(f"config: {field}: takes {what}")
            continue
        if switch:
            raise ConfigError(f"config: {field}: a switch, give true or false (got {value!r})")
        words = option_words(value)
        single = action.nargs in (None, "?")
        if single and len(words) != 1:
            raise ConfigError(f"config: {field}: takes one value (got {value!r})")
        if isinstance(action.nargs, int) and len(words) != action.nargs:
            raise ConfigError(f"config: {field}: takes {action.nargs} values (got {value!r})")
        for word in words:
            try:
                parsed = action.type(word) if callable(action.type) else word
            except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
                detail = {int: "expected an integer", float: "expected a number"}.get(
                    action.type, str(exc) or "not a valid value")
                raise ConfigError(f"config: {field}: {word!r}: {detail}") from None
            if action.choices is not None and parsed not in action.choices:
                raise ConfigError(f"config: {field}: {word!r} is not one of "
                                  f"{', '.join(map(str, action.choices))}")


def check_stage_options(config: dict) -> None:
    """Every stage section's options and every dataset's overrides and ``simulate``."""
    for stage, command in STAGE_COMMANDS.items():
        section = config.get(stage) or {}
        if stage == "inspect":
            check_options(command, section, stage)
        else:
            check_options(command, section.get("options") or {}, f"{stage}.options")
    for name, entry in (config.get("datasets") or {}).items():
        if "simulate" in entry:
            check_options("simulate", entry["simulate"] or {}, f"datasets.{name}.simulate")
        for stage, command in STAGE_COMMANDS.items():
            override = entry.get(stage) or {}
            if "options" in override:
                check_options(command, override["options"] or {},
                              f"datasets.{name}.{stage}.options")


def check_config(config: dict, schema: dict) -> None:
    check_schema(config, schema)
    check_datasets(config.get("datasets") or {})
    check_stage_options(config)


def split_photon_cell(text: str) -> list[str]:
    """The photon files of a run-table cell: separated by ``;``, or shell-like words (a path
    with a space is quoted: ``"/data/run 7/a.h5" /data/b.h5``)."""
    if ";" in text:
        return [part.strip() for part in text.split(";") if part.strip()]
    try:
        return shlex.split(text)
    except ValueError as exc:
        raise ConfigError(f"photons cell {text!r}: {exc}") from None


def shell_words(text: str) -> str:
    """A command from the config (``spiscape_command``, ``launcher``) for a shell: split like a
    shell would, each word quoted, so it runs as the words it names and nothing else (no
    ``$(...)``, ``;`` or redirection)."""
    return " ".join(shlex.quote(word) for word in shlex.split(text))


def quoted(paths) -> str:
    """Paths (a string, or a list of them) as quoted shell words."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    return " ".join(shlex.quote(str(p)) for p in paths)
