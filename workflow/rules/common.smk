import os
import shlex
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

validate(config, schema="../schemas/config.schema.yaml")

# --sdm conda: ../envs/scgpt-vcc.post-deploy.sh installs the package from this repository.
# Snakemake runs a copy of that script from .snakemake/conda/, in the working directory,
# so the repository's path (the folder above workflow/) reaches it from here. A workflow
# read from elsewhere than a local checkout leaves it unset, and the script says so.
# (Set, not read, so the envvars directive, which asserts variables the user sets, is no fit.)
_REPO = Path(workflow.basedir).parent
if (_REPO / "pyproject.toml").is_file():
    os.environ.update(SCGPT_VCC_REPO=str(_REPO.resolve()))


# Wildcards that mean the same in every rule; model_type differs per rule (baseline or scGPT).
wildcard_constraints:
    seed=r"\d+",


# Every job runs the package's CLI; without it on PATH a job would die with exit 127 and
# no word of why.
shell.prefix(
    "set -euo pipefail; command -v scgpt-vcc >/dev/null || {{ echo 'scgpt-vcc is not on PATH:"
    " activate the environment first (source .venv/bin/activate; make demo does it), or run"
    " with --sdm conda' >&2; exit 127; }}; "
)

DATASET = config["dataset"]
SYNTHETIC = config["synthetic"]["enabled"]
PRETRAINED_FILES = ("args.json", "vocab.json", "best_model.pt")
GEARS_DIR = f"results/gears/{DATASET}"

# Where a user gets each real input when it is missing (synthetic.enabled: false).
REAL_INPUT_SOURCES = {
    "raw_adata": "the Virtual Cell Challenge training data (adata_Training.h5ad) from the "
    "challenge site or Arc Institute's Virtual Cell Atlas",
    "validation_counts": "pert_counts_Validation.csv from the Virtual Cell Challenge downloads",
    "gene_names": "gene_names.csv from the Virtual Cell Challenge downloads "
    "(a copy ships as resources/reference/vcc_gene_names.csv)",
    "pretrained_dir": "the whole-human model (scGPT_human: args.json, vocab.json, "
    "best_model.pt) from the scGPT model zoo",
}


def pretrained_files():
    return [f"{config['pretrained_dir']}/{name}" for name in PRETRAINED_FILES]


def check_real_inputs():
    """Stop early, naming the source, when a real input is missing."""
    if SYNTHETIC:
        return
    wanted = {
        key: [config[key]] for key in ("raw_adata", "validation_counts", "gene_names")
    }
    wanted["pretrained_dir"] = pretrained_files()
    for key, paths in wanted.items():
        missing = [p for p in paths if not Path(p).exists()]
        if missing:
            raise WorkflowError(
                f"config key '{key}': {', '.join(missing)} does not exist. "
                f"Download {REAL_INPUT_SOURCES[key]} and put it there, or point '{key}' "
                "at your copy (or run the bundled demo on generated data: "
                "--configfile config/demo.yaml)."
            )


def cli_options(**options):
    """Render keyword options as CLI flags: a_b=1 -> --a-b 1, a list as --a-b x y (an empty
    one is left out: the CLI's default is empty). A config null is passed as 'none' (the
    CLI's word for no value), never left to the CLI's default."""
    flags = []
    for key, value in options.items():
        if isinstance(value, list):
            words = [shlex.quote(str(item)) for item in value]
        else:
            words = [shlex.quote("none" if value is None else str(value))]
        if words:
            flags.append(" ".join([f"--{key.replace('_', '-')}", *words]))
    return " ".join(flags)


def convert_options(**overrides):
    """convert-to-gears options: the dataset's labels and the convert section."""
    return cli_options(
        cell_type=config["cell_type"],
        context_column=config["context_column"],
        control_label=config["control_label"],
        perturbation_column=config["perturbation_column"],
        **{**config["convert"], **overrides},
    )


def synthetic_dataset_options():
    settings = config["synthetic"]
    return cli_options(
        control_label=config["control_label"],
        **{k: v for k, v in settings.items() if k not in ("enabled", "checkpoint")},
    )


def synthetic_checkpoint_options():
    return cli_options(
        seed=config["synthetic"]["seed"], **config["synthetic"]["checkpoint"]
    )


def selected_gpu_class():
    """The gpu_classes entry named by gpu_class: SLURM GPU type and training settings."""
    name = config["gpu_class"]
    if name not in config["gpu_classes"]:
        raise WorkflowError(
            f"config key 'gpu_class': '{name}' is not one of gpu_classes "
            f"({', '.join(sorted(config['gpu_classes']))}). Pick one or add it to gpu_classes."
        )
    return config["gpu_classes"][name]


GPU = selected_gpu_class()


def requested_gpu_type(resources):
    """The GPU type a resource mapping pins (gpu_model or a typed gres gpu:TYPE[:N]), or None."""
    for name in ("gpu_model", "gres"):
        raw = getattr(resources.get(name), "raw", resources.get(name))
        if not isinstance(raw, str):
            continue
        value = raw.strip().strip("'\"")
        if name == "gpu_model":
            return value
        parts = value.split(":")
        if parts[0] == "gpu" and len(parts) >= 2 and not parts[1].isdigit():
            return parts[1]
    return None


def check_gpu_requests():
    """Fail the DAG (also under -n) when a profile or --set-resources pins another GPU type.

    The GPU rules take gpu_model from gpu_class, so the request and the training settings
    always agree; a gpu_model or typed gres set outside config would silently break that.
    """
    # Snakemake's ResourceSettings (snakemake.settings.types, the type of its public API):
    # the only place where --set-resources and --default-resources reach a Snakefile.
    settings = workflow.resource_settings
    overrides = settings.overwrite_resources.items()
    pinned = {f"set-resources of {r}": resources for r, resources in overrides}
    if settings.default_resources is not None:
        pinned["default-resources"] = settings.default_resources
    for where, resources in pinned.items():
        gpu_type = requested_gpu_type(resources)
        if gpu_type is not None and gpu_type != GPU["slurm_gpu"]:
            raise WorkflowError(
                f"{where} requests GPU type '{gpu_type}' but gpu_class '{config['gpu_class']}' "
                f"asks for '{GPU['slurm_gpu']}' (batch size {GPU['batch_size']}, {GPU['precision']}). "
                "Set gpu_class in the config instead of gpu_model/gres in the profile or "
                "--set-resources; the GPU rules take their GPU type from gpu_class."
            )


# --- GEARS processing (rules/gears.smk) ---
GEARS_CFG = config["gears"]
GEARS_GO_FILES = ("gene2go_all.pkl", "essential_all_data_pert_genes.pkl")


def go_inputs():
    if not GEARS_CFG["go_filter"]:
        return []
    return [f"{GEARS_CFG['go_dir']}/{name}" for name in GEARS_GO_FILES]


# The submission's models train on every training perturbation (the original setup).
SUBMISSION_SPLIT = "all_train"
# A VCC submission holds one cell context: a dataset of several makes none.
MAKES_SUBMISSION = not config["context_column"]
SUBMISSION_SEED = config["seeds"][0]


def check_evaluation_split():
    """Refuse split 'custom' without held-out perturbations (the schema refuses the
    splits that hold out nothing or train on nothing)."""
    if GEARS_CFG["split"] == "custom" and not GEARS_CFG["test_perts"]:
        raise WorkflowError(
            "config key 'gears.test_perts' is empty, so split 'custom' holds out nothing to "
            "evaluate. List the held-out conditions (e.g. 'GENE+ctrl') there."
        )


def split_outputs(seed, split=GEARS_CFG["split"]):
    stem = f"{GEARS_DIR}/splits/{DATASET}_{split}_{seed}_{GEARS_CFG['train_gene_set_size']}"
    return [f"{stem}.pkl"] + ([f"{stem}_subgroup.pkl"] if split == "simulation" else [])


def split_options(split):
    """build-split options: GEARS's splitter settings and the small-perturbation filter."""
    min_cells = GEARS_CFG["min_cells"] if GEARS_CFG["exclude_below_min_cells"] else 0
    return cli_options(
        name=DATASET,
        split=split,
        train_gene_set_size=GEARS_CFG["train_gene_set_size"],
        min_cells=min_cells,
    )


SUBMISSION_SPLIT_FILE = split_outputs(SUBMISSION_SEED, SUBMISSION_SPLIT)[0]


def gears_outputs():
    outputs = [
        f"{GEARS_DIR}/perturb_processed.h5ad",
        f"{GEARS_DIR}/go_filter.json",
        f"{GEARS_DIR}/qc/qc.json",
    ]
    for seed in config["seeds"]:
        outputs.append(f"{GEARS_DIR}/data_pyg/pairing_seed{seed}.npz")
        outputs.extend(split_outputs(seed))
    if GEARS_CFG["write_cell_graphs"]:
        outputs.append(f"{GEARS_DIR}/data_pyg/cell_graphs.pkl")
    return outputs


# --- finetuning (rules/train.smk) ---
TRAIN_CFG = config["train"]
# Data genes to vocabulary tokens, with HGNC's renames (rule match_vocabulary).
VOCAB_MATCH = f"{GEARS_DIR}/vocab_match.json"


def finetune_launcher():
    """The CLI; under torchrun with one process per GPU when several GPUs are requested.

    Several nodes (SLURM only): scripts/slurm_torchrun.sh starts one torchrun per node
    with srun; they meet by c10d rendezvous on the job's first node.
    """
    nodes, gpus = TRAIN_CFG["nodes"], TRAIN_CFG["gpus"]
    cli = "$(command -v scgpt-vcc)"
    if nodes > 1:
        # Relative, so that a moved working directory does not count as a param change.
        script = os.path.relpath(
            Path(workflow.basedir) / "scripts" / "slurm_torchrun.sh"
        )
        return f"bash {script} {nodes} {gpus} {cli}"
    if gpus > 1:
        return f"torchrun --standalone --nproc-per-node {gpus} {cli}"
    return "scgpt-vcc"


def finetune_resources():
    """What a finetuning job asks for: train.gpus GPUs of gpu_class on each of train.nodes.

    One node: --gpus=<type>:<gpus>. Several: --nodes, one task per node, --gres per node;
    ``mpi`` makes the plugin run the command as it is (its own srun starts the tasks) and
    ``tasks_per_gpu: 0`` keeps it from adding --ntasks-per-gpu.
    """
    nodes, gpus, gpu_type = TRAIN_CFG["nodes"], TRAIN_CFG["gpus"], GPU["slurm_gpu"]
    if nodes == 1:
        return {"gpu": gpus, "gpu_model": gpu_type}
    return {
        "nodes": nodes,
        "tasks": nodes,
        "tasks_per_gpu": 0,
        "mpi": "srun",
        "gres": f"gpu:{gpu_type}:{gpus}",
    }


def finetune_inputs(seed, split):
    """Inputs of a finetuning run: the data, the seed's control pairing, a split file, the
    pretrained checkpoint and the data genes' vocabulary match."""
    return {
        "data": f"{GEARS_DIR}/perturb_processed.h5ad",
        "pairing": f"{GEARS_DIR}/data_pyg/pairing_seed{seed}.npz",
        "split": split,
        "pretrained": pretrained_files(),
        "renames": VOCAB_MATCH,
    }


def load_prefixes_option(model_type):
    """Checkpoint modules a trained model type starts from: none for scgpt_scratch."""
    prefixes = [] if model_type == "scgpt_scratch" else TRAIN_CFG["load_prefixes"]
    return cli_options(load_prefixes=",".join(prefixes))


def gpu_precision():
    """Autocast precision of scGPT on a GPU, in training and prediction alike: the GPU
    class's unless train.precision overrides it; fp32 when train.amp is off."""
    if not TRAIN_CFG["amp"]:
        return "fp32"
    return TRAIN_CFG["precision"] or GPU["precision"]


def finetune_options():
    """Training options; batch size, accumulation and precision default to the GPU class."""
    per_gpu = {k: TRAIN_CFG[k] or GPU[k] for k in ("batch_size", "accumulation")}
    per_gpu["precision"] = gpu_precision()
    settings = {
        k: v
        for k, v in TRAIN_CFG.items()
        if k not in ("gpus", "nodes", "threads", "load_prefixes", *per_gpu)
    }
    return cli_options(gpu_class=config["gpu_class"], **per_gpu, **settings)


MODELS_DIR = f"results/models/{DATASET}"
# A trained folder: what predict and the submission read, and the training record.
TRAINED_FILES = (*PRETRAINED_FILES, "metrics.csv", "steps.csv", "run.log")


def trained_outputs(folder, subcategory):
    """Named outputs of one finetuning run into ``folder``."""
    outputs = {name.split(".")[0]: f"{folder}/{name}" for name in TRAINED_FILES}
    outputs["curve"] = report(
        f"{folder}/loss_curve.png",
        category="Training",
        subcategory=subcategory,
        caption="../report/training.rst",
    )
    return outputs


def trained_dir(model_type, seed):
    return f"{MODELS_DIR}/seed{seed}/{model_type}"


def submission_model_dir(model_type):
    return f"{MODELS_DIR}/submission/{model_type}"


# --- prediction and submission (rules/predict.smk, rules/submit.smk) ---
PREDICT_CFG = config["predict"]
SUBMIT_CFG = config["submission"]
PREDICTIONS_DIR = f"results/predictions/{DATASET}"
SUBMISSION_DIR = f"results/submission/{DATASET}"


def is_scgpt(model_type):
    return model_type.startswith("scgpt")


def scgpt_model_types():
    return [m for m in PREDICT_CFG["model_types"] if is_scgpt(m)]


def baseline_model_types():
    return [m for m in PREDICT_CFG["model_types"] if not is_scgpt(m)]


def model_dir(model_type, seed=None):
    """The folder a model type reads: its trained folder (scGPT models; the submission's
    when ``seed`` is None), the pretrained checkpoint (linear_scgpt), or None."""
    if is_scgpt(model_type):
        return (
            trained_dir(model_type, seed) if seed else submission_model_dir(model_type)
        )
    if model_type == "linear_scgpt":
        return config["pretrained_dir"]
    return None


def model_files(model_type, seed=None):
    folder = model_dir(model_type, seed)
    return [] if folder is None else [f"{folder}/{name}" for name in PRETRAINED_FILES]


def finetune_outputs():
    trained = [
        trained_dir(m, seed) for seed in config["seeds"] for m in scgpt_model_types()
    ]
    if MAKES_SUBMISSION and is_scgpt(SUBMIT_CFG["model"]):
        trained.append(submission_model_dir(SUBMIT_CFG["model"]))
    return [f"{folder}/{name}" for folder in trained for name in TRAINED_FILES]


# Settings of the predicted cells (how many), as opposed to those of the models.
CELL_SETTINGS = ("n_cells", "n_control_cells")


def uses_vocab(model_type):
    """Model types that feed genes to scGPT's vocabulary (scGPT, linear_scgpt)."""
    return is_scgpt(model_type) or model_type == "linear_scgpt"


def vocab_inputs(model_type):
    return [VOCAB_MATCH] if uses_vocab(model_type) else []


# predict settings only some model types use: scGPT's inference, the linear model's fit.
SCGPT_SETTINGS = ("chunk_size", "device", "compile")
LINEAR_SETTINGS = ("linear_pca_dim", "linear_ridge")


def model_settings(model_type):
    """predict's settings that ``model_type`` uses; an scGPT model also gets the training's
    GPU precision and the GPU class's cells per model call, and the models that use the
    vocabulary the genes' renames."""
    unused = [*CELL_SETTINGS, "model_types", "threads"]
    if not is_scgpt(model_type):
        unused += SCGPT_SETTINGS
    if not model_type.startswith("linear"):
        unused += LINEAR_SETTINGS
    settings = {k: v for k, v in PREDICT_CFG.items() if k not in unused}
    if is_scgpt(model_type):
        settings["precision"] = gpu_precision()
        settings["gpu_batch_size"] = GPU["predict_batch_size"]
    if uses_vocab(model_type):
        settings["gene_renames"] = VOCAB_MATCH
    return settings


def predict_options(model_type, seed):
    folder = model_dir(model_type, seed)
    return cli_options(
        **({"model_dir": folder} if folder else {}),
        **model_settings(model_type),
        **{k: PREDICT_CFG[k] for k in CELL_SETTINGS},
    )


def heldout_real_options():
    return cli_options(**{k: PREDICT_CFG[k] for k in CELL_SETTINGS})


def submission_counts():
    return SUBMIT_CFG["counts_csv"] or config["validation_counts"]


def submission_options(model_type):
    folder = model_dir(model_type)
    return cli_options(
        model_type=model_type,
        **({"model_dir": folder} if folder else {}),
        max_cells=SUBMIT_CFG["max_cells"],
        min_control_cells=SUBMIT_CFG["min_control_cells"],
        target_sum=SUBMIT_CFG["target_sum"],
        seed=SUBMISSION_SEED,
        **model_settings(model_type),
    )


def prediction_outputs():
    return [
        f"{PREDICTIONS_DIR}/seed{seed}/{name}.h5ad"
        for seed in config["seeds"]
        for name in ("real", *PREDICT_CFG["model_types"])
    ]


def submission_dir(model_type):
    return f"{SUBMISSION_DIR}/{model_type}"


# The true counts of the submission's list (synthetic data only; written by make_synthetic_dataset).
SUBMISSION_TRUTH = f"resources/{DATASET}/adata_Validation_truth.h5ad"


def submission_truth_counts():
    return [SUBMISSION_TRUTH] if SYNTHETIC else []


def submission_outputs():
    if not MAKES_SUBMISSION:
        return []
    folder = submission_dir(SUBMIT_CFG["model"])
    outputs = [
        f"{folder}/prediction.prep.vcc",
        f"{folder}/submission.json",
        f"{folder}/submission_counts.json",
    ]
    if SYNTHETIC:
        outputs.append(f"{folder}/score.json")
        if VCC2026:
            outputs.append(f"{folder}/metrics_vcc2026.json")
    return outputs


# --- evaluation (rules/evaluate.smk) ---
EVAL_CFG = config["evaluate"]
EVAL_DIR = f"results/eval/{DATASET}"
BASELINE_MODEL = "train_mean"


def check_eval_models():
    """Every evaluated model type must be predicted."""
    missing = [
        m for m in EVAL_CFG["model_types"] if m not in PREDICT_CFG["model_types"]
    ]
    if missing:
        raise WorkflowError(
            f"config key 'evaluate.model_types': {', '.join(missing)} not in "
            "'predict.model_types'; add them there or remove them here."
        )


def eval_baseline_input(model_type, seed):
    """train_mean's metrics.json: the challenge-score baseline of the other model types."""
    if model_type == BASELINE_MODEL or BASELINE_MODEL not in EVAL_CFG["model_types"]:
        return []
    return [f"{EVAL_DIR}/seed{seed}/{BASELINE_MODEL}/metrics.json"]


def evaluate_options():
    baseline = EVAL_CFG["challenge_baseline"]
    return " ".join(
        [
            cli_options(
                control_label=config["control_label"],
                de_key=EVAL_CFG["de_key"],
                n_top_de=EVAL_CFG["n_top_de"],
                chunk_size=EVAL_CFG["chunk_size"],
                vcc_group_size=EVAL_CFG["vcc_group_size"],
            ),
            f"--baseline {baseline['des']} {baseline['pds']} {baseline['mae']}",
        ]
    )


def ceiling_options():
    """vcc-ceiling options: the evaluate settings it shares (threads come from the rule)."""
    return cli_options(
        control_label=config["control_label"],
        chunk_size=EVAL_CFG["chunk_size"],
        vcc_group_size=EVAL_CFG["vcc_group_size"],
        ceiling_seed=EVAL_CFG["ceiling_seed"],
    )


COUNTS_CFG = config["counts"]
VCC2026 = "vcc2026" in EVAL_CFG["profiles"]


def counts_options():
    return cli_options(**COUNTS_CFG)


def vcc2026_options():
    return cli_options(control_label=config["control_label"])


def eval_outputs():
    profile_files = ["metrics.json", *(["metrics_vcc2026.json"] if VCC2026 else [])]
    return [
        f"{EVAL_DIR}/seed{seed}/{model}/{name}"
        for seed in config["seeds"]
        for model in EVAL_CFG["model_types"]
        for name in profile_files
    ]


def summary_outputs():
    return [f"{EVAL_DIR}/summary.md", f"{EVAL_DIR}/summary.csv"]


def final_outputs():
    return [
        f"{GEARS_DIR}/converted.h5ad",
        *pretrained_files(),
        *gears_outputs(),
        *finetune_outputs(),
        *prediction_outputs(),
        *submission_outputs(),
        *summary_outputs(),
    ]


check_real_inputs()
check_gpu_requests()
check_evaluation_split()
check_eval_models()
