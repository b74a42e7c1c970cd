"""The package's settings dataclasses and step functions, the config schema and
config/config.yaml agree on every default they share, so a step run through the CLI (whose
options take their defaults from the same signatures) behaves as the workflow's."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from scgpt_vcc.data.convert import convert_to_gears
from scgpt_vcc.data.de import compute_de
from scgpt_vcc.data.qc import write_qc
from scgpt_vcc.data.splits import build_split
from scgpt_vcc.data.synthetic import SyntheticSpec
from scgpt_vcc.evaluate.run import DEFAULT_BASELINE, PROFILES, EvalSettings
from scgpt_vcc.model.random_checkpoint import write_random_checkpoint
from scgpt_vcc.predict import MODEL_TYPES
from scgpt_vcc.predict.counts import CountSettings
from scgpt_vcc.predict.run import PredictSettings
from scgpt_vcc.submission import SubmissionSettings
from scgpt_vcc.train.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
SCHEMA = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
CONFIG = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
# null in the workflow: the gpu_classes entry decides (under the key given); the library
# needs a concrete value.
FROM_GPU_CLASS = {
    ("train", "batch_size"): "batch_size",
    ("train", "accumulation"): "accumulation",
    ("train", "precision"): "precision",
    ("predict", "batch_size"): "predict_batch_size",
}


def _shared_fields(section: str, settings: type) -> list[tuple[str, object]]:
    properties = SCHEMA["properties"][section]["properties"]
    fields = []
    for field in dataclasses.fields(settings):
        if field.name in properties and (section, field.name) not in FROM_GPU_CLASS:
            default = field.default
            fields.append((field.name, list(default) if isinstance(default, tuple) else default))
    return fields


@pytest.mark.parametrize(
    ("section", "settings"),
    [("train", TrainConfig), ("predict", PredictSettings), ("submission", SubmissionSettings),
     ("evaluate", EvalSettings), ("counts", CountSettings)],
)  # fmt: skip
def test_defaults_agree(section: str, settings: type) -> None:
    shared = _shared_fields(section, settings)
    assert len(shared) >= 3, "the section shares settings with the package"
    properties = SCHEMA["properties"][section]["properties"]
    for name, default in shared:
        assert properties[name].get("default") == default, f"schema {section}.{name}"
        assert CONFIG[section][name] == default, f"config.yaml {section}.{name}"


def test_gpu_class_settings_are_left_to_the_class() -> None:
    classes = SCHEMA["properties"]["gpu_classes"]
    for (section, name), class_key in FROM_GPU_CLASS.items():
        properties = SCHEMA["properties"][section]["properties"]
        assert properties[name].get("default") is None and CONFIG[section][name] is None
        assert class_key in classes["additionalProperties"]["required"]
        assert all(class_key in entry for entry in classes["default"].values())
        assert classes["default"] == CONFIG["gpu_classes"]
    # The library's own GPU default is the default class's.
    default_class = CONFIG["gpu_classes"][CONFIG["gpu_class"]]
    assert PredictSettings().gpu_batch_size == default_class["predict_batch_size"]


def _section(path: str) -> tuple[dict, dict]:
    """Schema properties and config.yaml values of a dotted config section."""
    properties, values = SCHEMA, CONFIG
    for key in path.split("."):
        properties, values = properties["properties"][key], values[key]
    return properties["properties"], values


@pytest.mark.parametrize(
    ("section", "step", "fed_otherwise"),
    [
        ("synthetic", SyntheticSpec, ()),
        ("synthetic.checkpoint", write_random_checkpoint, ()),
        ("convert", convert_to_gears, ()),
        ("gears", compute_de, ()),
        # gears.min_cells reaches build_split only with exclude_below_min_cells (0 = keep all).
        ("gears", build_split, ("min_cells",)),
        ("gears", write_qc, ()),
    ],
    ids=lambda v: getattr(v, "__name__", None),
)
def test_step_defaults_agree(section: str, step: Callable, fed_otherwise: tuple) -> None:
    """Options with a default that a config key of the same name feeds default to its value."""
    properties, values = _section(section)
    defaults = {
        name: p.default
        for name, p in inspect.signature(step).parameters.items()
        if name in properties
        and name not in fed_otherwise
        and p.default is not inspect.Parameter.empty
    }
    assert defaults, f"{step.__name__} takes a setting of {section}"
    for name, default in defaults.items():
        default = list(default) if isinstance(default, tuple) else default
        assert properties[name].get("default") == default, f"schema {section}.{name}"
        assert values[name] == default, f"config.yaml {section}.{name}"


def test_challenge_baseline_agrees() -> None:
    properties = SCHEMA["properties"]["evaluate"]["properties"]
    assert properties["challenge_baseline"]["default"] == DEFAULT_BASELINE
    assert CONFIG["evaluate"]["challenge_baseline"] == DEFAULT_BASELINE


def _schema_defaults(schema: dict, path: str = "") -> dict[str, object]:
    """``{dotted key: default}`` of every schema property that declares one."""
    defaults = {}
    for name, prop in schema.get("properties", {}).items():
        key = f"{path}{name}"
        if "default" in prop and prop["default"] != {}:  # {}: filled from its properties
            defaults[key] = prop["default"]
        defaults.update(_schema_defaults(prop, f"{key}."))
    return defaults


def test_config_yaml_holds_the_schema_defaults() -> None:
    """config.yaml is the one file of defaults: it sets every key the schema defaults, to
    that default (and only the inputs, which have none, beyond)."""
    defaults = _schema_defaults(SCHEMA)
    assert len(defaults) > 50
    for key, default in defaults.items():
        value = CONFIG
        for part in key.split("."):
            assert part in value, f"config.yaml lacks {key}"
            value = value[part]
        assert value == default, f"config.yaml {key}: {value!r}, schema default {default!r}"
    undefaulted = {k for k in CONFIG if not any(d.split(".")[0] == k for d in defaults)}
    assert undefaulted == {"dataset", "raw_adata", "pretrained_dir", "validation_counts",
                           "gene_names", "seeds"}  # fmt: skip


def test_the_schema_knows_the_package_model_types() -> None:
    predict = SCHEMA["properties"]["predict"]["properties"]
    assert predict["model_types"]["items"]["enum"] == list(MODEL_TYPES)
    assert SCHEMA["properties"]["submission"]["properties"]["model"]["enum"] == list(MODEL_TYPES)
    assert SCHEMA["properties"]["evaluate"]["properties"]["model_types"]["default"] == list(
        MODEL_TYPES
    )


def test_profiles_are_the_packages() -> None:
    profiles = SCHEMA["properties"]["evaluate"]["properties"]["profiles"]
    assert tuple(profiles["items"]["enum"]) == PROFILES
    assert profiles["contains"] == {"const": PROFILES[0]}  # vcc2025 always runs
    assert CONFIG["evaluate"]["profiles"] == profiles["default"] == list(PROFILES)
