"""Prefill cost of a beacon model vs. the same base model with full attention.

    python benchmarks/bench_prefill.py [--lengths 4096 8192 ...] [--device cpu|cuda]
        [--model DIR | --shape qwen2-7b --random-weights] [--ratio N] [--attn sdpa|eager]
        [--repeats 2] [--threads N] [--no-base]

For every length, one prompt is read by (a) our beacon model (`model(ids, logits_to_keep=1)`
after `memory.reset()`) and (b) the base model's own Hugging Face forward over the whole sequence
with its KV cache (`AutoModelForCausalLM`, `use_cache=True, logits_to_keep=1`), with the same
weights. Printed per length: seconds, tokens/s, peak memory above the loaded weights, KV entries
per layer and KV bytes, and the beacon/base ratio of each. Base rows whose estimated memory
(KV cache + one layer's activations + attention scores for eager) exceeds what is free are
skipped as "n/a (OOM estimate)".

Models:
* default: a small random-weight Qwen2 written to a temp dir (hidden 256, 4 layers, 4/2 heads,
  window 1024, ratios 2/4/8 with `adapt-1024`, 16K native positions; `--ratio 8` pins the ratio
  of the issue's CPU target); 4K-64K, a few minutes on 2 CPU cores (full attention dominates).
* `--model DIR`: a real checkpoint folder (beacon settings from its config.json).
* `--shape qwen2-7b --random-weights`: the Qwen2-7B shape (hidden 3584, 28 layers, 28/4 heads,
  intermediate 18944, vocab 152064, 32K positions) with the released beacon recipe (window 2048,
  ratios 2/4/8, interleave, full-coverage, q/k/v), random bf16 weights built directly on the
  device: nothing is downloaded or written. Base and beacon share the weights.

Peak memory: `torch.cuda.max_memory_allocated` on CUDA; on CPU the process's peak RSS (VmHWM,
reset through /proc/self/clear_refs before each run; else the growth of getrusage's maxrss).
Beacon KV bytes are exact (`model.memory.nbytes()`: keys, values and the open window's
pre-RoPE keys, all layers); base KV bytes are those of the returned cache.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import resource
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from beacon_apps.beacon.checkpoint import BASE_MODEL_BEACON_DEFAULTS

QWEN2_7B = {
    "model_type": "qwen2",
    "architectures": ["Qwen2ForCausalLM"],
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "use_sliding_window": False,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}
# the released Qwen2 recipe (docs/beacon_method.md §1), evaluation mix
RELEASED_BEACON = {**BASE_MODEL_BEACON_DEFAULTS, "beacon_sink_size": 0}
SMALL = {  # the default CPU model: written with write_tiny_model (random weights, BPE tokenizer)
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 16384,  # reach at ratio 8: (16384 - 1024) * 8 + 1024 = 123K
    **RELEASED_BEACON,
    "beacon_window": 1024,
    "beacon_stride": 1024,
}
CPU_LENGTHS = [4096, 16384, 65536]
CUDA_LENGTHS = [4096, 8192, 16384, 32768, 65536]
MIB = 2**20


# ------------------------------------------------------------------------------------- memory
class PeakMemory:
    """Peak memory growth during a block: CUDA allocator peak, or process peak RSS on CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0

    def __enter__(self):
        gc.collect()
        if LIBC is not None:
            LIBC.malloc_trim(0)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.mode, self.base = "cuda", torch.cuda.memory_allocated(self.device)
        elif _reset_peak_rss() and _proc_status("VmRSS") is not None:
            self.mode, self.base = "hwm", _proc_status("VmRSS")
        else:  # maxrss only grows: this counts only what exceeds every earlier peak
            self.mode = "maxrss"
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return self

    def __exit__(self, *exc):
        if self.mode == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        elif self.mode == "hwm":
            self.peak = _proc_status("VmHWM") - self.base
        else:
            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.base
        return False


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: RSS numbers may then include freed, unreturned memory
        return None


LIBC = _libc()
if LIBC is not None:
    # A fixed mmap threshold (glibc otherwise raises it after big frees): every tensor >= 1 MiB
    # gets its own mapping and leaves the RSS when freed, so peak RSS tracks live tensors.
    LIBC.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD


def _proc_status(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (Linux >= 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 1 << 62


def base_estimate(config, length: int, dtype: torch.dtype, attn: str) -> int:
    """Bytes the base forward needs beyond its weights: KV cache, one layer's activations, scores."""
    size = torch.finfo(dtype).bits // 8
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv = 2 * config.num_hidden_layers * kv_heads * head_dim * length * size
    qkv = (heads + 2 * kv_heads) * head_dim
    activations = length * size * (4 * config.hidden_size + qkv + 3 * config.intermediate_size)
    # eager materialises [heads, L, L] scores (model dtype, then fp32 softmax); SDPA's fused
    # kernels (flash / memory-efficient / CPU flash) stay linear in L.
    scores = heads * length * length * (2 * size + 4) if attn == "eager" else 0
    return kv + activations + scores


def cache_bytes(cache) -> int:
    layers = getattr(cache, "layers", None)
    if layers is not None:
        pairs = [(layer.keys, layer.values) for layer in layers]
    else:
        pairs = list(cache)
    return sum(t.numel() * t.element_size() for pair in pairs for t in pair if t is not None)


# ------------------------------------------------------------------------------------- models
def build_models(args, device: torch.device, dtype: torch.dtype):
    """(beacon model, base HF model, description)."""
    from transformers import AutoModelForCausalLM

    from beacon_apps.beacon import load_beacon_model

    overrides = {"beacon_ratio": [args.ratio]} if args.ratio is not None else {}
    if args.shape == "qwen2-7b":
        if not args.random_weights:
            raise SystemExit("--shape qwen2-7b needs --random-weights (or give --model DIR)")
        return random_weight_models(QWEN2_7B, RELEASED_BEACON, overrides, args, device, dtype)
    if args.model:
        folder = Path(args.model)
        what = str(folder)
    else:
        from beacon_apps.beacon.tiny import write_tiny_model

        folder = write_tiny_model(Path(tempfile.mkdtemp(prefix="bench-prefill-")), **SMALL)
        what = "small random-weight qwen2 (hidden 256, 4 layers, 16K positions)"
    beacon = load_beacon_model(
        folder, device=device, dtype=dtype, attn_implementation=args.attn, **overrides
    )
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation=args.attn)
    return beacon, base.to(device).eval(), what


def random_weight_models(shape, beacon_fields, overrides, args, device, dtype):
    """The real shape with random weights, built on the device; base and beacon share them."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from beacon_apps.beacon import BeaconConfig, BeaconForCausalLM
    from beacon_apps.beacon.checkpoint import FAMILIES

    fields = {k: v for k, v in shape.items() if k != "architectures"}
    config = CONFIG_MAPPING[fields["model_type"]].from_dict(fields)
    with torch.device("meta"):
        base = FAMILIES[fields["model_type"]](config)
    base.config._attn_implementation = args.attn
    base.to(dtype)  # still on meta: nothing is allocated in float32
    base.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, parameter in base.named_parameters():
            if name.endswith("norm.weight"):
                parameter.fill_(1.0)
            else:
                parameter.normal_(0.0, 0.02, generator=generator)
    base.model.rotary_emb = type(base.model.rotary_emb)(config=config).to(device)
    billions = sum(p.numel() for p in base.parameters()) / 1e9  # before beacon params attach
    beacon_config = BeaconConfig.from_dict(beacon_fields, **overrides)
    beacon = BeaconForCausalLM(base, beacon_config, attn_implementation=args.attn)
    beacon.init_beacon_parameters({name for name, _ in beacon.beacon_parameters()})
    return beacon.eval(), base.eval(), f"random-weight {args.shape} ({billions:.2f}B base params)"


# ------------------------------------------------------------------------------------- runs
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_beacon(model, ids: torch.Tensor):
    model.memory.reset()
    with PeakMemory(model.device) as peak:
        start = time.perf_counter()
        model(ids, logits_to_keep=1)
        sync(model.device)
        seconds = time.perf_counter() - start
    entries = sum(model.memory.size())
    row = {
        "s": seconds,
        "peak": peak.peak,
        "entries": entries,
        "kv": model.memory.nbytes(),
        "ratios": sorted(set(model.memory.ratios)),
    }
    model.memory.reset()
    return row


def run_base(model, ids: torch.Tensor):
    device = ids.device
    with torch.inference_mode(), PeakMemory(device) as peak:
        start = time.perf_counter()
        out = model(ids, use_cache=True, logits_to_keep=1)
        sync(device)
        seconds = time.perf_counter() - start
        kv = cache_bytes(out.past_key_values)
        del out
    return {"s": seconds, "peak": peak.peak, "entries": ids.shape[1], "kv": kv}


def prompt(length: int, vocab: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(length)
    ids = torch.randint(10, min(vocab, 32000), (1, length), generator=generator)
    return ids.to(device)


def fmt(value, spec: str) -> str:
    if value is None:  # keep the column width of `spec` (e.g. ">9.3f" -> 9)
        width = "".join(c for c in spec.split(".")[0] if c.isdigit())
        return format("n/a", ">" + width)
    return format(value, spec)


def ratio(a, b) -> str:
    return "n/a" if a is None or b is None or b == 0 else f"{a / b:.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default=None, help="a checkpoint folder")
    parser.add_argument("--shape", choices=["small", "qwen2-7b"], default="small")
    parser.add_argument("--random-weights", action="store_true")
    parser.add_argument("--ratio", type=int, default=None, help="pin the compression ratio")
    parser.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    parser.add_argument("--repeats", type=int, default=2, help="runs per row; the fastest counts")
    parser.add_argument("--no-base", action="store_true", help="skip the full-attention rows")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args()
    print("$ " + shlex.join([os.path.basename(sys.executable), *sys.argv]), flush=True)

    import transformers

    transformers.logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    default_dtype = "bfloat16" if device.type == "cuda" else "float32"
    dtype = getattr(torch, args.dtype or default_dtype)
    lengths = args.lengths or (CUDA_LENGTHS if device.type == "cuda" else CPU_LENGTHS)

    started = time.perf_counter()
    beacon, base, what = build_models(args, device, dtype)
    cfg = beacon.beacon_config
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"model: {what}; {str(dtype).replace('torch.', '')} on {name} "
        f"(torch {torch.__version__}, {torch.get_num_threads()} threads), attention {args.attn}; "
        f"loaded in {time.perf_counter() - started:.1f}s"
    )
    print(
        f"beacon: window {cfg.beacon_window}, {cfg.beacon_pos}/{cfg.beacon_attn}, ratios "
        f"{cfg.beacon_ratio} ({cfg.beacon_ratio_mix}), native positions "
        f"{beacon.memory.max_positions}; peak = memory above the loaded weights"
    )

    warm = prompt(min(2 * cfg.beacon_window, min(lengths)), beacon.config.vocab_size, device)
    run_beacon(beacon, warm)
    if not args.no_base:
        run_base(base, warm)

    header = (
        f"{'tokens':>7} {'ratio':>6} | {'beacon s':>9} {'base s':>9} {'b/B':>5} | "
        f"{'beacon tok/s':>12} {'base tok/s':>11} | {'beacon peak':>11} {'base peak':>10} "
        f"{'b/B':>5} | {'beacon KV':>9} {'base KV':>8} | {'beacon KV':>9} {'base KV':>8} {'b/B':>5}"
    )
    units = (
        f"{'':>7} {'':>6} | {'':>9} {'':>9} {'':>5} | {'':>12} {'':>11} | {'MiB':>11} "
        f"{'MiB':>10} {'':>5} | {'entries':>9} {'entries':>8} | {'MiB':>9} {'MiB':>8} {'':>5}"
    )
    print()
    print(header)
    print(units)
    print("-" * len(header))
    for length in lengths:
        ids = prompt(length, beacon.config.vocab_size, device)
        b = min((run_beacon(beacon, ids) for _ in range(args.repeats)), key=lambda r: r["s"])
        skip = None
        if args.no_base:
            skip = "skipped (--no-base)"
        elif base_estimate(base.config, length, dtype, args.attn) > 0.9 * free_bytes(device):
            skip = "n/a (OOM estimate)"
        f = None
        if skip is None:
            try:
                f = min((run_base(base, ids) for _ in range(args.repeats)), key=lambda r: r["s"])
            except torch.OutOfMemoryError:
                skip = "n/a (OOM)"
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        get = (lambda key: None) if f is None else f.get
        ratios = "/".join(str(r) for r in b["ratios"]) or "-"
        line = (
            f"{length:>7} {ratios:>6} | {b['s']:>9.3f} {fmt(get('s'), '>9.3f')} "
            f"{ratio(b['s'], get('s')):>5} | {length / b['s']:>12.0f} "
            f"{fmt(None if f is None else length / f['s'], '>11.0f')} | "
            f"{b['peak'] / MIB:>11.1f} {fmt(None if f is None else f['peak'] / MIB, '>10.1f')} "
            f"{ratio(b['peak'], get('peak')):>5} | {b['entries']:>9} "
            f"{fmt(get('entries'), '>8')} | {b['kv'] / MIB:>9.2f} "
            f"{fmt(None if f is None else f['kv'] / MIB, '>8.2f')} {ratio(b['kv'], get('kv')):>5}"
        )
        if skip:
            line += f"   base: {skip}"
        print(line, flush=True)
    print(
        "\nb/B = beacon / base. KV entries are per layer (beacon: sink + condensed beacons + raw "
        "tokens of the open window); beacon KV MiB also counts the open window's pre-RoPE keys."
    )
    print(f"total {time.perf_counter() - started:.1f}s")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
