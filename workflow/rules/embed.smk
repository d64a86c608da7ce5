# The CLPCA landscape: embedding of the common-line matrix, clusters, the absolute-embedding
# regressor, then each frame's place in the landscape (what a user selects frames from).


rule embed:
    input:
        commonlines=f"{RESULTS}/{{ds}}/commonlines.h5",
        averages=f"{RESULTS}/{{ds}}/averages.h5",
        replicates=replicate_files,
        truth=truth_input,
    output:
        embedding=f"{RESULTS}/{{ds}}/embedding.h5",
        model=f"{RESULTS}/{{ds}}/embedding_model.pt",
        figures=report(
            directory(f"{RESULTS}/{{ds}}/embed"),
            patterns=["{name}.png"],
            labels={"figure": "{name}"},
            caption="../report/embed.rst",
            category="4. Landscape",
            subcategory="{ds}",
        ),
    params:
        cmd=SPISCAPE,
        truth=lambda wc, input: truth_flag(input),
        flags=lambda wc: cli_flags(stage_config(wc.ds, "embed")["options"]),
        version=stage_version("embed"),
    conda:
        "../../envs/cpu.yaml"
    log:
        f"{RESULTS}/logs/{{ds}}/embed.log",
    resources:
        mem_mb=4000,
        runtime=60,
    shell:
        "{params.cmd} embed --commonlines {input.commonlines:q} --averages {input.averages:q} "
        "--replicates {input.replicates:q} {params.truth} --out {output.embedding:q} "
        "--model {output.model:q} --figure-dir {output.figures:q} {params.flags} 2> {log:q}"


rule landscape:
    input:
        embedding=f"{RESULTS}/{{ds}}/embedding.h5",
        averages=f"{RESULTS}/{{ds}}/averages.h5",
        replicates=replicate_files,
        photons=photons_input,
        truth=truth_input,
        frame_latent=frame_latent_input,
    output:
        frames=f"{RESULTS}/{{ds}}/frames.h5",
        metrics=f"{RESULTS}/{{ds}}/landscape_metrics.json",
        figures=report(
            directory(f"{RESULTS}/{{ds}}/landscape"),
            patterns=["{name}.png"],
            labels={"figure": "{name}"},
            caption="../report/landscape.rst",
            category="4. Landscape",
            subcategory="{ds}",
        ),
    params:
        cmd=SPISCAPE,
        truth=lambda wc, input: truth_flag(input),
        frame_latent=lambda wc, input: frame_latent_flag(input),
        version=stage_version("landscape"),
    conda:
        "../../envs/cpu.yaml"
    log:
        f"{RESULTS}/logs/{{ds}}/landscape.log",
    shell:
        "{params.cmd} landscape --embedding {input.embedding:q} --averages {input.averages:q} "
        "--replicates {input.replicates:q} --photons {input.photons:q} {params.truth} "
        "{params.frame_latent} --out {output.frames:q} --metrics-json {output.metrics:q} --figure-dir {output.figures:q} "
        "2> {log:q}"


# Facility-wide reprocessing: a dataset with `reference: <other dataset>` gets no landscape of
# its own; its frames are placed on the reference's (spiscape place).
rule place:
    input:
        unpack(reference_inputs),
        photons=photons_input,
        detector=detector_input,
    output:
        placed=f"{RESULTS}/{{ds}}/placed.h5",
        figure=report(
            f"{RESULTS}/{{ds}}/placed.png",
            caption="../report/placed.rst",
            labels={"figure": "frames placed on another landscape"},
            category="4. Landscape",
            subcategory="{ds}",
        ),
    params:
        cmd=SPISCAPE,
        reference=lambda wc: f"{RESULTS}/{reference_of(wc.ds)}",
        version=stage_version("place"),
    conda:
        "../../envs/cpu.yaml"
    log:
        f"{RESULTS}/logs/{{ds}}/place.log",
    resources:
        mem_mb=4000,
        runtime=120,
    shell:
        "{params.cmd} place --reference {params.reference:q} --photons {input.photons:q} "
        "--detector {input.detector:q} --out {output.placed:q} --figure {output.figure:q} "
        "2> {log:q}"
