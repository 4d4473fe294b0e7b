"""Start `vllm serve` on the bundled tiny DeepSeek-V4, talk to it, stop it: the harness of the end-to-end tests
(`from serving import Server`), also used by scripts/vllm_serve_client.py (the main job, scripts/serve.sh) and
benchmarks/bench_serving.py. Standard library only. Every server listens on 127.0.0.1 on a free port, runs in its
own session (so the engine processes it starts go with it) and is stopped by its pid; every wait and request loop
is bounded.
"""

from __future__ import annotations

import concurrent.futures as cf
import glob
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "configs" / "dsv4-tiny"  # config + tokenizer: what `--load-format dummy` serves
SERVED_NAME = "dsv4-tiny"  # the model name requests use, whichever weights are served
LINE = re.compile(r"indexer_epilog: (?P<site>[^:]+): mode=(?P<mode>\S+) round_scale=(?P<rs>\S+) fp8=(?P<fp8>\S+)")
START_TIMEOUT_S = 420
REQUEST_TIMEOUT_S = 300


def die_with_parent() -> None:
    """`preexec_fn` for a server: Linux sends it SIGTERM when the process that started it dies, so a test
    runner killed by a timeout or SIGKILL cannot leave a server (and its 2 GB engine) behind."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_checkpoint: Path | None = None


def checkpoint_dir() -> Path:
    """The tiny model with its seeded checkpoint (scripts/make_tiny_checkpoint.py builds it once into the cache
    folder; a subprocess, so this harness stays free of torch)."""
    global _checkpoint
    if _checkpoint is None:
        out = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_tiny_checkpoint.py")], capture_output=True,
                             text=True, timeout=600)
        if out.returncode != 0 or not out.stdout.strip():
            raise RuntimeError(f"scripts/make_tiny_checkpoint.py failed (exit {out.returncode}):\n{out.stderr[-4000:]}")
        _checkpoint = Path(out.stdout.strip().splitlines()[-1])
    return _checkpoint


def omp_threads_bind(workers: int) -> str:
    """`VLLM_CPU_OMP_THREADS_BIND` for `workers` CPU workers on this host: the allowed cores split into that many
    lists ("0|1" on 2 cores). vLLM's default ("auto") binds one NUMA node per worker and refuses to start more
    workers than nodes ("Not enough allowed NUMA nodes"); CI machines have one node. With DP the lists are taken
    DP rank by DP rank ([DP, PP, TP] order, vllm/utils/ompmultiprocessing.py)."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < workers:
        raise RuntimeError(f"{workers} CPU workers need {workers} cores; this process may use {cores}")
    share = len(cores) // workers
    return "|".join(",".join(map(str, cores[i * share:(i + 1) * share])) for i in range(workers))


def token_prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(2, 1000) for _ in range(n)]


@dataclass
class Server:
    """`vllm serve` of the tiny model. `flag` is the `--additional-config` JSON (None: none given).
    `load_format`: None serves the seeded checkpoint (`checkpoint_dir()`), "dummy" vLLM's dummy weights."""

    flag: dict | None = None
    hf_overrides: dict | None = None
    env: dict[str, str] = field(default_factory=dict)
    workdir: Path | None = None
    max_num_seqs: int = 8
    extra_args: list[str] = field(default_factory=list)
    load_format: str | None = None
    # Scale-out (tests/integrations/vllm_cpu/test_serve_distributed.py). executor None: "uni" for one worker
    # (the engine runs the model in-process), "mp" for several. data_parallel_size > 1 runs one engine per DP
    # rank (vLLM's internal load balancing, `--data-parallel-backend mp`), all on 127.0.0.1.
    executor: str | None = None
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir or tempfile.mkdtemp(prefix="vie-serve-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log_path = self.workdir / "server.log"
        self.stats_dir = self.workdir / "stats"
        self.proc: subprocess.Popen | None = None

    @property
    def world_size(self) -> int:
        """Worker processes that run the model (one per TP rank per DP rank)."""
        return self.tensor_parallel_size * self.data_parallel_size

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        vllm = shutil.which("vllm") or str(Path(sys.executable).with_name("vllm"))
        model = MODEL if self.load_format == "dummy" else checkpoint_dir()
        cmd = [vllm, "serve", str(model), "--served-model-name", SERVED_NAME, "--host", "127.0.0.1",
               "--port", str(self.port), "--enforce-eager", "--max-model-len", "4096",
               "--max-num-seqs", str(self.max_num_seqs), "--seed", "0",
               "--distributed-executor-backend", self.executor or ("uni" if self.world_size == 1 else "mp")]
        if self.load_format is not None:
            cmd += ["--load-format", self.load_format]
        if self.tensor_parallel_size > 1:
            cmd += ["--tensor-parallel-size", str(self.tensor_parallel_size)]
        if self.data_parallel_size > 1:
            # The DP coordinator's RPC port defaults to 29550 on every host: a free one, so that parallel runs
            # on this machine cannot collide (the DP master ports vLLM already picks free). One API server: vLLM
            # starts one per DP rank by default, each importing vLLM and torch again on a 2-core machine.
            cmd += ["--data-parallel-size", str(self.data_parallel_size), "--data-parallel-backend", "mp",
                    "--data-parallel-address", "127.0.0.1", "--data-parallel-rpc-port", str(free_port()),
                    "--api-server-count", "1"]
        if self.flag is not None:
            cmd += ["--additional-config", json.dumps(self.flag)]
        if self.hf_overrides is not None:
            cmd += ["--hf-overrides", json.dumps(self.hf_overrides)]
        return cmd + self.extra_args

    def start(self) -> "Server":
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
               "VLLM_INDEXER_EPILOG_STATS_DIR": str(self.stats_dir), **self.env}
        # A worker killed by SIGSEGV/SIGBUS/SIGFPE/SIGABRT/SIGILL then prints "Fatal Python error" and where it
        # was into this log; without it vLLM's engine only says "WorkerProc initialization failed due to an
        # exception in a background process" and no worker says anything (measured: docs/vllm-cpu.md).
        env.setdefault("PYTHONFAULTHANDLER", "1")
        if self.world_size > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in self.env:
            env["VLLM_CPU_OMP_THREADS_BIND"] = omp_threads_bind(self.world_size)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.command(), stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True, preexec_fn=die_with_parent, cwd=self.workdir)
        return self

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> bool:
        """True once /health answers; False if the server exited first (start-up failed)."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return True
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(1.0)
        raise TimeoutError(f"vllm serve not ready after {timeout_s:.0f} s (log: {self.log_path})")

    def wait_exit(self, timeout_s: float = START_TIMEOUT_S) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout_s)

    def stop(self) -> None:
        """SIGTERM to the server's session (its pid is the group id), then SIGKILL after 30 s."""
        if self.proc is None:
            return
        pid = self.proc.pid
        for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait_s)
                break
            except subprocess.TimeoutExpired:
                continue
        # Engine processes left in the session after the API server exited.
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._log.close()
        self.proc = None

    def __enter__(self) -> "Server":
        self.start()
        if not self.wait_ready():
            self.stop()
            raise RuntimeError(f"vllm serve exited during start-up:\n{self.log_tail()}{self.silent_worker_death()}")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---------------------------------------------------------------------------------------- requests
    def complete(self, prompt: list[int] | str, max_tokens: int = 4, dp_rank: int | None = None) -> dict:
        """One /v1/completions request with token ids or text; returns the generated `token_ids` and `text`,
        `finish_reason`, `usage`, `elapsed_s` and `ttft_s` (time to the first streamed token). `dp_rank` pins
        the request to one data-parallel engine (vLLM's X-data-parallel-rank header) instead of leaving it to
        the load balancer."""
        body = {"model": SERVED_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                "ignore_eos": True, "return_token_ids": True, "stream": True,
                "stream_options": {"include_usage": True}}
        headers = {"Content-Type": "application/json"}
        if dp_rank is not None:
            headers["X-data-parallel-rank"] = str(dp_rank)
        req = urllib.request.Request(self.url + "/v1/completions", data=json.dumps(body).encode(), headers=headers)
        t0 = time.perf_counter()
        ttft = None
        tokens: list[int] = []
        text = ""
        usage = None
        finish = None
        with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_S) as resp:
            for raw in resp:
                line = raw.decode().strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices", []):
                    ids = choice.get("token_ids") or []
                    if ids and ttft is None:
                        ttft = time.perf_counter() - t0
                    tokens += ids
                    text += choice.get("text") or ""
                    finish = choice.get("finish_reason") or finish
        return {"token_ids": tokens, "text": text, "finish_reason": finish, "usage": usage, "ttft_s": ttft,
                "elapsed_s": time.perf_counter() - t0}

    def chat(self, content: str, max_tokens: int = 8) -> dict:
        """One /v1/chat/completions request (one user message, greedy); returns vLLM's JSON response."""
        body = {"model": SERVED_NAME, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
                "temperature": 0.0, "ignore_eos": True}
        req = urllib.request.Request(self.url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_S) as resp:
            return json.loads(resp.read())

    def complete_many(self, prompts: list[list[int]], max_tokens: int = 4, concurrency: int = 8,
                      dp_ranks: list[int | None] | None = None) -> list[dict]:
        ranks = dp_ranks if dp_ranks is not None else [None] * len(prompts)
        with cf.ThreadPoolExecutor(max_workers=concurrency) as pool:
            return list(pool.map(lambda pr: self.complete(pr[0], max_tokens, pr[1]), zip(prompts, ranks)))

    # ---------------------------------------------------------------------------------------- what happened
    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def plugin_lines(self) -> list[dict]:
        return [m.groupdict() for m in LINE.finditer(self.log_text())]

    def stats(self) -> list[dict]:
        return [json.loads(Path(p).read_text()) for p in sorted(glob.glob(str(self.stats_dir / "*.json")))]

    def silent_worker_death(self) -> str:
        """A note for a start-up failure in which a worker died without a word: no Python exception and no
        faulthandler dump, so by a signal no handler sees (SIGKILL: the kernel's OOM killer is the usual sender),
        with the memory the machine has left now."""
        log = self.log_text()
        if "WorkerProc initialization failed" not in log or "Fatal Python error" in log:
            return ""
        meminfo = Path("/proc/meminfo").read_text() if Path("/proc/meminfo").exists() else ""
        m = re.search(r"MemAvailable:\s+(\d+) kB", meminfo)
        avail = f"{int(m.group(1)) // 1024} MiB" if m else "unknown"
        return (f"\n[serving] a worker died by a signal during start-up with no traceback (SIGKILL, e.g. the OOM "
                f"killer, leaves none); MemAvailable now {avail}")

    def kv_cache_tokens(self) -> int | None:
        m = re.search(r"CPU KV cache size: ([\d,]+) tokens", self.log_text())
        return int(m.group(1).replace(",", "")) if m else None


def well_formed(resp: dict, max_tokens: int, prompt_len: int | None) -> bool:
    """`complete`'s response has `max_tokens` ids in the vocabulary and the usage to match; `prompt_len` None
    (a text prompt): any positive prompt length."""
    usage = resp.get("usage") or {}
    ids = resp.get("token_ids") or []
    prompt_ok = (usage.get("prompt_tokens") == prompt_len if prompt_len is not None
                 else usage.get("prompt_tokens", 0) > 0)
    return (len(ids) == max_tokens and all(isinstance(t, int) and 0 <= t < 1024 for t in ids) and prompt_ok
            and usage.get("completion_tokens") == max_tokens and resp.get("finish_reason") == "length")


def mx_floor_share(stat: dict) -> float | None:
    """Share of the indexer rows a process wrote whose MX scale is the one the 1e-4 amax floor gives (every row
    whose amax was floored, and the few just above the floor in its binade); None outside MX mode or with no rows.
    MX scales are powers of two, so the stats' log2 histogram holds one bucket per scale value."""
    if stat.get("mode") != "mx" or not stat.get("rows_written"):
        return None
    import torch  # lazily: the rest of the harness is standard library only

    from vllm_indexer_epilog.op.reference import mx_exponent
    from vllm_indexer_epilog.op.spec import FP8_FORMATS, MX_AMAX_FLOOR

    fmt = FP8_FORMATS[getattr(torch, stat["fp8"])]
    floor_log2 = int(mx_exponent(torch.tensor([MX_AMAX_FLOOR / 2]), fmt, bool(stat["round_scale"]))[0])
    return stat["scale"]["log2_histogram"].get(str(floor_log2), 0) / stat["rows_written"]
