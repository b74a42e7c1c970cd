# The raw Perturb-seq file (VCC layout) to GEARS's AnnData: conditions, gene symbols,
# log-normalised X with the raw counts kept; streamed in row chunks.


rule convert_to_gears:
    input:
        adata=config["raw_adata"],
    output:
        adata=f"{GEARS_DIR}/converted.h5ad",
    log:
        f"logs/{DATASET}/convert_to_gears.log",
    benchmark:
        f"benchmarks/{DATASET}/convert_to_gears.tsv"
    conda:
        "../envs/scgpt-vcc.yaml"
    params:
        options=convert_options(),
    shell:
        "scgpt-vcc convert-to-gears {input.adata} {output.adata} {params.options} 2> {log}"
