"""The teacher store: a teacher's signal over a dataset, computed once and served from disk.

`dskd teacher-store build job.toml --out DIR` runs the job's teacher over its training (and validation) split
and writes, per sample, the teacher's token ids and the signal of its label rows: last hidden states (`hidden`,
bf16 / float32 / int8 with a per-row scale) or top-k log-probabilities with the tail mass (`topk`). The store
also keeps the teacher's tokenizer and LM head, so `[teacher] store = "DIR"` trains a student of *any*
tokenizer with no teacher process: the student's data pipeline tokenises with the stored tokenizer (yielding
the stored ids), aligns against them as with a live teacher, and `StoreTeacher.score` finds each sequence by
a hash of its teacher ids.

Modules: `layout` (file names, the build plan and manifest), `encoding` (signal <-> shard tensors),
`shards` (atomic, checksummed shard files), `build` (the builder: resumable, several workers), `teacher`
(`StoreTeacher`), `inspect` (info, verify), `checks` (config problems), `cli` (the subcommands).
"""
