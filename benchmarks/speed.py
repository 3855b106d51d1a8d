"""Speed of the ARC encoder at real model shapes (random weights, bf16), measured in ONE run.

One process measures the GPU's dense bf16 matmul throughput first and reports every other
number against it, so ratios (MFU, speedups) hold for the card as found. Sections:

  matmul   reference peak: median TFLOP/s of a large bf16 matrix product on random data
  encoder  ARC encoder forward (Llama-3.2-3B shape minus 2 layers, pooling 4 and 8) over a
           batch of 1k-token chunks: tokens/s and model FLOP utilisation (MFU) vs that peak;
           PyTorch SDPA with its default kernel choice vs forced cuDNN attention; flash-attn
           when installed (it is not on the device machines: no binary wheel for their stack)
  prefill  frozen decoder (Llama-3.1-8B shape) prefill for contexts of 1k/4k/16k tokens:
           full text vs cached compressed context (x4, x8) vs compress-on-the-fly + prefill,
           speedups, and time to first token through ``generate``
  bytes    bytes per original token: cached compressed vectors vs the decoder's KV cache
  train    one pretraining step (trainable encoder + projector, frozen decoder): tokens/s,
           MFU, peak memory; eager, activation checkpointing, torch.compile'd layers
  scaling  (multi-GPU only) DDP training and cache-build throughput on N GPUs vs 1
  grid     (not in the default run) speed curves for `arc-encoder plan`: on-the-fly compression
           over chunk_len x pooling factor x tokens, decoder prefill over input lengths, and
           end-to-end validation queries off the grid; writes plan_speed_<gpu>_<date>.json

FLOP counts: model FLOPs as defined (formulas included) in ``arc_encoder/planner/flops.py``, where
the functions this script uses live; the planner (``arc-encoder plan``) shares them.
  training step: encoder and projector 3x forward (forward + input and weight grads);
                 frozen decoder 2x forward (forward + input grads only, no weight grads).

Usage (repo root):  PYTHONPATH=. python3 benchmarks/speed.py [--preset h100|tiny]
                    [--sections matmul,encoder,prefill,bytes,train] [--out-dir DIR]
                    planner curves: --sections matmul,grid
Writes speed_<gpu>_<date>.json, a .png plot and a .md table to --out-dir
(default benchmarks/results/).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import os
import re
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Multi-GPU runs must never use NVLink multicast on the shared hosts (device README).
for _k, _v in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ.setdefault(_k, _v)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python3 benchmarks/speed.py` from anywhere, no install needed
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig  # noqa: E402

from arc_encoder import ARCConfig, ARCEncoder, ARCModel, CompressedContext, EncoderConfig  # noqa: E402
from arc_encoder.encoder import flash_attn_available  # noqa: E402
from arc_encoder.planner.flops import (  # noqa: E402
    attention_dims, decoder_forward_flops, encoder_forward_flops, projector_flops,
)
from arc_encoder.decoders import freeze_decoder  # noqa: E402
from arc_encoder.objectives import decoder_loss  # noqa: E402
from arc_encoder.storage import (  # noqa: E402
    atomic_save_figure,
    atomic_save_tensors,
    atomic_write_json,
    atomic_write_text,
)

SECTIONS = ("matmul", "encoder", "prefill", "bytes", "train", "scaling", "grid")
DEFAULT_SECTIONS = "matmul,encoder,prefill,bytes,train"
DECODER_NAME = "llama8b"
FLASH_NOTE = (
    "flash-attn is not installed: PyPI has no binary wheel for the device machines' stack "
    "(torch 2.11, CUDA 13), and they cannot build it (no network); PyTorch SDPA is used"
)

# Real shapes, built in code (no hub). Llama-3.2-3B: config.json of meta-llama/Llama-3.2-3B.
LLAMA32_3B = dict(
    vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
    num_attention_heads=24, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
    rms_norm_eps=1e-5, tie_word_embeddings=True, rope_theta=500000.0,
    rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    bos_token_id=128000, eos_token_id=128001,
)
# Llama-3.1-8B: config.json of meta-llama/Llama-3.1-8B.
LLAMA31_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
    rms_norm_eps=1e-5, tie_word_embeddings=False, rope_theta=500000.0,
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    bos_token_id=128000, eos_token_id=128001,
)
# Odd tiny sizes: seconds on 2 CPU cores, swapped dimensions fail loudly.
TINY_ENCODER = dict(
    vocab_size=131, hidden_size=48, intermediate_size=71, num_hidden_layers=4,
    num_attention_heads=6, num_key_value_heads=2, head_dim=8, max_position_embeddings=4096,
    tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)
TINY_DECODER = dict(
    vocab_size=311, hidden_size=40, intermediate_size=67, num_hidden_layers=3,
    num_attention_heads=5, num_key_value_heads=1, head_dim=8, max_position_embeddings=4096,
    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)


@dataclass(frozen=True)
class Preset:
    """Every size one run uses; ``h100`` is the issue's setting, ``tiny`` the CPU test."""

    name: str
    encoder: dict[str, Any]
    decoder: dict[str, Any]
    dtype: str
    matmul_size: int
    chunk_len: int
    encoder_chunks: int  # chunks per encoder forward batch
    context_lens: tuple[int, ...]
    prompt_len: int
    train_batch: int
    train_context: int
    train_target: int
    warmup: int
    repeats: int
    pooling_factors: tuple[int, ...] = (4, 8)
    projector_hidden: int = 2048
    train_steps: int = 5
    cache_contexts: int = 8  # contexts per cache-build batch in the scaling section
    train_variants: tuple[str, ...] = ("eager", "checkpointing", "compile")
    # grid section (planner speed curves). Encoder token counts are whole chunks of every chunk
    # length up to them (longer chunks are skipped at that count); prefill contexts are powers
    # of two, timed at decoder input length BOS + context + marker + prompt, plus the
    # closed-book BOS + prompt.
    plan_chunk_lens: tuple[int, ...] = (256, 512, 1024, 2048)
    plan_pooling_factors: tuple[int, ...] = (2, 4, 8)
    plan_encoder_tokens: tuple[int, ...] = (1024, 4096, 16384)
    plan_prefill_contexts: tuple[int, ...] = tuple(2**k for k in range(6, 16))  # 64 ... 32768
    plan_validation_contexts: tuple[int, ...] = (3000, 6000, 12000)
    plan_validation_pfs: tuple[int, ...] = (4, 8)
    plan_validation_chunks: tuple[int, ...] = (512, 1024)
    plan_warmup: int = 1
    plan_repeats: int = 5


PRESETS = {
    "h100": Preset(
        name="h100", encoder=LLAMA32_3B, decoder=LLAMA31_8B, dtype="bfloat16", matmul_size=8192,
        chunk_len=1024, encoder_chunks=16, context_lens=(1024, 4096, 16384), prompt_len=32,
        train_batch=4, train_context=1024, train_target=256, warmup=3, repeats=10,
    ),
    "tiny": Preset(
        name="tiny", encoder=TINY_ENCODER, decoder=TINY_DECODER, dtype="float32", matmul_size=128,
        chunk_len=32, encoder_chunks=3, context_lens=(32, 96), prompt_len=5, train_batch=2,
        train_context=32, train_target=9, warmup=1, repeats=2, projector_hidden=24, train_steps=2,
        cache_contexts=2, train_variants=("eager", "checkpointing"),
        plan_chunk_lens=(8, 16, 32), plan_encoder_tokens=(16, 64, 192), plan_prefill_contexts=(8, 16, 32, 64, 128, 256),
        plan_validation_contexts=(37, 75, 150), plan_validation_chunks=(16, 32), plan_warmup=0, plan_repeats=1,
    ),
}


# ---------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> dict[str, float]:
    """Median / min / max seconds of ``fn`` after ``warmup`` calls (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "repeats": repeats}


def peak_memory_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


# ---------------------------------------------------------------------------- models
def hf_config(kwargs: dict[str, Any]) -> PretrainedConfig:
    return AutoConfig.for_model("llama", **kwargs)


def build_encoder(preset: Preset, pf: int, device: torch.device, dtype: torch.dtype, attn: str = "sdpa") -> ARCEncoder:
    """Random-weight encoder, initialised directly on ``device`` (fast setup)."""
    cfg = EncoderConfig(
        base_model=f"random-{preset.name}-llama", layers_removed=2, pooling_factor=pf,
        chunk_len=preset.chunk_len, max_chunks=max(32, max(preset.context_lens) // preset.chunk_len),
        attn_implementation=attn,  # type: ignore[arg-type]
    )
    with torch.device(device):
        enc = ARCEncoder.from_base_model(cfg, torch_dtype=dtype, backbone_config=hf_config(preset.encoder))
    return enc.eval()


def with_pooling(encoder: ARCEncoder, pf: int) -> ARCEncoder:
    """Same weights, another pooling factor (the factor only changes the last block's queries)."""
    return ARCEncoder(dataclasses.replace(encoder.config, pooling_factor=pf), encoder.backbone).eval()


def model_variant(first: ARCModel, encoder: ARCEncoder, pf: int, **chunking: int) -> ARCModel:
    """``first``'s weights and projector at another pooling factor (and chunk_len / max_chunks).

    Neither changes a weight, and one projector serves every pooling factor.
    """
    cfg = dataclasses.replace(encoder.config, pooling_factor=pf, **chunking)
    m = ARCModel(ARCConfig(encoder=cfg), ARCEncoder(cfg, encoder.backbone).eval())
    m.projectors = first.projectors
    m.config.projectors = first.config.projectors
    return m.eval()


def build_decoder(preset: Preset, device: torch.device, dtype: torch.dtype):
    with torch.device(device):
        dec = AutoModelForCausalLM.from_config(hf_config(preset.decoder), dtype=dtype, attn_implementation="sdpa")
    return freeze_decoder(dec)


def build_arc_model(encoder: ARCEncoder, decoder, preset: Preset, dtype: torch.dtype) -> ARCModel:
    model = ARCModel(ARCConfig(encoder=encoder.config), encoder)
    # add_decoder builds the projector with the default device; make that the decoder's so
    # its special-token init (which reads the decoder's embeddings) stays on one device.
    with torch.device(decoder.device):
        model.add_decoder(DECODER_NAME, decoder, hidden_dim=preset.projector_hidden)
    model.projectors.to(dtype=dtype)
    return model.eval()


def random_ids(vocab: int, shape: tuple[int, ...], device: torch.device, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    # Avoid ids 0-2 (pad/bos/eos in the tiny configs): real text, not specials.
    return torch.randint(3, vocab, shape, generator=g).to(device)


# ---------------------------------------------------------------------------- sections
def bench_matmul(preset: Preset, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Dense matmul throughput on random data (zeros run faster and would flatter the peak)."""
    n = preset.matmul_size
    g = torch.Generator(device="cpu").manual_seed(0)
    # Rotate among 3 input sets so a small size cannot live in cache between repeats.
    pairs = [(torch.randn(n, n, generator=g).to(device, dtype), torch.randn(n, n, generator=g).to(device, dtype)) for _ in range(3)]
    out = torch.empty(n, n, device=device, dtype=dtype)
    state = {"i": 0}

    def step() -> None:
        a, b = pairs[state["i"] % 3]
        state["i"] += 1
        torch.matmul(a, b, out=out)

    t = time_fn(step, device, preset.warmup * 3, preset.repeats * 3)
    flops = 2.0 * n**3
    return {"size": n, "dtype": str(dtype), "tflops": flops / t["median_s"] / 1e12, "time": t}


def _encoder_batch(preset: Preset, device: torch.device, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    ids = random_ids(preset.encoder["vocab_size"], (preset.encoder_chunks, preset.chunk_len), device, seed)
    return ids, torch.ones_like(ids, dtype=torch.bool)


def set_compiled(modules, on: bool) -> None:
    """torch.compile each module in place (``nn.Module.compile``), or undo it."""
    for module in modules:
        if on:
            module.compile()
        else:
            module._compiled_call_impl = None


def bench_encoder(preset: Preset, device: torch.device, dtype: torch.dtype, peak_tflops: float,
                  encoder: ARCEncoder, out_dir: Path | None, profile: bool,
                  compile_blocks: bool = True) -> dict[str, Any]:
    """Encoder forward (cache building / on-the-fly compression) tokens/s and MFU."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    ids, mask = _encoder_batch(preset, device)
    tokens = ids.numel()
    layers = len(encoder.blocks)
    attn_kernels: dict[str, list | None] = {"sdpa_default": None}
    if device.type == "cuda":
        attn_kernels["sdpa_cudnn"] = [SDPBackend.CUDNN_ATTENTION]
        attn_kernels["sdpa_flash"] = [SDPBackend.FLASH_ATTENTION]
    results: dict[str, Any] = {
        "shape": "Llama-3.2-3B minus 2 layers" if preset.name != "tiny" else "tiny",
        "layers": layers, "chunk_len": preset.chunk_len, "chunks": preset.encoder_chunks,
        "tokens_per_batch": tokens, "flash_attn": "available" if flash_attn_available() else FLASH_NOTE,
        "runs": [],
    }
    for pf in preset.pooling_factors:
        enc = with_pooling(encoder, pf)
        flops = encoder_forward_flops(encoder.backbone.config, layers, preset.chunk_len, pf, preset.encoder_chunks)
        for kernel, backends in attn_kernels.items():
            def fwd() -> None:
                with torch.no_grad():
                    if backends is None:
                        enc(ids, mask)
                    else:
                        with sdpa_kernel(backends):
                            enc(ids, mask)
            try:
                t = time_fn(fwd, device, preset.warmup, preset.repeats)
            except RuntimeError as err:  # a forced backend may refuse these shapes
                results["runs"].append({"pooling_factor": pf, "attention": kernel, "error": str(err)[:300]})
                continue
            tflops = flops / t["median_s"] / 1e12
            results["runs"].append({
                "pooling_factor": pf, "attention": kernel, "time": t, "model_tflop": flops / 1e12,
                "tokens_per_s": tokens / t["median_s"], "tflops": tflops, "mfu": tflops / peak_tflops,
            })
    if compile_blocks and device.type == "cuda":
        # Hot spot (see encoder_profile.txt): eager RMSNorm / RoPE / SiLU are separate memory-bound
        # kernels; torch.compile fuses them. Blocks are identical, so one compile serves all.
        t0 = time.perf_counter()
        set_compiled(encoder.blocks[:-1], True)
        try:
            for pf in preset.pooling_factors:
                enc = with_pooling(encoder, pf)
                flops = encoder_forward_flops(encoder.backbone.config, layers, preset.chunk_len, pf, preset.encoder_chunks)

                def fwd_c() -> None:
                    with torch.no_grad():
                        enc(ids, mask)

                fwd_c()
                sync(device)
                compile_s = time.perf_counter() - t0
                t = time_fn(fwd_c, device, preset.warmup, preset.repeats)
                tflops = flops / t["median_s"] / 1e12
                results["runs"].append({
                    "pooling_factor": pf, "attention": "sdpa_default+compiled_blocks", "time": t,
                    "model_tflop": flops / 1e12, "tokens_per_s": tokens / t["median_s"], "tflops": tflops,
                    "mfu": tflops / peak_tflops, "first_call_with_compile_s": compile_s,
                })
                t0 = time.perf_counter()
        except Exception as err:  # noqa: BLE001 - report, keep the eager numbers
            traceback.print_exc()
            results["runs"].append({"attention": "sdpa_default+compiled_blocks", "error": str(err)[:400]})
        finally:
            set_compiled(encoder.blocks[:-1], False)  # later sections time the library's eager path
    ok = [r for r in results["runs"] if "mfu" in r]
    if ok:
        best = max(ok, key=lambda r: r["mfu"])
        results["best"] = {k: best[k] for k in ("pooling_factor", "attention", "tokens_per_s", "mfu")}
    if profile and out_dir is not None:
        results["profile_file"] = profile_encoder(encoder, ids, mask, device, out_dir)
    return results


def profile_encoder(encoder: ARCEncoder, ids: torch.Tensor, mask: torch.Tensor, device: torch.device, out_dir: Path) -> str:
    """Top kernels of one encoder forward, as a text table (where the time goes)."""
    def fwd() -> None:
        with torch.no_grad():
            encoder(ids, mask)

    return profile_call(fwd, device, out_dir / "encoder_profile.txt")["file"]


def profile_call(fn: Callable[[], Any], device: torch.device, path: Path, sort_cpu: bool = False) -> dict[str, Any]:
    """Profile one call of ``fn``: top-op table to ``path``; CPU-side vs GPU-busy milliseconds.

    When the host's own time exceeds the GPU's busy time, the call is launch-bound (the GPU
    waits for Python), which no kernel change fixes.
    """
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    fn()
    sync(device)
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        fn()
        sync(device)
    wall = time.perf_counter() - t0
    events = prof.key_averages()
    sort_keys = ("cpu_time_total",) if (sort_cpu or device.type != "cuda") else ("cuda_time_total", "device_time_total")
    table = ""
    for key in sort_keys:
        try:
            table = events.table(sort_by=key, row_limit=25, max_name_column_width=70)
            break
        except (KeyError, AttributeError, ValueError):
            continue
    info = {"file": path.name, "wall_ms_profiled": wall * 1e3,
            "cpu_self_ms": _footer_ms(table, "CPU"), "gpu_busy_ms": _footer_ms(table, "CUDA")}
    atomic_write_text(path, json.dumps(info) + "\n" + table + "\n")
    return info


def _footer_ms(table: str, kind: str) -> float | None:
    """The profiler table's own 'Self CUDA time total: 12.3ms' footer, in ms (None if absent)."""
    m = re.search(rf"Self {kind} time total: ([0-9.]+)(ms|us|s)\b", table)
    if not m:
        return None
    return float(m.group(1)) * {"s": 1e3, "ms": 1.0, "us": 1e-3}[m.group(2)]


def _prompt_ids(preset: Preset, seed: int) -> list[int]:
    return random_ids(preset.decoder["vocab_size"], (preset.prompt_len,), torch.device("cpu"), seed).tolist()


def _prefill_full(decoder, ids: torch.Tensor):
    with torch.no_grad():
        return decoder(input_ids=ids, use_cache=True, logits_to_keep=1)


def _prefill_embeds(decoder, inputs):
    with torch.no_grad():
        return decoder(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask,
                       use_cache=True, logits_to_keep=1)


def kv_cache_bytes(cache) -> int:
    """Bytes held by a transformers KV cache (either the layered or the list layout)."""
    total = 0
    if hasattr(cache, "layers"):
        for layer in cache.layers:
            for name in ("keys", "values"):
                t = getattr(layer, name, None)
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
    else:
        for t in list(getattr(cache, "key_cache", [])) + list(getattr(cache, "value_cache", [])):
            total += t.numel() * t.element_size()
    return total


def bench_prefill(preset: Preset, device: torch.device, dtype: torch.dtype, peak_tflops: float,
                  models: dict[int, ARCModel], decoder, decoder_tokenizer,
                  profile_dir: Path | None = None) -> dict[str, Any]:
    """Time to prefill the frozen decoder for one context + prompt, batch 1, per mode."""
    emb = decoder.get_input_embeddings()
    bos = preset.decoder["bos_token_id"]
    prompt = _prompt_ids(preset, seed=7)
    prompt_text = "Question: what does the context say about the topic? Answer:"
    results: dict[str, Any] = {"prompt_tokens": len(prompt), "batch": 1, "contexts": []}
    for n in preset.context_lens:
        row: dict[str, Any] = {"context_tokens": n, "modes": {}}
        enc_vocab = preset.encoder["vocab_size"]
        ctx_enc_ids = random_ids(enc_vocab, (n,), torch.device("cpu"), seed=100 + n).tolist()
        # Full text: the decoder reads the context's own tokens (same length as the encoder's
        # here: both are Llama-3 tokenizers in the paper setting).
        ctx_dec_ids = random_ids(preset.decoder["vocab_size"], (n,), torch.device("cpu"), seed=200 + n).tolist()
        full_ids = torch.tensor([[bos] + ctx_dec_ids + prompt], device=device)
        t = time_fn(lambda: _prefill_full(decoder, full_ids), device, preset.warmup, preset.repeats)
        flops = decoder_forward_flops(decoder.config, full_ids.shape[1], 1)
        row["modes"]["full"] = {"time": t, "decoder_tokens": full_ids.shape[1],
                                "tflops": flops / t["median_s"] / 1e12,
                                "mfu": flops / t["median_s"] / 1e12 / peak_tflops}
        for pf, model in models.items():
            with torch.no_grad():
                cached = model.compress([ctx_enc_ids], DECODER_NAME)  # built once, as a cache would

            def cached_prefill(cached=cached, model=model):
                inputs = model.build_decoder_inputs(emb, cached, [prompt], None, "continuation", [[bos]])
                return _prefill_embeds(decoder, inputs)

            def on_the_fly(model=model):
                with torch.no_grad():
                    ctx = model.compress([ctx_enc_ids], DECODER_NAME)
                inputs = model.build_decoder_inputs(emb, ctx, [prompt], None, "continuation", [[bos]])
                return _prefill_embeds(decoder, inputs)

            def compress_only(model=model):
                with torch.no_grad():
                    return model.compress([ctx_enc_ids], DECODER_NAME)

            dec_tokens = 1 + int(cached.lengths[0]) + 1 + len(prompt)
            row["modes"][f"cached_x{pf}"] = {
                "time": time_fn(cached_prefill, device, preset.warmup, preset.repeats),
                "decoder_tokens": dec_tokens}
            row["modes"][f"on_the_fly_x{pf}"] = {
                "time": time_fn(on_the_fly, device, preset.warmup, preset.repeats),
                "decoder_tokens": dec_tokens}
            row["modes"][f"compress_only_x{pf}"] = {
                "time": time_fn(compress_only, device, preset.warmup, preset.repeats)}
        full_s = row["modes"]["full"]["time"]["median_s"]
        row["speedup_vs_full"] = {
            k: full_s / v["time"]["median_s"] for k, v in row["modes"].items()
            if k != "full" and not k.startswith("compress_only")
        }
        if profile_dir is not None and n == preset.context_lens[min(1, len(preset.context_lens) - 1)]:
            pf0 = preset.pooling_factors[0]
            model0 = models[pf0]
            with torch.no_grad():
                cached0 = model0.compress([ctx_enc_ids], DECODER_NAME)

            def prefill_once() -> None:
                inputs = model0.build_decoder_inputs(emb, cached0, [prompt], None, "continuation", [[bos]])
                _prefill_embeds(decoder, inputs)

            row["profile_cached"] = profile_call(prefill_once, device, profile_dir / "prefill_profile.txt", sort_cpu=True)
        row["ttft"] = bench_ttft(preset, device, models, decoder, decoder_tokenizer, full_ids,
                                 ctx_enc_ids, prompt_text)
        results["contexts"].append(row)
    return results


def bench_ttft(preset: Preset, device: torch.device, models: dict[int, ARCModel], decoder,
               decoder_tokenizer, full_ids: torch.Tensor, ctx_enc_ids: list[int], prompt_text: str) -> dict[str, Any]:
    """Time to first token through ``generate`` (max_new_tokens=1, greedy)."""
    pad = preset.decoder.get("pad_token_id") or preset.decoder["eos_token_id"]
    out: dict[str, Any] = {}

    def full() -> None:
        with torch.no_grad():
            decoder.generate(input_ids=full_ids, attention_mask=torch.ones_like(full_ids),
                             max_new_tokens=1, do_sample=False, pad_token_id=pad)

    out["full"] = time_fn(full, device, 1, max(2, preset.repeats // 2))
    for pf, model in models.items():
        with torch.no_grad():
            cached = model.compress([ctx_enc_ids], DECODER_NAME)
        for name, contexts in ((f"cached_x{pf}", cached), (f"on_the_fly_x{pf}", [ctx_enc_ids])):
            def gen(contexts=contexts, model=model) -> None:
                model.generate(decoder, decoder_tokenizer, DECODER_NAME, contexts, [prompt_text],
                               max_new_tokens=1, do_sample=False)
            out[name] = time_fn(gen, device, 1, max(2, preset.repeats // 2))
    return {k: v["median_s"] for k, v in out.items()} | {"repeats": max(2, preset.repeats // 2)}


def bench_bytes(preset: Preset, device: torch.device, models: dict[int, ARCModel], decoder,
                out_dir: Path) -> dict[str, Any]:
    """Bytes per original token: stored compressed vectors vs the decoder's KV cache."""
    cfg = decoder.config
    h, _, dq, dkv = attention_dims(cfg)
    elem = torch.finfo(decoder.dtype).bits // 8
    kv_formula = 2 * cfg.num_hidden_layers * dkv * elem
    n = max(preset.context_lens)
    ids = random_ids(preset.decoder["vocab_size"], (1, n), device, seed=5)
    with torch.no_grad():
        kv = decoder(input_ids=ids, use_cache=True, logits_to_keep=1).past_key_values
    kv_measured = kv_cache_bytes(kv) / n
    del kv
    enc_ids = random_ids(preset.encoder["vocab_size"], (n,), torch.device("cpu"), seed=6).tolist()
    res: dict[str, Any] = {"context_tokens": n, "kv_cache_bytes_per_token": kv_measured,
                           "kv_cache_bytes_per_token_formula": kv_formula, "compressed": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for pf, model in models.items():
            with torch.no_grad():
                ctx = model.compress([enc_ids], DECODER_NAME)
            vectors = ctx.unpad()[0]
            tensor_bytes = vectors.numel() * vectors.element_size()
            path = Path(tmp) / f"x{pf}.safetensors"  # as a cache shard stores it (bf16)
            atomic_save_tensors(path, {"embeddings": vectors}, {"tokens": str(n)})
            file_bytes = path.stat().st_size
            res["compressed"][f"x{pf}"] = {
                "vectors": vectors.shape[0], "bytes_per_token": tensor_bytes / n,
                "file_bytes_per_token": file_bytes / n,
                "bytes_per_token_formula": h_out(model) * elem / pf,
                "ratio_to_kv": (tensor_bytes / n) / kv_measured,
            }
    return res


def h_out(model: ARCModel) -> int:
    return model.projector(DECODER_NAME).config.output_dim


# ---------------------------------------------------------------------------- planner grid
PLAN_SPEED_FORMAT = 1
ENCODER_MEASURED = ("ARCModel.compress of one context of `tokens` random token ids in chunks of chunk_len "
                    "(chunking on the host, one padded batch through the encoder, projector), batch 1")
PREFILL_MEASURED = ("decoder prefill, batch 1, use_cache, one logits row, at `tokens` input positions: "
                    "[BOS][random vectors][marker][prompt] through build_decoder_inputs + inputs_embeds "
                    "(path cached_embeds), and the closed-book [BOS][prompt] through input_ids")


def _check_grid(preset: Preset) -> None:
    for n in preset.plan_encoder_tokens:
        bad = [c for c in preset.plan_chunk_lens if c <= n and n % c]
        if bad:
            raise ValueError(f"preset {preset.name}: plan_encoder_tokens {n} is not a multiple of chunk lens {bad}")


def bench_grid(preset: Preset, device: torch.device, dtype: torch.dtype, first: ARCModel, encoder: ARCEncoder,
               decoder) -> dict[str, Any]:
    """Speed curves for the budget planner, then off-grid end-to-end queries to check them against."""
    _check_grid(preset)
    warm, reps = preset.plan_warmup, preset.plan_repeats
    cpu = torch.device("cpu")
    emb = decoder.get_input_embeddings()
    width = emb.weight.shape[1]
    bos = preset.decoder["bos_token_id"]
    prompt = _prompt_ids(preset, seed=7)
    longest = max(max(preset.plan_encoder_tokens), max(preset.plan_validation_contexts))
    variants: dict[tuple[int, int], ARCModel] = {}

    def variant(pf: int, c: int) -> ARCModel:
        if (pf, c) not in variants:
            variants[(pf, c)] = model_variant(first, encoder, pf, chunk_len=c, max_chunks=-(-longest // c))
        return variants[(pf, c)]

    def ms(t: dict[str, float]) -> dict[str, float]:
        return {"ms": t["median_s"] * 1e3, "min_ms": t["min_s"] * 1e3, "max_ms": t["max_s"] * 1e3}

    enc_rows = []
    for n in preset.plan_encoder_tokens:
        ids = random_ids(preset.encoder["vocab_size"], (n,), cpu, seed=300 + n).tolist()
        for c in [c for c in preset.plan_chunk_lens if c <= n]:
            for pf in preset.plan_pooling_factors:
                model = variant(pf, c)

                def compress(model=model, ids=ids) -> None:
                    with torch.no_grad():
                        model.compress([ids], DECODER_NAME)

                t = ms(time_fn(compress, device, warm, reps))
                enc_rows.append({"chunk_len": c, "pooling_factor": pf, "tokens": n, **t,
                                 "ms_per_1k_tokens": t["ms"] * 1e3 / n})

    def cached_prefill(model: ARCModel, ctx: CompressedContext) -> Callable[[], Any]:
        def run():
            inputs = model.build_decoder_inputs(emb, ctx, [prompt], None, "continuation", [[bos]])
            return _prefill_embeds(decoder, inputs)
        return run

    closed_ids = torch.tensor([[bos] + prompt], device=device)
    prefill_rows = [{"tokens": closed_ids.shape[1], "path": "input_ids",
                     **ms(time_fn(lambda: _prefill_full(decoder, closed_ids), device, warm, reps))}]
    g = torch.Generator(device="cpu").manual_seed(9)
    for n in preset.plan_prefill_contexts:
        vectors = torch.randn(1, n, width, generator=g).to(device, dtype)
        ctx = CompressedContext(vectors, torch.tensor([n]), DECODER_NAME)
        prefill_rows.append({"tokens": 1 + n + 1 + len(prompt), "path": "cached_embeds",
                             **ms(time_fn(cached_prefill(first, ctx), device, warm, reps))})
        del vectors, ctx

    validation = []  # off the grid: context lengths between the encoder's and the prefill's points
    for n in preset.plan_validation_contexts:
        dec_ids = random_ids(preset.decoder["vocab_size"], (n,), cpu, seed=400 + n).tolist()
        full_ids = torch.tensor([[bos] + dec_ids + prompt], device=device)
        validation.append({"context": "full", "mode": None, "context_tokens": n, "prompt_tokens": len(prompt),
                           "pooling_factor": None, "chunk_len": None, "decoder_tokens": full_ids.shape[1],
                           **ms(time_fn(lambda: _prefill_full(decoder, full_ids), device, warm, reps))})
        ids = random_ids(preset.encoder["vocab_size"], (n,), cpu, seed=500 + n).tolist()
        for pf in preset.plan_validation_pfs:
            for c in preset.plan_validation_chunks:
                model = variant(pf, c)
                with torch.no_grad():
                    cached = model.compress([ids], DECODER_NAME)  # built once, as a cache would

                def online(model=model) -> Any:
                    with torch.no_grad():
                        ctx = model.compress([ids], DECODER_NAME)
                    return cached_prefill(model, ctx)()

                dec_tokens = 1 + int(cached.lengths[0]) + 1 + len(prompt)
                for mode, fn in (("cached", cached_prefill(model, cached)), ("online", online)):
                    validation.append({"context": "compressed", "mode": mode, "context_tokens": n,
                                       "prompt_tokens": len(prompt), "pooling_factor": pf, "chunk_len": c,
                                       "decoder_tokens": dec_tokens, **ms(time_fn(fn, device, warm, reps))})
                del cached
    return {"encoder": enc_rows, "prefill": prefill_rows, "validation": validation}


def write_plan_speed(path: Path, curves: dict[str, Any], res: dict[str, Any], preset: Preset,
                     encoder_layers_kept: int, argv: list[str]) -> dict[str, Any]:
    """The planner's speed-curve file (schema: arc_encoder/planner/plan.py's load_speed_curve)."""
    data = {
        "benchmark": "plan_speed", "format_version": PLAN_SPEED_FORMAT,
        "device": res["device_name"], "date": res["date"], "timestamp": res["timestamp"],
        "command": "PYTHONPATH=. python3 benchmarks/speed.py " + " ".join(argv),
        "preset": preset.name, "dtype": preset.dtype, "torch": res["torch"], "transformers": res["transformers"],
        "matmul_peak_tflops": res["sections"].get("matmul", {}).get("tflops"),
        "shapes": {
            "encoder_backbone": {"model_type": "llama", **preset.encoder},
            "encoder_layers_kept": encoder_layers_kept,
            "decoder": {"model_type": "llama", **preset.decoder},
            "projector_hidden": preset.projector_hidden,
        },
        "warmup": preset.plan_warmup, "repeats": preset.plan_repeats,
        "encoder_measured": ENCODER_MEASURED, "prefill_measured": PREFILL_MEASURED,
        **curves,
    }
    atomic_write_json(path, data)
    return data


def check_plan_speed(path: Path) -> dict[str, Any]:
    """The planner's latency predictions against the file's own end-to-end validation queries."""
    from arc_encoder.planner.plan import check_speed_model, load_speed_curve, summarise_check

    results = check_speed_model(load_speed_curve(path))
    rows = [{"context": r.point.context, "mode": r.point.mode, "context_tokens": r.point.context_tokens,
             "pooling_factor": r.point.pooling_factor, "chunk_len": r.point.chunk_len,
             "decoder_tokens": r.point.decoder_tokens, "predicted_decoder_tokens": r.predicted.decoder_tokens,
             "measured_ms": r.point.ms, "predicted_ms": r.predicted.ms, "relative_error": r.relative_error,
             "extrapolated": list(r.predicted.extrapolated)} for r in results]
    return {"summary": summarise_check(results), "queries": rows}


# ---------------------------------------------------------------------------- training
@dataclass
class TrainBatch:
    ids: torch.Tensor  # [batch, context] encoder tokens
    mask: torch.Tensor
    targets: list[list[int]]  # continuation tokens per row (decoder vocabulary)
    prefix: list[list[int]]


def make_train_batch(preset: Preset, device: torch.device, seed: int = 11) -> TrainBatch:
    b = preset.train_batch
    ids = random_ids(preset.encoder["vocab_size"], (b, preset.train_context), device, seed)
    targets = random_ids(preset.decoder["vocab_size"], (b, preset.train_target), torch.device("cpu"), seed + 1).tolist()
    # A pretraining window: [vectors][marker][targets], no BOS (the reference's layout).
    return TrainBatch(ids, torch.ones_like(ids, dtype=torch.bool), targets, [[] for _ in range(b)])


def train_step_fn(model: ARCModel, decoder, batch: TrainBatch, opt: torch.optim.Optimizer,
                  encoder: torch.nn.Module | None = None) -> Callable[[], float]:
    """One continuation pretraining step through the library's own path (loss on targets)."""
    emb = decoder.get_input_embeddings()
    enc = encoder if encoder is not None else model.encoder
    projector = model.projector(DECODER_NAME)

    def step() -> torch.Tensor:
        out = enc(batch.ids, batch.mask)
        ctx = CompressedContext(projector(out.hidden_states), out.lengths, DECODER_NAME)
        inputs = model.build_decoder_inputs(emb, ctx, [[] for _ in batch.targets], batch.targets,
                                            "continuation", batch.prefix)
        loss = decoder_loss(decoder, inputs)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def train_flops(preset: Preset, model: ARCModel, decoder) -> float:
    enc = model.encoder
    cfg = enc.backbone.config
    pf = enc.config.pooling_factor
    m = -(-preset.train_context // pf)
    b = preset.train_batch
    enc_f = encoder_forward_flops(cfg, len(enc.blocks), preset.train_context, pf, b)
    pcfg = model.projector(DECODER_NAME).config
    proj_f = projector_flops(pcfg.input_dim, pcfg.hidden_dim, pcfg.output_dim, b * m)
    dec_tokens = 1 + m + 1 + preset.train_target
    dec_f = b * decoder_forward_flops(decoder.config, dec_tokens, dec_tokens)
    return 3 * (enc_f + proj_f) + 2 * dec_f


def bench_train(preset: Preset, device: torch.device, dtype: torch.dtype, peak_tflops: float,
                model: ARCModel, decoder) -> dict[str, Any]:
    """Pretraining step: encoder + projector trainable (AdamW), decoder frozen."""
    batch = make_train_batch(preset, device)
    flops = train_flops(preset, model, decoder)
    res: dict[str, Any] = {
        "batch": preset.train_batch, "context_tokens": preset.train_context,
        "target_tokens": preset.train_target, "pooling_factor": model.encoder.config.pooling_factor,
        "optimizer": "AdamW (bf16 params and states)" if dtype == torch.bfloat16 else "AdamW",
        "model_tflop_per_step": flops / 1e12, "variants": {},
    }
    model.train()
    decoder.eval()
    trainable = [p for p in model.parameters()]
    for p in trainable:
        p.requires_grad_(True)
    for variant in preset.train_variants:
        reset_peak(device)
        encoder_mod: torch.nn.Module = model.encoder
        try:
            if variant == "checkpointing":
                model.encoder.gradient_checkpointing_enable()
            t_compile = None
            if variant == "compile":
                set_compiled(model.encoder.blocks[:-1], True)
                set_compiled(decoder.model.layers, True)
            opt = torch.optim.AdamW(trainable, lr=1e-5, fused=device.type == "cuda")
            step = train_step_fn(model, decoder, batch, opt, encoder_mod)
            if variant == "compile":
                t0 = time.perf_counter()
                step()
                sync(device)
                t_compile = time.perf_counter() - t0
            t = time_fn(step, device, 1, preset.train_steps)
            loss = float(step())
            tflops = flops / t["median_s"] / 1e12
            res["variants"][variant] = {
                "time": t, "tflops": tflops, "mfu": tflops / peak_tflops,
                "encoder_tokens_per_s": preset.train_batch * preset.train_context / t["median_s"],
                "samples_per_s": preset.train_batch / t["median_s"],
                "peak_memory_gib": peak_memory_gib(device), "loss": loss,
                **({"first_step_with_compile_s": t_compile} if t_compile is not None else {}),
            }
            del opt
        except Exception as err:  # noqa: BLE001 - record OOM / compile failures, keep going
            res["variants"][variant] = {"error": ("out of memory: " if is_oom(err) else "") + str(err)[:400]}
            if not is_oom(err):
                traceback.print_exc()
        finally:
            if variant == "checkpointing":
                model.encoder.backbone.gradient_checkpointing_disable()
            if variant == "compile":
                set_compiled(model.encoder.blocks[:-1], False)
                set_compiled(decoder.model.layers, False)
            for p in trainable:
                p.grad = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
    model.eval()
    for p in trainable:
        p.requires_grad_(False)
    ok = {k: v for k, v in res["variants"].items() if "mfu" in v}
    if ok:
        best = max(ok, key=lambda k: ok[k]["encoder_tokens_per_s"])
        res["best"] = {"variant": best, **{k: ok[best][k] for k in ("encoder_tokens_per_s", "mfu", "peak_memory_gib")}}
    return res


# ---------------------------------------------------------------------------- scaling (DDP)
def _scaling_worker(rank: int, world: int, preset_name: str, port: int, result_dir: str) -> None:
    """One DDP rank: training steps and cache-build throughput on its own GPU (or CPU)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    preset = PRESETS[preset_name]
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    try:
        dtype = getattr(torch, preset.dtype)
        torch.manual_seed(0)
        encoder = build_encoder(preset, preset.pooling_factors[0], device, dtype)
        decoder = build_decoder(preset, device, dtype)
        model = build_arc_model(encoder, decoder, preset, dtype)
        # Cache build: every rank encodes its own shard of contexts; no communication.
        ids, mask = _encoder_batch(preset, device, seed=rank)
        projector = model.projector(DECODER_NAME)

        def build_cache() -> None:
            with torch.no_grad():
                projector(model.encoder(ids, mask).hidden_states)

        dist.barrier()
        t_cache = time_fn(build_cache, device, preset.warmup, preset.repeats)
        # Training: DDP over the trainable part (encoder + projectors); the decoder is frozen.
        model.train()
        for p in model.parameters():
            p.requires_grad_(True)
        ddp = DDP(TrainableEncoder(model), device_ids=[rank] if cuda else None)
        batch = make_train_batch(preset, device, seed=11 + rank)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=cuda)
        step = train_step_fn(model, decoder, batch, opt, ddp)

        dist.barrier()
        t_train = time_fn(step, device, 1, preset.train_steps)
        result = {"rank": rank, "cache_s": t_cache["median_s"], "train_s": t_train["median_s"],
                  "peak_memory_gib": peak_memory_gib(device)}
        atomic_write_json(Path(result_dir) / f"rank{rank}.json", result)
    finally:
        dist.destroy_process_group()


class TrainableEncoder(torch.nn.Module):
    """What DDP wraps: the encoder and projectors (the trained part); forward = encode.

    Projector weights ride along so their gradients are all-reduced too (they are used
    outside this forward, which DDP allows because every parameter gets a gradient).
    """

    def __init__(self, model: ARCModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        return self.model.encoder(input_ids, attention_mask)


def bench_scaling(preset: Preset, world_sizes: tuple[int, ...]) -> dict[str, Any]:
    """Spawn 1 and N ranks; efficiency = throughput(N) / (N * throughput(1))."""
    import socket

    import torch.multiprocessing as mp

    res: dict[str, Any] = {"world_sizes": list(world_sizes), "backend": "nccl" if torch.cuda.is_available() else "gloo",
                           "strategy": "DDP (encoder + projector), frozen decoder replicated", "runs": {}}
    tokens_cache = preset.encoder_chunks * preset.chunk_len
    tokens_train = preset.train_batch * preset.train_context
    for world in world_sizes:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(_scaling_worker, args=(world, preset.name, port, tmp), nprocs=world, join=True)
            ranks = [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(world)]
        cache_s = max(r["cache_s"] for r in ranks)
        train_s = max(r["train_s"] for r in ranks)
        res["runs"][str(world)] = {
            "cache_tokens_per_s": world * tokens_cache / cache_s,
            "train_encoder_tokens_per_s": world * tokens_train / train_s,
            "peak_memory_gib": max((r["peak_memory_gib"] or 0) for r in ranks) or None,
        }
    base = res["runs"][str(world_sizes[0])]
    for world in world_sizes[1:]:
        run = res["runs"][str(world)]
        scale = world / world_sizes[0]
        run["cache_efficiency"] = run["cache_tokens_per_s"] / (scale * base["cache_tokens_per_s"])
        run["train_efficiency"] = run["train_encoder_tokens_per_s"] / (scale * base["train_encoder_tokens_per_s"])
    return res



# ---------------------------------------------------------------------------- report
TARGETS = {
    "encoder_mfu": 0.60, "cached_x4_speedup_4k_plus": 3.5, "on_the_fly_speedup_4k_plus": 1.0,
    "bytes_ratio": 1 / 32, "scaling_efficiency": 0.85,
}


def summarise(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of (measure, value, target, met) for the README table."""
    rows: list[dict[str, Any]] = []
    s = res["sections"]
    if "matmul" in s:
        rows.append({"measure": f"{res['dtype']} matmul {s['matmul']['size']}^3 (reference peak)",
                     "value": f"{s['matmul']['tflops']:.0f} TFLOP/s", "target": "-", "met": None})
    if "encoder" in s:
        for r in s["encoder"]["runs"]:
            if "mfu" in r:
                rows.append({"measure": f"encoder fwd x{r['pooling_factor']} {r['attention']}",
                             "value": f"{r['tokens_per_s']:,.0f} tok/s, MFU {r['mfu']:.0%}",
                             "target": ">= 60%", "met": r["mfu"] >= TARGETS["encoder_mfu"]})
    if "prefill" in s:
        for c in s["prefill"]["contexts"]:
            n = c["context_tokens"]
            full_ms = c["modes"]["full"]["time"]["median_s"] * 1e3
            for k, v in c["speedup_vs_full"].items():
                ms = c["modes"][k]["time"]["median_s"] * 1e3
                target, met = "-", None
                if n >= 4096 and k == "cached_x4":
                    target, met = ">= 3.5x", v >= TARGETS["cached_x4_speedup_4k_plus"]
                elif n >= 4096 and k.startswith("on_the_fly"):
                    target, met = "> 1x", v > TARGETS["on_the_fly_speedup_4k_plus"]
                rows.append({"measure": f"prefill {n} tok: {k} vs full ({full_ms:.1f} ms)",
                             "value": f"{ms:.1f} ms, {v:.2f}x", "target": target, "met": met})
            if "profile_cached" in c:
                pc = c["profile_cached"]
                rows.append({"measure": f"profile: one cached_x4 prefill at {n} tok",
                             "value": f"host CPU {pc['cpu_self_ms'] or 0:.1f} ms vs GPU busy {pc['gpu_busy_ms'] or 0:.1f} ms",
                             "target": "-", "met": None})
            tt = c["ttft"]
            rows.append({"measure": f"TTFT generate {n} tok",
                         "value": ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in tt.items() if k != "repeats"),
                         "target": "-", "met": None})
    if "bytes" in s:
        b = s["bytes"]
        for k, v in b["compressed"].items():
            rows.append({"measure": f"cache bytes/token {k} vs KV ({b['kv_cache_bytes_per_token']:,.0f} B)",
                         "value": f"{v['bytes_per_token']:,.0f} B = 1/{1 / v['ratio_to_kv']:.0f}",
                         "target": "<= 1/32", "met": v["ratio_to_kv"] <= TARGETS["bytes_ratio"]})
    if "train" in s:
        for k, v in s["train"]["variants"].items():
            if "mfu" in v:
                rows.append({"measure": f"pretrain step ({k})",
                             "value": f"{v['encoder_tokens_per_s']:,.0f} ctx tok/s, MFU {v['mfu']:.0%}, "
                                      f"{v['time']['median_s'] * 1e3:.0f} ms, peak {v['peak_memory_gib'] or 0:.1f} GiB",
                             "target": "-", "met": None})
            else:
                rows.append({"measure": f"pretrain step ({k})", "value": v["error"][:80], "target": "-", "met": None})
    if "grid" in s and s["grid"]["model_check"]["summary"]:
        c = s["grid"]["model_check"]["summary"]
        rows.append({"measure": f"planner latency model vs {c['queries']} end-to-end queries ({s['grid']['file']})",
                     "value": f"median abs. error {c['median_abs_error']:.0%}, max {c['max_abs_error']:.0%}",
                     "target": "-", "met": None})
    if "scaling" in s:
        for w, v in s["scaling"]["runs"].items():
            if "train_efficiency" in v:
                rows.append({"measure": f"{w}-GPU scaling (train / cache)",
                             "value": f"{v['train_efficiency']:.0%} / {v['cache_efficiency']:.0%}",
                             "target": ">= 85%", "met": v["train_efficiency"] >= TARGETS["scaling_efficiency"]})
    return rows


def markdown_table(res: dict[str, Any]) -> str:
    head = f"GPU: {res['device_name']}, {res['date']}, torch {res['torch']}, transformers {res['transformers']}\n\n"
    lines = ["| measure | value | target | met |", "| --- | --- | --- | --- |"]
    for r in res["summary"]:
        met = "-" if r["met"] is None else ("yes" if r["met"] else "**no**")
        lines.append(f"| {r['measure']} | {r['value']} | {r['target']} | {met} |")
    return head + "\n".join(lines) + "\n"


def plot(res: dict[str, Any], path: Path) -> str | None:
    """Prefill time per mode and context length, and encoder MFU; None when matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: plot skipped"
    s = res["sections"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    if "prefill" in s:
        ax = axes[0]
        modes = [k for k in s["prefill"]["contexts"][0]["modes"] if not k.startswith("compress_only")]
        ctxs = s["prefill"]["contexts"]
        width = 0.8 / len(modes)
        for i, mode in enumerate(modes):
            ys = [c["modes"][mode]["time"]["median_s"] * 1e3 for c in ctxs]
            ax.bar([j + i * width for j in range(len(ctxs))], ys, width, label=mode)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(ctxs))], [f"{c['context_tokens']} tok" for c in ctxs])
        ax.set_yscale("log")
        ax.set_ylabel("prefill time, ms (log)")
        ax.set_title("Decoder prefill, batch 1")
        ax.legend(fontsize=8)
    if "encoder" in s:
        ax = axes[1]
        runs = [r for r in s["encoder"]["runs"] if "mfu" in r]
        labels = [f"x{r['pooling_factor']} " + r["attention"].replace("sdpa_", "").replace("+compiled_blocks", "+compile")
                  for r in runs]
        ax.bar(range(len(runs)), [r["mfu"] * 100 for r in runs])
        ax.set_xticks(range(len(runs)), labels, rotation=30, ha="right", fontsize=8)
        ax.axhline(60, color="red", linestyle="--", label="target 60%")
        ax.set_ylabel("MFU vs measured matmul peak, %")
        ax.set_title("Encoder forward")
        ax.legend(fontsize=8)
    fig.suptitle(f"arc-encoder speed: {res['device_name']}, {res['date']}")
    fig.tight_layout()
    atomic_save_figure(fig, path)
    return None


def plot_grid(curve: dict[str, Any], check: dict[str, Any], path: Path) -> str | None:
    """The planner's speed curves and its predictions vs the validation queries."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: planner curve plot skipped"
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    ax = axes[0]
    most = max(r["tokens"] for r in curve["encoder"])
    for pf in sorted({r["pooling_factor"] for r in curve["encoder"]}):
        rows = sorted((r for r in curve["encoder"] if r["pooling_factor"] == pf and r["tokens"] == most),
                      key=lambda r: r["chunk_len"])
        ax.plot([r["chunk_len"] for r in rows], [r["ms_per_1k_tokens"] for r in rows], "o-", label=f"x{pf}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("chunk length, tokens")
    ax.set_ylabel("ms per 1k context tokens")
    ax.set_title(f"Compress on the fly ({most} tokens per call)")
    ax.legend(fontsize=8)
    ax = axes[1]
    pre = sorted(curve["prefill"], key=lambda r: r["tokens"])
    ax.loglog([r["tokens"] for r in pre], [r["ms"] for r in pre], "o-")
    ax.set_xlabel("decoder input tokens")
    ax.set_ylabel("prefill ms")
    ax.set_title("Decoder prefill, batch 1")
    ax = axes[2]
    for context, mode, marker in (("compressed", "cached", "o"), ("compressed", "online", "D"), ("full", None, "s")):
        qs = [q for q in check["queries"] if q["context"] == context and q["mode"] == mode]
        if qs:
            ax.plot([q["measured_ms"] for q in qs], [q["predicted_ms"] for q in qs], marker, ls="none",
                    label=mode or "full text")
    every = [v for q in check["queries"] for v in (q["measured_ms"], q["predicted_ms"])]
    if every:
        ax.plot([min(every), max(every)], [min(every), max(every)], "k--", lw=1, label="exact")
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlabel("measured ms")
    ax.set_ylabel("planner's predicted ms")
    ax.set_title("Off-grid queries")
    ax.legend(fontsize=8)
    fig.suptitle(f"arc-encoder planner speed curves: {curve['device']}, {curve['date']}")
    fig.tight_layout()
    atomic_save_figure(fig, path)
    return None


def device_slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower() or "device"


# ---------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="sizes: h100 (real shapes; default on CUDA) or tiny (CPU, seconds; default without CUDA)")
    p.add_argument("--sections", default=DEFAULT_SECTIONS,
                   help=f"comma-separated subset of {','.join(SECTIONS)} (default {DEFAULT_SECTIONS})")
    p.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--repeats", type=int, default=None, help="override the preset's timed repeats")
    p.add_argument("--warmup", type=int, default=None, help="override the preset's warm-up calls")
    p.add_argument("--train-variants", default=None, help="comma list of eager,checkpointing,compile")
    p.add_argument("--gpus", type=int, default=2, help="largest world size for --sections scaling")
    p.add_argument("--profile", action="store_true", help="write the encoder forward's top kernels")
    p.add_argument("--tag", default="", help="suffix for the output file names")
    args = p.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        p.error(f"unknown sections {bad}; choose from {list(SECTIONS)}")
    args.sections = sections
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    preset = PRESETS[args.preset or ("h100" if cuda else "tiny")]
    overrides = {k: getattr(args, k) for k in ("repeats", "warmup") if getattr(args, k) is not None}
    overrides.update({f"plan_{k}": v for k, v in list(overrides.items())})
    if args.train_variants:
        overrides["train_variants"] = tuple(v.strip() for v in args.train_variants.split(","))
    preset = dataclasses.replace(preset, **overrides)
    device = torch.device("cuda" if cuda else "cpu")
    dtype = getattr(torch, preset.dtype)
    if preset.name != "tiny" and not cuda:
        raise SystemExit(f"speed.py: error: preset {preset.name!r} needs a CUDA GPU; use --preset tiny on CPU")
    import transformers

    name = torch.cuda.get_device_name(device) if cuda else f"CPU ({os.cpu_count()} cores)"
    now = _dt.datetime.now(_dt.timezone.utc)
    res: dict[str, Any] = {
        "preset": preset.name, "device_name": name, "date": now.strftime("%Y-%m-%d"),
        "timestamp": now.isoformat(timespec="seconds"), "torch": torch.__version__,
        "transformers": transformers.__version__, "dtype": preset.dtype, "preset_config": dataclasses.asdict(preset),
        "flash_attn": "available" if flash_attn_available() else FLASH_NOTE,
        "targets": TARGETS, "sections": {}, "notes": [],
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"speed_{device_slug(name)}_{res['date']}{('_' + args.tag) if args.tag else ''}"
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)

    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    peak = None
    if "matmul" in args.sections or any(s in args.sections for s in ("encoder", "prefill", "train", "grid")):
        res["sections"]["matmul"] = bench_matmul(preset, device, dtype)
        peak = res["sections"]["matmul"]["tflops"]
        log(f"matmul {peak:.1f} TFLOP/s")
    need_encoder = any(s in args.sections for s in ("encoder", "prefill", "bytes", "train", "grid"))
    need_decoder = any(s in args.sections for s in ("prefill", "bytes", "train", "grid"))
    encoder = build_encoder(preset, preset.pooling_factors[0], device, dtype) if need_encoder else None
    if encoder is not None:
        log(f"encoder built: {sum(p.numel() for p in encoder.parameters()) / 1e9:.3f} B params")
    if "encoder" in args.sections:
        res["sections"]["encoder"] = bench_encoder(preset, device, dtype, peak, encoder, args.out_dir, args.profile)
        log("encoder: " + json.dumps(res["sections"]["encoder"].get("best")))
    decoder = build_decoder(preset, device, dtype) if need_decoder else None
    models: dict[int, ARCModel] = {}
    if decoder is not None:
        log(f"decoder built: {sum(p.numel() for p in decoder.parameters()) / 1e9:.3f} B params")
        first = build_arc_model(encoder, decoder, preset, dtype)
        models[preset.pooling_factors[0]] = first
        for pf in preset.pooling_factors[1:]:
            models[pf] = model_variant(first, encoder, pf)
    if "prefill" in args.sections:
        from arc_encoder.tiny import train_tokenizer

        tok = train_tokenizer(["Question: what does the context say about the topic? Answer: it says."] * 8, vocab_size=300)
        try:
            res["sections"]["prefill"] = bench_prefill(preset, device, dtype, peak, models, decoder, tok,
                                                       args.out_dir if args.profile else None)
            log("prefill: " + json.dumps({c["context_tokens"]: c["speedup_vs_full"] for c in res["sections"]["prefill"]["contexts"]}))
        except Exception as err:  # noqa: BLE001 - keep the other sections' numbers
            traceback.print_exc()
            res["sections"]["prefill_error"] = str(err)[:500]
    if "bytes" in args.sections:
        res["sections"]["bytes"] = bench_bytes(preset, device, models, decoder, args.out_dir)
        log("bytes: " + json.dumps({k: v["ratio_to_kv"] for k, v in res["sections"]["bytes"]["compressed"].items()}))
    if "grid" in args.sections:
        plan_path = args.out_dir / f"plan_speed_{device_slug(name)}_{res['date']}{('_' + args.tag) if args.tag else ''}.json"
        curves = bench_grid(preset, device, dtype, models[preset.pooling_factors[0]], encoder, decoder)
        curve = write_plan_speed(plan_path, curves, res, preset, len(encoder.blocks),
                                 list(argv) if argv is not None else sys.argv[1:])
        check = check_plan_speed(plan_path)
        res["sections"]["grid"] = {"file": plan_path.name, "encoder_points": len(curves["encoder"]),
                                   "prefill_points": len(curves["prefill"]), "model_check": check}
        log(f"grid: wrote {plan_path}; planner vs measured: " + json.dumps(check["summary"]))
        for q in check["queries"]:
            log(f"  {q['context']:10} {q['mode'] or '-':6} T={q['context_tokens']:6} x{q['pooling_factor'] or '-'} "
                f"c={q['chunk_len'] or '-'}: measured {q['measured_ms']:8.2f} ms, predicted {q['predicted_ms']:8.2f} ms "
                f"({q['relative_error']:+.0%})")
        note = plot_grid(curve, check, plan_path.with_suffix(".png"))
        if note:
            res["notes"].append(note)
    if "train" in args.sections:
        res["sections"]["train"] = bench_train(preset, device, dtype, peak, models[preset.pooling_factors[0]], decoder)
        log("train: " + json.dumps(res["sections"]["train"].get("best")))
    if "scaling" in args.sections:
        del models, encoder, decoder
        if cuda:
            torch.cuda.empty_cache()
        gpus = torch.cuda.device_count() if cuda else args.gpus
        if cuda and gpus < 2:
            res["notes"].append(f"scaling not run: {gpus} GPU visible (needs >= 2, e.g. nvidia-h200-x2)")
        else:
            res["sections"]["scaling"] = bench_scaling(preset, (1, min(args.gpus, gpus)))
            log("scaling: " + json.dumps(res["sections"]["scaling"]["runs"]))
    res["summary"] = summarise(res)
    res["wall_s"] = time.perf_counter() - t_start
    json_path = args.out_dir / f"{stem}.json"
    atomic_write_json(json_path, res)
    md = markdown_table(res)
    atomic_write_text(args.out_dir / f"{stem}.md", md)
    note = plot(res, args.out_dir / f"{stem}.png")
    if note:
        res["notes"].append(note)
        print(note)
        atomic_write_json(json_path, res)
    print(md)
    print(f"wrote {json_path}")
    return res


if __name__ == "__main__":
    main()
