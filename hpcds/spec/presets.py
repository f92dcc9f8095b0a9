"""Named starting points for a job spec: model shapes (and a few training defaults) a spec can build on.

A spec says `preset: 7b_mamba` and overrides what it wants; precedence is defaults < preset < YAML < --set < flags.
Shapes reproduce the seed projects' presets; parameter counts follow from the architecture (hpcds.plan.params), and
equal what transformers builds for the same config. No I/O here.
"""

from __future__ import annotations

PRESETS: dict[str, dict] = {
    # A tiny Mamba-1 that trains on 2 CPU cores in minutes (the README's first command).
    "quickstart": {
        "model": {
            "type": "mamba",
            "d_model": 128,
            "n_layer": 2,
            "vocab_size": 256,
            "max_seq_len": 128,
            "d_state": 16,
            "d_conv": 4,
            "expand": 2,
        },
        "data": {"train": [{"path": "builtin:stdlib-docs"}], "tokenizer": "bytes"},
        "training": {
            "precision": "fp32",
            "micro_batch_size": 8,
            "lr": 6e-3,
            "warmup_steps": 10,
            "max_steps": 200,
            "eval_interval_steps": 50,
            "eval_iters": 4,
            "log_interval_steps": 10,
        },
        "deepspeed": {"zero_stage": 2},
        "checkpoint": {"every_steps": 50, "keep_last": 2},
        "slurm": {"gpus_per_node": 0, "ranks_per_node": 2, "time": "00:30:00", "signal_lead_s": 60},
        "wandb": {"mode": "offline"},
    },
    "1b_mamba": {
        "model": {
            "type": "mamba",
            "d_model": 2048,
            "n_layer": 24,
            "vocab_size": 50257,
            "max_seq_len": 2048,
            "d_state": 16,
            "d_conv": 4,
            "expand": 2,
        },
    },
    "3b_mamba": {
        "model": {
            "type": "mamba",
            "d_model": 3584,
            "n_layer": 32,
            "vocab_size": 50257,
            "max_seq_len": 2048,
            "d_state": 16,
            "d_conv": 4,
            "expand": 2,
        },
    },
    "7b_mamba": {
        "model": {
            "type": "mamba",
            "d_model": 4864,
            "n_layer": 45,
            "vocab_size": 50257,
            "max_seq_len": 4096,
            "d_state": 16,
            "d_conv": 4,
            "expand": 2,
        },
    },
    "gpt2-xl": {
        "model": {
            "type": "gpt2",
            "d_model": 1600,
            "n_layer": 48,
            "n_head": 25,
            "vocab_size": 50257,
            "max_seq_len": 1024,
        },
    },
}
