# spiscape: structural landscapes of heterogeneous samples from X-ray single particle imaging.
# Thin on purpose: configuration, validation and input functions live in workflow/rules/common.smk,
# one .smk per stage; every rule calls the `spiscape` command line, never an algorithm.
from snakemake.utils import min_version

min_version("8.20")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/simulate.smk"
include: "workflow/rules/inspect.smk"
include: "workflow/rules/classify2d.smk"
include: "workflow/rules/commonlines.smk"
include: "workflow/rules/embed.smk"
include: "workflow/rules/orient.smk"
include: "workflow/rules/vae.smk"
include: "workflow/rules/emc3d.smk"
include: "workflow/rules/amortise.smk"
include: "workflow/rules/summary.smk"


rule all:
    input:
        all_targets(),
    default_target: True


# jobs too cheap to queue on a cluster
localrules:
    all,
    averages,
    commonlines_merge,
    summary,
