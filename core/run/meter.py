"""What a training stage logs: per-term sums kept on the device and reduced once per log interval (`Meter`),
and the run's `metrics.jsonl` (`MetricsFile`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from dskd.kit.contracts import member
from dskd.models.teacher import Teacher
from dskd.types import LossTerms


class Meter:
    """Per-term sums and counts kept on the device; reduced across processes once per log interval."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}
        self.loss = None
        self.host: dict[str, float] = {}
        self.local: dict[str, float] = {}

    def add(self, loss: torch.Tensor, terms: LossTerms, *, ce: bool = True, kd: bool = True) -> None:
        """Add a micro-batch's terms. Of a batch that trains only the CE (or only the KD) of a split step, only
        that part's terms are kept, so that `train/ce` stays the mean over the dataset's responses and the KD
        terms the means over the samples, not means over both."""
        self.loss = loss.detach() if self.loss is None else self.loss + loss.detach()
        for name, value in terms.sums.items():
            if not (ce if name == "ce" else kd):
                continue
            self.sums[name] = self.sums[name] + value if name in self.sums else value.detach().clone()
        for name, value in terms.counts.items():
            if not (ce if name == "ce" else kd):
                continue
            value = torch.as_tensor(value, dtype=torch.float32, device=loss.device)
            self.counts[name] = self.counts[name] + value if name in self.counts else value.clone()

    def add_host(self, name: str, value: float) -> None:
        self.host[name] = self.host.get(name, 0.0) + value

    def add_local(self, name: str, value: float) -> None:
        """A count logged as this process saw it, not reduced: processes may see different names (e.g. which
        policy made their batches), and one collective needs the same names everywhere."""
        self.local[name] = self.local.get(name, 0.0) + value

    def reduce(self, accelerator, steps: int) -> dict[str, float]:
        """Means over the interval: one collective and one device->host copy for all metrics."""
        names = sorted(self.sums)
        host_names = sorted(self.host)
        device = accelerator.device
        loss = self.loss if self.loss is not None else torch.zeros((), device=device)
        parts = [loss.reshape(1).float()]
        parts += [self.sums[n].reshape(1).float() for n in names]
        parts += [self.counts.get(n, torch.zeros((), device=device)).reshape(1).float() for n in names]
        parts.append(torch.tensor([self.host[n] for n in host_names], dtype=torch.float32, device=device))
        flat = torch.cat([p.to(device) for p in parts])
        if accelerator.num_processes > 1:
            flat = accelerator.reduce(flat, reduction="sum")
        values = flat.tolist()
        k = len(names)
        out = {"train/loss": values[0] / max(steps, 1) / accelerator.num_processes}
        for i, name in enumerate(names):
            count = values[1 + k + i]
            if count:  # a term with no tokens in the interval (e.g. nothing agreed) is left out, not NaN
                out[f"train/{name}"] = values[1 + i] / count
        host_values = values[1 + 2 * k :]
        for name, value in zip(host_names, host_values):
            out[name] = value
        out.update(self.local)
        self.__init__()
        return out

    def interval(
        self, accelerator, steps: int, *, lr: float, tokens: int, seconds: float, teacher: Any
    ) -> dict[str, float]:
        """The log record of an interval of `steps` steps: the reduced means, the align ratio, the learning rate,
        tokens/s over all processes, the share of time spent waiting for the teacher, and the teacher's counters
        (e.g. a remote teacher's calls and retries, as this process's client saw them)."""
        metrics = self.reduce(accelerator, steps)
        num, den = metrics.pop("train/align_ratio_num", None), metrics.pop("train/align_ratio_den", None)
        if num is not None and den:
            metrics["train/align_ratio"] = num / den
        metrics["train/lr"] = lr
        metrics["perf/tokens_per_s"] = tokens * accelerator.num_processes / max(seconds, 1e-9)
        waited = metrics.pop("perf/teacher_wait_s", None)
        if waited is not None:
            metrics["perf/teacher_wait_fraction"] = waited / max(seconds * accelerator.num_processes, 1e-9)
        if teacher is not None:
            metrics.update({f"teacher/{name}": value for name, value in member(teacher, Teacher, "stats")().items()})
        return metrics


class MetricsFile:
    """`metrics.jsonl`: one JSON line per log interval and stage, written by the main process only."""

    def __init__(self, path: Path, *, main_process: bool) -> None:
        self.path = path
        self.main_process = main_process

    def append(self, record: dict[str, Any]) -> None:
        if not self.main_process:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")

    def truncate(self, stage: str, step: int) -> None:
        """Drop `stage`'s lines logged after `step` (the checkpoint a run resumes from), so steps are never doubled."""
        if not self.main_process or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by the crash
            if record.get("stage") == stage and record.get("step", 0) > step:
                continue
            kept.append(line)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(self.path)
