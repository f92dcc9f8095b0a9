"""The strategy: memory per GPU for every ZeRO stage and offload (`plan_job`), the first that fits, and the pinning
of `zero_stage: auto` to it for the life of a run (`pin_strategy`).

The recommendation is the first strategy in `STRATEGY_ORDER` (least communication first) that fits. No I/O here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from hpcds.errors import HpcdsError
from hpcds.plan.memory import (
    GIB,
    HEADROOM_FRACTION,
    RESERVED_BYTES,
    Strategy,
    activation_bytes,
    bucket_bytes,
    checkpoint_bytes,
    checkpoint_save_s,
    flops_per_token,
    model_state_bytes,
    parse_mem_bytes,
    snapshot_bytes_per_node,
)
from hpcds.plan.params import ParamCount, count_params
from hpcds.spec import JobSpec
from hpcds.spec.model import SSM_LAYOUTS

# Least communication first (the order of the DeepSpeed/transformers guide: 0 > 1 > 2 > 2+offload > 3 > 3+offload).
# ZeRO-1 with optimizer offload moves as much over PCIe as ZeRO-2 with it while keeping full gradients, so it never
# comes first; it stays for completeness.
STRATEGY_ORDER = (
    Strategy(0),
    Strategy(1),
    Strategy(2),
    Strategy(2, offload_optimizer=True),
    Strategy(1, offload_optimizer=True),
    Strategy(3),
    Strategy(3, offload_optimizer=True),
    Strategy(3, offload_optimizer=True, offload_params=True),
)


@dataclass(frozen=True)
class PlanRow:
    strategy: Strategy
    params_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    cpu_bytes_per_node: int
    usable_bytes: int  # GPU memory minus headroom
    cpu_fits: bool = True
    buffers_bytes: int = 0  # DeepSpeed's gradient communication buckets
    # The asynchronous save's host copy, counted in cpu_bytes_per_node; 0 where saves stay synchronous.
    snapshot_bytes_per_node: int = 0

    @property
    def model_state_bytes(self) -> int:
        return self.params_bytes + self.grads_bytes + self.optimizer_bytes

    @property
    def total_bytes(self) -> int:
        return self.model_state_bytes + self.activations_bytes + self.buffers_bytes

    @property
    def headroom_bytes(self) -> int:
        """Usable memory left after this strategy; negative when it does not fit."""
        return self.usable_bytes - self.total_bytes

    @property
    def fits(self) -> bool:
        return self.headroom_bytes >= 0 and self.cpu_fits

    def to_dict(self) -> dict:
        return {
            "stage": self.strategy.stage,
            "offload_optimizer": self.strategy.offload_optimizer,
            "offload_params": self.strategy.offload_params,
            "name": self.strategy.name,
            "params_bytes": self.params_bytes,
            "grads_bytes": self.grads_bytes,
            "optimizer_bytes": self.optimizer_bytes,
            "activations_bytes": self.activations_bytes,
            "buffers_bytes": self.buffers_bytes,
            "total_bytes": self.total_bytes,
            "cpu_bytes_per_node": self.cpu_bytes_per_node,
            "snapshot_bytes_per_node": self.snapshot_bytes_per_node,
            "headroom_bytes": self.headroom_bytes,
            "fits": self.fits,
        }


@dataclass
class Plan:
    rows: list[PlanRow]
    params: ParamCount
    flops_per_token: float
    recommended: PlanRow | None
    chosen: PlanRow | None  # the spec's own strategy when its zero_stage is not auto
    gpu_mem_bytes: int
    reserve_bytes: int
    world_size: int
    gpus_per_node: int
    nodes: int
    checkpoint_bytes: int
    notes: list[str] = field(default_factory=list)
    async_save: bool = False  # periodic saves in the background, for the spec's (or the recommended) strategy
    async_save_reason: str = ""

    def row(self, strategy: Strategy) -> PlanRow:
        return next(r for r in self.rows if r.strategy == strategy)

    def to_dict(self) -> dict:
        return {
            "params": self.params.total,
            "params_active": self.params.active_per_token,  # a mixture of experts: what one token passes through
            "param_count": asdict(self.params),
            "flops_per_token": self.flops_per_token,
            "gpu_mem_bytes": self.gpu_mem_bytes,
            "reserve_bytes": self.reserve_bytes,
            "world_size": self.world_size,
            "gpus_per_node": self.gpus_per_node,
            "nodes": self.nodes,
            "checkpoint_bytes": self.checkpoint_bytes,
            "checkpoint_save_s": checkpoint_save_s(self.checkpoint_bytes),
            "async_save": self.async_save,
            "async_save_reason": self.async_save_reason,
            "strategies": [r.to_dict() for r in self.rows],
            "recommended": self.recommended.to_dict() if self.recommended else None,
            "chosen": self.chosen.to_dict() if self.chosen else None,
            "notes": list(self.notes),
        }


def plan_job(spec: JobSpec, gpu_mem_gb: float | None = None) -> Plan:
    """Memory per GPU for every strategy, and the first strategy (least communication) that fits."""
    gpu_mem_bytes = int((gpu_mem_gb if gpu_mem_gb is not None else spec.slurm.gpu_mem_gb) * GIB)
    reserve = int(gpu_mem_bytes * HEADROOM_FRACTION) + RESERVED_BYTES
    usable = gpu_mem_bytes - reserve
    params = count_params(spec.model)
    train = spec.training
    precision = train.precision
    seq_len = spec.model.max_seq_len
    acts = activation_bytes(spec.model, train.micro_batch_size, seq_len, precision, train.activation_checkpointing)
    gpus, nodes = spec.slurm.ranks, spec.slurm.nodes
    node_mem = parse_mem_bytes(spec.slurm.mem)
    rows = []
    verdicts = {}
    for strategy in STRATEGY_ORDER:
        p, g, o, cpu = model_state_bytes(strategy, params, gpus, nodes, precision)
        cpu_fits = node_mem is None or cpu <= node_mem
        buffers = bucket_bytes(spec, strategy, params)
        # CPU ranks hold their model states in host memory too.
        host = cpu + ((p + g + o) * gpus if spec.slurm.gpus_per_node == 0 else 0)
        snapshot = snapshot_bytes_per_node(params, precision, strategy.stage, gpus, nodes)
        verdicts[strategy] = verdict = async_save_verdict(spec, host, snapshot, node_mem)
        snapshot = snapshot if verdict[0] else 0
        rows.append(PlanRow(strategy, p, g, o, acts, cpu + snapshot, usable, cpu_fits, buffers, snapshot))
    allowed = [r for r in rows if _allowed(spec, r.strategy)]
    recommended = next((r for r in allowed if r.fits), None)
    ds = spec.deepspeed
    fixed = Strategy(ds.zero_stage, ds.offload_optimizer != "none", ds.offload_params != "none")
    chosen = next((r for r in rows if r.strategy == fixed), None) if ds.zero_stage != "auto" else None
    notes = []
    row = chosen or recommended
    async_on, async_reason = verdicts[row.strategy] if row else (False, "no strategy fits: no plan for saves")
    notes.append(async_reason)
    if spec.model.layout in SSM_LAYOUTS:
        notes.append(
            "Mamba activations assume the fused kernels (pip install 'hpcds[gpu]'); the reference path keeps more"
        )
    return Plan(
        rows=rows,
        params=params,
        flops_per_token=flops_per_token(spec.model, params, seq_len),
        recommended=recommended,
        chosen=chosen,
        gpu_mem_bytes=gpu_mem_bytes,
        reserve_bytes=reserve,
        world_size=spec.world_size,
        gpus_per_node=gpus,
        nodes=nodes,
        checkpoint_bytes=checkpoint_bytes(params, precision),
        notes=notes,
        async_save=async_on,
        async_save_reason=async_reason,
    )


def async_save_verdict(spec: JobSpec, host_bytes: int, snapshot_bytes: int, node_mem: int | None) -> tuple[bool, str]:
    """Whether periodic saves run in the background, and why, for one strategy: `host_bytes` is what the run already
    holds in a node's memory, `snapshot_bytes` the copy an asynchronous save adds (`snapshot_bytes_per_node`)."""
    wanted = spec.checkpoint.async_save
    if wanted is False:
        return False, "checkpoint.async_save is false: periodic saves block training for the whole write"
    if spec.deepspeed.offload_optimizer == "nvme":
        return False, (
            "periodic saves are synchronous: with the optimizer on NVMe, DeepSpeed copies its swap files inside the "
            "save itself"
        )
    copy = f"{snapshot_bytes / GIB:.1f} GiB"
    if node_mem is not None and host_bytes + snapshot_bytes > node_mem:
        return False, (
            f"periodic saves are synchronous: an asynchronous save's host copy ({copy} per node) beside the run's "
            f"{host_bytes / GIB:.1f} GiB does not fit slurm.mem ({node_mem / GIB:.0f} GiB)"
            + ("; checkpoint.async_save: true is refused" if wanted is True else "")
        )
    where = f"within slurm.mem {node_mem / GIB:.0f} GiB" if node_mem is not None else "checked at start"
    return True, f"periodic saves are asynchronous: a {copy} host copy per node ({where})"


def _allowed(spec: JobSpec, strategy: Strategy) -> bool:
    """Strategies compatible with what the spec fixed: a stage that is not auto, offloads the person asked for."""
    ds = spec.deepspeed
    if ds.zero_stage != "auto" and strategy.stage != ds.zero_stage:
        return False
    if ds.offload_optimizer != "none" and not strategy.offload_optimizer:
        return False
    return not (ds.offload_params != "none" and not strategy.offload_params)


def pin_strategy(spec: JobSpec) -> JobSpec:
    """Resolve `deepspeed.zero_stage: auto` to the recommended stage and offloads; any other spec is returned as is."""
    if spec.deepspeed.zero_stage != "auto":
        return spec
    plan = plan_job(spec)
    row = plan.recommended
    if row is None:
        raise HpcdsError(_nothing_fits_message(spec, plan))
    ds = spec.deepspeed
    opt = ds.offload_optimizer if ds.offload_optimizer != "none" else "cpu"
    par = ds.offload_params if ds.offload_params != "none" else "cpu"
    update = {
        "zero_stage": row.strategy.stage,
        "offload_optimizer": opt if row.strategy.offload_optimizer else "none",
        "offload_params": par if row.strategy.offload_params else "none",
    }
    return spec.model_copy(update={"deepspeed": ds.model_copy(update=update)})


def refusals(spec: JobSpec) -> list[str]:
    """What the planner refuses in a pinned spec, from one plan: checkpoint.async_save: true whose host copy does not
    fit slurm.mem, a strategy that does not fit its GPUs (`misfit`), a warning lead too short for a save
    (`lead_shortfall`). Specs for CPU ranks are judged on the first alone: the table is GPU memory, and such
    specs (tests, local debugging) may have no planned shape."""
    judged, asks_async = _judged(spec), spec.checkpoint.async_save is True
    if not (judged or asks_async):  # nothing to judge: a CPU-rank spec need not have a shape the planner can count
        return []
    plan = plan_job(spec)
    found = []
    if asks_async and not plan.async_save:
        hint = "hint: raise slurm.mem, or set checkpoint.async_save: auto (synchronous where the copy does not fit)"
        found.append(f"checkpoint.async_save: {plan.async_save_reason}\n{hint}")
    if not judged:
        return found
    return found + [why for why in (misfit(spec, plan), lead_shortfall(spec, plan)) if why is not None]


def _judged(spec: JobSpec) -> bool:
    return spec.slurm.gpus_per_node > 0 and spec.deepspeed.zero_stage != "auto"


def misfit(spec: JobSpec, plan: Plan | None = None) -> str | None:
    """Why a pinned spec's strategy does not fit its GPUs, as `hpcds plan` says it, with the strategies that do fit;
    None when it fits, or when the spec is not judged (see `refusals`)."""
    if not _judged(spec):
        return None
    plan = plan or plan_job(spec)
    chosen = plan.chosen
    if chosen is None or chosen.fits:
        return None
    headroom = chosen.headroom_bytes
    short = f"{-headroom / GIB:.1f} GiB short per GPU" if headroom < 0 else "too little CPU RAM per node"
    fitting = [row.strategy.name for row in plan.rows if row.fits]
    lines = [
        f"deepspeed: {chosen.strategy.name} does not fit {plan.params.total / 1e9:.2f}B parameters on "
        f"{plan.nodes} node(s) x {plan.gpus_per_node} GPU(s) of {plan.gpu_mem_bytes / GIB:.0f} GiB ({short})",
        "strategies that fit: " + (", ".join(fitting) if fitting else "none (`hpcds plan` shows what each needs)"),
        "hint: set deepspeed.zero_stage: auto (the planner picks), or the stage and offload of one that fits; "
        "--force submits it anyway",
    ]
    return "\n".join(lines)


# docs/preemption.md's rule for the warning's lead: two saves (one may be running when it comes) and a margin for the
# step in flight and the exit; the slowest step is the person's to add.
LEAD_MARGIN_S = 30


def lead_needed_s(spec: JobSpec, plan: Plan) -> float:
    """Seconds of warning one save-and-stop needs: 2 x the save time at checkpoint.write_gbps + LEAD_MARGIN_S."""
    return 2 * checkpoint_save_s(plan.checkpoint_bytes, spec.checkpoint.write_gbps) + LEAD_MARGIN_S


def lead_shortfall(spec: JobSpec, plan: Plan | None = None) -> str | None:
    """Why slurm.signal_lead_s is too short for this spec's checkpoint; None when it is long enough, or when the spec
    is not judged (see `refusals`)."""
    if not _judged(spec):
        return None
    plan = plan or plan_job(spec)
    need_s = lead_needed_s(spec, plan)
    if spec.slurm.signal_lead_s >= need_s:
        return None
    save_s = checkpoint_save_s(plan.checkpoint_bytes, spec.checkpoint.write_gbps)
    return (
        f"slurm.signal_lead_s: {spec.slurm.signal_lead_s} s is shorter than 2 x {save_s:.0f} s (a "
        f"{plan.checkpoint_bytes / GIB:.1f} GiB checkpoint at checkpoint.write_gbps {spec.checkpoint.write_gbps:g}) "
        f"+ {LEAD_MARGIN_S} s = {need_s:.0f} s, so the save after Slurm's warning may not finish\n"
        "hint: raise slurm.signal_lead_s (add your slowest step), or state your file system's checkpoint.write_gbps"
    )


def _nothing_fits_message(spec: JobSpec, plan: Plan) -> str:
    best = min((r for r in plan.rows if _allowed(spec, r.strategy)), key=lambda r: r.total_bytes)
    lines = [
        f"no ZeRO strategy fits {plan.params.total / 1e9:.2f}B parameters on {plan.world_size} GPU(s) of "
        f"{plan.gpu_mem_bytes / GIB:.0f} GiB ({(plan.gpu_mem_bytes - plan.reserve_bytes) / GIB:.1f} GiB usable).",
        f"Smallest: {best.strategy.name} needs {best.total_bytes / GIB:.1f} GiB per GPU "
        f"(activations {best.activations_bytes / GIB:.1f} GiB) and {best.cpu_bytes_per_node / GIB:.0f} GiB CPU RAM "
        "per node.",
        "hint: add GPUs (--nodes / --gpus-per-node), offload (deepspeed.offload_optimizer: cpu), lower "
        "training.micro_batch_size, or set training.activation_checkpointing: true; `hpcds plan` shows the table",
    ]
    return "\n".join(lines)
