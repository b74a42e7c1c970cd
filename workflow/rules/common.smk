import shlex
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

validate(config, schema="../schemas/config.schema.yaml")

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
                "at your copy (or set synthetic.enabled: true to use generated demo data)."
            )


def cli_options(**options):
    """Render keyword options as CLI flags: a_b=1 -> --a-b 1; None is left out."""
    flags = []
    for key, value in options.items():
        if value is None:
            continue
        flags.append(f"--{key.replace('_', '-')} {shlex.quote(str(value))}")
    return " ".join(flags)


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


def final_outputs():
    return [f"{GEARS_DIR}/converted.h5ad", *pretrained_files()]


check_real_inputs()
