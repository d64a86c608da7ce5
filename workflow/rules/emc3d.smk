# Multi-model 3D EMC straight from the frames (issue 19), then each model phased. Off by
# default: only datasets whose `emc3d` section says `run: true` (and that have a q scale and a
# landscape of their own) get it.


rule emc3d:
    input:
        photons=photons_input,
        detector=detector_input,
        truth=truth_input,
        landscape=emc3d_landscape_input,
    output:
        emc3d=f"{RESULTS}/{{ds}}/emc3d/emc3d.h5",
        volumes=f"{RESULTS}/{{ds}}/emc3d/volumes.h5",
        maps=directory(f"{RESULTS}/{{ds}}/emc3d/maps"),
        models=report(
            f"{RESULTS}/{{ds}}/emc3d/models.png",
            caption="../report/emc3d.rst",
            labels={"figure": "3D EMC models"},
            category="7. 3D EMC",
            subcategory="{ds}",
        ),
        convergence=report(
            f"{RESULTS}/{{ds}}/emc3d/convergence.png",
            caption="../report/emc3d.rst",
            labels={"figure": "3D EMC convergence"},
            category="7. 3D EMC",
            subcategory="{ds}",
        ),
    params:
        cmd=SPISCAPE,
        launcher=lambda wc, resources: mpi_launcher(wc.ds, resources),
        geometry=lambda wc, input: q_scale_flag(wc.ds, input),
        labels=lambda wc, input: (f"--init-labels {quoted(input.landscape)}"
                                  if input.landscape else ""),
        flags=lambda wc: cli_flags(stage_config(wc.ds, "emc3d")["options"]),
        version=stage_version("emc3d"),
    threads: 2
    conda:
        "../../envs/gpu.yaml"
    log:
        f"{RESULTS}/logs/{{ds}}/emc3d.log",
    resources:
        mem_mb=8000,
        runtime=480,
        tasks=1,
    shell:
        "OMP_NUM_THREADS={threads} OPENBLAS_NUM_THREADS={threads} "
        "{params.launcher} {params.cmd} emc3d --photons {input.photons:q} "
        "--detector {input.detector:q} {params.geometry} {params.labels} "
        "--out {output.emc3d:q} --volumes {output.volumes:q} --maps {output.maps:q} "
        "--figure {output.models:q} --convergence {output.convergence:q} {params.flags} "
        "--resume 2> {log:q}"


rule emc3d_phase:
    input:
        f"{RESULTS}/{{ds}}/emc3d/volumes.h5",
    output:
        phasing=f"{RESULTS}/{{ds}}/emc3d/phasing.h5",
        curve=f"{RESULTS}/{{ds}}/emc3d/volumes.csv",
        maps=directory(f"{RESULTS}/{{ds}}/emc3d/density_maps"),
        figures=report(
            directory(f"{RESULTS}/{{ds}}/emc3d/phasing"),
            patterns=["{name}.png"],
            labels={"figure": "3D EMC model {name}"},
            caption="../report/phasing.rst",
            category="7. 3D EMC",
            subcategory="{ds}",
        ),
    params:
        cmd=SPISCAPE,
        flags=lambda wc: cli_flags(stage_config(wc.ds, "phase")["options"]),
        version=stage_version("phase"),
    threads: 2
    conda:
        "../../envs/gpu.yaml"
    log:
        f"{RESULTS}/logs/{{ds}}/emc3d_phase.log",
    resources:
        mem_mb=8000,
        runtime=120,
    shell:
        "OMP_NUM_THREADS={threads} {params.cmd} phase --volumes {input:q} "
        "--out {output.phasing:q} --curve {output.curve:q} --figure-dir {output.figures:q} "
        "--mrc-dir {output.maps:q} {params.flags} 2> {log:q}"
