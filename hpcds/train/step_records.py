"""Rank 0's per-step records for losses.jsonl, kept with the loss and gradient norm still on the device and written
in one go: at a log interval, before a save, at the end, and at least every `MAX_UNWRITTEN` steps.

Reading a device tensor (`.item()`) makes the host wait for the GPU to finish everything queued; once per micro-batch
(as before) that wait is on every step's critical path, once per write it is not. On CPU ranks it costs nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAX_UNWRITTEN = 100


@dataclass
class StepRecords:
    path: Path
    unwritten: list[dict[str, Any]] = field(default_factory=list)

    def add(self, **record: Any) -> None:
        """One step's record; tensors in it (loss, grad_norm) are read when written."""
        self.unwritten.append(record)
        if len(self.unwritten) >= MAX_UNWRITTEN:
            self.write()

    def write(self) -> None:
        if not self.unwritten:
            return
        import torch

        tensors = [v for r in self.unwritten for v in r.values() if isinstance(v, torch.Tensor)]
        # One stack and one read for every tensor of every record: a single wait for the device.
        floats = iter(torch.stack([t.detach().reshape(()).float() for t in tensors]).tolist() if tensors else [])
        lines = []
        for record in self.unwritten:
            values = {k: next(floats) if isinstance(v, torch.Tensor) else v for k, v in record.items()}
            lines.append(json.dumps(values) + "\n")
        with open(self.path, "a") as handle:
            handle.writelines(lines)
        self.unwritten = []
