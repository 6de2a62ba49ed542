"""Several teachers in one objective (issue 18): one single-teacher objective per teacher, combined per sample.

For a micro-batch, `L = (1 - kd_rate) * CE + kd_rate * sum_i w_i(s) * KD_i`, where `KD_i` is teacher i's
distillation parts (as its own objective computes them, with its own projectors, alignment and closed-form maps)
and `w_i(s) = weight_i / sum of the weights of the teachers that serve sample s`. The gold CE is computed once,
over every sample (the engine's `student_ce_terms`); each teacher's objective runs on the samples it serves,
grouped by the set of teachers serving them (`Batch.teachers`, built by `dskd.data.multi_teacher`), so every group
has one weight per teacher and the member objective needs no per-sample weights.

Weights: the engine makes the micro-batch's weights current (`dskd.kit.weighting`); each member computes inside a
weighting whose distillation weight is the engine's times `w_i` and whose CE weight is 0 (the member's own CE of a
subset is not trained again). The members' weighted losses are handed to the engine's weighing under per-teacher
part names, `<part>/<teacher>` (e.g. `kd/math`), whose values are the *unweighted* sums over that teacher's tokens,
so `train/kd/math` in metrics.jsonl is teacher `math`'s mean KD on its own samples.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dskd.data.multi_teacher import select_signal
from dskd.kit.contracts import member
from dskd.kit.objective import Objective
from dskd.kit.weights import CE, LossWeights, current_weighing, weighting
from dskd.types import Batch, LossTerms, SignalRequest, TeacherSignal


class MultiTeacherObjective(Objective):
    """The composite of `members` (teacher name -> that teacher's objective), with `ce_terms(batch, hidden)` the
    student's gold CE alone. The teacher signal it computes on is a dict: teacher name -> that teacher's signal for
    its view of the batch (`dskd.run.teachers.MultiSignalFetcher`)."""

    def __init__(self, members: dict[str, Objective], ce_terms: Callable[[Batch, torch.Tensor], LossTerms]) -> None:
        self.members = dict(members)
        self.ce_terms = ce_terms
        self.requests = {name: m.request for name, m in self.members.items()}
        request = SignalRequest()
        for r in self.requests.values():
            request = request.merge(r)
        self.request = request  # non-empty when any teacher is asked (the engine's cross-step prefetch test)
        modules = {
            name: mod
            for name, m in self.members.items()
            if (mod := member(m, Objective, "trainable_modules")()) is not None
        }
        # One module for the optimizer and checkpoints, each teacher's projectors under its name.
        self.modules = torch.nn.ModuleDict(modules) if modules else None

    def trainable_modules(self) -> torch.nn.Module | None:
        return self.modules

    def on_optimizer_step(self) -> None:
        for m in self.members.values():
            member(m, Objective, "on_optimizer_step")()

    def describe(self) -> str:
        lines = [(name, member(m, Objective, "describe")()) for name, m in self.members.items()]
        return "; ".join(f"{name}: {text}" for name, text in lines if text)

    def compute(self, batch: Batch, student_hidden: torch.Tensor, signal: dict[str, TeacherSignal] | None) -> LossTerms:
        if batch.teachers is None:
            raise ValueError("a multi-teacher objective needs batches with their teachers' parts (Batch.teachers)")
        outer = current_weighing()
        base = outer.weights if outer is not None else LossWeights()
        ce = self.ce_terms(batch, student_hidden)
        parts, counts, metrics = dict(ce.parts), dict(ce.counts), dict(ce.metrics)
        losses: list[torch.Tensor] = []
        kd_names: list[str] = []
        for name, view in batch.teachers.items():
            objective, teacher_signal = self.members[name], (signal or {}).get(name)
            for group in view.groups:
                hidden = student_hidden.index_select(0, group.samples)
                sub_signal = None if teacher_signal is None else select_signal(teacher_signal, group)
                weights = LossWeights(ce=0.0, kd=base.kd * group.weight, denominator=base.denominator)
                with weighting(weights) as inner:
                    terms = objective.compute(group.batch, hidden, sub_signal)
                carried = frozenset().union(*(names for _, names in inner.carried)) if inner.carried else frozenset()
                kd = {part: value for part, value in terms.parts.items() if part != CE}
                rest = {part: value for part, value in kd.items() if part not in carried}
                losses.extend(loss for loss, _ in inner.carried)
                if rest:
                    losses.append(weights.combine(rest))
                for part, value in kd.items():
                    _add(parts, f"{part}/{name}", value.detach())
                    if f"{part}/{name}" not in kd_names:
                        kd_names.append(f"{part}/{name}")
                for key, value in terms.counts.items():
                    if key != CE:
                        _add(counts, f"{key}/{name}", torch.as_tensor(value, dtype=torch.float32))
                for key, value in terms.metrics.items():
                    _add(metrics, f"{key}/{name}", value.detach())
            if view.batch.aligned_rows is not None:  # pairs kept per student token, as train/align_ratio
                aligned = torch.tensor(float(view.batch.aligned_rows.shape[0]), device=student_hidden.device)
                _add(metrics, f"align_ratio/{name}", aligned)
                _add(counts, f"align_ratio/{name}", torch.tensor(float(view.batch.student_rows.shape[0])))
        if not losses:
            return LossTerms(parts=parts, counts=counts, metrics=metrics)
        total = losses[0]
        for loss in losses[1:]:
            total = total + loss
        if outer is not None:
            outer.carry(total, frozenset(kd_names))
        elif total.requires_grad:
            # Outside the engine, as `chunked_parts`: each part keeps its value and together the parts carry the
            # gradient of the weighted sum (`total - total.detach()` is exactly zero).
            delta = (total - total.detach()) / len(kd_names)
            for part in kd_names:
                parts[part] = parts[part] + delta
        return LossTerms(parts=parts, counts=counts, metrics=metrics)


def _add(table: dict[str, torch.Tensor], key: str, value: torch.Tensor) -> None:
    table[key] = table[key] + value.to(table[key].device) if key in table else value
