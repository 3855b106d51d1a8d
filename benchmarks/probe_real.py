"""`arc-encoder probe` on real pretrained LLMs and on decoders that cannot read: the numbers behind the gates.

The probe's earlier absolute gates, tuned on small stand-ins, failed SmolLM2-135M (a real reader).
This measures the readers and the non-readers with the probe users run, so the relative gates in
``ProbeConfig`` sit between them with a margin on both sides:

* readers: SmolLM2-135M-Instruct and Gemma 3 270M (converted HF directories, DATA.md);
* non-readers: the bundled tiny decoder, and CONTROLS built from the real models by ``controls``:
  the same weights with every attention layer cut to a window of the last ``--window`` tokens
  (16): all the model's knowledge of language and local text, no access to anything 16 tokens
  back. SmolLM2 becomes a saved Mistral (the Llama architecture plus a sliding window) that the
  CLI probes like any decoder; Gemma 3 (whose full-attention layers have their own RoPE base, so
  no saved config can make them local) is cut in process (``--local-control``). Within the window
  they give the original model's logits, beyond it they do not (checked).

For each decoder it runs the CLI (``python -m arc_encoder.cli.main probe DIR --data F --json``)
in a child process and records its JSON, wall and CPU seconds and peak resident memory (from
``wait4``). For the real models it adds the decisive variants: random induction tokens from the
whole vocabulary (``--induction-tokens vocabulary``, the earlier measure) and the other row
prefix (the old probe's BOS for SmolLM2, whose tokenizer adds none; no BOS for Gemma 3, whose
tokenizer adds one). ``--baseline-commit`` also runs the probe of that commit (the absolute gates)
for time and memory.

    python benchmarks/probe_real.py controls --decoder smollm2=/work/models/smollm2 \\
        --decoder gemma3=/work/models/gemma3 --out .data/probe_controls
    python benchmarks/probe_real.py run --data arc_encoder/resources/pydoc_small/test.jsonl.gz \\
        --decoder smollm2=/work/models/smollm2 --decoder gemma3=/work/models/gemma3 \\
        --decoder tiny=arc_encoder/resources/tiny_lm \\
        --decoder smollm2_local16=.data/probe_controls/smollm2_local16 \\
        --local-control gemma3=/work/models/gemma3 \\
        --variants smollm2,gemma3 --baseline-commit a3563b3 --out benchmarks/results/probe_real_cpu.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def named(values: list[str]) -> dict[str, str]:
    out = {}
    for v in values:
        if "=" not in v:
            raise SystemExit(f"probe_real.py: error: expected NAME=DIR, got {v!r}")
        name, path = v.split("=", 1)
        out[name] = path
    return out


# ----------------------------------------------------------------------------- controls
def cmd_controls(args) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from arc_encoder.decoders import load_frozen_decoder

    out = Path(args.out)
    for name, path in named(args.decoder).items():
        model, tok = load_frozen_decoder(path, "cpu", torch.float32)
        cfg = model.config
        if cfg.model_type == "llama":
            fields = {k: v for k, v in cfg.to_dict().items()
                      if k not in ("model_type", "architectures", "pretraining_tp", "mlp_bias", "transformers_version")}
            local_cfg = AutoConfig.for_model("mistral", **{**fields, "sliding_window": args.window})
        else:
            raise SystemExit(f"probe_real.py: error: {name}: no saved local-attention control for {cfg.model_type!r} "
                             "(Gemma 3: `run --local-control`)")
        local = AutoModelForCausalLM.from_config(local_cfg, dtype=torch.float32)
        missing, unexpected = local.load_state_dict(model.state_dict(), strict=False)
        missing = [k for k in missing if not k.endswith("lm_head.weight")]  # tied to the embeddings
        if missing or unexpected:
            raise SystemExit(f"probe_real.py: error: {name}: weights do not map: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}")
        local.tie_weights()
        local.eval()
        ids = torch.randint(3, min(1000, model.config.vocab_size), (1, 3 * args.window),
                            generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            delta = (local(input_ids=ids).logits - model(input_ids=ids).logits).abs().amax(-1)[0]  # [3w]
        diff, beyond = float(delta[: args.window].max()), float(delta[args.window :].max())
        if diff > 1e-3 or beyond < 1e-2:
            raise SystemExit(f"probe_real.py: error: {name}: max |logit diff| {diff:.1e} within the window, "
                             f"{beyond:.1e} beyond it")
        dest = out / f"{name}_local{args.window}"
        local.to(torch.bfloat16).save_pretrained(dest)
        AutoTokenizer.from_pretrained(path).save_pretrained(dest)
        (dest / "CONTROL.json").write_text(json.dumps({
            "source": str(Path(path).resolve()), "window": args.window, "architecture": local_cfg.model_type,
            "max_logit_diff_within_window": diff, "max_logit_diff_beyond": beyond,
            "what": f"{name} with every attention layer limited to the last {args.window} tokens"}, indent=1))
        print(f"wrote {dest} (within-window max |logit diff| vs {name}: {diff:.1e})")
    return 0


# ----------------------------------------------------------------------------- one probe (child)
def local_decoder(path: str, window: int, sink: bool):
    """A decoder whose every attention layer sees only the last ``window`` tokens (and, with ``sink``,
    the row's first token), in this process only; and a record of the check that it is cut.

    The causal masks its modeling module builds are narrowed with ``and_mask_function``: this works
    for any architecture whose module calls ``create_causal_mask`` / ``create_sliding_window_causal_mask``
    (Llama, Mistral, Qwen2, Gemma 3, ...). Gemma 3's full-attention layers have their own RoPE base,
    so a saved config cannot make them local; a mask can. The first token is kept visible with
    ``sink``: models park attention there (attention sinks), and without it a windowed model also
    loses much of its skill on ordinary text, so the control would be broken, not just blind.
    """
    import importlib

    import torch
    from transformers import AutoModelForCausalLM, masking_utils

    from arc_encoder.decoders import freeze_decoder

    model = freeze_decoder(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32))
    module = importlib.import_module(type(model).__module__)
    ids = torch.randint(3, min(1000, model.config.vocab_size), (1, 3 * window), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(input_ids=ids).logits  # before the masks are narrowed

    def local(batch_idx, head_idx, q_idx, kv_idx):
        near = kv_idx > q_idx - window
        return (near | (kv_idx == 0)) if sink else near

    def narrowed(builder):
        def build(*a, **kw):
            return builder(*a, **{**kw, "and_mask_function": local})
        return build

    for name in ("create_causal_mask", "create_sliding_window_causal_mask"):
        if hasattr(module, name):
            setattr(module, name, narrowed(getattr(masking_utils, name)))
    with torch.no_grad():
        delta = (model(input_ids=ids).logits - reference).abs().amax(-1)[0]  # [3w]
    inside, beyond = float(delta[:window].max()), float(delta[window:].max())
    if inside > 1e-3 or beyond < 1e-2:
        raise SystemExit(f"probe_real.py: error: local control: max |logit diff| {inside:.1e} within the window, "
                         f"{beyond:.1e} beyond it")
    return model, {"window": window, "sink": sink, "max_logit_diff_within_window": inside,
                   "max_logit_diff_beyond": beyond,
                   "what": f"every attention layer limited to the last {window} tokens"
                           f"{' and the first token of the row' if sink else ''} (masks narrowed in process)"}


def cmd_one(args) -> int:
    """The library probe in this process: another row prefix, or a Gemma 3 local-attention control."""
    import torch
    from transformers import AutoTokenizer

    from arc_encoder.corpus import read_corpus
    from arc_encoder.decoders import decoder_prefix_ids
    from arc_encoder.decoders import load_frozen_decoder
    from arc_encoder.probe import ProbeConfig, probe_decoder, text_windows

    control = None
    if args.local_window:
        model, control = local_decoder(args.decoder, args.local_window, args.sink)
        tok = AutoTokenizer.from_pretrained(args.decoder)
    else:
        model, tok = load_frozen_decoder(args.decoder, "cpu", torch.float32)
    _, texts = read_corpus(args.data, "auto")
    config = ProbeConfig()
    windows = text_windows(tok, texts, config)
    t0 = time.time()
    prefix = json.loads(args.prefix) if args.prefix is not None else decoder_prefix_ids(tok)
    vocab = min(len(tok), model.get_input_embeddings().weight.shape[0])
    result = probe_decoder(model, windows, prefix, vocab, tok.all_special_ids, config)
    Path(args.json).write_text(json.dumps({**result.to_dict(), "probe_seconds": round(time.time() - t0, 1),
                                           "control": control}))
    return 0


def child(argv: list[str], pythonpath: Path, timeout: float) -> dict:
    """Run ``python argv`` in ``pythonpath`` (so that its ``arc_encoder`` is the one imported: ``python -c``
    puts the working directory first on sys.path); its wall seconds, output and exit code."""
    env = {**os.environ, "PYTHONPATH": str(pythonpath), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("OMP_NUM_THREADS", None)
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, *argv], cwd=pythonpath, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise SystemExit(f"probe_real.py: error: timed out after {timeout:.0f} s: {' '.join(argv)}") from None
    return {"rc": proc.returncode, "wall_seconds": round(time.time() - t0, 1), "stdout": stdout[-2000:],
            "stderr": stderr[-2000:]}


def measured(argv: list[str], pythonpath: Path, timeout: float) -> dict:
    """``child`` running ``argv`` (a module or script and its arguments) under a wrapper that reports that
    process's own peak RSS and CPU seconds when it ends."""
    wrapper = ("import resource, runpy, sys, time, json\n"
               "t0 = time.time()\n"
               "sys.argv = sys.argv[1:]\n"
               "rc = 0\n"
               "try:\n"
               "    runpy.run_path(sys.argv[0], run_name='__main__') if sys.argv[0].endswith('.py') else "
               "runpy.run_module(sys.argv[0], run_name='__main__')\n"
               "except SystemExit as e:\n"
               "    rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)\n"
               "u = resource.getrusage(resource.RUSAGE_SELF)\n"
               "print('PROBE_REAL_USAGE ' + json.dumps({'peak_rss_mib': round(u.ru_maxrss / 1024, 1), "
               "'cpu_seconds': round(u.ru_utime + u.ru_stime, 1), 'rc': rc}), file=sys.stderr)\n"
               "sys.exit(rc)\n")
    rec = child(["-c", wrapper, *argv], pythonpath, timeout)
    for line in rec["stderr"].splitlines():
        if line.startswith("PROBE_REAL_USAGE "):
            rec.update(json.loads(line.split(" ", 1)[1]))
    rec["stderr"] = "\n".join(line for line in rec["stderr"].splitlines()
                              if not line.startswith("PROBE_REAL_USAGE ") and "Warning" not in line)[-1000:]
    return rec


def cli_probe(name: str, path: str, data: str, extra: list[str], code: Path, timeout: float) -> dict:
    given = {str((REPO / path).resolve()): path, str((REPO / data).resolve()): data}
    path, data = list(given)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "p.json"
        argv = ["-m", "arc_encoder.cli.main", "probe", path, "--data", data, "--device", "cpu", "--json", str(out), *extra]
        print(f"[{name}] {' '.join(shlex.quote(a) for a in argv[2:])} (code: {code})", flush=True)
        rec = measured(argv[1:], code, timeout)
        if out.is_file():
            rec["result"] = json.loads(out.read_text())
    shown = ["OUT.json" if a == str(out) else given.get(a, a) for a in argv[2:]]
    rec["argv"] = "arc-encoder " + " ".join(shlex.quote(a) for a in shown)
    print(f"[{name}] rc {rec.get('rc')} wall {rec['wall_seconds']} s cpu {rec.get('cpu_seconds')} s peak "
          f"{rec.get('peak_rss_mib')} MiB: {rec['stdout'].strip().splitlines()[0] if rec['stdout'].strip() else rec['stderr']}",
          flush=True)
    if "result" not in rec and rec.get("rc") not in (0, 1):
        print(rec["stderr"], file=sys.stderr)
    return rec


def key_numbers(result: dict) -> dict:
    keys = ("induction_first", "induction_second", "induction_ratio", "copy_first", "copy_second", "copy_ratio",
            "closed_book", "open_book", "open_book_gain", "gain_ratio")
    out = {k: round(result[k], 4) for k in keys if k in result}
    out["se"] = {k: (round(v, 4) if v is not None else None) for k, v in (result.get("se") or {}).items()}
    for k in ("prefix_ids", "gates", "passed", "passages", "induction_rows", "induction_tokens"):
        if k in result:
            out[k] = result[k]
    out["summary"] = (f"induction {out['induction_first']:.2f}->{out['induction_second']:.3f} (ratio "
                      f"{out['induction_ratio']:.3f}), copy {out['copy_first']:.2f}->{out['copy_second']:.3f} (ratio "
                      f"{out['copy_ratio']:.3f}), open book {out['closed_book']:.3f}->{out['open_book']:.3f} (gain "
                      f"{out['open_book_gain']:.3f} nats, ratio {out['gain_ratio']:.3f}); passed {out.get('passed')}")
    return out


def recorded_stand_ins() -> dict:
    """Ratios of the earlier tiny stand-ins from their recorded probe (old measure: BOS first, random tokens from
    the whole vocabulary, copy repeated right after itself); their weights are not kept in git."""
    src = REPO / "benchmarks/results/decoders_final_h100.json"
    rec = json.loads(src.read_text())["test_probe"]
    out = {}
    for name, r in rec.items():
        out[name] = {"induction_ratio": round(r["induction_second"] / r["induction_first"], 4),
                     "copy_ratio": round(r["copy_second"] / r["copy_first"], 4),
                     "gain_ratio": round(r["open_book_gain"] / r["closed_book"], 4),
                     "old_gates_passed": r["passed"], "parameters": r["parameters"]}
    return {"source": str(src.relative_to(REPO)), "decoders": out}


def library_probe(label: str, path: str, data: str, extra: list[str], timeout: float) -> dict | None:
    """``one`` in a child process: its numbers, control record, probe seconds, wall/CPU seconds and peak RSS."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "one.json"
        print(f"[{label}] library probe {' '.join(extra)}", flush=True)
        rec = measured([str(Path(__file__).resolve()), "one", "--decoder", str((REPO / path).resolve()),
                        "--data", str((REPO / data).resolve()), *extra,
                        "--json", str(out)], REPO, timeout)
        if not out.is_file():
            print(rec["stderr"], file=sys.stderr)
            return None
        res = json.loads(out.read_text())
    entry = {**key_numbers(res), "control": res.get("control"), "probe_seconds": res.get("probe_seconds"),
             **{k: rec.get(k) for k in ("wall_seconds", "cpu_seconds", "peak_rss_mib")}}
    print(f"[{label}] {entry['summary']}", flush=True)
    return entry


def cmd_run(args) -> int:
    import torch
    import transformers

    from arc_encoder.config import ProbeConfig
    from arc_encoder.storage import atomic_write_json

    decoders = named(args.decoder)
    variants = [v for v in args.variants.split(",") if v]
    old = json.loads(Path(args.out).read_text()) if args.resume and Path(args.out).is_file() else {}
    record = {
        "benchmark": "probe_real", "date": dt.date.today().isoformat(),
        "command": "python benchmarks/probe_real.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "machine": f"CPU, {os.cpu_count()} cores, {platform.machine()}; shared with other jobs (times are noisy: "
                   "CPU seconds, both threads together, are given beside wall seconds)",
        "torch": torch.__version__, "transformers": transformers.__version__, "data": args.data,
        "probe_defaults": dataclasses.asdict(ProbeConfig()),
        "decoders": old.get("decoders", {}), "stand_ins_recorded": recorded_stand_ins(),
        **({"baseline": old["baseline"]} if "baseline" in old else {}),
    }

    def save() -> None:  # after every run: a crash or a timeout keeps what was measured (--resume goes on)
        atomic_write_json(args.out, record)

    for name, path in decoders.items():
        entry = record["decoders"].get(name) or {"path": path}
        control = Path(path) / "CONTROL.json"
        if control.is_file():
            entry["control"] = json.loads(control.read_text())
        if "default" not in entry:
            run = cli_probe(name, path, args.data, [], REPO, args.timeout)
            entry["cli"] = {k: run.get(k) for k in ("argv", "rc", "wall_seconds", "cpu_seconds", "peak_rss_mib")}
            if "result" in run:
                entry["cli"]["probe_seconds"] = round(run["result"]["seconds"] - run["result"]["load_seconds"], 1)
                entry["cli"]["load_seconds"] = run["result"]["load_seconds"]
                entry["default"] = key_numbers(run["result"])
            record["decoders"][name] = entry
            save()
        if name in variants and "vocabulary_tokens" not in entry:
            run = cli_probe(f"{name}/vocabulary", path, args.data, ["--induction-tokens", "vocabulary"], REPO,
                            args.timeout)
            if "result" in run:
                entry["vocabulary_tokens"] = key_numbers(run["result"])
            save()
        if name in variants and "other_prefix" not in entry:
            from transformers import AutoTokenizer

            from arc_encoder.decoders import decoder_prefix_ids

            tok = AutoTokenizer.from_pretrained(path)
            other = [] if decoder_prefix_ids(tok) else [tok.bos_token_id]
            res = library_probe(f"{name}/prefix {other}", path, args.data, ["--prefix", json.dumps(other)], args.timeout)
            if res:
                entry["other_prefix"] = res
            save()
    for spec in args.local_control:
        name, path = spec.split("=", 1)
        key = f"{name}_local{args.window}_sink"
        if "default" in record["decoders"].get(key, {}):
            continue
        res = library_probe(key, path, args.data, ["--local-window", str(args.window), "--sink"], args.timeout)
        if res:
            record["decoders"][key] = {"path": path, "control": res.pop("control"), "default": res}
        save()
    if args.baseline_commit:
        base = record.setdefault("baseline", {"commit": args.baseline_commit, "runs": {}})
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(f"git -C {shlex.quote(str(REPO))} archive {shlex.quote(args.baseline_commit)} arc_encoder "
                           f"| tar -x -C {shlex.quote(tmp)}", shell=True, check=True)
            for spec in args.baseline:
                label, extra = spec.split(":", 1) if ":" in spec else (spec, "")
                if label in base["runs"]:
                    continue
                run = cli_probe(f"{label}@{args.baseline_commit}", decoders[label.split("/")[0]], args.data,
                                shlex.split(extra), Path(tmp), args.timeout)
                name = label
                base["runs"][name] = {k: run.get(k) for k in ("argv", "rc", "wall_seconds", "cpu_seconds",
                                                               "peak_rss_mib")}
                if "result" in run:
                    r = run["result"]
                    base["runs"][name]["numbers"] = {k: round(r[k], 4) for k in (
                        "induction_first", "induction_second", "copy_first", "copy_second", "open_book_gain")}
                    base["runs"][name]["passed"] = r["passed"]
                    base["runs"][name]["seconds_in_probe_command"] = r["seconds"]
                save()
    save()
    print(f"wrote {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("controls", help="real models with attention cut to a local window (non-reader controls)")
    p.add_argument("--decoder", action="append", required=True, metavar="NAME=DIR")
    p.add_argument("--window", type=int, default=16, help="tokens each position may attend to, itself included")
    p.add_argument("--out", required=True, help="folder for NAME_localW/ directories (keep it out of git)")
    p.set_defaults(func=cmd_controls)
    p = sub.add_parser("run", help="probe every decoder (CLI in a child process) and write the JSON")
    p.add_argument("--decoder", action="append", required=True, metavar="NAME=DIR")
    p.add_argument("--data", required=True)
    p.add_argument("--variants", default="", help="comma-separated NAMEs that also get the vocabulary-token and "
                   "other-prefix variants")
    p.add_argument("--local-control", action="append", default=[], metavar="NAME=DIR",
                   help="a decoder to probe with its attention cut to --window tokens and its first token (in process)")
    p.add_argument("--window", type=int, default=16)
    p.add_argument("--baseline-commit", help="also run this commit's probe (the absolute gates) on --baseline runs")
    p.add_argument("--baseline", action="append", default=[], metavar="NAME[/LABEL][:ARGS]",
                   help="NAME or NAME/LABEL, then its arguments: e.g. 'smollm2:--passages 16', "
                   "'smollm2/64:--passages 64' or 'gemma3:--passages 16 --batch-size 4'")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--resume", action="store_true", help="keep the runs already in --out and do the rest")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("one", help=argparse.SUPPRESS)
    p.add_argument("--decoder", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--prefix", help="JSON list of ids (default: the tokenizer's own, decoder_prefix_ids)")
    p.add_argument("--local-window", type=int, help="probe with attention cut to this many tokens")
    p.add_argument("--sink", action="store_true", help="with --local-window: the first token stays visible")
    p.add_argument("--json", required=True)
    p.set_defaults(func=cmd_one)
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
