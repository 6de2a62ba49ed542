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
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dskd.config import TrainConfig
from dskd.console import Console
from dskd.errors import CheckpointError, DskdError, PluginError, TeacherError
from dskd.kit.contracts import member
from dskd.kit.lm_head import last_hidden_state
from dskd.kit.policy import Policy
from dskd.kit.weights import LossWeights, weighting
from dskd.models.teacher import Teacher
from dskd.run import checkpoint
from dskd.run.launch import LaunchError
from dskd.types import Batch, LossTerms, TeacherSignal


@dataclass
class StageSpec:
    """What one training stage needs; built by `dskd.run.job` from the config."""

    name: str  # "teacher_sft" or "distill": names the checkpoint folder and the metrics lines
    model: torch.nn.Module
    objective: Any  # a `dskd.kit.objective.Objective`
    policy: Any  # a `dskd.kit.policy.Policy`
    teacher: Any  # a `dskd.models.teacher.Teacher`, or None
    make_batches: Callable[[int], Iterator[Batch]]  # consumed-batch count -> this process's batches from there on
    train: TrainConfig
    run_dir: Path
    log_every: int
    fingerprints: dict[str, str] = field(default_factory=dict)  # teacher/tokenizers, checked on resume
    kd_rate: float = 0.0  # weight of the objective's distillation parts (0: it has none, e.g. sft)
    ce_terms: Callable[[Batch, torch.Tensor], LossTerms] | None = None  # the student's gold CE alone (split steps)


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    consumed: int = 0  # micro-batches taken from this process's data stream
    tokens: int = 0  # student input tokens processed (this process)


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


class SignalFetcher:
    """Asks the teacher for the signal of micro-batch i+1 while the student computes i, when the teacher
    can answer asynchronously (`Teacher.score_async`); otherwise the call is made when the signal is needed."""

    def __init__(self, teacher: Any, request: Any) -> None:
        self.teacher = teacher
        self.request = request
        self.active = teacher is not None and not request.empty

    def submit(self, batch: Batch):
        if not self.active:
            return None
        args = (batch.teacher_input_ids, batch.teacher_attention_mask, batch.teacher_rows, self.request)
        future = member(self.teacher, Teacher, "score_async")(*args)
        return future if future is not None else (lambda: self.teacher.score(*args))

    @staticmethod
    def result(handle) -> TeacherSignal | None:
        if handle is None:
            return None
        return handle() if callable(handle) else handle.result()


def lr_lambda(train: TrainConfig) -> Callable[[int], float]:
    """Multiplier of every group's peak learning rate at a step: linear warm-up, then the configured decay."""

    def factor(step: int) -> float:
        if train.warmup_steps and step < train.warmup_steps:
            return (step + 1) / train.warmup_steps
        decay_steps = max(train.max_steps - train.warmup_steps, 1)
        progress = min(max(step - train.warmup_steps, 0) / decay_steps, 1.0)
        floor = train.min_lr_ratio
        if train.schedule == "cosine":
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        if train.schedule == "linear":
            return floor + (1 - floor) * (1 - progress)
        return 1.0

    return factor


def require_finite(model: torch.nn.Module, extra: torch.nn.Module | None, what: str) -> None:
    """Raise a `DskdError` instead of saving `what` when a parameter of `model` (or `extra`) is NaN or infinite.
    One device->host copy for all parameters."""
    named = list(model.named_parameters()) + ([] if extra is None else [(f"projectors.{n}", p) for n, p in extra.named_parameters()])
    if not named:
        return
    finite = torch.stack([p.detach().isfinite().all().to(named[0][1].device) for _, p in named]).tolist()
    bad = [name for (name, _), ok in zip(named, finite) if not ok]
    if bad:
        listed = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise DskdError(f"not saving the {what}: its weights are not finite ({listed}); lower train.lr, or resume from an earlier checkpoint")


def _parameter_storage(model: torch.nn.Module) -> list[tuple[int, tuple[int, ...]]]:
    return [(p.data_ptr(), tuple(p.shape)) for p in model.parameters()]


def param_groups(model: torch.nn.Module, extra: torch.nn.Module | None, train: TrainConfig) -> list[dict]:
    """AdamW groups: decayed matrices, undecayed biases and norm weights (any 1-D parameter, which covers
    every architecture's norms, not only GPT-2's names), and the objective's projectors at their own lr."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": train.weight_decay, "lr": train.lr},
        {"params": no_decay, "weight_decay": 0.0, "lr": train.lr},
    ]
    if extra is not None:
        params = [p for p in extra.parameters() if p.requires_grad]
        if params:
            groups.append({"params": params, "weight_decay": train.weight_decay, "lr": train.projector_lr})
    return [g for g in groups if g["params"]]


class Trainer:
    def __init__(self, spec: StageSpec, accelerator, console: Console) -> None:
        self.spec = spec
        self.accelerator = accelerator
        self.console = console
        self.train_cfg = spec.train
        self.projectors = spec.objective.trainable_modules()
        if self.projectors is not None:
            self.projectors.to(accelerator.device)
        self.optimizer = torch.optim.AdamW(param_groups(spec.model, self.projectors, spec.train), betas=(0.9, 0.999), eps=1e-8)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(spec.train))
        # The scheduler is stepped by us, once per optimizer step: accelerate's prepared scheduler would step it
        # once per process, which shortens the schedule under data parallelism.
        # The objective reads the student's LM head through views taken at setup, so `prepare` must wrap the
        # model without moving or re-sharding its weights: the model is already on `accelerator.device`, and
        # accelerate's own placement would copy it (a CPU model "moves" to cpu:0 in a multi-process CPU run).
        storage = _parameter_storage(spec.model)
        self.model, self.optimizer = accelerator.prepare(spec.model, self.optimizer, device_placement=[False, True])
        if _parameter_storage(accelerator.unwrap_model(self.model)) != storage:
            raise LaunchError(
                f"accelerate moved or sharded the weights of the {spec.name} model ({accelerator.distributed_type.value}), but "
                f"the objectives read its LM head directly; run data parallel (DDP, `accelerate launch --multi_gpu`), "
                f"not FSDP or DeepSpeed ZeRO-3"
            )
        self.fetcher = SignalFetcher(spec.teacher, spec.objective.request)
        # Cross-step prefetch needs a policy whose output is its input (off_policy); a synchronous teacher's call
        # is merely deferred to when the signal is needed.
        self._can_prefetch = bool(member(spec.policy, Policy, "prefetchable")) and self.fetcher.active
        self._prefetched: dict[int, Any] = {}
        self.state = TrainState()
        self.bad_steps = 0  # consecutive steps skipped for a non-finite loss or gradient norm
        self._saved_step = -1  # the step of the newest checkpoint on disk (written or resumed from)
        self.ckpt_root = spec.run_dir / "checkpoints" / spec.name
        self.metrics_path = spec.run_dir / "metrics.jsonl"

    # -- the step ---------------------------------------------------------------------------------------------
    def train_step(self, window: list[Batch], meter: Meter) -> None:
        acc, objective, model = self.accelerator, self.spec.objective, self.model
        ahead = self._prefetched.pop(id(window[0]), None)  # the teacher call started during the previous step
        window = [b.to(acc.device) for b in self._prepare(window)]
        for batch in window:
            if batch.kd and "policy" in batch.meta:  # once per data batch: a split step's CE batch is its twin
                meter.add_local(f"policy/{batch.meta['policy']}", 1.0)
        weights = self._weights(window)
        pending = ahead if ahead is not None else self._submit(window[0])
        step_loss = torch.zeros((), device=acc.device)
        for i, batch in enumerate(window):
            waited = time.perf_counter()
            signal = self.fetcher.result(pending)
            # Time the student stood waiting for its teacher (0 when the signal was prefetched in time).
            if pending is not None:
                meter.add_host("perf/teacher_wait_s", time.perf_counter() - waited)
            pending = self._submit(window[i + 1]) if i + 1 < len(window) else None
            last = i + 1 == len(window)
            with (contextlib.nullcontext() if last else acc.no_sync(model)), acc.autocast(), weighting(weights[i]) as weighing:
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
        self._average_projector_grads()
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
        if self.train_cfg.clip_grad > 0:
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
            saved = checkpoint.checkpoints(self.ckpt_root)  # none is written during a run of skipped steps
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

    def _average_projector_grads(self) -> None:
        """Average the objective's projector gradients over processes, as DDP does for the student's.

        The projectors live outside the prepared (DDP-wrapped) model, so nothing else would synchronise them and
        each process would train its own copy. One collective for all of them: the gradients flattened, plus
        one presence flag per parameter, so a parameter no process gave a gradient keeps `None` (skipped by
        the optimizer, as in one process) while one that only some processes reached gets their mean.
        """
        acc = self.accelerator
        if self.projectors is None or acc.num_processes == 1:
            return
        params = [p for p in self.projectors.parameters() if p.requires_grad]
        if not params:
            return
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params]
                         + [torch.tensor([float(p.grad is not None) for p in params], device=acc.device)])
        flat = acc.reduce(flat, reduction="sum")
        present = flat[-len(params):].tolist()
        offset = 0
        for param, seen in zip(params, present):
            n = param.numel()
            if seen:
                param.grad = (flat[offset : offset + n] / acc.num_processes).view_as(param).to(param.dtype)
            offset += n

    def _weights(self, window: list[Batch]) -> list[LossWeights]:
        """Each micro-batch's weights of its CE and distillation parts: `1 - kd_rate` and `kd_rate` (spec §1.3)
        over the step's loss denominator D (spec §0), with one collective for the global token counts.

        Batches that train both parts share D. When a policy split the step into CE-only and KD-only batches,
        each part is rescaled so that it is a mean over its own tokens across all processes.
        """
        acc = self.accelerator
        counts = [(b.num_student_tokens(), b.ce, b.kd) for b in window]
        local = torch.tensor(
            [float(sum(n for n, _, _ in counts)), float(sum(n for n, ce, _ in counts if ce)), float(sum(n for n, _, kd in counts if kd))],
            device=acc.device,
        )
        total, ce_total, kd_total = (acc.reduce(local, reduction="sum") if acc.num_processes > 1 else local).tolist()
        denominator = max(total, 1.0) / acc.num_processes
        return [
            LossWeights.for_batch(
                kd_rate=self.spec.kd_rate, denominator=denominator,
                ce_scale=total / ce_total if batch.ce and ce_total else 0.0,
                kd_scale=total / kd_total if batch.kd and kd_total else 0.0,
            )
            for batch in window
        ]

    # -- the loop ---------------------------------------------------------------------------------------------
    def run(self, resume: bool = False, force: bool = False) -> torch.nn.Module:
        if resume:
            self._resume(force)
        batches = self.spec.make_batches(self.state.consumed)
        meter = Meter()
        total = self.train_cfg.max_steps
        start = time.perf_counter()
        tokens_at_start = self.state.tokens
        last_log_time, last_log_tokens = start, self.state.tokens
        last_save = time.monotonic()
        with self.console.progress(self.spec.name, total, self.state.step) as progress, self._stop_requests() as stop:
            upcoming = [next(batches) for _ in range(self.train_cfg.grad_accum)]
            while self.state.step < total:
                window = upcoming
                before = TrainState(**vars(self.state)), checkpoint.rng_state()  # to checkpoint this step's start
                self.state.consumed += len(window)
                # Take the next step's data now and, when the policy's batches do not depend on the student and
                # the teacher answers asynchronously, start its teacher call: a remote teacher then computes step
                # k+1's signal while the student trains on step k.
                upcoming = [next(batches) for _ in range(self.train_cfg.grad_accum)] if self.state.step + 1 < total else []
                if upcoming and self._can_prefetch:
                    self._prefetched[id(upcoming[0])] = self._submit(upcoming[0])
                try:
                    self.train_step(window, meter)
                except TeacherError as error:
                    raise self._checkpoint_before_stopping(error, *before) from None
                step = self.state.step
                if step % self.spec.log_every == 0 or step == total:
                    now = time.perf_counter()
                    metrics = meter.reduce(self.accelerator, self.spec.log_every if step % self.spec.log_every == 0 else step % self.spec.log_every)
                    num, den = metrics.pop("train/align_ratio_num", None), metrics.pop("train/align_ratio_den", None)
                    if num is not None and den:
                        metrics["train/align_ratio"] = num / den
                    metrics["train/lr"] = self.scheduler.get_last_lr()[0]
                    tokens = (self.state.tokens - last_log_tokens) * self.accelerator.num_processes
                    metrics["perf/tokens_per_s"] = tokens / max(now - last_log_time, 1e-9)
                    waited = metrics.pop("perf/teacher_wait_s", None)
                    if waited is not None:  # share of the interval the student spent waiting for the teacher
                        metrics["perf/teacher_wait_fraction"] = waited / max((now - last_log_time) * self.accelerator.num_processes, 1e-9)
                    last_log_time, last_log_tokens = now, self.state.tokens
                    if self.spec.teacher is not None:  # e.g. a remote teacher's client counters (this process's)
                        stats = member(self.spec.teacher, Teacher, "stats")()
                        metrics.update({f"teacher/{name}": value for name, value in stats.items()})
                    self._log({"stage": self.spec.name, "step": step, **metrics})
                    member(self.spec.policy, Policy, "observe")(step, metrics)  # adaptive policies react to the curve
                    progress.update(step, metrics)
                by_steps = bool(self.train_cfg.save_every) and step % self.train_cfg.save_every == 0
                # Not during a run of skipped steps: their checkpoints would rotate out the last good step's.
                if step < total and not self.bad_steps and (by_steps or (step % self.spec.log_every == 0 and self._save_is_due(last_save))):
                    self._save()
                    last_save = time.monotonic()
                if stop.is_set() and step < total:
                    if self._saved_step != step:
                        self._save()
                    self.console.warn(f"{self.spec.name}: stopped at step {step}, checkpointed in {self.ckpt_root}; continue with --resume")
                    raise KeyboardInterrupt
        if self._saved_step != self.state.step:  # a resumed, already finished stage is not written again
            self._save()
        elapsed = time.perf_counter() - start
        self.console.print(
            f"{self.spec.name}: {total} steps, {(self.state.tokens - tokens_at_start) / max(elapsed, 1e-9):.0f} tokens/s per process"
        )
        return self.accelerator.unwrap_model(self.model)

    # -- checkpoints and metrics ----------------------------------------------------------------------------------
    def _objects(self) -> dict[str, Any]:
        objects = {
            "model": self.accelerator.unwrap_model(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "policy": self.spec.policy.state_dict(),
            "rng": checkpoint.rng_state(),
        }
        if self.projectors is not None:
            objects["objective"] = self.projectors.state_dict()
        return objects

    def _save(self) -> None:
        self.accelerator.wait_for_everyone()
        # Never a checkpoint of non-finite weights: it would replace (prune) the last good one. The weights are the
        # same on every process, so every process raises here or none does.
        require_finite(self.accelerator.unwrap_model(self.model), self.projectors, f"{self.spec.name} checkpoint in {self.ckpt_root}")
        # Every process keeps its own RNG and data position; the main process also writes the shared state.
        rank = self.accelerator.process_index
        manifest = {"stage": self.spec.name, "state": vars(self.state).copy(), "fingerprints": self.spec.fingerprints,
                    "world_size": self.accelerator.num_processes}
        root = self.ckpt_root if rank == 0 else self.ckpt_root / f"rank-{rank}"
        objects = self._objects() if rank == 0 else {"rng": checkpoint.rng_state(), "policy": self.spec.policy.state_dict()}
        checkpoint.save(root, self.state.step, objects, manifest, keep=self.train_cfg.keep_checkpoints)
        self._saved_step = self.state.step
        self.accelerator.wait_for_everyone()

    def _save_is_due(self, last_save: float) -> bool:
        """`train.save_every_minutes` passed since the last checkpoint. Asked only at log steps: with several
        processes every one must save at the same step, so rank 0's clock decides, in one small collective."""
        minutes = self.train_cfg.save_every_minutes
        if not minutes:
            return False
        due = time.monotonic() - last_save >= 60.0 * minutes
        if self.accelerator.num_processes > 1:
            from accelerate.utils import broadcast

            due = bool(broadcast(torch.tensor([float(due)], device=self.accelerator.device), from_process=0).item())
        return due

    @contextlib.contextmanager
    def _stop_requests(self):
        """Ctrl-C or SIGTERM (a preempted job) during the stage: finish the step, checkpoint it, then stop; a second
        signal stops at once. Only in a single process: under a launcher the processes would see the signal at
        different steps, and a checkpoint needs all of them at the same one."""
        requested = threading.Event()
        if self.accelerator.num_processes > 1 or threading.current_thread() is not threading.main_thread():
            yield requested
            return

        def handler(signum, frame) -> None:
            if requested.is_set():
                raise KeyboardInterrupt
            requested.set()
            sys.stderr.write(f"{self.spec.name}: stopping after this step to checkpoint it (signal again to stop at once)\n")

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield requested
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    def _checkpoint_before_stopping(self, error: TeacherError, state: TrainState, rng: dict[str, Any]) -> TeacherError:
        """The teacher stayed away past `teacher.retry_timeout_s`: checkpoint the last completed step and say how to go on.

        The failed step changed neither weights, optimizer nor schedule (the teacher answers before the update), so
        the checkpoint is that step's start: the data position and RNG taken before it. A policy's own state is the
        current one (at most one step of its sampling ahead)."""
        if self.accelerator.num_processes > 1:  # the other processes wait in this step's collectives: no checkpoint now
            return TeacherError(f"{error}; continue from the last periodic checkpoint with --resume once the teacher answers again")
        self.state = state
        checkpoint.set_rng_state(rng)
        if self._saved_step != state.step:
            self._save()
        return TeacherError(f"{error}; step {state.step} is checkpointed in {self.ckpt_root}: once the teacher answers again, continue with --resume")

    def _resume(self, force: bool) -> None:
        # Every process picks the same step: the newest whose parts (rank 0's and each other rank's) are all intact.
        parts = [self.ckpt_root / f"rank-{r}" for r in range(1, self.accelerator.num_processes)]
        found = checkpoint.latest(self.ckpt_root, warn=self.console.warn, companions=[p for p in parts if p.is_dir()])
        if found is None:
            if checkpoint.checkpoints(self.ckpt_root):  # the run got somewhere: step 0 would train over its metrics
                raise CheckpointError(
                    f"every checkpoint under {self.ckpt_root} is unusable (each named above); restore an intact one, "
                    f"or start afresh in another directory (--set run.output_dir=...)"
                )
            self.console.print(f"{self.spec.name}: no checkpoint to resume from; starting at step 0")
            self._truncate_metrics(0)  # lines of an attempt that died before its first checkpoint
            return
        manifest = found.manifest
        if manifest.get("world_size", 1) != self.accelerator.num_processes:
            raise CheckpointError(
                f"{found.path} was written by {manifest.get('world_size')} processes but this run has "
                f"{self.accelerator.num_processes}; resume with the same number of processes"
            )
        for key, value in self.spec.fingerprints.items():
            saved = manifest.get("fingerprints", {}).get(key)
            if saved is not None and saved != value and not force:
                raise CheckpointError(
                    f"{found.path} was trained with a different {key} ({saved[:12]} vs now {value[:12]}); "
                    f"resuming would mix two setups; pass --force-resume to resume anyway"
                )
        self.accelerator.unwrap_model(self.model).load_state_dict(found.load("model"))
        self.optimizer.load_state_dict(found.load("optimizer"))
        self.scheduler.load_state_dict(found.load("scheduler"))
        if self.projectors is not None:
            self.projectors.load_state_dict(found.load("objective"))
            self.spec.objective.on_optimizer_step()  # closed-form maps follow the restored student head
        rank = self.accelerator.process_index
        if rank == 0:
            rng, policy = found.load("rng"), found.load("policy")
        else:
            own = checkpoint.Loaded(self.ckpt_root / f"rank-{rank}" / found.path.name, {})
            if (reason := checkpoint.verify(own.path)) is not None:
                raise CheckpointError(
                    f"{own.path}, process {rank}'s part of {found.path.name}, is unusable: {reason}; "
                    f"restore the run's rank-{rank} folder, or run without --resume to start afresh"
                )
            rng, policy = own.load("rng"), own.load("policy")
        self.spec.policy.load_state_dict(policy)
        checkpoint.set_rng_state(rng)
        self.state = TrainState(**manifest["state"])
        self._saved_step = self.state.step
        self._truncate_metrics(self.state.step)
        self.console.print(f"{self.spec.name}: resumed from {found.path.name} (step {self.state.step})")

    def _log(self, record: dict[str, Any]) -> None:
        if not self.accelerator.is_main_process:
            return
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        with self.metrics_path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")

    def _truncate_metrics(self, step: int) -> None:
        """Drop this stage's lines logged after the checkpoint we resume from, so steps are never doubled."""
        if not self.accelerator.is_main_process or not self.metrics_path.exists():
            return
        kept = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by the crash
            if record.get("stage") == self.spec.name and record.get("step", 0) > step:
                continue
            kept.append(line)
        tmp = self.metrics_path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(self.metrics_path)
