"""Read the jobs a Snakemake dry run plans: rule, wildcards, reason, resources and shell
command (with ``-p``) per job."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import run_snakemake

JOB_HEADER = re.compile(r"^(?:local)?(?:rule|checkpoint) (\w+):$")


@dataclass
class PlannedJob:
    rule: str
    wildcards: str = ""
    reason: str = ""
    resources: dict[str, str] = field(default_factory=dict)
    shell: str = ""

    @property
    def gpu_type(self) -> str | None:
        """The GPU type the job asks for (gpu >= 1 with a gpu_model), else None."""
        if self.resources.get("gpu", "0") in ("0", ""):
            return None
        return self.resources.get("gpu_model")


def parse_plan(output: str) -> list[PlannedJob]:
    """Jobs of a dry run's printout (``snakemake -n``), in printed order."""
    jobs: list[PlannedJob] = []
    for line in output.splitlines():
        header = JOB_HEADER.match(line)
        if header:
            jobs.append(PlannedJob(header.group(1)))
            continue
        if jobs and line.startswith("Shell command: "):
            jobs[-1].shell = line.removeprefix("Shell command: ")
            continue
        if not jobs or not line.startswith("    "):
            continue
        key, _, value = line.strip().partition(": ")
        if key == "wildcards":
            jobs[-1].wildcards = value
        elif key == "reason":
            jobs[-1].reason = value
        elif key == "resources":
            for item in value.split(", "):
                name, _, val = item.partition("=")
                jobs[-1].resources[name] = val
    return jobs


def plan(workdir: Path, *args: str) -> list[PlannedJob]:
    """Dry-run snakemake in ``workdir`` and return the jobs it would run (not the target rule)."""
    output = run_snakemake(workdir, "-n", *args).stdout
    return [job for job in parse_plan(output) if job.rule != "all"]
