# Amortised inference (issue 21): an encoder from single frames to pose, conformation and scale,
# the VAE's decoder as the warm start, trained on the frames' Poisson likelihood. Off by default:
# only datasets whose `amortise` section says `run: true` (and that run the VAE) get it.


rule amortise:
    input:
        photons=photons_input,
        detector=detector_input,
        truth=truth_input,
        vae=f"{RESULTS}/{{ds}}/vae/model.pt",
        landscape=f"{RESULTS}/{{ds}}/frames.h5",
    output:
        frames=f"{RESULTS}/{{ds}}/amortise/amortise.h5",
        volumes=f"{RESULTS}/{{ds}}/amortise/volumes.h5",
        model=f"{RESULTS}/{{ds}}/amortise/model.pt",
        z_vs_landscape=report(
            f"{RESULTS}/{{ds}}/amortise/z_vs_landscape.png",
            caption="../report/amortise.rst",
            labels={"figure": "amortised: z against the landscape"},
            category="8. Amortised inference",
            subcategory="{ds}",
        ),
        poses=report(
            f"{RESULTS}/{{ds}}/amortise/poses.png",
            caption="../report/amortise.rst",
            labels={"figure": "amortised: pose distribution"},
            category="8. Amortised inference",
            subcategory="{ds}",
        ),
        sections=report(
            f"{RESULTS}/{{ds}}/amortise/volumes.png",
            caption="../report/amortise.rst",
            labels={"figure": "amortised: volumes along z"},
            category="8. Amortised inference",
            subcategory="{ds}",
        ),
        training=report(
            f"{RESULTS}/{{ds}}/amortise/training.png",
            caption="../report/amortise.rst",
            labels={"figure": "amortised: training curve"},
            category="8. Amortised inference",
            subcategory="{ds}",
        ),
    params:
        launcher=lambda wc, resources: torch_launcher(resources, SPISCAPE),
        out_dir=lambda wc, output: os.path.dirname(output.frames),
        geometry=lambda wc, input: q_scale_flag(wc.ds, input),
        flags=lambda wc: cli_flags(stage_config(wc.ds, "amortise")["options"]),
        version=stage_version("amortise"),
    threads: 2
    conda:
        "../../envs/gpu.yaml"
    log:
        f"{RESULTS}/logs/{{ds}}/amortise.log",
    resources:
        mem_mb=8000,
        runtime=240,
    shell:
        "OMP_NUM_THREADS={threads} {params.launcher} amortise --photons {input.photons:q} "
        "--detector {input.detector:q} --init-vae {input.vae:q} "
        "--landscape {input.landscape:q} {params.geometry} --out-dir {params.out_dir:q} "
        "{params.flags} --resume 2> {log:q}"
