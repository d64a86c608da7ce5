# Continuous heterogeneity in 3D: the VAE from class averages (with their orientation and gain)
# to 3D intensities along a latent coordinate, then phase retrieval of the decoded volumes.
# In the default targets of every dataset with a q scale (simulated, truth or q_per_pixel) unless
# its `vae` section says `run: false`; the per-frame latents go on into frames.h5.


rule vae:
    input:
        averages=f"{RESULTS}/{{ds}}/averages.h5",
        orientation=f"{RESULTS}/{{ds}}/orientation.h5",
        embedding=f"{RESULTS}/{{ds}}/embedding.h5",
        commonlines=f"{RESULTS}/{{ds}}/commonlines.h5",
        replicates=replicate_files,
        photons=photons_input,
        detector=detector_input,
        truth=truth_input,
    output:
        model=f"{RESULTS}/{{ds}}/vae/model.pt",
        latent=f"{RESULTS}/{{ds}}/vae/latent.h5",
        volumes=f"{RESULTS}/{{ds}}/vae/volumes.h5",
        frame_latent=f"{RESULTS}/{{ds}}/vae/frame_latent.h5",
        figures=report(
            directory(f"{RESULTS}/{{ds}}/vae/figures"),
            patterns=["{name}.png"],
            labels={"figure": "VAE {name}"},
            caption="../report/vae.rst",
            category="6. 3D: VAE and phasing",
            subcategory="{ds}",
        ),
    params:
        out_dir=lambda wc, output: os.path.dirname(output.volumes),
        launcher=lambda wc, resources: torch_launcher(resources, SPISCAPE),
        geometry=lambda wc, input: q_scale_flag(wc.ds, input),
        flags=lambda wc: cli_flags(stage_config(wc.ds, "vae")["options"]),
        version=stage_version("vae"),
    threads: 1
    conda:
        "../../envs/gpu.yaml"
    log:
        f"{RESULTS}/logs/{{ds}}/vae.log",
    resources:
        mem_mb=8000,
        runtime=240,
    shell:
        "{params.launcher} vae --averages {input.averages:q} --orientation {input.orientation:q} "
        "--detector {input.detector:q} --embedding {input.embedding:q} "
        "--commonlines {input.commonlines:q} --replicates {input.replicates:q} "
        "--photons {input.photons:q} {params.geometry} "
        "--out-dir {params.out_dir:q} --figure-dir {output.figures:q} {params.flags} --resume "
        "2> {log:q}"


rule phase:
    input:
        f"{RESULTS}/{{ds}}/vae/volumes.h5",
    output:
        phasing=f"{RESULTS}/{{ds}}/phasing.h5",
        curve=report(
            f"{RESULTS}/{{ds}}/volume_curve.csv",
            caption="../report/volume_curve.rst",
            labels={"figure": "volume along the latent (table)"},
            category="6. 3D: VAE and phasing",
            subcategory="{ds}",
        ),
        maps=directory(f"{RESULTS}/{{ds}}/maps"),
        figures=report(
            directory(f"{RESULTS}/{{ds}}/phasing"),
            patterns=["{name}.png"],
            labels={"figure": "{name}"},
            caption="../report/phasing.rst",
            category="6. 3D: VAE and phasing",
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
        f"{RESULTS}/logs/{{ds}}/phase.log",
    resources:
        mem_mb=8000,
        runtime=120,
    shell:
        "OMP_NUM_THREADS={threads} {params.cmd} phase --volumes {input:q} --out {output.phasing:q} "
        "--curve {output.curve:q} --figure-dir {output.figures:q} --mrc-dir {output.maps:q} "
        "{params.flags} 2> {log:q}"
