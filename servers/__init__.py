"""Remote teachers over gRPC (protocol `dskd.teacher.v1`, see docs/protocol.md).

- `serve_teacher.py`: the server users start; `servicer.py`, `batcher.py`, `validation.py`, `security.py` and
  `health_status.py` are its parts.
- `client.py`: `RemoteTeacher`, the `dskd.models.teacher.Teacher` implementation the engine uses; `score_plan.py`,
  `replicas.py` and `teacher_cache.py` are its parts.
- `wire.py`: the byte layout both sides share.

Nothing here imports the training loop, and nothing is imported by `import dskd`, so installs without gRPC
keep working.
"""
