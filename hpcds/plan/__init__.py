"""The planner: parameter counts (`params`), memory per GPU for one strategy (`memory`), and the ZeRO strategy to use
(`strategy`). Pure functions of a validated spec; no I/O here.
"""

from hpcds.plan.memory import (
    GIB,
    Strategy,
    activation_bytes,
    bucket_bytes,
    checkpoint_bytes,
    checkpoint_save_s,
    flops_per_token,
    model_state_bytes,
    parse_mem_bytes,
    snapshot_bytes_per_node,
    zero_buckets,
)
from hpcds.plan.params import ParamCount, count_params
from hpcds.plan.strategy import (
    STRATEGY_ORDER,
    Plan,
    PlanRow,
    async_save_verdict,
    lead_needed_s,
    lead_shortfall,
    misfit,
    pin_strategy,
    plan_job,
    refusals,
)

__all__ = [
    "GIB",
    "STRATEGY_ORDER",
    "ParamCount",
    "Plan",
    "PlanRow",
    "Strategy",
    "activation_bytes",
    "async_save_verdict",
    "bucket_bytes",
    "checkpoint_bytes",
    "checkpoint_save_s",
    "count_params",
    "flops_per_token",
    "lead_needed_s",
    "lead_shortfall",
    "misfit",
    "model_state_bytes",
    "parse_mem_bytes",
    "pin_strategy",
    "plan_job",
    "refusals",
    "snapshot_bytes_per_node",
    "zero_buckets",
]
