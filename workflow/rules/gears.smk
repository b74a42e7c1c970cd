# GEARS processing: DE genes, control pairing, GO filter, cell graphs, splits and QC.
# Everything lands in GEARS's own layout under results/gears/{dataset}/.


rule compute_de:
    input:
        adata=f"{GEARS_DIR}/converted.h5ad",
    output:
        adata=f"{GEARS_DIR}/perturb_processed.h5ad",
        stats=f"{GEARS_DIR}/condition_stats.npz",
    log:
        f"logs/{DATASET}/compute_de.log",
    benchmark:
        f"benchmarks/{DATASET}/compute_de.tsv"
    conda:
        "../envs/scgpt-vcc.yaml"
    params:
        options=cli_options(chunk_size=GEARS_CFG["chunk_size"]),
    shell:
        "scgpt-vcc compute-de {input.adata} {output.adata} --stats {output.stats} "
        "{params.options} 2> {log}"


# A download on the login node: compute nodes of many clusters have no internet.
localrules:
    download_gears_go,


rule download_gears_go:
    output:
        gene2go=f"{GEARS_CFG['go_dir']}/gene2go_all.pkl",
        essential=f"{GEARS_CFG['go_dir']}/essential_all_data_pert_genes.pkl",
    log:
        "logs/download_gears_go.log",
    conda:
        "../envs/scgpt-vcc.yaml"
    params:
        outdir=lambda w, output: Path(output.gene2go).parent,
    shell:
        "scgpt-vcc download-gears-go {params.outdir} 2> {log}"


rule go_filter:
    input:
        adata=f"{GEARS_DIR}/perturb_processed.h5ad",
        go=go_inputs(),
    output:
        report=f"{GEARS_DIR}/go_filter.json",
    log:
        f"logs/{DATASET}/go_filter.log",
    conda:
        "../envs/scgpt-vcc.yaml"
    params:
        options=cli_options(
            gears_dir=GEARS_CFG["go_dir"] if GEARS_CFG["go_filter"] else None
        ),
    shell:
        "scgpt-vcc go-filter {input.adata} {output.report} {params.options} 2> {log}"


rule pair_controls:
    input:
        adata=f"{GEARS_DIR}/perturb_processed.h5ad",
    output:
        pairing=f"{GEARS_DIR}/data_pyg/pairing_seed{{seed}}.npz",
    log:
        f"logs/{DATASET}/pair_controls_seed{{seed}}.log",
    benchmark:
        f"benchmarks/{DATASET}/pair_controls_seed{{seed}}.tsv"
    conda:
        "../envs/scgpt-vcc.yaml"
    shell:
        "scgpt-vcc pair-controls {input.adata} {output.pairing} --seed {wildcards.seed} 2> {log}"


rule write_cell_graphs:
    input:
        adata=f"{GEARS_DIR}/perturb_processed.h5ad",
        pairing=f"{GEARS_DIR}/data_pyg/pairing_seed{config['seeds'][0]}.npz",
        go=f"{GEARS_DIR}/go_filter.json",
    output:
        pickle=f"{GEARS_DIR}/data_pyg/cell_graphs.pkl",
    log:
        f"logs/{DATASET}/write_cell_graphs.log",
    benchmark:
        f"benchmarks/{DATASET}/write_cell_graphs.tsv"
    conda:
        "../envs/scgpt-vcc.yaml"
    shell:
        "scgpt-vcc write-cell-graphs {input.adata} {output.pickle} --pairing {input.pairing} "
        "--go-filter {input.go} 2> {log}"


rule build_split:
    input:
        adata=f"{GEARS_DIR}/perturb_processed.h5ad",
        go=f"{GEARS_DIR}/go_filter.json",
    output:
        splits=split_outputs("{seed}"),
    log:
        f"logs/{DATASET}/build_split_seed{{seed}}.log",
    conda:
        "../envs/scgpt-vcc.yaml"
    params:
        outdir=lambda w, output: Path(output[0]).parent,
        seed=lambda w: w.seed,
        options=split_options(GEARS_CFG["split"]),
        perts=cli_options(
            test_perts=GEARS_CFG["test_perts"], val_perts=GEARS_CFG["val_perts"]
        ),
    shell:
        "scgpt-vcc build-split {input.adata} {params.outdir} --go-filter {input.go} "
        "--seed {params.seed} {params.options} {params.perts} 2> {log}"


# Every training perturbation in train, none held out: what the submission's models fit on.
use rule build_split as build_submission_split with:
    output:
        splits=[SUBMISSION_SPLIT_FILE],
    log:
        f"logs/{DATASET}/build_submission_split.log",
    params:
        seed=SUBMISSION_SEED,
        options=split_options(SUBMISSION_SPLIT),
        perts="",


rule data_qc:
    input:
        stats=f"{GEARS_DIR}/condition_stats.npz",
        vocab=f"{config['pretrained_dir']}/vocab.json",
        converted=f"{GEARS_DIR}/converted.h5ad",
    output:
        report=f"{GEARS_DIR}/qc/qc.json",
        cells=report(
            f"{GEARS_DIR}/qc/cells_per_perturbation.png",
            category="Data QC",
            caption="../report/qc_cells.rst",
        ),
        knockdown=report(
            f"{GEARS_DIR}/qc/knockdown.png",
            category="Data QC",
            caption="../report/qc_knockdown.rst",
        ),
    log:
        f"logs/{DATASET}/data_qc.log",
    benchmark:
        f"benchmarks/{DATASET}/data_qc.tsv"
    conda:
        "../envs/scgpt-vcc.yaml"
    params:
        outdir=lambda w, output: Path(output.report).parent,
        options=cli_options(min_cells=GEARS_CFG["min_cells"]),
    shell:
        "scgpt-vcc data-qc {input.stats} {params.outdir} --vocab {input.vocab} "
        "--converted {input.converted} {params.options} 2> {log}"
