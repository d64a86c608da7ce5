# Dataset check: validates photons against the detector and shows what the frames hold.


rule inspect:
    input:
        photons=photons_input,
        detector=detector_input,
        truth=truth_input,
    output:
        summary=f"{RESULTS}/{{ds}}/inspect/summary.json",
        powder=report(
            f"{RESULTS}/{{ds}}/inspect/powder.png",
            caption="../report/powder.rst",
            labels={"figure": "powder pattern"},
            category="1. Dataset",
            subcategory="{ds}",
        ),
        photons=report(
            f"{RESULTS}/{{ds}}/inspect/photons_per_frame.png",
            caption="../report/photons_per_frame.rst",
            labels={"figure": "photons per frame"},
            category="1. Dataset",
            subcategory="{ds}",
        ),
        radial=report(
            f"{RESULTS}/{{ds}}/inspect/radial_profile.png",
            caption="../report/radial_profile.rst",
            labels={"figure": "radial profile"},
            category="1. Dataset",
            subcategory="{ds}",
        ),
    params:
        out_dir=lambda wc, output: os.path.dirname(output.summary),
        cmd=SPISCAPE,
        truth=lambda wc, input: truth_flag(input),
        flags=lambda wc: cli_flags(config["inspect"]),
        version=stage_version("inspect"),
    conda:
        "../../envs/cpu.yaml"
    log:
        f"{RESULTS}/logs/{{ds}}/inspect.log",
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        "{params.cmd} inspect --photons {input.photons:q} --detector {input.detector:q} {params.truth} "
        "--out-dir {params.out_dir:q} {params.flags} 2> {log:q}"
