"""Budget planner: pick the pooling factor and chunk length that fit a per-query cost budget.

Two measured curves go in. The speed curve (``benchmarks/speed.py --sections grid``) has
encoder latency over a (chunk_len, pooling_factor, tokens) grid and decoder prefill latency
over decoder input lengths. The quality curve (``arc-encoder eval info``) has a quality
metric per pooling factor and chunk length. The cost of one query is predicted from the
first, its expected quality is read from the second, and the best quality whose cost fits
wins (ties go to the cheaper candidate).

Cost model for one query of T context tokens and P prompt tokens at pooling pf, chunk c:

  latency = [online only] encoder(T, c, pf) + prefill(1 + compressed_len + 1 + P)
  encoder(T, c, pf): ceil(T / c) chunks, padded to min(c, T) tokens each, timed at the
      measured total token count by log-log interpolation (and between measured chunk
      lengths log-log too); prefill: log-log interpolation over the measured lengths.
      Outside the measured range both extend the nearest segment's slope and are flagged.
  FLOPs = arc_encoder.planner.flops (model FLOPs: encoder over the unpadded chunks, projector,
      decoder prefill with one logits row), at the shapes the speed file records.

The library only computes; ``arc_encoder/cli/plan.py`` finds the files, prints and plots.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from .flops import ModelShape, QueryMode, compressed_query_flops, text_query_flops
from ..storage import PathLike, read_json_file

Metric = Literal["gap_closed", "loss_compressed", "info_retained"]
BudgetKind = Literal["ms", "tflops"]
CandidateKind = Literal["compressed", "full_text", "no_context"]
# Whether a larger value of the metric is better.
METRICS: dict[str, bool] = {"gap_closed": True, "loss_compressed": False, "info_retained": True}
SPEED_BENCHMARK = "plan_speed"
QUALITY_BENCHMARK = "info"


# ---------------------------------------------------------------------------- file checks
def _get(d: Mapping[str, Any], key: str, where: str) -> Any:
    if not isinstance(d, Mapping):
        raise ValueError(f"{where}: expected a JSON object, got {type(d).__name__}")
    if key not in d:
        raise ValueError(f"{where}: missing key {key!r}")
    return d[key]


def _int(d: Mapping[str, Any], key: str, where: str, minimum: int = 1) -> int:
    v = _get(d, key, where)
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
        raise ValueError(f"{where}: key {key!r} must be an integer >= {minimum}, got {v!r}")
    return v


def _num(d: Mapping[str, Any], key: str, where: str, positive: bool = False) -> float:
    v = _get(d, key, where)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or (positive and v <= 0):
        need = "a finite number > 0" if positive else "a finite number"
        raise ValueError(f"{where}: key {key!r} must be {need}, got {v!r}")
    return float(v)


def _metric(d: Mapping[str, Any], key: str, where: str) -> float:
    """A finite number, or NaN (a ratio whose denominator vanished), never infinite."""
    v = _get(d, key, where)
    if isinstance(v, float) and math.isnan(v):
        return v
    return _num(d, key, where)


def _str(d: Mapping[str, Any], key: str, where: str) -> str:
    v = _get(d, key, where)
    if not isinstance(v, str) or not v:
        raise ValueError(f"{where}: key {key!r} must be a non-empty string, got {v!r}")
    return v


def _list(d: Mapping[str, Any], key: str, where: str) -> list[Any]:
    v = _get(d, key, where)
    if not isinstance(v, list) or not v:
        raise ValueError(f"{where}: key {key!r} must be a non-empty list")
    return v


def _load(path: PathLike, benchmark: str) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    data = read_json_file(path)
    if _get(data, "benchmark", str(path)) != benchmark:
        raise ValueError(f"{path}: key 'benchmark' is {data['benchmark']!r}, expected {benchmark!r}")
    return data


# ---------------------------------------------------------------------------- speed curve
@dataclass(frozen=True)
class Shapes:
    """Model sizes for FLOP counts: the encoder backbone (before truncation) and the decoder."""

    encoder: ModelShape
    encoder_layers_kept: int
    decoder: ModelShape
    projector_hidden: int


@dataclass(frozen=True)
class EncoderPoint:
    """ARCModel.compress of one context of ``tokens`` tokens in chunks of ``chunk_len``."""

    chunk_len: int
    pooling_factor: int
    tokens: int
    ms: float


@dataclass(frozen=True)
class PrefillPoint:
    """Decoder prefill (first-token logits) over ``tokens`` input positions."""

    tokens: int
    ms: float


@dataclass(frozen=True)
class ValidationPoint:
    """One end-to-end query timed outside the grid, to check the cost model against."""

    context: Literal["compressed", "full", "none"]
    mode: QueryMode | None  # compressed only
    context_tokens: int
    prompt_tokens: int
    pooling_factor: int | None
    chunk_len: int | None
    decoder_tokens: int
    ms: float


@dataclass(frozen=True)
class SpeedCurve:
    path: str
    device: str
    date: str
    command: str
    shapes: Shapes
    matmul_tflops: float | None
    encoder: tuple[EncoderPoint, ...]
    prefill: tuple[PrefillPoint, ...]
    validation: tuple[ValidationPoint, ...] = ()

    def pooling_factors(self) -> list[int]:
        return sorted({p.pooling_factor for p in self.encoder})

    def chunk_lens(self, pf: int) -> list[int]:
        return sorted({p.chunk_len for p in self.encoder if p.pooling_factor == pf})


def load_speed_curve(path: PathLike) -> SpeedCurve:
    """Read and check a ``plan_speed_*.json`` file; every problem names the file and the key."""
    data = _load(path, SPEED_BENCHMARK)
    w = str(path)
    sh = _get(data, "shapes", w)
    shapes = Shapes(
        encoder=ModelShape.from_dict(_get(sh, "encoder_backbone", f"{w}: shapes"), f"{w}: shapes.encoder_backbone"),
        encoder_layers_kept=_int(sh, "encoder_layers_kept", f"{w}: shapes"),
        decoder=ModelShape.from_dict(_get(sh, "decoder", f"{w}: shapes"), f"{w}: shapes.decoder"),
        projector_hidden=_int(sh, "projector_hidden", f"{w}: shapes"),
    )
    encoder = []
    for i, p in enumerate(_list(data, "encoder", w)):
        at = f"{w}: encoder[{i}]"
        encoder.append(EncoderPoint(_int(p, "chunk_len", at), _int(p, "pooling_factor", at),
                                    _int(p, "tokens", at), _num(p, "ms", at, positive=True)))
        if encoder[-1].chunk_len < encoder[-1].pooling_factor:
            raise ValueError(f"{at}: key 'chunk_len' ({encoder[-1].chunk_len}) is below 'pooling_factor'")
    keys = [(p.chunk_len, p.pooling_factor, p.tokens) for p in encoder]
    if len(set(keys)) != len(keys):
        raise ValueError(f"{w}: key 'encoder' has two entries for one (chunk_len, pooling_factor, tokens)")
    prefill = []
    for i, p in enumerate(_list(data, "prefill", w)):
        at = f"{w}: prefill[{i}]"
        prefill.append(PrefillPoint(_int(p, "tokens", at), _num(p, "ms", at, positive=True)))
    prefill.sort(key=lambda p: p.tokens)
    if len({p.tokens for p in prefill}) != len(prefill) or len(prefill) < 2:
        raise ValueError(f"{w}: key 'prefill' needs at least 2 entries with distinct 'tokens'")
    validation = []
    for i, p in enumerate(data.get("validation") or []):
        at = f"{w}: validation[{i}]"
        context = _get(p, "context", at)
        if context not in ("compressed", "full", "none"):
            raise ValueError(f"{at}: key 'context' must be 'compressed', 'full' or 'none', got {context!r}")
        mode = p.get("mode")
        if context == "compressed" and mode not in ("cached", "online"):
            raise ValueError(f"{at}: key 'mode' must be 'cached' or 'online', got {mode!r}")
        compressed = context == "compressed"
        validation.append(ValidationPoint(
            context, mode if compressed else None, _int(p, "context_tokens", at, 0), _int(p, "prompt_tokens", at, 0),
            _int(p, "pooling_factor", at) if compressed else None, _int(p, "chunk_len", at) if compressed else None,
            _int(p, "decoder_tokens", at), _num(p, "ms", at, positive=True)))
    peak = data.get("matmul_peak_tflops")
    return SpeedCurve(
        path=w, device=_str(data, "device", w), date=_str(data, "date", w), command=str(data.get("command", "")),
        shapes=shapes, matmul_tflops=float(peak) if isinstance(peak, (int, float)) else None,
        encoder=tuple(encoder), prefill=tuple(prefill), validation=tuple(validation),
    )


# ---------------------------------------------------------------------------- quality curve
@dataclass(frozen=True)
class QualityPoint:
    pooling_factor: int
    chunk_len: int
    values: dict[str, float]  # metric name -> value (the metrics the point has)
    loss_none: float
    loss_full: float
    trained: bool = True  # eval info's ``trained_factor``: false when the checkpoint never trained this pf


@dataclass(frozen=True)
class QualityCurve:
    path: str
    device: str
    date: str
    checkpoint: str
    decoder: str
    context_tokens: int | None  # length of the evaluated contexts, when the file says
    points: tuple[QualityPoint, ...]  # adaptive == false only

    def pooling_factors(self) -> list[int]:
        return sorted({p.pooling_factor for p in self.points})

    def lookup(self, pf: int, chunk_len: int, metric: str) -> tuple[float, int]:
        """(value, measured chunk_len used): the point at ``pf`` whose chunk_len is nearest (log scale)."""
        pts = [p for p in self.points if p.pooling_factor == pf]
        if not pts:
            raise ValueError(f"{self.path}: no point with pooling_factor {pf}")
        # Nearest by ratio; a tie goes to the shorter measured chunk (the conservative side).
        best = min(pts, key=lambda p: (abs(math.log(p.chunk_len / chunk_len)), p.chunk_len))
        where = f"{self.path}: point pooling_factor {pf}, chunk_len {best.chunk_len}"
        if metric not in best.values:
            raise ValueError(f"{where} has no key {metric!r}")
        if math.isnan(best.values[metric]):
            # gap_closed is NaN when the full text does not beat no context on the eval set.
            raise ValueError(f"{where}: key {metric!r} is NaN; choose another --metric")
        return best.values[metric], best.chunk_len

    def reference(self, kind: Literal["full_text", "no_context"], metric: str) -> float:
        """Quality with the full text / no context: 1 and 0 for the gap-style metrics; losses averaged."""
        if metric == "loss_compressed":
            losses = [p.loss_full if kind == "full_text" else p.loss_none for p in self.points]
            return sum(losses) / len(losses)
        return 1.0 if kind == "full_text" else 0.0


def load_quality_curve(path: PathLike) -> QualityCurve:
    """Read and check an ``arc-encoder eval info`` JSON; keeps the points with ``adaptive`` false."""
    data = _load(path, QUALITY_BENCHMARK)
    w = str(path)
    points = []
    seen: set[tuple[int, int]] = set()
    for i, p in enumerate(_list(data, "points", w)):
        at = f"{w}: points[{i}]"
        adaptive = _get(p, "adaptive", at)
        if not isinstance(adaptive, bool):
            raise ValueError(f"{at}: key 'adaptive' must be true or false, got {adaptive!r}")
        if adaptive:
            continue
        pf, chunk = _int(p, "pooling_factor", at), _int(p, "chunk_len", at)
        if (pf, chunk) in seen:
            raise ValueError(f"{at}: a second non-adaptive point for pooling_factor {pf}, chunk_len {chunk}")
        seen.add((pf, chunk))
        values = {m: _metric(p, m, at) for m in METRICS if m in p}
        for m in ("gap_closed", "loss_compressed"):
            if m not in values:
                _get(p, m, at)  # raises, naming the key
        points.append(QualityPoint(pf, chunk, values, _num(p, "loss_none", at), _num(p, "loss_full", at),
                                   p.get("trained_factor") is not False))
    if not points:
        raise ValueError(f"{w}: key 'points' has no point with 'adaptive': false")
    return QualityCurve(
        path=w, device=_str(data, "device", w), date=_str(data, "date", w),
        checkpoint=_recorded_path(data.get("checkpoint")), decoder=str(data.get("decoder", "?")),
        context_tokens=data.get("context_tokens") if isinstance(data.get("context_tokens"), int) else None,
        points=tuple(points),
    )


def _recorded_path(value: object) -> str:
    """A path a curve recorded: as is when it exists here, else only its name (the packaged
    curves were measured in a GPU machine's temporary directory)."""
    if not value:
        return "?"
    path = Path(str(value))
    return str(path) if path.exists() else f"{path.name} (not on this machine)"


# ---------------------------------------------------------------------------- interpolation
def loglog_interp(xs: Sequence[float], ys: Sequence[float], x: float, single_slope: float = 1.0) -> tuple[float, bool]:
    """(y at x, extrapolated?): piecewise linear in log(x)-log(y), exact at the given points.

    Between two points y is monotone; outside, the nearest segment's slope continues (one
    point alone: ``single_slope``, 1 = proportional) and the result is flagged.
    """
    if len(xs) != len(ys) or not xs:
        raise ValueError("loglog_interp needs as many ys as xs, at least one")
    pts = sorted(zip(xs, ys))
    if x <= 0 or any(a <= 0 or b <= 0 for a, b in pts):
        raise ValueError("loglog_interp works on positive values only")
    lx = math.log(x)
    for a, b in pts:
        if a == x:
            return float(b), False
    if len(pts) == 1:
        a, b = pts[0]
        return b * (x / a) ** single_slope, True
    if x < pts[0][0]:
        (a0, b0), (a1, b1), out = pts[0], pts[1], True
    elif x > pts[-1][0]:
        (a0, b0), (a1, b1), out = pts[-2], pts[-1], True
    else:
        k = next(i for i in range(1, len(pts)) if pts[i][0] > x)
        (a0, b0), (a1, b1), out = pts[k - 1], pts[k], False
    t = (lx - math.log(a0)) / (math.log(a1) - math.log(a0))
    return math.exp(math.log(b0) + t * (math.log(b1) - math.log(b0))), out


# ---------------------------------------------------------------------------- cost model
@dataclass(frozen=True)
class Cost:
    """Predicted cost of one query's prefill (time to first-token logits)."""

    ms: float
    tflops: float
    encoder_ms: float
    prefill_ms: float
    decoder_tokens: int
    extrapolated: tuple[str, ...] = ()  # why a part lies outside the measured curve


class CostModel:
    """Latency from a speed curve, FLOPs from ``flops.py`` at ``shapes`` (default: the curve's)."""

    def __init__(self, speed: SpeedCurve, shapes: Shapes | None = None) -> None:
        self.speed = speed
        self.shapes = shapes or speed.shapes

    def prefill_ms(self, tokens: int) -> tuple[float, str | None]:
        pts = self.speed.prefill
        ms, out = loglog_interp([p.tokens for p in pts], [p.ms for p in pts], tokens)
        why = f"prefill of {tokens} tokens outside the measured {pts[0].tokens}-{pts[-1].tokens}" if out else None
        return ms, why

    def encoder_ms(self, context_tokens: int, chunk_len: int, pf: int) -> tuple[float, list[str]]:
        """Time of compressing one context on the fly, from the (chunk_len, pf, tokens) grid."""
        grid = [p for p in self.speed.encoder if p.pooling_factor == pf]
        if not grid:
            raise ValueError(f"{self.speed.path}: no encoder timing at pooling_factor {pf}")
        chunks = -(-context_tokens // chunk_len)
        effective = min(chunk_len, context_tokens)  # a context shorter than a chunk is one chunk
        padded = chunks * effective  # the batch pads the ragged tail chunk to the longest
        per_chunk: dict[int, float] = {}
        token_range: dict[int, tuple[int, int, bool]] = {}
        for c in sorted({p.chunk_len for p in grid}):
            row = [p for p in grid if p.chunk_len == c]
            per_chunk[c], out = loglog_interp([p.tokens for p in row], [p.ms for p in row], padded)
            token_range[c] = (min(p.tokens for p in row), max(p.tokens for p in row), out)
        lens = sorted(per_chunk)
        notes: list[str] = []
        if effective in per_chunk:
            ms, used = per_chunk[effective], [effective]
        else:
            # At a fixed token count the time barely depends on the chunk length (only attention
            # grows with it), so one measured chunk length alone is taken as flat (slope 0).
            ms, out = loglog_interp(lens, [per_chunk[c] for c in lens], effective, single_slope=0.0)
            if out:
                notes.append(f"encoder x{pf} chunk {effective} outside the measured chunk lengths {lens[0]}-{lens[-1]}")
            below = [c for c in lens if c < effective][-1:] or lens[:2]
            above = [c for c in lens if c > effective][:1] or lens[-2:]
            used = sorted(set(below + above))
        for c in used:
            lo, hi, out = token_range[c]
            if out:
                notes.append(f"encoder x{pf} chunk {c} at {padded} tokens outside the measured {lo}-{hi}")
        return ms, notes

    def compressed(self, context_tokens: int, chunk_len: int, pf: int, prompt_tokens: int, mode: QueryMode) -> Cost:
        s = self.shapes
        fl = compressed_query_flops(s.encoder, s.encoder_layers_kept, s.decoder, s.projector_hidden,
                                    context_tokens, chunk_len, pf, prompt_tokens, mode)
        pre, why = self.prefill_ms(fl.decoder_tokens)
        notes = [why] if why else []
        enc = 0.0
        if mode == "online":
            enc, enc_notes = self.encoder_ms(context_tokens, chunk_len, pf)
            notes += enc_notes
        return Cost(enc + pre, fl.total / 1e12, enc, pre, fl.decoder_tokens, tuple(notes))

    def text(self, context_tokens: int, prompt_tokens: int) -> Cost:
        """Full text in context (context_tokens > 0) or closed book (0)."""
        fl = text_query_flops(self.shapes.decoder, context_tokens, prompt_tokens)
        pre, why = self.prefill_ms(fl.decoder_tokens)
        return Cost(pre, fl.total / 1e12, 0.0, pre, fl.decoder_tokens, (why,) if why else ())


# ---------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class Query:
    context_tokens: int
    prompt_tokens: int = 32
    mode: QueryMode = "online"

    def __post_init__(self) -> None:
        if not isinstance(self.context_tokens, int) or self.context_tokens < 1:
            raise ValueError(f"context_tokens must be an integer >= 1, got {self.context_tokens!r}")
        if not isinstance(self.prompt_tokens, int) or self.prompt_tokens < 0:
            raise ValueError(f"prompt_tokens must be an integer >= 0, got {self.prompt_tokens!r}")
        if self.mode not in ("cached", "online"):
            raise ValueError(f"mode must be 'cached' or 'online', got {self.mode!r}")


@dataclass(frozen=True)
class Budget:
    kind: BudgetKind
    value: float

    def __post_init__(self) -> None:
        if self.kind not in ("ms", "tflops"):
            raise ValueError(f"budget kind must be 'ms' or 'tflops', got {self.kind!r}")
        if not isinstance(self.value, (int, float)) or not math.isfinite(self.value) or self.value <= 0:
            raise ValueError(f"budget must be a finite number > 0, got {self.value!r}")

    def cost(self, c: Cost) -> float:
        return c.ms if self.kind == "ms" else c.tflops


@dataclass(frozen=True)
class Candidate:
    name: str
    kind: CandidateKind
    pooling_factor: int | None
    chunk_len: int | None
    quality: float
    quality_chunk_len: int | None  # the measured chunk_len the quality was read at
    cost: Cost
    fits: bool


@dataclass(frozen=True)
class Source:
    """Where a curve came from, for the printout."""

    path: str
    device: str
    date: str
    detail: str = ""


@dataclass(frozen=True)
class Plan:
    query: Query
    budget: Budget
    metric: str
    higher_is_better: bool
    candidates: tuple[Candidate, ...]  # compressed only, cheapest first
    references: tuple[Candidate, ...]  # full text, no context
    chosen: Candidate | None  # None: nothing fits the budget
    cheapest: Candidate
    speed_source: Source
    quality_source: Source
    notes: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _better(metric_higher: bool, a: float, b: float) -> bool:
    return a > b if metric_higher else a < b


def make_plan(query: Query, budget: Budget, speed: SpeedCurve, quality: QualityCurve,
              metric: str = "gap_closed", shapes: Shapes | None = None) -> Plan:
    """Every (pooling factor in both curves) x (chunk length in the speed grid); the best that fits."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {sorted(METRICS)}, got {metric!r}")
    higher = METRICS[metric]
    model = CostModel(speed, shapes)
    pfs = sorted(set(speed.pooling_factors()) & set(quality.pooling_factors()))
    if not pfs:
        raise ValueError(f"no pooling factor is in both curves: {speed.path} has {speed.pooling_factors()}, "
                         f"{quality.path} has {quality.pooling_factors()}")
    T, P = query.context_tokens, query.prompt_tokens
    candidates = []
    for pf in pfs:
        for c in speed.chunk_lens(pf):
            value, q_chunk = quality.lookup(pf, c, metric)
            cost = model.compressed(T, c, pf, P, query.mode)
            candidates.append(Candidate(f"x{pf} chunk {c}", "compressed", pf, c, value, q_chunk, cost,
                                        budget.cost(cost) <= budget.value))
    candidates.sort(key=lambda k: (budget.cost(k.cost), k.pooling_factor, k.chunk_len))
    references = tuple(
        Candidate(name, kind, None, None, quality.reference(kind, metric), None, cost, budget.cost(cost) <= budget.value)
        for name, kind, cost in (("full text", "full_text", model.text(T, P)),
                                 ("no context", "no_context", model.text(0, P)))
    )
    chosen = None
    for k in candidates:  # cheapest first, so a strict improvement is needed to move on: ties -> cheaper
        if k.fits and (chosen is None or _better(higher, k.quality, chosen.quality)):
            chosen = k
    notes = []
    missing = sorted(set(quality.pooling_factors()) - set(pfs))
    if missing:
        notes.append(f"pooling factors {missing} have quality points but no speed grid; not considered")
    untrained = sorted({p.pooling_factor for p in quality.points if not p.trained and p.pooling_factor in pfs})
    if untrained:
        notes.append(f"pooling factors {untrained} were not trained in {quality.checkpoint}; their quality is "
                     "measured all the same")
    if shapes is not None and shapes != speed.shapes:
        notes.append("FLOPs use the given model configs; latencies were measured at the speed file's shapes")
    full = references[0]
    if full.fits:
        notes.append(f"the full text itself fits the budget ({budget.cost(full.cost):.4g} {budget.kind}): "
                     "compression is not needed for this query")
    if any(k.cost.extrapolated for k in candidates + list(references)):
        notes.append("~ marks costs extrapolated beyond the measured speed curve")
    return Plan(
        query=query, budget=budget, metric=metric, higher_is_better=higher, candidates=tuple(candidates),
        references=references, chosen=chosen, cheapest=candidates[0],
        speed_source=Source(speed.path, speed.device, speed.date),
        quality_source=Source(quality.path, quality.device, quality.date,
                              f"checkpoint {quality.checkpoint}, decoder {quality.decoder}"
                              + (f", contexts of {quality.context_tokens} tokens" if quality.context_tokens else "")),
        notes=tuple(notes),
    )


# ---------------------------------------------------------------------------- model check
@dataclass(frozen=True)
class ValidationResult:
    point: ValidationPoint
    predicted: Cost

    @property
    def relative_error(self) -> float:
        """predicted / measured - 1: positive when the model is pessimistic."""
        return self.predicted.ms / self.point.ms - 1


def check_speed_model(speed: SpeedCurve) -> list[ValidationResult]:
    """The cost model's latency for every validation query the speed file timed end to end."""
    model = CostModel(speed)
    out = []
    for v in speed.validation:
        if v.context == "compressed":  # the loader guarantees chunk_len, pooling_factor and mode here
            cost = model.compressed(v.context_tokens, int(v.chunk_len or 0), int(v.pooling_factor or 0),
                                    v.prompt_tokens, v.mode or "online")
        else:
            cost = model.text(v.context_tokens if v.context == "full" else 0, v.prompt_tokens)
        out.append(ValidationResult(v, cost))
    return out


def summarise_check(results: Sequence[ValidationResult]) -> dict[str, float | int] | None:
    """Median and max |relative error| of the model over the validation queries."""
    if not results:
        return None
    errs = sorted(abs(r.relative_error) for r in results)
    mid = len(errs) // 2
    median = errs[mid] if len(errs) % 2 else (errs[mid - 1] + errs[mid]) / 2
    return {"queries": len(errs), "median_abs_error": median, "max_abs_error": errs[-1]}


__all__ = [
    "METRICS", "Budget", "Candidate", "Cost", "CostModel", "Plan", "Query", "QualityCurve", "Shapes",
    "SpeedCurve", "ValidationResult", "check_speed_model", "load_quality_curve",
    "load_speed_curve", "loglog_interp", "make_plan", "summarise_check",
]
