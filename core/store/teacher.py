"""`StoreTeacher`: the `Teacher` interface answered from a finished teacher store, with no teacher process.

Each sequence of a batch is found by the hash of its unpadded teacher ids (`encoding.sequence_key`), so batch
order, padding and shuffling do not matter; its requested rows must be label rows (the rows the store kept).
Hidden states come back as stored (bf16 or float32, int8 dequantised to float32) and objectives apply the stored
LM head to them, exactly as with a gRPC teacher; top-k requests are answered from hidden states through that
head, or from stored top-k entries (narrowed exactly when fewer are asked for). Reads are prefetched:
`score_async` runs `score` on a small thread pool while the student computes the previous step.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file

from dskd.config import Config, TeacherConfig
from dskd.errors import StoreError
from dskd.kit.lm_head import LMHead
from dskd.models.teacher import Teacher, tokenizer_fingerprint, topk_with_tail
from dskd.store.encoding import decode_hidden, narrow_topk, sequence_key
from dskd.store.layout import FORMAT, HEAD, INDEX, MANIFEST, PLAN, TOKENIZER, read_json, shard_path
from dskd.store.shards import ShardReader, complete_sidecar, file_sha256
from dskd.types import SignalRequest, TeacherSignal

CAPABILITIES = {"hidden": frozenset({"hidden_states", "top_k", "logits"}), "topk": frozenset({"top_k"})}


def read_manifest(root: str | Path) -> dict:
    """The manifest of the finished store in `root`, or a `StoreError` saying what `root` is instead."""
    root = Path(root)
    manifest = read_json(root / MANIFEST)
    if manifest is not None:
        if manifest.get("format") != FORMAT:
            raise StoreError(
                f"teacher store {root} has format {manifest.get('format')!r}, this dskd reads format {FORMAT}; rebuild it"
            )
        return manifest
    plan = read_json(root / PLAN)
    if plan is None:
        what = "does not exist" if not root.exists() else "is not a teacher store (no manifest.json)"
        raise StoreError(f"teacher store {root} {what}; build one with `dskd teacher-store build JOB --out {root}`")
    total = -(-plan["samples"] // plan["shard_samples"])
    done = sum(complete_sidecar(root, shard) is not None for shard in range(total))
    raise StoreError(
        f"teacher store {root} is unfinished ({done} of {total} shards complete); run its build again "
        f"(`dskd teacher-store build JOB --out {root}`, every worker) to finish it"
    )


class StoreTeacher(Teacher):
    def __init__(self, root: str | Path, device: torch.device | str = "cpu", *, prefetch_workers: int = 2) -> None:
        from dskd.models.loading import load_tokenizer

        self.root = Path(root)
        self.manifest = manifest = read_manifest(self.root)
        self.mode, self.k = manifest["mode"], int(manifest["k"])
        self.device = torch.device(device)
        index = read_json(self.root / INDEX)
        if index is None or file_sha256(self.root / INDEX) != manifest["index_sha256"]:
            raise StoreError(f"teacher store {self.root}: {INDEX} is missing or damaged; rebuild the store")
        sidecars = index["shards"]
        self.tokenizer = load_tokenizer(TeacherConfig(tokenizer=str(self.root / TOKENIZER)), "teacher store")
        if tokenizer_fingerprint(self.tokenizer) != manifest["tokenizer_fingerprint"]:
            raise StoreError(
                f"teacher store {self.root}: its tokenizer files do not give the tokenizer it was built with "
                f"(another tokenizers version, or edited files); rebuild the store"
            )
        self.head, self.embeddings = self._load_head()
        self.fingerprint = manifest["teacher_fingerprint"]
        self.capabilities = CAPABILITIES[self.mode]
        for sidecar in sidecars:  # a stat per shard: a truncated or missing shard is refused before training starts
            self.reader_check(sidecar)
        self.reader = ShardReader(self.root, sidecars)
        # key -> (shard, slot); a sample that occurs twice (duplicate data) has one signal, either copy serves it
        self.lookup: dict[str, tuple[int, int]] = {}
        for shard, sidecar in enumerate(sidecars):
            for slot, key in enumerate(sidecar["keys"]):
                self.lookup.setdefault(key, (shard, slot))
        self.prefetch_workers = prefetch_workers
        self._pool: ThreadPoolExecutor | None = None
        self._reads = 0

    def reader_check(self, sidecar: dict) -> None:
        path = shard_path(self.root, sidecar["shard"])
        size = path.stat().st_size if path.is_file() else None
        if size != sidecar["bytes"]:
            found = (
                "is missing"
                if size is None
                else f"has {size} bytes but was written with {sidecar['bytes']} (truncated)"
            )
            raise StoreError(
                f"teacher store {self.root}: shard {path.name} {found}; rebuild the store "
                f"(`dskd teacher-store verify {self.root}` lists every damaged shard)"
            )

    def _load_head(self) -> tuple[LMHead, torch.Tensor | None]:
        info = self.manifest["head"]
        path = self.root / HEAD
        if not path.is_file() or file_sha256(path) != info["sha256"]:
            raise StoreError(
                f"teacher store {self.root}: {HEAD} is missing or does not match its checksum; rebuild the store"
            )
        tensors = {name: t.to(self.device) for name, t in load_file(str(path)).items()}
        head = LMHead(tensors["weight"], tensors.get("bias"), float(info["scale"]), float(info["softcap"]))
        embeddings = {"tied": head.weight, "stored": tensors.get("embeddings"), "none": None}[info["embeddings"]]
        return head, embeddings

    # -- the Teacher interface ------------------------------------------------------------------------------------
    def check_request(self, request: SignalRequest) -> str:
        if self.mode == "topk" and (request.hidden_states or request.logits):
            wanted = "hidden states" if request.hidden_states else "dense logits"
            return (
                f"it asks the teacher for {wanted}, but the teacher store {self.root} holds top-{self.k} log-probabilities "
                f'only; build a store with --mode hidden, or use an objective that takes top-k (kd with teacher_signal = "top_k")'
            )
        if self.mode == "topk" and request.top_k > self.k:
            return (
                f"it asks for the top {request.top_k} teacher log-probabilities, but the teacher store {self.root} holds "
                f"the top {self.k}; lower the objective's top_k to at most {self.k}, or build a store with --k {request.top_k}"
            )
        return ""

    def score(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: torch.Tensor, request: SignalRequest
    ) -> TeacherSignal:
        problem = self.check_request(request)
        if problem:
            raise StoreError(f"a request cannot be served: {problem}")
        batch_size, seq_len = input_ids.shape
        ids, mask, rows = input_ids.cpu(), attention_mask.cpu().bool(), rows.cpu().to(torch.int64)
        seq, pos = torch.div(rows, seq_len, rounding_mode="floor"), rows.remainder(seq_len)
        offsets, parts, row_starts = {}, [], 0
        for b in torch.unique(seq).tolist():
            record = self._record(ids[b][mask[b]])
            n_rows = record["row_count"]
            offsets[b] = (row_starts, record["prompt_len"] - 1, n_rows)
            row_starts += n_rows
            parts.append(record)
        local = torch.empty_like(rows)
        for b, (start, first, n_rows) in offsets.items():
            picked = seq == b
            index = pos[picked] - first
            if index.numel() and (int(index.min()) < 0 or int(index.max()) >= n_rows):
                bad = int(pos[picked][(index < 0) | (index >= n_rows)][0])
                raise StoreError(
                    f"the teacher store {self.root} was asked for position {bad} of a sequence whose stored label rows are "
                    f"positions {first}..{first + n_rows - 1}; it keeps the teacher signal of label rows only (a policy or "
                    f"objective that asks about other positions needs the live teacher)"
                )
            local[picked] = index + start
        names = parts[0]["tensors"].keys() if parts else ()
        stored = {name: torch.cat([p["tensors"][name] for p in parts]).index_select(0, local) for name in names}
        signal = TeacherSignal(
            rows_per_sequence=torch.bincount(seq, minlength=batch_size), fingerprint=self.fingerprint
        )
        if self.mode == "hidden":
            hidden = decode_hidden(stored).to(self.device) if stored else torch.zeros((0, self.hidden_size))
            if request.hidden_states:
                signal.hidden_states = hidden
            if request.top_k or request.logits:
                z = self.head.logits(hidden)
                if request.top_k:
                    k = min(request.top_k, self.vocab_size)
                    signal.topk_ids, signal.topk_logprobs, signal.tail_logmass = topk_with_tail(z, k)
                if request.logits:
                    signal.logits = z
        elif request.top_k:
            narrowed = narrow_topk(stored["topk_ids"], stored["topk_logprobs"], stored["tail_logmass"], request.top_k)
            signal.topk_ids, signal.topk_logprobs, signal.tail_logmass = (t.to(self.device) for t in narrowed)
        self._reads += len(parts)
        return signal

    def _record(self, input_ids: torch.Tensor) -> dict:
        key = sequence_key(input_ids.numpy())
        where = self.lookup.get(key)
        if where is None:
            raise StoreError(
                f"a sequence of {input_ids.numel()} teacher tokens is not in the teacher store {self.root} "
                f"({self.manifest['samples']} samples): the store was built from other data, template or length settings, "
                f"or the policy made new sequences; rebuild the store for this job, or use policy off_policy"
            )
        sample = self.reader.sample(*where)
        if not torch.equal(sample["ids"][:-1].to(torch.int64), input_ids.to(torch.int64)):
            raise StoreError(
                f"teacher store {self.root}: shard {where[0]} holds other ids under a key; rebuild the store"
            )
        tensors = {k: v for k, v in sample.items() if k not in ("ids", "prompt_len")}
        rows = len(sample["ids"]) - sample["prompt_len"]
        return {"tensors": tensors, "prompt_len": sample["prompt_len"], "row_count": rows}

    def score_async(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: torch.Tensor, request: SignalRequest
    ) -> Future:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.prefetch_workers, thread_name_prefix="dskd-store")
        return self._pool.submit(self.score, input_ids, attention_mask, rows, request)

    def generate(self, prompts, *, max_new_tokens, temperature=1.0, top_p=1.0, seed=0):
        raise StoreError(
            f"the teacher store {self.root} holds no model and cannot generate; use policy off_policy, or the live teacher"
        )

    def stats(self) -> dict[str, float]:
        return {"store_reads": float(self._reads)}

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def open_store_teacher(config: Config, device: torch.device, *, model_path: str | None = None, cache_dir=None):
    """The job's `StoreTeacher`, checked against the job: the same length limits and data, and, when the job also
    names its teacher (model, config or address), that teacher's fingerprint (loading it once, running nothing)."""
    t = config.teacher
    teacher = StoreTeacher(t.store, device)
    manifest = teacher.manifest
    try:
        for key in ("max_length", "max_prompt_length"):
            mine, theirs = getattr(config.data, key), manifest[key]
            if mine != theirs:
                raise StoreError(
                    f"teacher store {t.store} was built with data.{key} = {theirs}, this job has {mine}; the stored teacher ids "
                    f"would not match: set data.{key} = {theirs}, or build a store for this job"
                )
        from dskd.data.examples import data_fingerprint, load_examples

        for split in manifest["splits"]:
            path = getattr(config.data, split, "")
            if not path:
                continue
            found = data_fingerprint(load_examples(path, config.data, split))
            if found != manifest["data_fingerprints"][split]:
                raise StoreError(
                    f"teacher store {t.store} was built from other data.{split} than this job's ({path}: data fingerprint "
                    f"{found[:12]}, store {manifest['data_fingerprints'][split][:12]}); point data.{split} at the data it was "
                    f"built from, or build a store for this data"
                )
        if t.model or t.config or t.address or model_path:
            from dskd.run.components import build_teacher

            live = build_teacher(
                replace(config, teacher=replace(t, store="")), device, model_path=model_path, cache_dir=cache_dir
            )
            try:
                if live.fingerprint != teacher.fingerprint:
                    raise StoreError(
                        f"teacher store {t.store} holds teacher {teacher.fingerprint[:12]}, but the job names teacher "
                        f"{live.fingerprint[:12]} (another model, weights, tokenizer or dtype); build a store of this teacher, "
                        f"or name only the store (unset teacher.model/config/address)"
                    )
            finally:
                live.close()
    except BaseException:
        teacher.close()
        raise
    return teacher
