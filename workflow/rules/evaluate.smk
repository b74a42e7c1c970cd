# Evaluation of every model type's predictions against the held-out real cells (per seed),
# with the VCC 2025 ceiling of those cells (one half scored against the other), then one
# summary over seeds and model types with the report's plots.


rule vcc2025_ceiling:
    input:
        real=f"{PREDICTIONS_DIR}/seed{{seed}}/real.h5ad",
    output:
        f"{EVAL_DIR}/seed{{seed}}/ceiling_vcc2025.json",
    log:
        f"logs/{DATASET}/vcc2025_ceiling_seed{{seed}}.log",
    benchmark:
        f"benchmarks/{DATASET}/vcc2025_ceiling_seed{{seed}}.tsv"
    conda:
        "../envs/scgpt-vcc.yaml"
    threads: EVAL_CFG["threads"]
    resources:
        mem_mb=EVAL_CFG["mem_mb"],
    params:
        options=ceiling_options(),
    shell:
        "scgpt-vcc vcc-ceiling --real {input.real} --output {output}"
        " --threads {threads} {params.options} 2> {log}"


rule evaluate:
    input:
        real=f"{PREDICTIONS_DIR}/seed{{seed}}/real.h5ad",
        pred=f"{PREDICTIONS_DIR}/seed{{seed}}/{{model_type}}.h5ad",
        processed=f"{GEARS_DIR}/perturb_processed.h5ad",
        ceiling=rules.vcc2025_ceiling.output[0],
        baseline=lambda w: eval_baseline_input(w.model_type, w.seed),
    output:
        metrics=f"{EVAL_DIR}/seed{{seed}}/{{model_type}}/metrics.json",
        table=f"{EVAL_DIR}/seed{{seed}}/{{model_type}}/per_perturbation.csv",
        means=f"{EVAL_DIR}/seed{{seed}}/{{model_type}}/means.npz",
    log:
        f"logs/{DATASET}/evaluate_seed{{seed}}_{{model_type}}.log",
    benchmark:
        f"benchmarks/{DATASET}/evaluate_seed{{seed}}_{{model_type}}.tsv"
    wildcard_constraints:
        model_type="|".join(EVAL_CFG["model_types"]),
    conda:
        "../envs/scgpt-vcc.yaml"
    threads: EVAL_CFG["threads"]
    resources:
        mem_mb=EVAL_CFG["mem_mb"],
    params:
        baseline=lambda w, input: (
            f"--baseline-metrics {input.baseline[0]}" if input.baseline else ""
        ),
        options=evaluate_options(),
        outdir=lambda w, output: Path(output.metrics).parent,
    shell:
        "scgpt-vcc evaluate --real {input.real} --pred {input.pred}"
        " --processed {input.processed} --outdir {params.outdir}"
        " --model-type {wildcards.model_type} --ceiling {input.ceiling} --threads {threads}"
        " {params.baseline} {params.options} 2> {log}"


rule vcc2026_reference:
    input:
        real=f"{PREDICTIONS_DIR}/seed{{seed}}/counts/real.h5ad",
    output:
        reference=directory(f"{EVAL_DIR}/seed{{seed}}/vcc2026_reference"),
    log:
        f"logs/{DATASET}/vcc2026_reference_seed{{seed}}.log",
    benchmark:
        f"benchmarks/{DATASET}/vcc2026_reference_seed{{seed}}.tsv"
    conda:
        "../envs/scgpt-vcc.yaml"
    threads: EVAL_CFG["threads"]
    resources:
        mem_mb=EVAL_CFG["vcc2026_mem_mb"],
    params:
        options=vcc2026_options(),
    shell:
        "scgpt-vcc vcc2026-reference --real {input.real} --output {output.reference}"
        " --threads {threads} {params.options} 2> {log}"


rule evaluate_vcc2026:
    input:
        real=f"{PREDICTIONS_DIR}/seed{{seed}}/counts/real.h5ad",
        pred=f"{PREDICTIONS_DIR}/seed{{seed}}/counts/{{model_type}}.h5ad",
        reference=f"{EVAL_DIR}/seed{{seed}}/vcc2026_reference",
    output:
        metrics=f"{EVAL_DIR}/seed{{seed}}/{{model_type}}/metrics_vcc2026.json",
        table=f"{EVAL_DIR}/seed{{seed}}/{{model_type}}/per_perturbation_vcc2026.csv",
    log:
        f"logs/{DATASET}/evaluate_vcc2026_seed{{seed}}_{{model_type}}.log",
    benchmark:
        f"benchmarks/{DATASET}/evaluate_vcc2026_seed{{seed}}_{{model_type}}.tsv"
    wildcard_constraints:
        model_type="|".join(EVAL_CFG["model_types"]),
    conda:
        "../envs/scgpt-vcc.yaml"
    threads: EVAL_CFG["threads"]
    resources:
        mem_mb=EVAL_CFG["vcc2026_mem_mb"],
    params:
        options=vcc2026_options(),
        outdir=lambda w, output: Path(output.metrics).parent,
    shell:
        "scgpt-vcc evaluate-vcc2026 --real {input.real} --pred {input.pred}"
        " --reference {input.reference} --outdir {params.outdir}"
        " --model-type {wildcards.model_type} --threads {threads} {params.options} 2> {log}"


rule summarize_eval:
    input:
        metrics=eval_outputs(),
    output:
        md=f"{EVAL_DIR}/summary.md",
        csv=report(
            f"{EVAL_DIR}/summary.csv",
            category="Evaluation",
            caption="../report/evaluation.rst",
        ),
        metrics_plot=report(
            f"{EVAL_DIR}/plots/metrics.png",
            category="Evaluation",
            caption="../report/evaluation.rst",
        ),
        per_perturbation_plot=report(
            f"{EVAL_DIR}/plots/per_perturbation.png",
            category="Evaluation",
            caption="../report/evaluation.rst",
        ),
        scatter_plot=report(
            f"{EVAL_DIR}/plots/change_scatter.png",
            category="Evaluation",
            caption="../report/evaluation.rst",
        ),
        calibrated_plot=report(
            f"{EVAL_DIR}/plots/calibrated.png",
            category="Evaluation",
            caption="../report/calibrated.rst",
        ),
    log:
        f"logs/{DATASET}/summarize_eval.log",
    conda:
        "../envs/scgpt-vcc.yaml"
    params:
        seeds=" ".join(str(s) for s in config["seeds"]),
        models=" ".join(EVAL_CFG["model_types"]),
        profiles=" ".join(EVAL_CFG["profiles"]),
        eval_dir=lambda w, output: Path(output.md).parent,
        plots=lambda w, output: Path(output.metrics_plot).parent,
    shell:
        "scgpt-vcc summarize --eval-dir {params.eval_dir} --seeds {params.seeds}"
        " --model-types {params.models} --out-md {output.md} --out-csv {output.csv}"
        " --plots-dir {params.plots} --profiles {params.profiles} 2> {log}"
