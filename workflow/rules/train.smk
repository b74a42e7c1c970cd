# Finetuning of scGPT's perturbation model, one run per seed (src/scgpt_vcc/train/).
# Killed or preempted runs resume from {outdir}/resume/ (not a declared output, so
# Snakemake keeps it when it reruns the incomplete job).


rule finetune:
    input:
        data=f"{GEARS_DIR}/perturb_processed.h5ad",
        pairing=f"{GEARS_DIR}/data_pyg/pairing_seed{{seed}}.npz",
        split=lambda w: split_outputs(w.seed)[0],
        pretrained=pretrained_files(),
    output:
        model=f"{finetuned_dir('{seed}')}/best_model.pt",
        args=f"{finetuned_dir('{seed}')}/args.json",
        vocab=f"{finetuned_dir('{seed}')}/vocab.json",
        metrics=f"{finetuned_dir('{seed}')}/metrics.csv",
        steps=f"{finetuned_dir('{seed}')}/steps.csv",
        curve=report(
            f"{finetuned_dir('{seed}')}/loss_curve.png",
            category="Training",
            subcategory="seed {seed}",
            caption="../report/training.rst",
        ),
        run_log=f"{finetuned_dir('{seed}')}/run.log",
    log:
        f"logs/{DATASET}/finetune_seed{{seed}}.log",
    benchmark:
        f"benchmarks/{DATASET}/finetune_seed{{seed}}.tsv"
    wildcard_constraints:
        seed=r"\d+",
    conda:
        "../../envs/scgpt-vcc.yaml"
    threads: TRAIN_CFG["threads"]
    resources:
        gpu=TRAIN_CFG["gpus"],
        gpu_model=GPU["slurm_gpu"],
    params:
        outdir=lambda w, output: Path(output.model).parent,
        checkpoint_dir=lambda w, input: Path(input.pretrained[0]).parent,
        launcher=finetune_launcher(),
        options=finetune_options(),
    shell:
        "{params.launcher} finetune --data {input.data} --pairing {input.pairing}"
        " --split {input.split} --checkpoint-dir {params.checkpoint_dir}"
        " --outdir {params.outdir} --seed {wildcards.seed} --threads {threads}"
        " {params.options} 2> {log}"
