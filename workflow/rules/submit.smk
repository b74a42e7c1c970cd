# Virtual Cell Challenge submission: predicted cells for the listed perturbations plus the
# training controls, packed into a .vcc file by cell-eval prep, in one folder per model
# type. Its model is trained or fitted on every training perturbation (the all_train
# split), not on an evaluation seed. With synthetic data the true cells are known, and the
# submission of submission.model is scored against them and against train_mean's.


rule submission_baseline:
    input:
        data=f"{GEARS_DIR}/perturb_processed.h5ad",
        split=SUBMISSION_SPLIT_FILE,
        counts=submission_counts(),
        gene_names=config["gene_names"],
        model=lambda w: model_files(w.model_type),
        renames=lambda w: vocab_inputs(w.model_type),
    output:
        h5ad=f"{SUBMISSION_DIR}/{{model_type}}/prediction.h5ad",
        vcc=f"{SUBMISSION_DIR}/{{model_type}}/prediction.prep.vcc",
        summary=report(
            f"{SUBMISSION_DIR}/{{model_type}}/submission.json",
            category="VCC submission",
            caption="../report/submission.rst",
        ),
    log:
        f"logs/{DATASET}/submission_{{model_type}}.log",
    benchmark:
        f"benchmarks/{DATASET}/submission_{{model_type}}.tsv"
    wildcard_constraints:
        model_type=r"(?!scgpt)\w+",
    conda:
        "../envs/scgpt-vcc.yaml"
    threads: PREDICT_CFG["threads"]
    params:
        outdir=lambda w, output: Path(output.vcc).parent,
        options=lambda w: submission_options(w.model_type),
    shell:
        "scgpt-vcc submission --data {input.data} --split {input.split} --counts {input.counts}"
        " --gene-names {input.gene_names} --outdir {params.outdir} --threads {threads}"
        " {params.options} 2> {log}"


use rule submission_baseline as submission_scgpt with:
    wildcard_constraints:
        model_type=r"scgpt\w*",
    resources:
        gpu=1,
        gpu_model=GPU["slurm_gpu"],


rule submission_counts:
    input:
        submission=f"{SUBMISSION_DIR}/{{model_type}}/prediction.h5ad",
        converted=f"{GEARS_DIR}/converted.h5ad",
        truth=submission_truth_counts(),
    output:
        h5ad=f"{SUBMISSION_DIR}/{{model_type}}/prediction_counts.h5ad",
        summary=f"{SUBMISSION_DIR}/{{model_type}}/submission_counts.json",
    log:
        f"logs/{DATASET}/submission_counts_{{model_type}}.log",
    benchmark:
        f"benchmarks/{DATASET}/submission_counts_{{model_type}}.tsv"
    conda:
        "../envs/scgpt-vcc.yaml"
    params:
        outdir=lambda w, output: Path(output.h5ad).parent,
        truth=lambda w, input: f"--truth {input.truth}" if input.truth else "",
        control_label=config["control_label"],
        options=counts_options(),
    shell:
        "scgpt-vcc submission-counts --submission {input.submission}"
        " --converted {input.converted} --outdir {params.outdir}"
        " --control-label {params.control_label} {params.truth} {params.options} 2> {log}"


if SYNTHETIC:

    rule convert_submission_truth:
        input:
            adata=SUBMISSION_TRUTH,
        output:
            adata=f"{SUBMISSION_DIR}/truth.h5ad",
        log:
            f"logs/{DATASET}/convert_submission_truth.log",
        conda:
            "../envs/scgpt-vcc.yaml"
        params:
            # cell-eval normalises the real counts it scores to their own median depth.
            options=convert_options(target_sum=None),
        shell:
            "scgpt-vcc convert-to-gears {input.adata} {output.adata} {params.options} 2> {log}"

    rule score_submission:
        input:
            submission=f"{SUBMISSION_DIR}/{{model_type}}/prediction.h5ad",
            baseline=f"{SUBMISSION_DIR}/{BASELINE_MODEL}/prediction.h5ad",
            truth=f"{SUBMISSION_DIR}/truth.h5ad",
        output:
            score=report(
                f"{SUBMISSION_DIR}/{{model_type}}/score.json",
                category="VCC submission",
                caption="../report/submission_score.rst",
            ),
        log:
            f"logs/{DATASET}/score_submission_{{model_type}}.log",
        benchmark:
            f"benchmarks/{DATASET}/score_submission_{{model_type}}.tsv"
        conda:
            "../envs/scgpt-vcc.yaml"
        threads: EVAL_CFG["threads"]
        params:
            control_label=config["control_label"],
        shell:
            "scgpt-vcc score-submission --submission {input.submission}"
            " --baseline {input.baseline} --truth {input.truth} --output {output.score}"
            " --control-label {params.control_label} --threads {threads} 2> {log}"

    if VCC2026:

        use rule vcc2026_reference as submission_vcc2026_reference with:
            input:
                real=SUBMISSION_TRUTH,
            output:
                reference=directory(f"{SUBMISSION_DIR}/vcc2026_reference"),
            log:
                f"logs/{DATASET}/submission_vcc2026_reference.log",
            benchmark:
                f"benchmarks/{DATASET}/submission_vcc2026_reference.tsv"

        use rule evaluate_vcc2026 as score_submission_vcc2026 with:
            input:
                real=SUBMISSION_TRUTH,
                pred=f"{SUBMISSION_DIR}/{{model_type}}/prediction_counts.h5ad",
                reference=f"{SUBMISSION_DIR}/vcc2026_reference",
            output:
                metrics=f"{SUBMISSION_DIR}/{{model_type}}/metrics_vcc2026.json",
                table=f"{SUBMISSION_DIR}/{{model_type}}/per_perturbation_vcc2026.csv",
            log:
                f"logs/{DATASET}/score_submission_vcc2026_{{model_type}}.log",
            benchmark:
                f"benchmarks/{DATASET}/score_submission_vcc2026_{{model_type}}.tsv"
