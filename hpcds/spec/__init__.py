"""The job spec: what to train, on what data, with which DeepSpeed and Slurm settings, validated with every problem
at once (`job`: the sections and the layering; `model`: the model section; `types`: the checked string types;
`presets`: named starting points; `doc`: the field reference in docs/spec.md). No I/O here except `load_spec`.
"""

from hpcds.spec.job import (
    CLI_FLAGS,
    CheckpointSpec,
    DatasetSpec,
    DataSpec,
    DeepSpeedSpec,
    JobSpec,
    SlurmSpec,
    TrainingSpec,
    WandbSpec,
    build_tree,
    deep_merge,
    load_spec,
    parse_set,
    validate_spec,
)
from hpcds.spec.model import LoraSpec, ModelSpec

__all__ = [
    "CLI_FLAGS",
    "CheckpointSpec",
    "DataSpec",
    "DatasetSpec",
    "DeepSpeedSpec",
    "JobSpec",
    "LoraSpec",
    "ModelSpec",
    "SlurmSpec",
    "TrainingSpec",
    "WandbSpec",
    "build_tree",
    "deep_merge",
    "load_spec",
    "parse_set",
    "validate_spec",
]
