# Finetuning of scGPT's perturbation model (src/scgpt_vcc/train/): per seed and scGPT model
# type on the seed's split (scgpt_finetuned from the pretrained checkpoint, scgpt_scratch
# from random initialisation), and once on every training perturbation for the submission.
# Killed or preempted runs resume from {outdir}/resume/ (not a declared output, so
# Snakemake keeps it when it reruns the incomplete job). Every model that uses the scGPT
# vocabulary reads the data genes' match to it, HGNC renames included (match_vocabulary).


rule match_vocabulary:
    input:
        data=f"{GEARS_DIR}/perturb_processed.h5ad",
        vocab=f"{config['pretrained_dir']}/vocab.json",
        hgnc=config["hgnc_table"] or [],
    output:
        match=report(
            VOCAB_MATCH, category="Data QC", caption="../report/vocab_match.rst"
        ),
    log:
        f"logs/{DATASET}/match_vocabulary.log",
    conda:
        "../envs/scgpt-vcc.yaml"
    params:
        hgnc=lambda w, input: cli_options(hgnc_table=input.hgnc) if input.hgnc else "",
    shell:
        "scgpt-vcc match-vocabulary {input.data} {input.vocab} {output.match}"
        " {params.hgnc} 2> {log}"


rule finetune:
    input:
        **finetune_inputs("{seed}", lambda w: split_outputs(w.seed)[0]),
    output:
        **trained_outputs(trained_dir("{model_type}", "{seed}"), "seed {seed}"),
    log:
        f"logs/{DATASET}/finetune_seed{{seed}}_{{model_type}}.log",
    benchmark:
        f"benchmarks/{DATASET}/finetune_seed{{seed}}_{{model_type}}.tsv"
    wildcard_constraints:
        model_type="|".join(scgpt_model_types()) or "scgpt_finetuned",
    conda:
        "../envs/scgpt-vcc.yaml"
    threads: TRAIN_CFG["threads"]
    resources:
        **finetune_resources(),
    params:
        outdir=lambda w, output: Path(output.best_model).parent,
        checkpoint_dir=lambda w, input: Path(input.pretrained[0]).parent,
        seed=lambda w: w.seed,
        launcher=finetune_launcher(),
        load_prefixes=lambda w: load_prefixes_option(w.model_type),
        options=finetune_options(),
    shell:
        "{params.launcher} finetune --data {input.data} --pairing {input.pairing}"
        " --split {input.split} --checkpoint-dir {params.checkpoint_dir}"
        " --outdir {params.outdir} --seed {params.seed} --threads {threads}"
        " --gene-renames {input.renames} {params.load_prefixes} {params.options} 2> {log}"


use rule finetune as finetune_submission with:
    input:
        **finetune_inputs(SUBMISSION_SEED, SUBMISSION_SPLIT_FILE),
    output:
        **trained_outputs(submission_model_dir("{model_type}"), "submission"),
    log:
        f"logs/{DATASET}/finetune_submission_{{model_type}}.log",
    benchmark:
        f"benchmarks/{DATASET}/finetune_submission_{{model_type}}.tsv"
    wildcard_constraints:
        model_type=r"scgpt_\w+",
    params:
        seed=SUBMISSION_SEED,
