# Virtual Cell Challenge submission: predicted cells for the listed perturbations plus the
# training controls, packed into a .vcc file by cell-eval prep. Its model is trained or
# fitted on every training perturbation (the all_train split), not on an evaluation seed.


rule submission:
    input:
        data=f"{GEARS_DIR}/perturb_processed.h5ad",
        split=SUBMISSION_SPLIT_FILE,
        counts=submission_counts(),
        gene_names=config["gene_names"],
        model=model_files(SUBMIT_CFG["model"]),
    output:
        h5ad=f"{SUBMISSION_DIR}/prediction.h5ad",
        vcc=f"{SUBMISSION_DIR}/prediction.prep.vcc",
        summary=report(
            f"{SUBMISSION_DIR}/submission.json",
            category="VCC submission",
            caption="../report/submission.rst",
        ),
    log:
        f"logs/{DATASET}/submission.log",
    benchmark:
        f"benchmarks/{DATASET}/submission.tsv"
    conda:
        "../../envs/scgpt-vcc.yaml"
    threads: PREDICT_CFG["threads"]
    resources:
        **submission_resources(),
    params:
        outdir=lambda w, output: Path(output.vcc).parent,
        options=submission_options(),
    shell:
        "scgpt-vcc submission --data {input.data} --split {input.split} --counts {input.counts}"
        " --gene-names {input.gene_names} --outdir {params.outdir} --threads {threads}"
        " {params.options} 2> {log}"


if SYNTHETIC:

    rule score_submission:
        input:
            submission=f"{SUBMISSION_DIR}/prediction.h5ad",
            truth=f"resources/{DATASET}/adata_Validation_truth.h5ad",
            data=f"{GEARS_DIR}/perturb_processed.h5ad",
            split=SUBMISSION_SPLIT_FILE,
            counts=submission_counts(),
            gene_names=config["gene_names"],
        output:
            score=report(
                f"{SUBMISSION_DIR}/score.json",
                category="VCC submission",
                caption="../report/submission_score.rst",
            ),
        log:
            f"logs/{DATASET}/score_submission.log",
        conda:
            "../../envs/scgpt-vcc.yaml"
        threads: PREDICT_CFG["threads"]
        params:
            options=submission_options(),
        shell:
            "scgpt-vcc score-submission --submission {input.submission} --truth {input.truth}"
            " --data {input.data} --split {input.split} --counts {input.counts}"
            " --gene-names {input.gene_names}"
            " --output {output.score} --threads {threads} {params.options} 2> {log}"
