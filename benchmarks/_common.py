"""Shared helpers for the benchmark scripts: what machine ran it, versions, memory, tables, and the
`genforge serve` processes a benchmark starts (a free port, waiting for /health, a graceful stop).

Every benchmark records the CPU's flags (AVX2 / AVX-512 / AVX512_BF16 / AMX decide which paths are
fast), the load average when it started (other jobs on a shared machine make timings noisy), the
package versions that ran, and prints its results as a markdown table that can go in the README.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import signal
import socket
import statistics
import subprocess
import threading
import time
from pathlib import Path

CACHE = Path(os.environ.get("GENFORGE_BENCH_CACHE", Path.home() / ".cache" / "genforge-bench"))
FLAGS_OF_INTEREST = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
                     "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")


def cpu_info() -> dict:
    """`lscpu`'s model name and the flags that decide which kernels are fast, plus the load now."""
    info: dict = {"cpu_count": os.cpu_count(), "machine": platform.machine(), "platform": platform.platform()}
    flags: set[str] = set()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model name":
                info["model_name"] = value.strip()
            elif key.strip() == "Flags":
                flags = set(value.split())
    except (OSError, subprocess.SubprocessError) as e:
        info["lscpu_error"] = str(e)
    if not flags and Path("/proc/cpuinfo").is_file():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.partition(":")[2].split())
                break
    info["flags"] = {f: f in flags for f in FLAGS_OF_INTEREST}
    try:
        info["loadavg_at_start"] = list(os.getloadavg())
    except OSError:
        pass
    return info


def has_flag(info: dict, flag: str) -> bool:
    return bool(info.get("flags", {}).get(flag))


def versions(*packages: str) -> dict:
    out = {"python": platform.python_version()}
    for p in packages:
        try:
            out[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            out[p] = None
    return out


def git_commit(root: Path) -> str | None:
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src", "benchmarks"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return r.stdout.strip() + ("+dirty" if dirty else "") if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def folder_hash(folder: Path, names: tuple[str, ...] = ("config.json", "tokenizer.json", "model.safetensors")) -> str:
    h = hashlib.sha256()
    for name in names:
        p = folder / name
        if p.is_file():
            h.update(name.encode())
            with p.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()[:16]


class PeakRSS:
    """Samples the resident memory of a process and its children every `interval` s; `.peak` in bytes."""

    def __init__(self, pid: int, interval: float = 0.25):
        import psutil

        self.proc = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self.last = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def sample(self) -> int:
        import psutil

        total = 0
        try:
            procs = [self.proc, *self.proc.children(recursive=True)]
        except psutil.Error:
            return self.last
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        self.last = total
        self.peak = max(self.peak, total)
        return total

    def os_threads(self) -> int | None:
        import psutil

        try:
            return sum(p.num_threads() for p in [self.proc, *self.proc.children(recursive=True)])
        except psutil.Error:
            return None

    def idle_cpu_percent(self, seconds: float = 2.0) -> float | None:
        """CPU the process (and children) burns while no request is in flight (busy-polling shows here)."""
        import psutil

        try:
            procs = [self.proc, *self.proc.children(recursive=True)]
            t0 = sum(sum(p.cpu_times()[:2]) for p in procs)
            time.sleep(seconds)
            t1 = sum(sum(p.cpu_times()[:2]) for p in procs)
            return 100 * (t1 - t0) / seconds
        except psutil.Error:
            return None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(timeout=2)
        return self.peak


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def mean_std(xs) -> tuple[float, float]:
    xs = [float(x) for x in xs]
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def ci95(xs) -> tuple[float, float]:
    """Mean ± t * s / sqrt(n): a 95% confidence interval of the mean (t from a small table)."""
    t = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23}
    m, s = mean_std(xs)
    n = len(xs)
    half = t.get(n - 1, 2.0) * s / n ** 0.5 if n > 1 else float("inf")
    return m - half, m + half


def md_table(headers: list[str], rows: list[list], align: str | None = None) -> str:
    """A GitHub markdown table; `align`: one character per column, 'l' or 'r' (default: first l, rest r)."""
    align = align or "l" + "r" * (len(headers) - 1)
    cells = [[("—" if c is None else str(c)) for c in r] for r in rows]
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in cells]
    return "\n".join(lines)


def fmt(x, spec: str = ".0f") -> str | None:
    return None if x is None else format(x, spec)


# --- servers as processes ---

def free_port() -> int:
    """A port nothing listens on now (the server binds it itself a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180.0) -> None:
    """Returns once `url`/health answers 200; RuntimeError with the end of the server's log when the
    process exits first or `timeout` seconds pass (then it is killed)."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"genforge serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"genforge serve did not come up in {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def stop_server(proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """SIGTERM (a server drains its requests in flight, then exits); killed after `timeout` seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
