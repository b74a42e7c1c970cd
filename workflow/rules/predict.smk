# Predictions of the held-out perturbations (the split's 'test' conditions) per seed:
# one file per model type plus the real cells they are compared with. scGPT runs on a
# GPU of the configured gpu_class; the baselines need none.


rule predict_baseline:
    input:
        data=f"{GEARS_DIR}/perturb_processed.h5ad",
        split=lambda w: split_outputs(w.seed)[0],
        pairing=f"{GEARS_DIR}/data_pyg/pairing_seed{{seed}}.npz",
        model=lambda w: model_files(w.model_type, w.seed),
        renames=lambda w: vocab_inputs(w.model_type),
    output:
        h5ad=f"{PREDICTIONS_DIR}/seed{{seed}}/{{model_type}}.h5ad",
    log:
        f"logs/{DATASET}/predict_seed{{seed}}_{{model_type}}.log",
    benchmark:
        f"benchmarks/{DATASET}/predict_seed{{seed}}_{{model_type}}.tsv"
    wildcard_constraints:
        model_type="|".join(baseline_model_types()),
    conda:
        "../envs/scgpt-vcc.yaml"
    threads: PREDICT_CFG["threads"]
    params:
        options=lambda w: predict_options(w.model_type, w.seed),
    shell:
        "scgpt-vcc predict --model-type {wildcards.model_type} --data {input.data}"
        " --split {input.split} --pairing {input.pairing} --seed {wildcards.seed}"
        " --output {output.h5ad} --threads {threads} {params.options} 2> {log}"


use rule predict_baseline as predict_scgpt with:
    wildcard_constraints:
        model_type="|".join(scgpt_model_types()),
    resources:
        gpu=1,
        gpu_model=GPU["slurm_gpu"],


rule heldout_real:
    input:
        data=f"{GEARS_DIR}/perturb_processed.h5ad",
        split=lambda w: split_outputs(w.seed)[0],
        pairing=f"{GEARS_DIR}/data_pyg/pairing_seed{{seed}}.npz",
    output:
        h5ad=f"{PREDICTIONS_DIR}/seed{{seed}}/real.h5ad",
    log:
        f"logs/{DATASET}/heldout_real_seed{{seed}}.log",
    benchmark:
        f"benchmarks/{DATASET}/heldout_real_seed{{seed}}.tsv"
    conda:
        "../envs/scgpt-vcc.yaml"
    params:
        options=heldout_real_options(),
    shell:
        "scgpt-vcc heldout-real --data {input.data} --split {input.split}"
        " --pairing {input.pairing} --seed {wildcards.seed} --output {output.h5ad}"
        " {params.options} 2> {log}"


rule prediction_counts:
    input:
        pred=f"{PREDICTIONS_DIR}/seed{{seed}}/{{name}}.h5ad",
        converted=f"{GEARS_DIR}/converted.h5ad",
    output:
        h5ad=f"{PREDICTIONS_DIR}/seed{{seed}}/counts/{{name}}.h5ad",
    log:
        f"logs/{DATASET}/prediction_counts_seed{{seed}}_{{name}}.log",
    benchmark:
        f"benchmarks/{DATASET}/prediction_counts_seed{{seed}}_{{name}}.tsv"
    wildcard_constraints:
        name="|".join(["real", *EVAL_CFG["model_types"]]),
    conda:
        "../envs/scgpt-vcc.yaml"
    params:
        options=counts_options(),
    shell:
        "scgpt-vcc counts --pred {input.pred} --converted {input.converted}"
        " --output {output.h5ad} {params.options} 2> {log}"
