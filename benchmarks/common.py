"""Shared helpers for the ippo benchmarks: model presets, timing, peak memory, records, tables, plots.

Every benchmark script imports this module (run them as ``python benchmarks/<name>.py`` from the
repository root, or ``python -m benchmarks.<name>``).
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import gc
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TRAIN_DATA = ROOT / "tests" / "rl" / "data" / "arith_train.jsonl"  # arithmetic questions the trainer benchmarks use
if str(ROOT) not in sys.path:  # so `python benchmarks/x.py` imports the checkout's ippo
    sys.path.insert(0, str(ROOT))

# ----------------------------------------------------------------------------- model presets
# Llama-style decoders with random weights (no download). ``tiny`` is the reference model:
# 4 layers, 256 wide, 7 linear layers per block + lm_head = 29 hooked linear layers.
PRESETS: dict[str, dict] = {
    "tiny": {"hidden": 256, "layers": 4, "heads": 4, "kv_heads": 4, "intermediate": 768, "vocab": 1024},
    "small": {"hidden": 512, "layers": 8, "heads": 8, "kv_heads": 8, "intermediate": 1536, "vocab": 4096},
    "125m": {"hidden": 768, "layers": 12, "heads": 12, "kv_heads": 12, "intermediate": 2048, "vocab": 32000},
    "350m": {"hidden": 1024, "layers": 24, "heads": 16, "kv_heads": 16, "intermediate": 2816, "vocab": 32000},
    "1b": {"hidden": 2048, "layers": 16, "heads": 32, "kv_heads": 8, "intermediate": 8192, "vocab": 32000},
    # CI-sized: a couple of layers, so --smoke finishes in seconds.
    "micro": {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate": 160, "vocab": 256},
}


def make_llama(preset: str, dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0):
    """A random-weight ``LlamaForCausalLM`` of the given preset, in eval mode (no dropout)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    p = PRESETS[preset]
    cfg = LlamaConfig(vocab_size=p["vocab"], hidden_size=p["hidden"], intermediate_size=p["intermediate"],
                      num_hidden_layers=p["layers"], num_attention_heads=p["heads"],
                      num_key_value_heads=p["kv_heads"], max_position_embeddings=4096,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                      attn_implementation="sdpa")
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    return model.to(dtype).eval()


def build_preset_dir(preset: str, out_dir: Path, seed: int = 0) -> Path:
    """A random-weight Llama of a preset's shape saved with a character-level tokenizer (the trainer's
    input), its vocabulary padded with filler tokens to the preset's size so the lm_head is full-sized."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    p = PRESETS[preset]
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = list("0123456789abcdefghijklmnopqrstuvwxyz #+-*/=.,:?!()$\n")
    names = specials + chars + [f"<x{i}>" for i in range(max(0, p["vocab"] - len(specials) - len(chars)))]
    tok = Tokenizer(models.WordLevel(vocab={c: i for i, c in enumerate(names)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                     unk_token="<unk>")
    model = make_llama(preset, seed=seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    hf_tok.save_pretrained(out)
    return out


def model_source(path: str) -> tuple[str, dict]:
    """(directory, from_pretrained kwargs) of a local model directory or .gguf file; clear errors."""
    p = Path(path)
    if not p.exists():
        raise SystemExit(f"--model {path}: no such file or directory")
    if p.is_file():
        if p.suffix != ".gguf":
            raise SystemExit(f"--model {path}: expected a model directory (config.json) or a .gguf file")
        return str(p.parent), {"gguf_file": p.name}
    if not (p / "config.json").is_file():
        raise SystemExit(f"--model {path}: the directory has no config.json")
    return str(p), {}


def model_label(path: str) -> str:
    """A model's short name for rows and file names: the directory's name, or the .gguf file's stem."""
    p = Path(path)
    return p.stem if p.suffix == ".gguf" else p.name


def load_model(path: str, dtype: torch.dtype = torch.float32, device: str = "cpu", pretrained: bool = False,
               seed: int = 0):
    """The user's causal LM in eval mode: random weights from its config, or its own weights with
    ``pretrained``. Local files only; never remote code."""
    from transformers import AutoConfig, AutoModelForCausalLM

    where, kw = model_source(path)
    if pretrained:
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, local_files_only=True,
                                                     trust_remote_code=False, **kw)
        return model.to(device).eval()
    cfg = AutoConfig.from_pretrained(where, local_files_only=True, trust_remote_code=False, **kw)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, trust_remote_code=False)
    return model.eval()


def describe_model(path: str, pretrained: bool) -> dict:
    from transformers import AutoConfig

    where, kw = model_source(path)
    cfg = AutoConfig.from_pretrained(where, local_files_only=True, trust_remote_code=False, **kw)
    keys = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "intermediate_size", "vocab_size")
    return {"path": str(path), "weights": "pretrained" if pretrained else "random (from its config)",
            **{k: getattr(cfg, k, None) for k in keys}}


def num_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def saved_params(model_dir: Path) -> int:
    """Parameters in a model directory's ``*.safetensors`` files (read from their headers, no tensor loaded)."""
    from safetensors import safe_open

    total = 0
    for f in Path(model_dir).glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            total += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())  # noqa: SIM118
    return total


def linear_params(model) -> int:
    return sum(m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
               for m in model.modules() if isinstance(m, torch.nn.Linear))


# ----------------------------------------------------------------------------- timing
def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], warmup: int = 1, repeats: int = 3, device="cpu") -> dict:
    """Median wall time of ``fn()`` after ``warmup`` calls; also min and every sample (seconds)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "times_s": times}


# ----------------------------------------------------------------------------- peak memory
_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
        except OSError:
            _LIBC = False
    return _LIBC


def _proc_status_mb(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process; Linux >= 4.0."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_method(device) -> str:
    if torch.device(device).type == "cuda":
        return "torch.cuda.max_memory_allocated minus the allocation before the call"
    return ("peak RSS (VmHWM, reset through /proc/self/clear_refs) minus the RSS before the call, "
            "after gc + malloc_trim, one call after warm-up")


def peak_memory_mb(fn: Callable[[], object], device="cpu") -> float | None:
    """Extra peak memory (MiB) of one call of ``fn()`` over what was live before it.

    CUDA: ``max_memory_allocated`` delta. CPU: the process's peak RSS (VmHWM, reset right before
    the call) minus its RSS before the call, after ``gc.collect()`` and ``malloc_trim(0)`` so that
    memory freed earlier is really returned to the OS and every page the call touches is counted.
    ``fn`` should have run once before (warm-up), so one-time caches do not count.
    """
    if torch.device(device).type == "cuda":
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    gc.collect()
    libc = _libc()
    if libc:
        libc.malloc_trim(0)
    if _reset_hwm():
        base = _proc_status_mb("VmRSS")
        fn()
        peak = _proc_status_mb("VmHWM")
        return None if base is None or peak is None else max(0.0, peak - base)
    # Fallback (no clear_refs): ru_maxrss only grows, so this is a lower bound.
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    return max(0.0, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024.0)


def configure_cpu_allocator() -> None:
    """Make the CPU peak-memory numbers meaningful: large blocks are mmap-ed and unmapped on free.

    glibc otherwise raises its mmap threshold dynamically and keeps freed blocks in the heap, so a
    call can reuse memory freed by an earlier one without touching new pages (an underestimate).
    Call this only after the timing runs: fresh mmaps cost page faults.
    """
    libc = _libc()
    if libc and torch.device("cpu").type == "cpu":
        libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD = 64 KiB (also disables the dynamic threshold)
        libc.mallopt(-1, 0)  # M_TRIM_THRESHOLD = 0


# ----------------------------------------------------------------------------- agreement
def max_rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """``max_e |a_e - ref_e| / max_e |ref_e|`` (element-wise relative errors blow up near 0)."""
    a, ref = a.detach().double().cpu(), ref.detach().double().cpu()
    scale = float(ref.abs().max())
    return float((a - ref).abs().max()) / scale if scale > 0 else float((a - ref).abs().max())


def _ranks(x: torch.Tensor) -> torch.Tensor:
    x = x.detach().double().cpu()
    order = torch.argsort(x, stable=True)
    r = torch.empty_like(x)
    r[order] = torch.arange(len(x), dtype=torch.float64)
    # average ranks of ties
    uniq, inv, counts = torch.unique(x, return_inverse=True, return_counts=True)
    if len(uniq) < len(x):
        sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, r)
        r = (sums / counts)[inv]
    return r


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / den if den > 0 else float("nan")


def agreement(a: torch.Tensor, ref: torch.Tensor) -> dict:
    return {"max_rel_err": max_rel_err(a, ref), "spearman": spearman(a, ref)}


# ----------------------------------------------------------------------------- environment record
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device="cpu") -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name()
    return _cpu_model()


def device_slug(device="cpu") -> str:
    """``cpu-<model name>`` or the GPU name, lower-case, as a directory name."""
    name = device_name(device)
    slug = re.sub(r"\(r\)|\(tm\)|cpu @.*|@.*", "", name.lower())
    slug = re.sub(r"[^a-z0-9]+", "-", slug).strip("-")
    return (f"cpu-{slug}" if torch.device(device).type == "cpu" else slug)[:60]


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10, check=False)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10, check=False)
        commit = out.stdout.strip() or "unknown"
        return commit + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device="cpu") -> dict:
    import ippo

    try:
        import transformers

        tf_version = transformers.__version__
    except ImportError:
        tf_version = None
    return {
        "device": device_name(device),
        "device_slug": device_slug(device),
        "device_type": torch.device(device).type,
        "torch": torch.__version__,
        "transformers": tf_version,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_avg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "git_commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "backends": {k: [bool(v), v.reason] for k, v in ippo.influence.backends().items()},
    }


def load_avg() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


# ----------------------------------------------------------------------------- CLI, output
def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--smoke", action="store_true", help="tiny sizes, seconds: checks outputs, not timings (CI)")
    size.add_argument("--quick", action="store_true", help="CPU-sized sweep, a few minutes")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats after warm-up (median reported)")
    p.add_argument("--out", default=None, help="output directory (default benchmarks/results/<device>/)")
    p.add_argument("--no-plots", action="store_true")
    return p


def setup(args) -> Path:
    torch.set_num_threads(args.threads)
    try:  # the trainer loads models many times per benchmark: no progress bar or load report each time
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU visible to torch")
    out = Path(args.out) if args.out else RESULTS / device_slug(args.device)
    out.mkdir(parents=True, exist_ok=True)
    return out


def mode_name(args) -> str:
    return "smoke" if args.smoke else "quick" if args.quick else "full"


def _clean(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _clean(obj.tolist())
    return obj


def write_json(path: Path, payload: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(payload), indent=1, sort_keys=False) + "\n")
    return path


def fmt(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "-"
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.2e}"
        return f"{v:.{digits}g}" if abs(v) < 1 else f"{v:.{digits}f}".rstrip("0").rstrip(".")
    return str(v)


def table(rows: Sequence[dict], columns: Sequence[str], title: str | None = None) -> str:
    """A GitHub-markdown table of ``rows`` (dicts) restricted to ``columns``."""
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = [] if title is None else [f"### {title}", ""]
    lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |")
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += ["| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |" for row in cells]
    return "\n".join(lines)


def plot_series(path: Path, series: dict[str, tuple[list, list]], xlabel: str, ylabel: str, title: str,
                logx: bool = True, logy: bool = True) -> Path | None:
    """One line per series name: ``{name: (xs, ys)}``; None values are skipped. PNG via Agg."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    drawn = False
    for name, (xs, ys) in series.items():
        pts = [(x, y) for x, y in zip(xs, ys) if y is not None and (not logy or y > 0)]
        if not pts:
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    if logx:
        ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
