"""The package's settings dataclasses, the config schema and config/config.yaml agree on
every default they share, so a step run through the CLI behaves as the workflow's."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from scgpt_vcc.evaluate.run import EvalSettings
from scgpt_vcc.predict.run import PredictSettings
from scgpt_vcc.submission import SubmissionSettings
from scgpt_vcc.train.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
SCHEMA = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
CONFIG = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
# null in the workflow: the gpu_classes entry decides; the library needs a concrete value.
FROM_GPU_CLASS = {("train", "batch_size"), ("train", "accumulation"), ("train", "precision")}


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
     ("evaluate", EvalSettings)],
)  # fmt: skip
def test_defaults_agree(section: str, settings: type) -> None:
    shared = _shared_fields(section, settings)
    assert len(shared) >= 3, "the section shares settings with the package"
    properties = SCHEMA["properties"][section]["properties"]
    for name, default in shared:
        assert properties[name].get("default") == default, f"schema {section}.{name}"
        assert CONFIG[section][name] == default, f"config.yaml {section}.{name}"


def test_gpu_class_settings_are_left_to_the_class() -> None:
    properties = SCHEMA["properties"]["train"]["properties"]
    for section, name in FROM_GPU_CLASS:
        assert properties[name].get("default") is None and CONFIG[section][name] is None
        assert name in SCHEMA["properties"]["gpu_classes"]["additionalProperties"]["required"]
