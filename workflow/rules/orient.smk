# Orientation and gain ("cubicness") of each class average against a reference intensity.


rule orient:
    input:
        averages=f"{RESULTS}/{{ds}}/averages.h5",
        detector=detector_input,
        truth=truth_input,
    output:
        orientation=f"{RESULTS}/{{ds}}/orientation.h5",
        figure=report(
            f"{RESULTS}/{{ds}}/orient/orientation.png",
            caption="../report/orient.rst",
            labels={"figure": "orientation and gain"},
            category="5. Orientation",
            subcategory="{ds}",
        ),
    params:
        cmd=SPISCAPE,
        geometry=lambda wc, input: q_scale_flag(wc.ds, input),
        flags=lambda wc: cli_flags(stage_config(wc.ds, "orient")["options"]),
        version=stage_version("orient"),
    threads: 2
    conda:
        "../../envs/cpu.yaml"
    log:
        f"{RESULTS}/logs/{{ds}}/orient.log",
    resources:
        mem_mb=4000,
        runtime=60,
    shell:
        "OMP_NUM_THREADS={threads} {params.cmd} orient --averages {input.averages:q} "
        "--detector {input.detector:q} {params.geometry} --out {output.orientation:q} "
        "--figure {output.figure:q} {params.flags} 2> {log:q}"
