# Simulated datasets: the embedded default and any dataset whose config has a `simulate:` section.


rule simulate:
    output:
        photons=f"{RESULTS}/{{ds}}/data/photons.h5",
        detector=f"{RESULTS}/{{ds}}/data/detector.h5",
        truth=f"{RESULTS}/{{ds}}/data/truth.h5",
        summary=f"{RESULTS}/{{ds}}/data/simulate.json",
    params:
        out_dir=lambda wc, output: os.path.dirname(output.photons),
        cmd=SPISCAPE,
        flags=lambda wc: cli_flags(dataset(wc.ds)["simulate"]),
        version=stage_version("simulate"),
    conda:
        "../../envs/cpu.yaml"
    log:
        f"{RESULTS}/logs/{{ds}}/simulate.log",
    resources:
        mem_mb=4000,
        runtime=60,
    shell:
        "{params.cmd} simulate --out-dir {params.out_dir:q} {params.flags} "
        "2> {log:q}"
