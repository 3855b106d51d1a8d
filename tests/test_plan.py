"""The budget planner (`arc-encoder plan`): curve files, cost model, choice, FLOPs, CLI.

Hand-written curves with odd sizes give exact expectations; a tiny CPU run of
``benchmarks/speed.py --sections grid`` checks the real file end to end (its CPU timings
mean nothing, but its decoder lengths and grid points must match the planner's model).
"""

import copy
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from arc_encoder.cli.main import build_parser, main
from arc_encoder.planner import flops
from arc_encoder.planner.plan import (
    Budget,
    CostModel,
    Query,
    check_speed_model,
    load_quality_curve,
    load_speed_curve,
    loglog_interp,
    make_plan,
)
from arc_encoder.cli.plan import default_curve, format_plan

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import speed  # noqa: E402

ENC = dict(vocab_size=131, hidden_size=48, intermediate_size=71, num_hidden_layers=5, num_attention_heads=6,
           num_key_value_heads=2, head_dim=8)
DEC = dict(vocab_size=311, hidden_size=40, intermediate_size=67, num_hidden_layers=3, num_attention_heads=5,
           num_key_value_heads=1, head_dim=8)
CHUNKS, PFS, ENC_TOKENS = (64, 256, 1024), (2, 4, 8), (2048, 8192)
PREFILL = (37, 101, 301, 1003, 3001, 10007, 30011)


def encoder_ms(c: int, pf: int, n: int) -> float:
    return n / 1000 * (9.0 + c / 251) * (1 + 0.3 / pf) + 1.7


def prefill_ms(n: int) -> float:
    return 21.0 + 0.031 * n + 1.3e-7 * n * n


def speed_doc() -> dict:
    return {
        "benchmark": "plan_speed", "format_version": 1, "device": "Test GPU 7", "date": "2026-11-20",
        "command": "hand-written", "matmul_peak_tflops": 123.0,
        "shapes": {"encoder_backbone": dict(ENC), "encoder_layers_kept": 3, "decoder": dict(DEC), "projector_hidden": 29},
        "encoder": [{"chunk_len": c, "pooling_factor": pf, "tokens": n, "ms": encoder_ms(c, pf, n)}
                    for c in CHUNKS for pf in PFS for n in ENC_TOKENS],
        "prefill": [{"tokens": n, "ms": prefill_ms(n)} for n in PREFILL],
        "validation": [],
    }


def quality_doc() -> dict:
    def pt(pf, chunk, gap, adaptive=False):
        return {"pooling_factor": pf, "chunk_len": chunk, "adaptive": adaptive, "rate_vectors_per_token": 1 / (pf or 3),
                "loss_none": 3.1, "loss_full": 2.6, "loss_compressed": 3.1 - 0.5 * gap, "gap_closed": gap,
                "bits_recovered_per_token": 1.0, "bits_per_vector": (pf or 3) * 1.0, "info_retained": gap * 0.9}
    return {"benchmark": "info", "checkpoint": "ckpt", "decoder": "dec", "device": "Test GPU 7", "date": "2026-11-21",
            "command": "hand-written", "context_tokens": 128,
            "points": [pt(2, 256, 0.91), pt(4, 256, 0.7), pt(4, 1024, 0.76), pt(8, 256, 0.47), pt(16, 256, 0.3),
                       pt(None, 256, 0.99, adaptive=True)]}


@pytest.fixture()
def curves(tmp_path):
    s, q = tmp_path / "plan_speed_test.json", tmp_path / "info_test.json"
    s.write_text(json.dumps(speed_doc()))
    q.write_text(json.dumps(quality_doc()))
    return s, q


def test_interpolation_reproduces_grid_points_and_is_monotone_between(curves):
    speed_curve = load_speed_curve(curves[0])
    model = CostModel(speed_curve)
    for n in PREFILL:
        ms, why = model.prefill_ms(n)
        assert ms == prefill_ms(n) and why is None
    xs = sorted({n + k * 7 for n in PREFILL[:-1] for k in range(60)} | set(PREFILL))
    ys = [model.prefill_ms(x)[0] for x in xs if x <= PREFILL[-1]]
    assert all(a < b for a, b in zip(ys, ys[1:]))
    # Encoder: T a multiple of c with T/c chunks = a measured token count -> the grid value itself.
    for c in CHUNKS:
        for pf in PFS:
            for n in ENC_TOKENS:
                ms, notes = model.encoder_ms(n, c, pf)
                assert ms == pytest.approx(encoder_ms(c, pf, n), rel=1e-12) and notes == []
            between = [model.encoder_ms(k * c, c, pf)[0] for k in range(2048 // c, 8192 // c + 1)]
            assert all(a < b for a, b in zip(between, between[1:]))
    # An off-grid chunk length lies between its measured neighbours.
    mid = model.encoder_ms(8192, 512, 4)[0]
    assert model.encoder_ms(8192, 256, 4)[0] < mid < model.encoder_ms(8192, 1024, 4)[0]
    # A ragged tail is padded to a whole chunk, as the real batch is.
    assert model.encoder_ms(2048 - 5, 64, 4)[0] == model.encoder_ms(2048, 64, 4)[0]
    assert loglog_interp([3, 9], [5, 45], 3) == (5, False)
    assert loglog_interp([3, 9], [5, 45], 27) == (pytest.approx(405), True)


def test_costs_outside_the_curves_are_flagged(curves):
    model = CostModel(load_speed_curve(curves[0]))
    _, why = model.prefill_ms(40000)
    assert "40000" in why and "37-30011" in why
    cost = model.compressed(29, 64, 4, 5, "online")  # 29 tokens: one chunk of 29, below every measured chunk
    assert any("chunk 29 outside" in w for w in cost.extrapolated)
    full = model.text(50000, 7)
    assert full.extrapolated and full.decoder_tokens == 1 + 50000 + 7
    plan = make_plan(Query(50000, 7), Budget("ms", 1e9), load_speed_curve(curves[0]), load_quality_curve(curves[1]))
    text = format_plan(plan)
    assert "~ full text: prefill of 50008 tokens" in text and "~" in text.split("full text")[1]


def _brute_force_best(plan):
    fits = [k for k in plan.candidates if k.fits]
    return max(fits, key=lambda k: (k.quality if plan.higher_is_better else -k.quality, -plan.budget.cost(k.cost)))


@pytest.mark.parametrize("mode", ["online", "cached"])
def test_choice_fits_the_budget_and_maximises_quality(curves, mode):
    s, q = load_speed_curve(curves[0]), load_quality_curve(curves[1])
    plans = [make_plan(Query(6007, 11, mode), Budget("ms", b), s, q) for b in range(40, 400, 3)]
    chosen = [p for p in plans if p.chosen is not None]
    assert len(chosen) > 10 and len({p.chosen.name for p in chosen}) >= 3
    for p in chosen:
        assert p.chosen.cost.ms <= p.budget.value
        best = _brute_force_best(p)
        assert p.chosen.quality == best.quality and p.chosen.cost.ms == best.cost.ms
        assert p.chosen.quality != 0.99  # the adaptive point is never used
        # pf 16 has quality but no speed grid: never a candidate, and said so.
        assert {k.pooling_factor for k in p.candidates} == {2, 4, 8}
        assert any("[16]" in n for n in p.notes)
    # Quality follows pf and the nearest measured chunk length.
    by_name = {k.name: k for k in plans[0].candidates}
    assert by_name["x4 chunk 64"].quality == 0.7 and by_name["x4 chunk 64"].quality_chunk_len == 256
    assert by_name["x4 chunk 1024"].quality == 0.76 and by_name["x4 chunk 1024"].quality_chunk_len == 1024
    assert by_name["x2 chunk 1024"].quality == 0.91  # one chunk length measured: pf alone decides
    ref = {k.name: k for k in plans[0].references}
    assert ref["full text"].quality == 1.0 and ref["no context"].quality == 0.0
    assert ref["full text"].cost.decoder_tokens == 1 + 6007 + 11 and ref["no context"].cost.decoder_tokens == 12
    if mode == "cached":  # no encoder: chunking only changes the compressed length
        assert all(k.cost.encoder_ms == 0 for k in plans[0].candidates)


@pytest.mark.parametrize("kind,budgets,metric", [
    ("ms", [400, 250, 180, 140, 120, 100, 90, 80, 70, 60, 50, 40], "gap_closed"),
    ("tflops", [6e-3, 3.2e-3, 1.9e-3, 1.4e-3, 1e-3, 8.5e-4, 5e-4], "gap_closed"),
    ("ms", [400, 200, 150, 120, 100, 80, 60, 45], "loss_compressed"),
])
def test_a_tighter_budget_never_yields_a_costlier_or_better_choice(curves, kind, budgets, metric):
    s, q = load_speed_curve(curves[0]), load_quality_curve(curves[1])
    plans = [make_plan(Query(6007, 11), Budget(kind, b), s, q, metric) for b in budgets]
    chosen = [p.chosen for p in plans if p.chosen is not None]
    assert len({c.name for c in chosen}) >= 2, "the budgets should move the choice"
    costs = [plans[0].budget.cost(c.cost) for c in chosen]
    assert costs == sorted(costs, reverse=True)
    qual = [c.quality for c in chosen]
    assert qual == sorted(qual, reverse=plans[0].higher_is_better)


def test_no_candidate_fits(curves, capsys):
    s, q = curves
    plan = make_plan(Query(6007, 11), Budget("ms", 1.0), load_speed_curve(s), load_quality_curve(q))
    assert plan.chosen is None and not any(k.fits for k in plan.candidates)
    assert plan.cheapest.cost.ms == min(k.cost.ms for k in plan.candidates)
    code = main(["plan", "--budget-ms", "1", "--context-tokens", "6007", "--prompt-tokens", "11",
                 "--speed", str(s), "--quality", str(q)])
    out = capsys.readouterr().out
    assert code == 1
    assert f"no candidate fits the budget of 1 ms: the cheapest is {plan.cheapest.name}" in out


def _mutate(doc, path, value):
    d = doc
    for k in path[:-1]:
        d = d[k]
    if value is KeyError:
        del d[path[-1]]
    else:
        d[path[-1]] = value


@pytest.mark.parametrize("which,path,value,key", [
    ("speed", ("shapes", "decoder", "hidden_size"), KeyError, "'hidden_size'"),
    ("speed", ("shapes", "encoder_layers_kept"), 0, "'encoder_layers_kept'"),
    ("speed", ("encoder",), KeyError, "'encoder'"),
    ("speed", ("encoder", 3, "ms"), -2.0, "'ms'"),
    ("speed", ("prefill", 2, "tokens"), "many", "'tokens'"),
    ("speed", ("benchmark",), "info", "'benchmark'"),
    ("speed", ("device",), KeyError, "'device'"),
    ("quality", ("points", 1, "gap_closed"), KeyError, "'gap_closed'"),
    ("quality", ("points", 0, "adaptive"), "no", "'adaptive'"),
    ("quality", ("points", 2, "pooling_factor"), 0, "'pooling_factor'"),
    ("quality", ("points",), [], "'points'"),
    ("quality", ("date",), KeyError, "'date'"),
])
def test_bad_curve_files_name_the_file_and_the_key(tmp_path, which, path, value, key):
    doc = speed_doc() if which == "speed" else quality_doc()
    _mutate(doc, path, value)
    f = tmp_path / f"{which}.json"
    f.write_text(json.dumps(doc))
    with pytest.raises(ValueError) as err:
        (load_speed_curve if which == "speed" else load_quality_curve)(f)
    assert str(f) in str(err.value) and key in str(err.value)


def test_duplicate_and_nan_quality_points_are_refused(tmp_path, curves):
    doc = quality_doc()
    doc["points"].append(copy.deepcopy(doc["points"][1]))
    f = tmp_path / "dup.json"
    f.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="second non-adaptive point for pooling_factor 4, chunk_len 256"):
        load_quality_curve(f)
    doc = quality_doc()
    doc["points"][0]["gap_closed"] = float("nan")  # json writes NaN; eval info does when gap <= 0
    f.write_text(json.dumps(doc))
    q = load_quality_curve(f)
    assert [p.trained for p in q.points] == [True] * 5
    with pytest.raises(ValueError, match="'gap_closed' is NaN"):
        make_plan(Query(999), Budget("ms", 100), load_speed_curve(curves[0]), q)
    assert make_plan(Query(999), Budget("ms", 100), load_speed_curve(curves[0]), q, "loss_compressed").chosen
    doc["points"][0]["trained_factor"] = False
    f.write_text(json.dumps(doc))
    plan = make_plan(Query(999), Budget("ms", 100), load_speed_curve(curves[0]), load_quality_curve(f), "loss_compressed")
    assert any("pooling factors [2] were not trained in ckpt" in n for n in plan.notes)


def test_flops_match_the_speed_benchmark():
    assert speed.encoder_forward_flops is flops.encoder_forward_flops  # one implementation
    enc_cfg, dec_cfg = speed.hf_config(speed.TINY_ENCODER), speed.hf_config(speed.TINY_DECODER)
    enc_shape, dec_shape = flops.ModelShape.from_dict(speed.TINY_ENCODER), flops.ModelShape.from_dict(speed.TINY_DECODER)
    layers, c, pf, prompt, hidden = 3, 32, 4, 5, 24
    # Three whole chunks: exactly the speed benchmark's encoder, projector and prefill counts.
    q = flops.compressed_query_flops(enc_shape, layers, dec_shape, hidden, 3 * c, c, pf, prompt, "online")
    m = 3 * (c // pf)
    assert q.encoder == speed.encoder_forward_flops(enc_cfg, layers, c, pf, 3)
    assert q.projector == speed.projector_flops(48, hidden, 40, m)
    assert q.decoder_tokens == 1 + m + 1 + prompt
    assert q.decoder == speed.decoder_forward_flops(dec_cfg, 1 + m + 1 + prompt, 1)
    # A ragged tail of 13 tokens: its own (unpadded) chunk and ceil(13 / 4) = 4 more vectors.
    t = flops.compressed_query_flops(enc_shape, layers, dec_shape, hidden, 2 * c + 13, c, pf, prompt, "online")
    assert t.encoder == speed.encoder_forward_flops(enc_cfg, layers, c, pf, 2) + speed.encoder_forward_flops(
        enc_cfg, layers, 13, pf, 1)
    assert t.decoder_tokens == 1 + 2 * 8 + 4 + 1 + prompt
    cached = flops.compressed_query_flops(enc_shape, layers, dec_shape, hidden, 2 * c + 13, c, pf, prompt, "cached")
    assert cached.encoder == cached.projector == 0 and cached.decoder == t.decoder
    # Decoder by hand: H 40, I 67, dq 40, dkv 8, 3 layers, vocab 311, one logits row.
    n = 17
    per_layer = 2 * n * (40 * 40 + 2 * 40 * 8 + 40 * 40 + 3 * 40 * 67) + 2 * n * n * 40
    assert flops.decoder_forward_flops(dec_shape, n, 1) == 3 * per_layer + 2 * 40 * 311
    assert flops.text_query_flops(dec_shape, 0, 16).decoder == flops.decoder_forward_flops(dec_shape, n, 1)


def test_encoder_flops_count_the_matmuls_the_encoder_runs():
    """torch's FLOP counter over a real ARCEncoder forward: its matmuls (aten.mm; attention
    kernels are not all counted on CPU) are the formula's projection and MLP terms."""
    from torch.utils.flop_counter import FlopCounterMode

    from arc_encoder import ARCEncoder, EncoderConfig

    shape = flops.ModelShape.from_dict(speed.TINY_ENCODER)
    h, _, dq, _ = flops.attention_dims(shape)
    for n, pf in ((32, 4), (17, 8)):
        enc = ARCEncoder.from_base_model(EncoderConfig(base_model="x", layers_removed=1, pooling_factor=pf),
                                         backbone_config=speed.hf_config(speed.TINY_ENCODER))
        ids = torch.randint(3, 100, (1, n))
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            enc(ids, torch.ones_like(ids, dtype=torch.bool))
        mm = counter.get_flop_counts()["Global"][torch.ops.aten.mm]
        m = -(-n // pf)
        attention = 2 * 4 * n * n * dq + 4 * m * n * dq  # 2 full blocks + the pooled one
        assert mm == flops.encoder_forward_flops(shape, 3, n, pf, 1) - attention, (n, pf)


@pytest.fixture(scope="module")
def tiny_grid(tmp_path_factory):
    out = tmp_path_factory.mktemp("grid")
    res = speed.main(["--preset", "tiny", "--sections", "grid", "--out-dir", str(out), "--tag", "t"])
    return out / res["sections"]["grid"]["file"], res


def test_tiny_grid_file_matches_the_planner_model(tiny_grid):
    path, res = tiny_grid
    assert path.name.startswith("plan_speed_") and path.name.endswith("_t.json")
    curve = load_speed_curve(path)
    p = speed.PRESETS["tiny"]
    whole = sum(c <= n for c in p.plan_chunk_lens for n in p.plan_encoder_tokens)  # chunks longer than n skipped
    assert len(curve.encoder) == whole * len(p.plan_pooling_factors) == 24
    assert [x.tokens for x in curve.prefill] == [1 + 5] + [1 + n + 1 + 5 for n in p.plan_prefill_contexts]
    assert curve.shapes.encoder_layers_kept == 2 and curve.shapes.decoder.hidden_size == 40
    assert curve.matmul_tflops > 0
    model = CostModel(curve)
    for pt in curve.encoder:  # grid points come back exactly
        assert model.encoder_ms(pt.tokens, pt.chunk_len, pt.pooling_factor)[0] == pytest.approx(pt.ms, rel=1e-12)
    checks = check_speed_model(curve)
    n_val = len(p.plan_validation_contexts) * (1 + 2 * len(p.plan_validation_pfs) * len(p.plan_validation_chunks))
    assert len(checks) == n_val
    for r in checks:  # the planner's decoder length is what the real compress + layout produced
        assert r.predicted.decoder_tokens == r.point.decoder_tokens
        assert math.isfinite(r.relative_error) and r.predicted.ms > 0
    assert {(r.point.context, r.point.mode) for r in checks} == {("full", None), ("compressed", "cached"),
                                                               ("compressed", "online")}
    assert res["sections"]["grid"]["model_check"]["summary"]["queries"] == n_val


def test_cli_end_to_end_on_the_tiny_grid(tiny_grid, curves, tmp_path, capsys):
    path, _ = tiny_grid
    doc = quality_doc()
    for pt in doc["points"]:  # the tiny grid's chunk lengths
        pt["chunk_len"] = {256: 16, 1024: 32}[pt["chunk_len"]]
    q = tmp_path / "q.json"
    q.write_text(json.dumps(doc))
    out_json, out_png = tmp_path / "plan.json", tmp_path / "plan.png"
    code = main(["plan", "--budget-ms", "1e6", "--context-tokens", "150", "--prompt-tokens", "5", "--mode", "online",
                 "--speed", str(path), "--quality", str(q), "--json", str(out_json), "--plot", str(out_png)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "recommendation: pooling factor 2, chunk length" in out and "expected gap_closed 0.910" in out
    assert "CPU" in out and "Test GPU 7, 2026-11-21" in out  # provenance of both curves
    assert "full text" in out and "no context" in out and "model check: median abs. error" in out
    plan = json.loads(out_json.read_text())
    assert plan["chosen"]["pooling_factor"] == 2 and len(plan["candidates"]) == 9
    assert plan["speed_model_check"]["queries"] > 0
    assert out_png.is_file() and f"wrote {out_png}" in out
    # A FLOPs budget and shapes from HF config files.
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(speed.TINY_DECODER | {"architectures": ["LlamaForCausalLM"]}))
    code = main(["plan", "--budget-tflops", "1", "--context-tokens", "150", "--speed", str(path),
                 "--quality", str(q), "--decoder-config", str(cfg), "--mode", "cached"])
    assert code == 0 and "1 TFLOPs per query" in capsys.readouterr().out


def test_cli_errors_and_help(curves, tmp_path, capsys):
    s, q = curves
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["plan", "--help"])
    assert e.value.code == 0
    assert "latency = [online only] encoder(T, c, pf) + prefill(1 + compressed_len + 1 + P)" in capsys.readouterr().out
    for argv in (["--context-tokens", "9"], ["--budget-ms", "5", "--budget-tflops", "1", "--context-tokens", "9"]):
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args(["plan", *argv])
        assert e.value.code == 2
    assert main(["plan", "--budget-ms", "-3", "--context-tokens", "9", "--speed", str(s), "--quality", str(q)]) == 2
    assert "budget must be a finite number > 0" in capsys.readouterr().err
    assert main(["plan", "--budget-ms", "3", "--context-tokens", "9", "--speed", str(tmp_path / "nope.json"),
                 "--quality", str(q)]) == 2
    assert "nope.json: no such file" in capsys.readouterr().err


def test_default_curves_are_the_newest_matching_files(tmp_path):
    with pytest.raises(ValueError, match="--speed FILE"):
        default_curve("speed", tmp_path)
    with pytest.raises(ValueError, match="--quality FILE"):
        default_curve("quality", tmp_path / "missing")
    for date in ("2026-10-02", "2026-11-03", "2026-09-30"):
        doc = speed_doc() | {"date": date}
        (tmp_path / f"plan_speed_gpu_{date}.json").write_text(json.dumps(doc))
        (tmp_path / f"rd_{date}.json").write_text(json.dumps(quality_doc() | {"date": date}))
    (tmp_path / "speed_other.json").write_text(json.dumps({"benchmark": "speed", "date": "2027-01-01"}))
    assert default_curve("speed", tmp_path).name == "plan_speed_gpu_2026-11-03.json"
    assert default_curve("quality", tmp_path).name == "rd_2026-11-03.json"


def test_budget_with_units():
    import argparse

    from arc_encoder.cli.plan import parse_budget

    assert (parse_budget("150ms").kind, parse_budget("150ms").value) == ("ms", 150.0)
    assert parse_budget("0.2 s").value == pytest.approx(200.0)
    assert (parse_budget("60TFLOPs").kind, parse_budget("60TFLOPs").value) == ("tflops", 60.0)
    assert parse_budget("500gflops").value == pytest.approx(0.5)
    for bad in ("150", "ms", "-3ms", "3 parsecs"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_budget(bad)
