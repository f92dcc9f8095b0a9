"""The job spec: what to train, on what data, with which DeepSpeed and Slurm settings, validated with every problem
at once (`job`: the sections; `model`: the model section; `types`: the checked string types; `load`: layering,
loading and validation; `ds_config`: the user's own DeepSpeed config read into the spec; `tree`: dotted paths in
plain trees; `presets`: named starting points; `doc`: the field reference in docs/spec.md). No I/O here except
`load_spec`.
"""

from hpcds.spec.job import (
    CheckpointSpec,
    DatasetSpec,
    DataSpec,
    DeepSpeedSpec,
    JobSpec,
    SlurmSpec,
    TrainingSpec,
    WandbSpec,
)
from hpcds.spec.load import CLI_FLAGS, build_tree, load_spec, parse_set, validate_spec
from hpcds.spec.model import LoraSpec, ModelSpec
from hpcds.spec.tree import deep_merge

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
