# EMC 2D classification: bootstrap replicates as independent jobs, then a gather of the averages.


rule classify2d:
    input:
        photons=photons_input,
        detector=detector_input,
    output:
        f"{RESULTS}/{{ds}}/classify2d/rep{{rep}}.h5",
    params:
        cmd=SPISCAPE,
        launcher=lambda wc, resources: mpi_launcher(wc.ds, resources),
        fraction=lambda wc: stage_config(wc.ds, "classify2d")["fraction"],
        flags=lambda wc: cli_flags(stage_config(wc.ds, "classify2d")["options"]),
        version=stage_version("classify2d"),
    threads: 2
    conda:
        "../../envs/gpu.yaml"
    log:
        f"{RESULTS}/logs/{{ds}}/classify2d_rep{{rep}}.log",
    resources:
        mem_mb=8000,
        runtime=240,
        tasks=1,
    shell:
        "OMP_NUM_THREADS={threads} OPENBLAS_NUM_THREADS={threads} "
        "{params.launcher} {params.cmd} classify2d --photons {input.photons:q} "
        "--detector {input.detector:q} --out {output:q} --replicate {wildcards.rep} "
        "--fraction {params.fraction} {params.flags} --resume 2> {log:q}"


rule averages:
    input:
        replicate_files,
    output:
        averages=f"{RESULTS}/{{ds}}/averages.h5",
        convergence=report(
            f"{RESULTS}/{{ds}}/classify2d/convergence.png",
            caption="../report/emc_convergence.rst",
            labels={"figure": "EMC convergence"},
            category="2. EMC 2D classification",
            subcategory="{ds}",
        ),
        montage=report(
            f"{RESULTS}/{{ds}}/classify2d/averages.png",
            caption="../report/emc_averages.rst",
            labels={"figure": "class averages"},
            category="2. EMC 2D classification",
            subcategory="{ds}",
        ),
    params:
        cmd=SPISCAPE,
        min_frames=lambda wc: stage_config(wc.ds, "classify2d")["min_frames"],
        version=stage_version("averages"),
    conda:
        "../../envs/cpu.yaml"
    log:
        f"{RESULTS}/logs/{{ds}}/averages.log",
    shell:
        "{params.cmd} averages --replicates {input:q} --out {output.averages:q} "
        "--min-frames {params.min_frames} --convergence-figure {output.convergence:q} "
        "--montage-figure {output.montage:q} 2> {log:q}"
