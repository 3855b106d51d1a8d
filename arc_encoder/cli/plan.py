"""`arc-encoder plan`: recommend a pooling factor and chunk length for a per-query budget.

The numbers come from two measured files (arc_encoder/planner/plan.py reads them); this module
only finds them, prints the table and draws the plot. Files are given as paths, or found in a
directory (--curves-dir); by default in the curves the package ships (arc_encoder/resources/curves/).
"""

from __future__ import annotations

import argparse
import json
from importlib import resources
from pathlib import Path
from typing import get_args

from ..planner.flops import ModelShape, QueryMode
from ..planner.plan import METRICS, QUALITY_BENCHMARK, Budget, Candidate, Plan, Query, Shapes, make_plan
from ..planner.plan import check_speed_model, load_quality_curve, load_speed_curve, summarise_check
from ..arguments import output_file, pyplot


def packaged_curves() -> Path:
    """The speed and quality curves installed with the package (measured on an H100)."""
    return Path(str(resources.files("arc_encoder.resources") / "curves"))

COST_MODEL_HELP = """\
Cost model, per query of T context tokens and P prompt tokens, at pooling pf and chunk c:
  latency = [online only] encoder(T, c, pf) + prefill(1 + compressed_len + 1 + P)
    encoder: ceil(T/c) chunks of min(c, T) tokens (the batch pads the tail), from the
      measured chunk_len x pooling x tokens grid, log-log interpolated;
    prefill: decoder input length, log-log interpolated over the measured lengths;
    compressed_len = sum over chunks of ceil(chunk / pf).
    Costs beyond the measured range extend the nearest segment and are marked ~.
  TFLOPs = model FLOPs (arc_encoder/planner/flops.py) at the speed file's model shapes.
  quality = the quality file's metric at pf and the nearest measured chunk length.
The best expected quality within the budget wins; ties go to the cheaper candidate.
References: "full text" (prefill of 1 + T + P tokens, gap closed 1) and "no context"
(closed book, 1 + P tokens, gap closed 0). Exit code 1 when nothing fits the budget.
Curves: python benchmarks/speed.py --sections matmul,grid (speed) and
`arc-encoder eval info` (quality)."""


# ---------------------------------------------------------------------------- file lookup
def _newest(paths: list[Path]) -> Path | None:
    """Newest by the file's own ``date``/``timestamp`` field, then modification time."""
    def key(p: Path) -> tuple[str, float, str]:
        try:
            data = json.loads(p.read_text())
            stamp = str(data.get("timestamp") or data.get("date") or "")
        except (OSError, ValueError, AttributeError):
            stamp = ""
        return stamp, p.stat().st_mtime, p.name

    return max(paths, key=key) if paths else None


def _is_quality_file(p: Path) -> bool:
    try:
        return json.loads(p.read_text()).get("benchmark") == QUALITY_BENCHMARK
    except (OSError, ValueError, AttributeError):
        return False


def default_curve(kind: str, results_dir: Path | None = None) -> Path:
    """The newest speed (``plan_speed_*.json``) or quality (``"benchmark": "info"``) file in
    ``results_dir`` (default: the package's curves)."""
    results_dir = packaged_curves() if results_dir is None else Path(results_dir)
    if kind == "speed":
        found = sorted(results_dir.glob("plan_speed_*.json")) if results_dir.is_dir() else []
        hint = "run `python benchmarks/speed.py --sections matmul,grid` or pass --speed FILE"
    else:
        found = [p for p in sorted(results_dir.glob("*.json")) if _is_quality_file(p)] if results_dir.is_dir() else []
        hint = "run `arc-encoder eval info` or pass --quality FILE"
    newest = _newest(found)
    if newest is None:
        raise ValueError(f"no {kind} curve given and none found in {results_dir}; {hint}")
    return newest


def _shapes(args: argparse.Namespace, default: Shapes) -> Shapes | None:
    """Shapes from --encoder-config / --decoder-config (HF config.json files), else None."""
    if not (args.encoder_config or args.decoder_config):
        return None
    enc, kept, dec = default.encoder, default.encoder_layers_kept, default.decoder
    if args.encoder_config:
        enc = ModelShape.from_dict(_read_json(args.encoder_config), args.encoder_config)
        kept = enc.num_hidden_layers - args.layers_removed
        if kept < 1:
            raise ValueError(f"--layers-removed {args.layers_removed} leaves no encoder layer of "
                             f"{enc.num_hidden_layers} in {args.encoder_config}")
    if args.decoder_config:
        dec = ModelShape.from_dict(_read_json(args.decoder_config), args.decoder_config)
    return Shapes(enc, kept, dec, default.projector_hidden)


def _read_json(path: str) -> object:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such file")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{p}: not valid JSON ({err})") from err


# ---------------------------------------------------------------------------- printing
def _cost_str(value: float, extrapolated: bool, digits: int, style: str = "f") -> str:
    """A cost, with ``~`` in front when it lies outside the measured curves."""
    return f"{'~' if extrapolated else ''}{value:.{digits}{style}}"


def format_plan(plan: Plan, check: dict | None = None) -> str:
    """The candidate table, the references, the provenance and the recommendation."""
    q, b = plan.query, plan.budget
    mode = "online (compress on the fly, then prefill)" if q.mode == "online" else "cached (prefill from stored vectors)"
    unit = "ms" if b.kind == "ms" else "TFLOPs"
    lines = [
        f"query        {q.context_tokens} context tokens + {q.prompt_tokens} prompt tokens, {mode}",
        f"budget       {b.value:g} {unit} per query",
        f"speed        {plan.speed_source.path} ({plan.speed_source.device}, {plan.speed_source.date})",
    ]
    if check:
        lines.append(f"             model check: median abs. error {check['median_abs_error']:.0%}, "
                     f"max {check['max_abs_error']:.0%} over {check['queries']} end-to-end queries")
    better = "higher" if plan.higher_is_better else "lower"
    lines += [
        f"quality      {plan.quality_source.path} ({plan.quality_source.device}, {plan.quality_source.date}; "
        f"{plan.quality_source.detail})",
        f"metric       {plan.metric} ({better} is better)",
        "",
    ]
    header = ("candidate", plan.metric, "quality at", "ms", "TFLOPs", "dec tokens", "fits")
    rows = []

    def row(k: Candidate, note: str = "") -> tuple[str, ...]:
        ex = bool(k.cost.extrapolated)
        at = f"x{k.pooling_factor} chunk {k.quality_chunk_len}" if k.kind == "compressed" else "reference"
        return (k.name, f"{k.quality:.3f}", at, _cost_str(k.cost.ms, ex, 1), _cost_str(k.cost.tflops, ex, 4, "g"),
                str(k.cost.decoder_tokens), ("yes" if k.fits else "no") + note)

    for k in plan.candidates:
        rows.append(row(k, "  <- chosen" if k is plan.chosen else ""))
    rows.append(("",) * len(header))
    rows += [row(k) for k in plan.references]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    right = {1, 3, 4, 5}
    for r in [header, *rows]:
        cells = [r[i].rjust(widths[i]) if i in right else r[i].ljust(widths[i]) for i in range(len(r))]
        lines.append("  ".join(cells).rstrip())
    lines.append("")
    for note in plan.notes:
        lines.append(f"note         {note}")
    for k in [*plan.candidates, *plan.references]:
        for why in k.cost.extrapolated:
            lines.append(f"~ {k.name}: {why}")
    c = plan.chosen
    if c is not None:
        lines.append(
            f"recommendation: pooling factor {c.pooling_factor}, chunk length {c.chunk_len}: expected "
            f"{plan.metric} {c.quality:.3f} at {_cost_str(c.cost.ms, bool(c.cost.extrapolated), 1)} ms and "
            f"{_cost_str(c.cost.tflops, bool(c.cost.extrapolated), 4, 'g')} TFLOPs per query "
            f"(budget {b.value:g} {unit}, {q.mode})")
    else:
        k = plan.cheapest
        lines.append(
            f"no candidate fits the budget of {b.value:g} {unit}: the cheapest is {k.name} at "
            f"{k.cost.ms:.1f} ms and {k.cost.tflops:.4g} TFLOPs ({plan.metric} {k.quality:.3f})")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- plot
def plot_plan(plan: Plan, path: Path) -> str:
    """Quality vs cost per candidate, the budget line, the choice ringed."""
    plt = pyplot()
    b = plan.budget
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for pf in sorted({k.pooling_factor for k in plan.candidates}):
        ks = [k for k in plan.candidates if k.pooling_factor == pf]
        ax.plot([b.cost(k.cost) for k in ks], [k.quality for k in ks], "o", label=f"x{pf}")
        # Candidates at the same spot (e.g. every chunk length when cached) share one label.
        spots: dict[tuple[float, float], list[int]] = {}
        for k in ks:
            spots.setdefault((round(b.cost(k.cost), 3), k.quality), []).append(k.chunk_len)
        for (x, y), chunks in spots.items():
            ax.annotate("/".join(str(c) for c in chunks), (x, y), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    for k, marker in zip(plan.references, ("s", "^")):
        ax.plot([b.cost(k.cost)], [k.quality], marker, color="gray", label=k.name)
    ax.axvline(b.value, color="tab:red", ls="--", label=f"budget {b.value:g} {b.kind}")
    if plan.chosen is not None:
        ax.plot([b.cost(plan.chosen.cost)], [plan.chosen.quality], "o", ms=14, mfc="none", mec="black",
                label=f"chosen: {plan.chosen.name}")
    ax.set_xscale("log")
    ax.set_xlabel("predicted ms per query" if b.kind == "ms" else "TFLOPs per query")
    ax.set_ylabel(plan.metric + (" (higher is better)" if plan.higher_is_better else " (lower is better)"))
    ax.set_title(f"{plan.query.context_tokens} context tokens, {plan.query.mode}; labels: chunk length", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    from ..storage import atomic_save_figure

    atomic_save_figure(fig, path)
    return f"wrote {path}"


# ---------------------------------------------------------------------------- command
_UNITS = {"ms": ("ms", 1.0), "s": ("ms", 1000.0), "tflops": ("tflops", 1.0), "gflops": ("tflops", 1e-3),
          "pflops": ("tflops", 1e3)}


def parse_budget(text: str) -> Budget:
    """'150ms', '0.2s', '60tflops', '500 GFLOPs' -> Budget (case and spaces ignored)."""
    t = text.strip().lower().replace(" ", "")
    for unit in sorted(_UNITS, key=len, reverse=True):
        if t.endswith(unit):
            number = t[: -len(unit)]
            try:
                value = float(number)
            except ValueError:
                break
            if value <= 0:
                raise argparse.ArgumentTypeError(f"--budget {text!r}: must be > 0")
            kind, scale = _UNITS[unit]
            return Budget(kind, value * scale)  # type: ignore[arg-type]
    raise argparse.ArgumentTypeError(
        f"--budget {text!r}: expected a number with a unit, e.g. 150ms, 0.2s, 60tflops, 500gflops"
    )


def cmd_plan(args: argparse.Namespace) -> int:
    if args.plot:
        pyplot()  # fails before any work when matplotlib is missing
    speed_path = Path(args.speed) if args.speed else default_curve("speed", args.curves_dir)
    quality_path = Path(args.quality) if args.quality else default_curve("quality", args.curves_dir)
    inputs = {"speed curve": str(speed_path), "quality curve": str(quality_path),
              "--encoder-config file": args.encoder_config, "--decoder-config file": args.decoder_config}
    if args.json:  # every output is checked before the plan is made or printed
        output_file(args.json, "--json", inputs)
    if args.plot:
        output_file(args.plot, "--plot", {**inputs, "--json file": args.json})
    speed = load_speed_curve(speed_path)
    quality = load_quality_curve(quality_path)
    if args.budget is not None:
        budget = args.budget
    elif args.budget_ms is not None:
        budget = Budget("ms", args.budget_ms)
    else:
        budget = Budget("tflops", args.budget_tflops)
    query = Query(args.context_tokens, args.prompt_tokens, args.mode)
    plan = make_plan(query, budget, speed, quality, args.metric, _shapes(args, speed.shapes))
    check = summarise_check(check_speed_model(speed))
    print(format_plan(plan, check))
    if args.json:
        from ..storage import atomic_write_json

        atomic_write_json(args.json, plan.to_dict() | {"speed_model_check": check})
        print(f"wrote {args.json}")
    if args.plot:
        print(plot_plan(plan, Path(args.plot)))
    return 0 if plan.chosen is not None else 1


def add_plan_command(sub: argparse._SubParsersAction) -> None:
    """Register `plan` on the `arc-encoder` parser."""
    p = sub.add_parser("plan", help="pick pooling factor and chunk length for a latency or FLOPs budget",
                       description="Recommend the pooling factor and chunk length with the best expected\n"
                       "quality whose predicted cost per query fits the budget, from measured speed\n"
                       "and quality curves.", epilog=COST_MODEL_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--budget", type=parse_budget,
                        help="budget per query with its unit: latency (150ms, 0.2s) or model FLOPs (60tflops)")
    budget.add_argument("--budget-ms", type=float, help="latency budget per query (time to first-token logits)")
    budget.add_argument("--budget-tflops", type=float, help="model-FLOPs budget per query, in TFLOPs")
    p.add_argument("--context-tokens", type=int, required=True, help="context length T, in encoder tokens")
    p.add_argument("--prompt-tokens", type=int, default=32, help="prompt tokens after the context (default 32)")
    p.add_argument("--mode", choices=get_args(QueryMode), default="online",
                   help="online: compress each query's context (encoder counted); cached: the context "
                   "was compressed ahead of time, e.g. an `arc-encoder cache` (default online)")
    p.add_argument("--speed", help="speed-curve JSON (default: the newest plan_speed_*.json in --curves-dir)")
    p.add_argument("--quality", help="quality-curve JSON from `arc-encoder eval info` "
                   "(default: the newest such file in --curves-dir)")
    p.add_argument("--curves-dir", type=Path, default=None,
                   help="directory searched for the newest curves, e.g. benchmarks/results (default: the "
                   "H100 curves installed with the package, arc_encoder/resources/curves/)")
    p.add_argument("--metric", choices=sorted(METRICS), default="gap_closed",
                   help="quality metric (default gap_closed; loss_compressed: lower is better)")
    p.add_argument("--encoder-config", help="HF config.json of the encoder's base LM, for FLOPs "
                   "(default: the shapes recorded in the speed file)")
    p.add_argument("--layers-removed", type=int, default=2,
                   help="blocks dropped from --encoder-config's LM (default 2)")
    p.add_argument("--decoder-config", help="HF config.json of the decoder, for FLOPs")
    p.add_argument("--json", help="also write the plan (every candidate) to this JSON file")
    p.add_argument("--plot", help="also draw quality vs cost to this PNG")
    p.set_defaults(func=cmd_plan)
