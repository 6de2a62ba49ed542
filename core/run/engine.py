"""The training loop: one stage of optimisation (teacher SFT or distillation) on `accelerate`.

Read `Trainer.train_step` top to bottom: it is the whole algorithm. Everything else here is setup,
logging and checkpointing around it.

Loss normalisation (spec §0). Before an optimizer step the trainer takes its `G` micro-batches, counts their
valid student tokens, and sums that count over all processes once: `N_glob`. Each micro-batch loss is
`sum(token losses) / D` with `D = N_glob / W` (W processes); gradients add up over the G micro-batches and DDP
averages over the W processes, so the step's gradient is exactly that of `sum over the global batch / N_glob`,
a true token mean, whatever the sequence lengths and however they fall into micro-batches.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dskd.config import TrainConfig
from dskd.console import Console
from dskd.errors import DataExhausted, DskdError, PluginError, TeacherError
from dskd.kit.contracts import member
from dskd.kit.lm_head import last_hidden_state
from dskd.kit.policy import Policy
from dskd.kit.weights import weighting
from dskd.run import checkpoint
from dskd.run.checkpoint import StageCheckpoints
from dskd.run.interrupts import stop_requests
from dskd.run.launch import LaunchError, average_gradients
from dskd.run.meter import Meter, MetricsFile
from dskd.run.optim import build_optimizer, build_scheduler, step_weights
from dskd.run.sharding import FSDP, clip_grad_norm, is_sharded, shard_student, sharding_mode, whole_parameters
from dskd.run.teacher_set import make_fetcher
from dskd.types import Batch, LossTerms


@dataclass
class StageSpec:
    """What one training stage needs; built by `dskd.run.job` from the config."""

    name: str  # "teacher_sft" or "distill": names the checkpoint folder and the metrics lines
    model: torch.nn.Module
    objective: Any  # a `dskd.kit.objective.Objective`
    policy: Any  # a `dskd.kit.policy.Policy`
    teacher: Any  # a `dskd.models.teacher.Teacher`, a `dskd.run.teacher_set.TeacherSet` (several), or None
    make_batches: Callable[[int], Iterator[Batch]]  # consumed-batch count -> this process's batches from there on
    train: TrainConfig
    run_dir: Path
    log_every: int
    fingerprints: dict[str, str] = field(default_factory=dict)  # teacher/tokenizers, checked on resume
    kd_rate: float = 0.0  # weight of the objective's distillation parts (0: it has none, e.g. sft)
    ce_terms: Callable[[Batch, torch.Tensor], LossTerms] | None = None  # the student's gold CE alone (split steps)
    data_metrics: dict[str, float] = field(default_factory=dict)  # facts of the training split, on every log line


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    consumed: int = 0  # micro-batches taken from this process's data stream
    tokens: int = 0  # student input tokens processed (this process)


def _parameter_storage(model: torch.nn.Module) -> list[tuple[int, tuple[int, ...]]]:
    return [(p.data_ptr(), tuple(p.shape)) for p in model.parameters()]


class Trainer:
    """One training stage. `optimizer` covers the student and the objective's projectors (`dskd.run.optim`);
    the trainer wraps it for `accelerate` and schedules its learning rate."""

    def __init__(self, spec: StageSpec, accelerator, console: Console, optimizer: torch.optim.Optimizer) -> None:
        self.spec = spec
        self.accelerator = accelerator
        self.console = console
        self.train_cfg = spec.train
        self.projectors = spec.objective.trainable_modules()
        if self.projectors is not None:
            self.projectors.to(accelerator.device)
        self.optimizer = optimizer
        self.scheduler = build_scheduler(optimizer, spec.train)
        # FSDP2 (`dskd.run.sharding`): the model was sharded before its optimizer was built; accelerate wraps nothing.
        self.sharded = is_sharded(spec.model)
        # Trained parameters that no wrapper synchronises: the projectors, and under FSDP any left whole.
        self.synced_here = [p for p in self.projectors.parameters()] if self.projectors is not None else []
        if self.sharded:
            self.model = spec.model
            self.synced_here += whole_parameters(p for p in spec.model.parameters() if p.requires_grad)
        else:
            self._prepare_data_parallel(spec, accelerator)
        self.fetcher = make_fetcher(spec.teacher, spec.objective)
        # Cross-step prefetch needs a policy whose output is its input (off_policy); a synchronous teacher's call
        # is merely deferred to when the signal is needed.
        self._can_prefetch = bool(member(spec.policy, Policy, "prefetchable")) and self.fetcher.active
        self._prefetched: dict[int, Any] = {}
        self.state = TrainState()
        self.bad_steps = 0  # consecutive steps skipped for a non-finite loss or gradient norm
        self.metrics = MetricsFile(spec.run_dir / "metrics.jsonl", main_process=accelerator.is_main_process)
        self.checkpoints = StageCheckpoints(self)

    def _prepare_data_parallel(self, spec: StageSpec, accelerator) -> None:
        # The objective reads the student's LM head through a view of its module, so `prepare` must wrap the model
        # without moving or re-sharding its weights: the model is already on `accelerator.device`, and accelerate's
        # own placement would copy it (a CPU model "moves" to cpu:0 in a multi-process CPU run).
        storage = _parameter_storage(spec.model)
        self.model, self.optimizer = accelerator.prepare(spec.model, self.optimizer, device_placement=[False, True])
        if _parameter_storage(accelerator.unwrap_model(self.model)) != storage:
            raise LaunchError(
                f"accelerate moved or sharded the weights of the {spec.name} model ({accelerator.distributed_type.value}) "
                f'itself; dskd shards with FSDP2 on its own: set train.sharding = "fsdp" (or launch with accelerate\'s '
                f"FSDP plugin, version 2), or run data parallel (DDP, `accelerate launch --multi_gpu`)"
            )

    @classmethod
    def for_stage(cls, spec: StageSpec, accelerator, console: Console) -> Trainer:
        """A trainer with the stage's AdamW (`dskd.run.optim.build_optimizer`); under `train.sharding = "fsdp"` the
        student is sharded first, since FSDP2 replaces its parameters and the optimizer must hold the new ones."""
        if sharding_mode(spec.train, accelerator) == FSDP and not is_sharded(spec.model):
            shard_student(spec.model, bf16=spec.train.precision == "bf16")
        projectors = spec.objective.trainable_modules()
        return cls(spec, accelerator, console, build_optimizer(spec.model, projectors, spec.train))

    # -- the step ---------------------------------------------------------------------------------------------
    def train_step(self, window: list[Batch], meter: Meter) -> None:
        acc, objective, model = self.accelerator, self.spec.objective, self.model
        ahead = self._prefetched.pop(id(window[0]), None)  # the teacher call started during the previous step
        window = [b.to(acc.device) for b in self._prepare(window)]
        for batch in window:
            if batch.kd and "policy" in batch.meta:  # once per data batch: a split step's CE batch is its twin
                meter.add_local(f"policy/{batch.meta['policy']}", 1.0)
        weights = step_weights(window, self.spec.kd_rate, self.accelerator)
        pending = ahead if ahead is not None else self._submit(window[0])
        step_loss = torch.zeros((), device=acc.device)
        for i, batch in enumerate(window):
            waited = time.perf_counter()
            signal = self.fetcher.result(pending)
            # Time the student stood waiting for its teacher (0 when the signal was prefetched in time).
            if pending is not None:
                meter.add_host("perf/teacher_wait_s", time.perf_counter() - waited)
                for name, seconds in getattr(self.fetcher, "waits", {}).items():  # several teachers: each one's wait
                    meter.add_host(f"perf/teacher_wait_s/{name}", seconds)
            pending = self._submit(window[i + 1]) if i + 1 < len(window) else None
            last = i + 1 == len(window)
            with (
                # FSDP2 reduce-scatters every micro-batch's gradients (sharded sums, no whole-model gradient held).
                contextlib.nullcontext() if last or self.sharded else acc.no_sync(model),
                acc.autocast(),
                weighting(weights[i]) as weighing,
            ):
                hidden = last_hidden_state(model, batch.student_input_ids, batch.student_attention_mask)
                if self._ce_alone(batch):
                    terms = self.spec.ce_terms(batch, hidden)
                else:
                    terms = objective.compute(batch, hidden, signal)
                loss = weighing.loss(terms)
            acc.backward(loss)
            step_loss = step_loss + loss.detach()
            meter.add(loss, terms, ce=batch.ce, kd=batch.kd)
            if batch.aligned_rows is not None:
                meter.add_host("train/align_ratio_num", float(batch.aligned_rows.shape[0]))
                meter.add_host("train/align_ratio_den", float(batch.student_rows.shape[0]))
            self.state.tokens += int(batch.student_attention_mask.sum())
        if self.synced_here:  # outside the DDP-wrapped or sharded model: averaged here, as DDP does the student's
            average_gradients(self.accelerator, [p for p in self.synced_here if p.requires_grad])
        if self._finite_step(step_loss, meter):
            self.optimizer.step()
            self.scheduler.step()
            objective.on_optimizer_step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1

    def _finite_step(self, step_loss: torch.Tensor, meter: Meter) -> bool:
        """Clip, and say whether this step's update may be applied: its loss and gradient norm are finite.

        A non-finite step is skipped (no optimizer or schedule step) and counted; `train.max_bad_steps` of them in a
        row stop the run before its weights are saved. The norm covers the student's gradients (all-reduced by DDP)
        and the projectors' (averaged above), so it is the same on every process; the local losses are folded in
        and summed over processes, so every process takes the same decision. That is one host sync per step.
        """
        acc = self.accelerator
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.sharded:  # sharded and whole gradients: one norm over both (`dskd.run.sharding.clip_grad_norm`)
            norm = clip_grad_norm(params, self.train_cfg.clip_grad)
        elif self.train_cfg.clip_grad > 0:
            norm = acc.clip_grad_norm_(params, self.train_cfg.clip_grad)
        else:  # no clipping: the norm alone, without touching the gradients
            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        # 0 * x is NaN for an infinite or NaN x, so `probe` is finite exactly when the norm and the loss are.
        probe = (torch.as_tensor(norm, device=acc.device).float() + 0.0 * step_loss.float()).reshape(1)
        if acc.num_processes > 1:
            probe = acc.reduce(probe, reduction="sum")
        finite = math.isfinite(probe.item())
        meter.add_local("train/skipped_steps", 0.0 if finite else 1.0)  # the same on every process
        self.bad_steps = 0 if finite else self.bad_steps + 1
        if self.bad_steps >= self.train_cfg.max_bad_steps:
            saved = checkpoint.checkpoints(self.checkpoints.root)  # none is written during a run of skipped steps
            kept = f"the last checkpoint, {saved[-1]}, is kept" if saved else "nothing was saved"
            raise DskdError(
                f"{self.spec.name}: the loss or gradient norm was not finite for {self.bad_steps} steps in a row "
                f"(steps {self.state.step + 2 - self.bad_steps}-{self.state.step + 1}, updates skipped); stopped, {kept}; "
                f"lower train.lr, check the divergence and objective options, or raise train.max_bad_steps"
            )
        return finite

    def _ce_alone(self, batch: Batch) -> bool:
        """A batch of a split step that trains only the CE: the engine computes it without the objective."""
        return not batch.kd and self.spec.ce_terms is not None

    def _submit(self, batch: Batch):
        # On-policy steps pair a CE-only batch of dataset responses with a KD batch of samples: asking the teacher
        # about the first would cost a teacher forward whose result is weighted by zero.
        return None if self._ce_alone(batch) else self.fetcher.submit(batch)

    def _prepare(self, window: list[Batch]) -> list[Batch]:
        """The policy's micro-batches for this step (a policy may turn one batch into a CE and a KD batch)."""
        out: list[Batch] = []
        for batch in window:
            prepared = self.spec.policy.prepare(batch, self.state.step)
            if not isinstance(prepared, list):
                raise PluginError(
                    f"policy {type(self.spec.policy).__name__}.prepare returned {type(prepared).__name__}, but a policy "
                    f"returns a list of batches (e.g. [batch]); see docs/plugins.md, Policies"
                )
            out.extend(prepared)
        return out

    def _ended(self, error: DataExhausted) -> DataExhausted:
        """The one line for a streamed split that ran out at this step (checkpointed, if any step was trained)."""
        step, total = self.state.step, self.train_cfg.max_steps
        kept = (
            f"step {step} is checkpointed in {self.checkpoints.root}: add data or lower train.max_steps, then continue with --resume"
            if self.checkpoints.saved_step == step and step > 0
            else "add data or lower train.max_steps"
        )
        return DataExhausted(f"{self.spec.name}: {error} = {total}; {kept}")

    # -- the loop ---------------------------------------------------------------------------------------------
    def run(self, resume: bool = False, force: bool = False) -> torch.nn.Module:
        if resume and (state := self.checkpoints.resume(force)) is not None:
            self.state = TrainState(**state)
        batches = self.batches = self.spec.make_batches(self.state.consumed)
        self.checkpoints.restore_data_position(batches)  # a stream's position (in memory, `consumed` is the position)
        meter = Meter()
        total = self.train_cfg.max_steps
        start = time.perf_counter()
        tokens_at_start = self.state.tokens
        last_log_time, last_log_tokens = start, self.state.tokens
        stopping = stop_requests(self.spec.name, self.accelerator.num_processes)
        with self.console.progress(self.spec.name, total, self.state.step) as progress, stopping as stop:
            try:
                upcoming = [next(batches) for _ in range(self.train_cfg.grad_accum)] if self.state.step < total else []
            except DataExhausted as error:  # nothing trained yet in this attempt: nothing more to checkpoint
                raise self._ended(error) from None
            while self.state.step < total:
                window = upcoming
                before = TrainState(**vars(self.state)), checkpoint.rng_state()  # to checkpoint this step's start
                self.state.consumed += len(window)
                # Take the next step's data now and, when the policy's batches do not depend on the student and
                # the teacher answers asynchronously, start its teacher call: a remote teacher then computes step
                # k+1's signal while the student trains on step k.
                ended = None  # a streamed split that ran out: this step still trains, is checkpointed, then we stop
                try:
                    upcoming = (
                        [next(batches) for _ in range(self.train_cfg.grad_accum)] if self.state.step + 1 < total else []
                    )
                except DataExhausted as error:
                    upcoming, ended = [], error
                if upcoming and self._can_prefetch:
                    self._prefetched[id(upcoming[0])] = self._submit(upcoming[0])
                try:
                    self.train_step(window, meter)
                except TeacherError as error:
                    raise self.checkpoints.before_stopping(error, *before) from None
                step = self.state.step
                if step % self.spec.log_every == 0 or step == total:
                    now = time.perf_counter()
                    metrics = meter.interval(
                        self.accelerator,
                        self.spec.log_every if step % self.spec.log_every == 0 else step % self.spec.log_every,
                        lr=self.scheduler.get_last_lr()[0],
                        tokens=self.state.tokens - last_log_tokens,
                        seconds=now - last_log_time,
                        teacher=self.spec.teacher,
                    )
                    last_log_time, last_log_tokens = now, self.state.tokens
                    self.metrics.append({"stage": self.spec.name, "step": step, **metrics, **self.spec.data_metrics})
                    member(self.spec.policy, Policy, "observe")(step, metrics)  # adaptive policies react to the curve
                    progress.update(step, metrics)
                if ended is not None:
                    if self.checkpoints.saved_step != step:
                        self.checkpoints.save()
                    raise self._ended(ended) from None
                by_steps = bool(self.train_cfg.save_every) and step % self.train_cfg.save_every == 0
                # Not during a run of skipped steps: their checkpoints would rotate out the last good step's.
                if (
                    step < total
                    and not self.bad_steps
                    and (by_steps or (step % self.spec.log_every == 0 and self.checkpoints.due()))
                ):
                    self.checkpoints.save()
                if stop.is_set() and step < total:
                    if self.checkpoints.saved_step != step:
                        self.checkpoints.save()
                    self.console.warn(
                        f"{self.spec.name}: stopped at step {step}, checkpointed in {self.checkpoints.root}; continue with --resume"
                    )
                    raise KeyboardInterrupt
        if self.checkpoints.saved_step != self.state.step:  # a resumed, already finished stage is not written again
            self.checkpoints.save()
        elapsed = time.perf_counter() - start
        self.console.print(
            f"{self.spec.name}: {total} steps, {(self.state.tokens - tokens_at_start) / max(elapsed, 1e-9):.0f} tokens/s per process"
        )
        return self.accelerator.unwrap_model(self.model)
