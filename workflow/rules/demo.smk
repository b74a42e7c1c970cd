# Synthetic inputs, so the workflow runs with nothing but the repository.
if SYNTHETIC:

    rule make_synthetic_dataset:
        input:
            gene_list="resources/reference/vcc_gene_names.csv",
        output:
            adata=config["raw_adata"],
            validation_counts=config["validation_counts"],
            gene_names=config["gene_names"],
            validation_truth=SUBMISSION_TRUTH,
        log:
            f"logs/{DATASET}/make_synthetic_dataset.log",
        benchmark:
            f"benchmarks/{DATASET}/make_synthetic_dataset.tsv"
        conda:
            "../envs/scgpt-vcc.yaml"
        params:
            options=synthetic_dataset_options(),
        shell:
            "scgpt-vcc make-synthetic-dataset --gene-list {input.gene_list}"
            " --out-adata {output.adata} --out-validation-counts {output.validation_counts}"
            " --out-gene-names {output.gene_names}"
            " --out-validation-truth {output.validation_truth} {params.options} 2> {log}"

    rule make_synthetic_checkpoint:
        input:
            gene_names=config["gene_names"],
        output:
            files=pretrained_files(),
        log:
            f"logs/{DATASET}/make_synthetic_checkpoint.log",
        conda:
            "../envs/scgpt-vcc.yaml"
        params:
            outdir=lambda wildcards, output: Path(output.files[0]).parent,
            options=synthetic_checkpoint_options(),
        shell:
            "scgpt-vcc make-synthetic-checkpoint --gene-names {input.gene_names}"
            " --outdir {params.outdir} {params.options} 2> {log}"
