# One index table across all datasets of the config (facility-wide reprocessing).


rule summary:
    input:
        [f"{RESULTS}/{ds}/inspect/summary.json" for ds in DATASETS],
        [frames_file(ds) for ds in DATASETS],
    output:
        table=report(
            f"{RESULTS}/summary.tsv",
            caption="../report/summary.rst",
            labels={"figure": "index of the datasets"},
            category="7. Summary",
        ),
        json=f"{RESULTS}/summary.json",
        health=report(
            f"{RESULTS}/health.tsv",
            caption="../report/health.rst",
            labels={"figure": "health checks"},
            category="7. Summary",
        ),
        health_json=f"{RESULTS}/health.json",
    params:
        out_dir=lambda wc, output: os.path.dirname(output.table),
        cmd=SPISCAPE,
        datasets=list(DATASETS),
        version=stage_version("summarize"),
    conda:
        "../../envs/cpu.yaml"
    log:
        f"{RESULTS}/logs/summary.log",
    shell:
        "{params.cmd} summarize --results {params.out_dir:q} --datasets {params.datasets:q} "
        "--out {output.table:q} --health {output.health:q} 2> {log:q}"
