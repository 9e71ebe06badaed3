"""The built-in tool environments.

``lookup`` (the quickstart's multi-turn agent task). The request names a person; the call it asks
for needs that person's number, which is drawn per row and shown by no prompt: only the tool has
it. A trajectory therefore needs two turns, in the ``simple`` call format of the character model:

    ring bob now ->          (prompt; the row's hidden table holds {"bob": "417", ...})
    [lookup(bob)]            student turn 1: a call
    417                      tool result
    dial(417)                student turn 2: the final answer, reward 1.0 iff it is the row's answer

``lookup_rows(rng, n, split)`` draws such rows (the ``dial`` and ``mail`` requests of
mopd/domains/agent.py, same train/eval split rule); ``demonstration(row)`` is the teacher-style
trajectory (e.g. for SFT of the agent teacher).

``shell`` (a starting point for a code-agent domain): tools ``bash(command)`` and ``finish()``. Each
command runs in a fresh ``bash`` inside the sandbox (mopd/sandbox.py: kernel namespaces, limits) in
the trajectory's working directory, which persists across turns: after every command the sandbox
hands back the directory as a tar archive, and the next command starts from it (files persist;
shell variables and ``cd`` do not). The row gives the starting files (``meta["files"]``, path ->
text) and a test command (``meta["test"]``): at ``finish`` (or a final answer) the test runs on the
directory and the reward is 1.0 if it exits 0, else 0.0.
"""

from __future__ import annotations

import base64
import io
import json
import tarfile
from typing import Any

from mopd.domains import agent
from mopd.envs.base import ERROR_PREFIX, Env, Message, ParsedCall, StepResult, function_schema, register_env
from mopd.envs.parsers import get_parser
from mopd.types import PromptRow

# --------------------------------------------------------------------------- lookup

# The rows are the agent domain's (its ``agent_lookup`` generator); re-exported for environment users.
LOOKUP_TOOL, lookup_rows = agent.LOOKUP_TOOL, agent.lookup_rows


def demonstration(row: PromptRow, fmt: str = "simple") -> list[Message]:
    """The trajectory a teacher should produce for ``row``: look the name up, then answer."""
    name = row.meta["key"]
    call = ParsedCall("lookup", {"name": name})
    return [
        {"role": "assistant", "content": get_parser(fmt).format_call(call.name, call.arguments)},
        {"role": "tool", "content": row.meta["table"][name], "tool_call_id": call.id, "name": call.name},
        {"role": "assistant", "content": row.meta["answer"]},
    ]


@register_env("lookup")
class LookupEnv(Env):
    """The answer needs a number only ``lookup`` returns (module docstring).

    info of the final step: ``lookups`` (calls made), ``answered_without_call``,
    ``used_result`` (the answer holds a number the tool returned)."""

    TOOLS = [LOOKUP_TOOL]

    def __init__(self, row: PromptRow, **kwargs: Any) -> None:
        super().__init__(row)
        self.table: dict[str, str] = dict(row.meta.get("table", {}))
        self.returned: list[str] = []

    def tool_lookup(self, name: str) -> str:
        if name not in self.table:
            return ERROR_PREFIX + f"no entry for {name}"
        self.returned.append(self.table[name])
        return self.table[name]

    def step(self, calls: list[ParsedCall], content: str = "") -> StepResult:
        res = super().step(calls, content)
        if res.info.get("final"):
            res.info.update(
                lookups=len(self.returned),
                answered_without_call=not self.returned,
                used_result=any(v in content for v in self.returned),
            )
        return res

    def reward(self, content: str) -> float | None:
        return 1.0 if content.strip() == str(self.row.meta.get("answer", "")) else 0.0


# --------------------------------------------------------------------------- shell

# Runs inside the sandbox (Python, audit hook off so that it may start bash; the kernel layer
# contains it): unpack the directory, run the command in its own process group, pack the directory.
_RUNNER = r"""
import base64, io, json, os, signal, subprocess, sys, tarfile
os.remove("main.py")
if SNAPSHOT:
    with tarfile.open(fileobj=io.BytesIO(base64.b64decode(SNAPSHOT))) as t:
        t.extractall(".", filter="data")
env = {"PATH": PATH, "HOME": os.getcwd(), "LANG": "C.UTF-8", "TERM": "dumb"}
p = subprocess.Popen(["bash", "-c", COMMAND], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                     stderr=subprocess.STDOUT, env=env, start_new_session=True)
try:
    out, _ = p.communicate(timeout=TIMEOUT)
    rc = p.returncode
except subprocess.TimeoutExpired:
    os.killpg(p.pid, signal.SIGKILL)
    out, _ = p.communicate()
    rc = None
buf = io.BytesIO()
with tarfile.open(fileobj=buf, mode="w:gz") as t:
    for name in sorted(os.listdir(".")):
        t.add(name)
sys.stdout.write(json.dumps({"rc": rc, "out": out[-MAX_OUT:].decode("utf-8", "replace"), "cut": len(out) > MAX_OUT,
                             "snapshot": base64.b64encode(buf.getvalue()).decode()}))
"""
SHELL_SYSTEM = (
    "You are working in a shell. Use the bash tool to inspect and change the files of the working "
    "directory; each command starts in that directory. Call finish when the task is done."
)
BASH_TOOL = function_schema("bash", "Run a bash command in the working directory.", {"command": "the command"})
FINISH_TOOL = function_schema("finish", "End the task; the tests run on the working directory.")
PATH = "/usr/local/bin:/usr/bin:/bin"


def pack_files(files: dict[str, str]) -> str:
    """The starting directory (relative path -> text) as the runner's base64 tar.gz snapshot."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for path, text in sorted(files.items()):
            if path.startswith("/") or ".." in path.split("/"):
                raise ValueError(f"shell: file {path!r} must be a relative path inside the working directory")
            data = text.encode("utf-8")
            info = tarfile.TarInfo(path)
            info.size, info.mode = len(data), 0o644
            t.addfile(info, io.BytesIO(data))
    return base64.b64encode(buf.getvalue()).decode()


@register_env("shell")
class ShellEnv(Env):
    """``bash`` + ``finish`` over a working directory kept between turns (module docstring).

    command_timeout_s  wall time of one command (then its process group is killed)
    limits             extra ``run_untrusted`` arguments (memory_mb, disk_mb, max_procs, ...)
    """

    TOOLS = [BASH_TOOL, FINISH_TOOL]
    SYSTEM = SHELL_SYSTEM
    MAX_OUTPUT = 1 << 16  # bytes of a command's output kept (its tail)
    # Sandboxes run as the one uid nobody, whose process count RLIMIT_NPROC caps across all of them.
    LIMITS: dict[str, Any] = dict(cpu_s=10.0, memory_mb=1024, max_procs=256, max_file_mb=16, disk_mb=32, audit=False)

    def __init__(self, row: PromptRow, command_timeout_s: float = 10.0, limits: dict | None = None) -> None:
        super().__init__(row)
        _check_sandbox()
        self.timeout_s = command_timeout_s
        self.limits = {**self.LIMITS, **(limits or {})}
        self.snapshot = pack_files(dict(row.meta.get("files") or {}))

    def tool_bash(self, command: str) -> str:
        result = self._run(command)
        if "error" in result:
            return ERROR_PREFIX + result["error"]
        out, rc = result["out"], result["rc"]
        note = "" if rc == 0 else f"[timed out after {self.timeout_s:g}s]" if rc is None else f"[exit {rc}]"
        if note and out and not out.endswith("\n"):
            note = "\n" + note
        return ("[... earlier output dropped]\n" if result["cut"] else "") + out + note

    def tool_finish(self) -> str:
        return "finished"

    def reward(self, content: str) -> float | None:
        test = self.row.meta.get("test")
        if not test:
            return None
        result = self._run(str(test))
        return 1.0 if result.get("rc") == 0 else 0.0

    def _run(self, command: str) -> dict[str, Any]:
        """Run ``command`` on the current directory; keep the directory it leaves."""
        from mopd.sandbox import run_untrusted

        params = dict(
            SNAPSHOT=self.snapshot, COMMAND=command, PATH=PATH, TIMEOUT=self.timeout_s, MAX_OUT=self.MAX_OUTPUT
        )
        code = "".join(f"{k} = {v!r}\n" for k, v in params.items()) + _RUNNER
        res = run_untrusted(code, wall_s=self.timeout_s + 10.0, **self.limits)
        try:
            result = json.loads(res.stdout)
        except ValueError:
            why = f"the sandbox run failed ({res.reason}): {res.stderr.strip()[-500:]}"
            return {"error": why}
        self.snapshot = result.pop("snapshot")
        return result


def _check_sandbox() -> None:
    """Refuse at once (not at the first command) where model-written commands cannot be contained."""
    from mopd import sandbox

    if sandbox.isolation() == "basic" and not sandbox._ALLOW_UNISOLATED:
        raise sandbox.SandboxUnavailableError(sandbox.unisolated_message())


def shell_row(task: str, files: dict[str, str], test: str, domain: str = "code_agent") -> PromptRow:
    """A row for the ``shell`` environment: the task as the user's message, the starting files and
    the test command whose exit status is the reward."""
    meta = {"files": files, "test": test, "tools": [BASH_TOOL, FINISH_TOOL], "system": SHELL_SYSTEM}
    return PromptRow(prompt=task, domain=domain, meta=meta, source="shell")
