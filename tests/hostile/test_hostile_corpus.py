"""Runs every case in tests/hostile/cases/ through the real CLI (`python -m dskd ...`), a real teacher server
(`servers/serve_teacher.py`) or raw gRPC against one, and checks each verdict. See README.md for the format.

Each case is data: what to lay out, what to run, and the expected exit status (or gRPC code) and a substring of
the first line of the answer. The table of every case is printed at the end of the session (conftest.py).
"""

from __future__ import annotations

import base64
import os
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import tomllib
from teacher_server_harness import REPO, TOKENIZERS, launch_server, save_tiny_teacher, start_servers, stop_servers
from tiny_job import write_job

from dskd.protos import teacher_pb2 as pb
from dskd.servers.wire import int32_bytes, pack_sequences

pytestmark = pytest.mark.integration
CASES = Path(__file__).resolve().parent / "cases"
KINDS = ("job", "data", "plugin", "grpc", "server")
TOKEN = "hostile-corpus-token-51f0"
METHOD = "/dskd.teacher.v1.Teacher/"
CLI_TIMEOUT = 300
# Lines a process may print before its answer: progress bars and library chatter, never the answer itself.
NOISE = ("%|", "it/s]", "examples/s]", "Writing model shards")


@dataclass
class Verdict:
    name: str
    shown_input: str
    status: str
    first_line: str
    problem: str  # empty when the answer is the expected one

    def row(self) -> tuple[str, str, str, str, str]:
        return (self.name, self.shown_input, self.status, self.first_line, self.problem or "ok")


def load_cases() -> list[tuple[str, dict]]:
    cases = []
    for path in sorted(CASES.glob("*.toml")):
        case = tomllib.loads(path.read_text())
        assert case.get("kind") in KINDS, f"{path.name}: kind must be one of {KINDS}"
        assert "expect" in case, f"{path.name}: has no [expect]"
        cases.append((path.stem, case))
    return cases


def expand(text: str, where: Path) -> str:
    return text.replace("{dir}", str(where)).replace("{tokenizers}", str(TOKENIZERS)).replace("{repo}", str(REPO))


def lay_out(case: dict, where: Path) -> None:
    """The files of a case under `where`: the tiny job (unless base = "none"), then the case's own files."""
    where.mkdir(parents=True)
    if case.get("base", "tiny_job") == "tiny_job":
        write_job(where, stages=tuple(case.get("stages", ("distill",))))
        if case.get("append_job"):
            with (where / "job.toml").open("a") as handle:
                handle.write("\n" + expand(case["append_job"], where) + "\n")
    for name in case.get("dirs", []):
        (where / name).mkdir(parents=True, exist_ok=True)
    for name, text in case.get("files", {}).items():
        (where / name).parent.mkdir(parents=True, exist_ok=True)
        (where / name).write_text(expand(text, where))
    for name, blob in case.get("files_base64", {}).items():
        (where / name).parent.mkdir(parents=True, exist_ok=True)
        (where / name).write_bytes(base64.b64decode(blob))
    for name, lines in case.get("replace_lines", {}).items():  # {"train.jsonl": {"4" = "base64 of line 4"}}
        content = (where / name).read_bytes().splitlines()
        for number, blob in lines.items():
            content[int(number) - 1] = base64.b64decode(blob)
        (where / name).write_bytes(b"\n".join(content) + b"\n")
    for name in case.get("fifos", []):
        os.mkfifo(where / name)


def first_line(stderr: str, stdout: str) -> str:
    for stream in (stderr, stdout):
        for line in stream.replace("\r", "\n").splitlines():
            if line.strip() and not any(mark in line for mark in NOISE):
                return line.strip()
    return ""


def judge(case: dict, status: str, expected_status: str, line: str, output: str) -> str:
    problems = []
    if status != expected_status:
        problems.append(f"expected {expected_status}")
    wanted = case["expect"].get("first_line", "")
    if wanted.lower() not in line.lower():
        problems.append(f"first line lacks {wanted!r}")
    if "Traceback" in output:
        problems.append("printed a traceback")
    return "; ".join(problems)


def run_cli(name: str, case: dict, root: Path) -> Verdict:
    where = root / name
    lay_out(case, where)
    args = [expand(a, where) for a in case["command"]]
    args += [a for override in case.get("overrides", []) for a in ("--set", expand(override, where))]
    env = {**os.environ, **{k: expand(v, where) for k, v in case.get("env", {}).items()}}
    if case.get("pythonpath"):  # plugin packages laid out as folders with a .dist-info: found like installed ones
        env["PYTHONPATH"] = os.pathsep.join([str(where / p) for p in case["pythonpath"]] + [env.get("PYTHONPATH", "")])
    try:
        done = subprocess.run(
            [sys.executable, "-m", "dskd", *args],
            cwd=where,
            env=env,
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        return Verdict(name, "dskd " + shlex.join(args), "timeout", "", f"no answer in {CLI_TIMEOUT}s")
    status = f"exit {done.returncode}"
    line = first_line(done.stderr, done.stdout)
    verdict = judge(case, status, f"exit {case['expect']['exit']}", line, done.stderr + done.stdout)
    return Verdict(name, case.get("input", "dskd " + shlex.join(args)), status, line, verdict)


def run_server(name: str, case: dict, root: Path, model: Path, running) -> Verdict:
    where = root / name
    lay_out({**case, "base": "none"}, where)
    args = [a.replace("{port_in_use}", str(running.port)) for a in case["args"]]
    process, _, log_path = launch_server(model, where, *args, name=name)
    try:
        process.wait(timeout=case.get("timeout_s", 90))
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return Verdict(name, case.get("input", shlex.join(args)), "still running", "", "expected it to exit")
    log = log_path.read_text(errors="replace")
    lines = [line for line in log.splitlines() if line.startswith("serve_teacher:")] or log.splitlines()
    line = first_line("\n".join(lines), "")
    status = f"exit {process.returncode}"
    return Verdict(
        name,
        case.get("input", "serve_teacher.py " + shlex.join(args)),
        status,
        line,
        judge(case, status, f"exit {case['expect']['exit']}", line, log),
    )


def grpc_payload(case: dict) -> bytes:
    if "request_base64" in case:
        return base64.b64decode(case["request_base64"])
    fields = dict(case.get("request", {}))
    method = case["method"]
    if method == "Generate":
        fields["prompts"] = pack_sequences(fields.get("prompts", []))
        return pb.GenerateRequest(**fields).SerializeToString()
    if method == "Score":
        positions = fields.pop("positions", [])
        fields["tokens"] = pack_sequences(fields.get("tokens", []))
        fields["positions"] = int32_bytes(np.array([p for ps in positions for p in ps], dtype=np.int64))
        fields["position_counts"] = [len(p) for p in positions]
        fields["outputs"] = pb.OutputSpec(**fields.get("outputs", {}))
        return pb.ScoreRequest(**fields).SerializeToString()
    if method == "GetInfo":
        return pb.GetInfoRequest(**fields).SerializeToString()
    raise AssertionError(f"unknown method {method!r}")


def run_grpc(name: str, case: dict, address: str) -> Verdict:
    auth = case.get("auth", "token")
    metadata = {
        "token": (("authorization", f"Bearer {TOKEN}"),),
        "none": None,
        "wrong": (("authorization", "Bearer wrong"),),
    }[auth]
    payload = grpc_payload(case)
    method = case["method"]
    shown = case.get("input", f"{method} {case.get('request', '<raw bytes>')}")
    with grpc.insecure_channel(address, options=[("grpc.max_send_message_length", -1)]) as channel:
        try:
            if method == "Score":
                answers = list(channel.unary_stream(METHOD + method)(payload, timeout=60, metadata=metadata))
                status, line = "OK", f"{len(answers)} Score answers"
            else:
                answer = channel.unary_unary(METHOD + method)(payload, timeout=60, metadata=metadata)
                if method == "Generate":
                    reply = pb.GenerateResponse.FromString(answer)
                    status, line = (
                        "OK",
                        f"{len(reply.tokens.lengths)} continuations, {sum(reply.tokens.lengths)} tokens",
                    )
                else:
                    status, line = "OK", f"{len(answer)} bytes"
        except grpc.RpcError as error:
            status, line = error.code().name, (error.details() or "").splitlines()[0] if error.details() else ""
    return Verdict(name, shown, status, line, judge(case, status, case["expect"]["code"], line, ""))


def guarded(run, name: str, case: dict, *args) -> Verdict:
    """A runner failure is one case's verdict, so the table still shows every other case."""
    try:
        return run(name, case, *args)
    except Exception as error:  # noqa: BLE001 - reported as that case's verdict and failed below
        return Verdict(
            name, case.get("input", name), "runner error", f"{type(error).__name__}: {error}", "the runner failed"
        )


def test_every_hostile_input_gets_its_expected_answer(tmp_path_factory, hostile_table):
    cases = load_cases()
    assert cases, f"no cases in {CASES}"
    root = tmp_path_factory.mktemp("hostile-corpus")
    verdicts: dict[str, Verdict] = {}
    cli = [(n, c) for n, c in cases if c["kind"] in ("job", "data", "plugin")]
    on_server = [(n, c) for n, c in cases if c["kind"] in ("grpc", "server")]
    running = None
    if on_server:
        model = save_tiny_teacher(root / "model", hidden_size=32, layers=1)
        (root / "token").write_text(TOKEN + "\n")
        (running,) = start_servers([(model, ("--auth-token-file", str(root / "token")), "corpus")], root)
    try:
        # CLI cases mostly wait on interpreter start-up: a few at a time halve the corpus's wall time.
        with ThreadPoolExecutor(max_workers=3) as pool:
            futures = {name: pool.submit(guarded, run_cli, name, case, root) for name, case in cli}
            for name, case in on_server:
                if case["kind"] == "grpc":
                    verdicts[name] = guarded(run_grpc, name, case, running.address)
                else:
                    verdicts[name] = guarded(run_server, name, case, root, model, running)
            for name, future in futures.items():
                verdicts[name] = future.result()
        if running is not None:  # the server survived every request and still answers
            from grpc_health.v1 import health_pb2
            from teacher_server_harness import health_status

            assert health_status(running.address) == health_pb2.HealthCheckResponse.SERVING, running.log()[-2000:]
    finally:
        if running is not None:
            assert stop_servers([running]) == [0]
    hostile_table.extend(verdicts[name].row() for name, _ in cases)
    wrong = [
        f"{v.name}: {v.problem} (got {v.status}: {v.first_line!r})"
        for v in (verdicts[n] for n, _ in cases)
        if v.problem
    ]
    assert not wrong, "\n".join(wrong)
