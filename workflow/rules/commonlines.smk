# Common-line similarity of the class averages: the upper triangle cut into tiles (one job each,
# one GPU each on a cluster), merged into the symmetric matrix by a cheap job.


rule commonlines_tile:
    input:
        f"{RESULTS}/{{ds}}/averages.h5",
    output:
        f"{RESULTS}/{{ds}}/commonlines/tile{{tile}}.h5",
    params:
        cmd=SPISCAPE,
        num_tiles=lambda wc: stage_config(wc.ds, "commonlines")["num_tiles"],
        flags=lambda wc: cli_flags(stage_config(wc.ds, "commonlines")["options"]),
        version=stage_version("commonlines"),
    threads: 1
    conda:
        "../../envs/gpu.yaml"
    log:
        f"{RESULTS}/logs/{{ds}}/commonlines_tile{{tile}}.log",
    resources:
        mem_mb=4000,
        runtime=120,
    shell:
        "{params.cmd} commonlines --averages {input:q} --out {output:q} --tile {wildcards.tile} "
        "--num-tiles {params.num_tiles} --threads {threads} {params.flags} 2> {log:q}"


rule commonlines_merge:
    input:
        lambda wc: expand(
            f"{RESULTS}/{{ds}}/commonlines/tile{{tile}}.h5",
            ds=wc.ds,
            tile=range(stage_config(wc.ds, "commonlines")["num_tiles"]),
        ),
    output:
        matrix=f"{RESULTS}/{{ds}}/commonlines.h5",
        figure=report(
            f"{RESULTS}/{{ds}}/commonlines/cc_matrix.png",
            caption="../report/commonlines.rst",
            labels={"figure": "common-line matrix"},
            category="3. Common lines",
            subcategory="{ds}",
        ),
    params:
        cmd=SPISCAPE,
        version=stage_version("merge-commonlines"),
    conda:
        "../../envs/cpu.yaml"
    log:
        f"{RESULTS}/logs/{{ds}}/commonlines_merge.log",
    shell:
        "{params.cmd} merge-commonlines --tiles {input:q} --out {output.matrix:q} "
        "--figure {output.figure:q} 2> {log:q}"
