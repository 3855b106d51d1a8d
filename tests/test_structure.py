"""The package's seams: no import cycles, one home per idea, the training config embeds the library's."""

import ast
import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

import arc_encoder
from arc_encoder.config import EncoderConfig, torch_dtype
from arc_encoder.objectives import IGNORE_INDEX, next_token_logits, target_scores
from arc_encoder.samples import collate, text_sample
from conftest import make_model

LIB = Path(arc_encoder.__file__).parent
TRAIN = LIB.parent / "arc_encoder_train"


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, root: Path, modules: set[str]) -> set[str]:
    """Every module of ``modules`` that ``path`` imports, anywhere in the file: lazy imports and
    ``if TYPE_CHECKING:`` imports too (a type-only import is still a dependency a reader follows)."""
    name = _module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:  # `from . import checkpoint` imports a module; `from .x import y` imports x
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base)
    return {m for m in found if m in modules and m != name}


def import_graph(*roots: Path) -> dict[str, set[str]]:
    """module -> the modules of ``roots`` it imports (every root's modules are known to every file)."""
    files = [(f, root) for root in roots for f in sorted(root.rglob("*.py"))]
    modules = {_module_name(f, root) for f, root in files}
    return {_module_name(f, root): _imports(f, root, modules) for f, root in files}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_type_checking_imports_are_edges(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import B\n")
    (pkg / "b.py").write_text("def f():\n    from .a import A\n")
    graph = import_graph(pkg)
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg.a"}
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.a"]


def test_no_import_cycle_in_arc_encoder():
    graph = import_graph(LIB)
    assert "arc_encoder.checkpoint" in graph["arc_encoder.model"]  # the walk sees lazy and `from . import` edges
    assert "arc_encoder.cli.cache" in graph["arc_encoder.cli.main"]
    assert find_cycle(graph) is None, find_cycle(graph)
    # The checkpoint layout and the cache format know files, not models; the layout and the token
    # scoring know no model either; the argument groups both command lines share import no command.
    assert graph["arc_encoder.checkpoint"] <= {"arc_encoder.config", "arc_encoder.storage"}
    for files_only in ("arc_encoder.checkpoint", "arc_encoder.cache.format", "arc_encoder.cache.reader",
                       "arc_encoder.layout", "arc_encoder.objectives", "arc_encoder.chunking", "arc_encoder.corpus"):
        assert "arc_encoder.model" not in graph[files_only], files_only
    assert "arc_encoder.model" in graph["arc_encoder.metrics"]  # validation metrics stand above the model
    # Library modules never import the command line (the reverse direction only).
    for name, deps in graph.items():
        if not name.startswith("arc_encoder.cli"):
            assert not {d for d in deps if d.startswith("arc_encoder.cli")}, name


def test_no_import_cycle_in_the_training_package():
    graph = import_graph(LIB, TRAIN)
    assert find_cycle(graph) is None, find_cycle(graph)
    assert not any(d.startswith("arc_encoder_train") for name, deps in graph.items()
                   if name.startswith("arc_encoder.") or name == "arc_encoder" for d in deps)


def test_the_training_package_never_imports_the_library_command_line():
    """`arc-encoder-train` shares argument groups with `arc-encoder` through the library
    (``arc_encoder.arguments``), never through ``arc_encoder.cli``: no exceptions."""
    graph = import_graph(LIB, TRAIN)
    for name, deps in graph.items():
        if name.startswith("arc_encoder_train"):
            assert not {d for d in deps if d == "arc_encoder.cli" or d.startswith("arc_encoder.cli.")}, name


# ---------------------------------------------------------------------------- training config
# A non-default, valid value for every EncoderConfig field; a new field must be added here.
ENCODER_VALUES = dict(
    base_model="/models/some-lm", layers_removed=3, pooling_factor=2, pooled_query_positions="group_mean",
    pooled_query_input="pooled_queries", pooling_groups="fixed_tail",
    pooled_residual=False, final_norm=True, chunk_len=64, max_chunks=5, attn_implementation="eager",
    pooling_factors=(2, 8), tuning="lora", lora_rank=8, lora_alpha=16.0, lora_targets=("q_proj", "v_proj"),
    full_blocks=2, base_sha256="ab" * 32, sliding_window_layers="band",
)


def test_every_encoder_config_field_is_settable_from_yaml_and_cli(tmp_path):
    from arc_encoder_train import cli

    names = [f.name for f in dataclasses.fields(EncoderConfig)]
    assert sorted(ENCODER_VALUES) == sorted(names)
    default = EncoderConfig(base_model="x")
    assert all(getattr(default, k) != v for k, v in ENCODER_VALUES.items())
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"encoder": {k: list(v) if isinstance(v, tuple) else v
                                                for k, v in ENCODER_VALUES.items()},
                                    "encoder_build": {"compile_blocks": True}}))
    _, cfg = cli.parse(["pretrain", "--config", str(path)])
    assert isinstance(cfg.encoder, EncoderConfig) and dataclasses.asdict(cfg.encoder) == ENCODER_VALUES
    assert cfg.encoder_build.compile_blocks is True
    argv = ["pretrain"]
    for k, v in ENCODER_VALUES.items():
        argv += [f"--encoder.{k}", str(list(v)) if isinstance(v, tuple) else str(v).lower() if isinstance(v, bool) else str(v)]
    _, cfg = cli.parse(argv)
    assert dataclasses.asdict(cfg.encoder) == ENCODER_VALUES
    with pytest.raises(Exception, match="pooling_factors"):  # validated by EncoderConfig itself
        cli.parse(["pretrain", "--encoder.pooling_factor", "4", "--encoder.pooling_factors", "[2, 8]"])


# A non-default, valid value for every ProjectorOptions field (what a user chooses per decoder).
PROJECTOR_VALUES = dict(hidden_dim=64, activation="gelu", bias=True, special_token_space="decoder",
                        special_tokens=("reconstruction",), init="reference", bos="always")
# The ProjectorConfig fields the models fix: never settable, derived when the projector is made.
PROJECTOR_DERIVED = {"input_dim", "output_dim", "decoder", "decoder_vocab_size", "decoder_relative", "decoder_sha256"}


def test_every_projector_option_is_settable_from_yaml_and_cli(tmp_path):
    from arc_encoder.config import ProjectorConfig, ProjectorOptions
    from arc_encoder_train import cli

    options = [f.name for f in dataclasses.fields(ProjectorOptions)]
    assert sorted(PROJECTOR_VALUES) == sorted(options)
    # ProjectorConfig is the options plus what the models fix: a new field must be one or the other.
    assert {f.name for f in dataclasses.fields(ProjectorConfig)} == set(options) | PROJECTOR_DERIVED
    assert all(getattr(ProjectorOptions(), k) != v for k, v in PROJECTOR_VALUES.items())
    plain = {k: list(v) if isinstance(v, tuple) else v for k, v in PROJECTOR_VALUES.items()}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"decoders": [{"name": "a", "projector": plain},
                                                 {"name": "b", "projector": {"hidden_dim": 32}}]}))
    _, cfg = cli.parse(["pretrain", "--config", str(path)])
    assert dataclasses.asdict(cfg.decoders[0].projector) == PROJECTOR_VALUES
    assert cfg.decoders[1].projector == ProjectorOptions(hidden_dim=32)
    argv = ["adapt"]
    for k, v in PROJECTOR_VALUES.items():
        argv += [f"--decoder.projector.{k}", str(list(v)) if isinstance(v, tuple) else str(v).lower() if isinstance(v, bool) else str(v)]
    _, cfg = cli.parse(argv)
    assert dataclasses.asdict(cfg.decoder.projector) == PROJECTOR_VALUES
    with pytest.raises(Exception, match="activation"):  # validated by ProjectorOptions itself
        cli.parse(["adapt", "--decoder.projector.activation", "relu6"])
    # The chosen options reach the projector; the widths come from the models.
    model, decoder = make_model()
    model.add_decoder("chosen", decoder, cfg.decoder.projector)
    made = model.projector("chosen").config
    assert made.options() == cfg.decoder.projector and (made.input_dim, made.output_dim) == (32, 24)
    assert model.projector("chosen").net[0].bias is not None and model.projector("chosen").special_tokens.shape == (1, 24)


def test_tiny_default_encoder_is_kept():
    from arc_encoder_train import cli

    from arc_encoder_train.config import BUILTIN_TINY, PretrainConfig, preset_path

    for argv in (["pretrain"], ["pretrain", "--config", str(preset_path("tiny"))]):
        _, cfg = cli.parse(argv)
        assert cfg.encoder == EncoderConfig(base_model=BUILTIN_TINY, layers_removed=1, pooling_factor=4)
    assert PretrainConfig().encoder == cfg.encoder  # the tiny default is the dataclass default


# ---------------------------------------------------------------------------- loss and scoring
def _batch(model, task="continuation"):
    samples = [text_sample([5, 6, 7, 8, 9, 10, 11], [12, 13, 14], None, None, same_tokenizer=True),
               text_sample([20, 21, 22, 23], [24, 25], None, None, same_tokenizer=True)]
    return collate(samples, "dec", task, prefix=1)


@pytest.mark.parametrize("task", ["continuation", "reconstruction"])
def test_forward_is_the_mean_cross_entropy_of_the_targets(task):
    model, decoder = make_model()
    batch = _batch(model, task)
    loss = model(batch, decoder)
    inputs = model.decoder_inputs(decoder, batch)
    logits = decoder(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask).logits
    on = inputs.labels[:, 1:] != IGNORE_INDEX
    assert int(on.sum()) == sum(len(t) for t in batch.target_ids)
    manual = F.cross_entropy(logits[:, :-1][on].float(), inputs.labels[:, 1:][on])
    torch.testing.assert_close(loss, manual)
    scores = target_scores(decoder, inputs)
    assert sum(scores.tokens) == int(on.sum())
    assert sum(scores.nll) / sum(scores.tokens) == pytest.approx(float(loss), rel=1e-5)
    loss.backward()  # the loss trains the encoder and projector
    assert model.projector("dec").special_tokens.grad.abs().sum() > 0


def test_decoder_inputs_context_modes():
    model, decoder = make_model()
    batch = _batch(model)
    lengths = {mode: model.decoder_inputs(decoder, batch, mode).attention_mask.sum(-1).tolist()
               for mode in ("compressed", "none", "full")}
    ctx, cont = [len(c) for c in batch.context_ids], [len(c) for c in batch.continuation_ids]
    assert lengths["none"] == [1 + c for c in cont]  # BOS + targets, no marker
    assert lengths["full"] == [1 + x + c for x, c in zip(ctx, cont)]
    vectors = [model.encoder.config.compressed_len(x) for x in ctx]
    assert lengths["compressed"] == [1 + v + 1 + c for v, c in zip(vectors, cont)]  # + marker
    with pytest.raises(ValueError, match="context must be"):
        model.decoder_inputs(decoder, batch, "half")


def test_next_token_logits_runs_without_a_kv_cache():
    _, decoder = make_model()
    calls = []
    handle = decoder.register_forward_pre_hook(lambda m, a, kw: calls.append(kw.get("use_cache")), with_kwargs=True)
    ids = torch.tensor([[1, 5, 6, 7]])
    logits, labels = next_token_logits(decoder, ids, torch.ones_like(ids), input_ids=ids)
    handle.remove()
    assert calls == [False] and logits.dtype == torch.float32
    assert logits.shape[:2] == labels.shape == (1, 3) and labels.tolist() == [[5, 6, 7]]


def test_decoder_bits_is_the_nll_in_bits():
    from arc_encoder.adaptive import decoder_bits
    from arc_encoder.tiny import train_tokenizer
    from conftest import TEXT

    tok = train_tokenizer([TEXT], vocab_size=101)
    _, decoder = make_model(dec_vocab=len(tok))
    texts = ["A list is a mutable sequence.", "Exceptions signal errors in Python programs."]
    bits = decoder_bits(decoder, tok, texts)
    for text, b in zip(texts, bits):
        ids = torch.tensor([[tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            logits = decoder(input_ids=ids).logits[0, :-1]
        assert b == pytest.approx(float(F.cross_entropy(logits, ids[0, 1:], reduction="sum")) / math.log(2), rel=1e-5)


# ---------------------------------------------------------------------------- shared helpers
def test_one_dtype_map():
    assert [torch_dtype(n) for n in ("float32", "bfloat16", "float16")] == [torch.float32, torch.bfloat16,
                                                                             torch.float16]
    with pytest.raises(ValueError, match="dtype='int4'"):
        torch_dtype("int4")


def test_one_trained_factor_check():
    cfg = EncoderConfig(base_model="x", pooling_factor=4, pooling_factors=(2, 4))
    assert cfg.untrained_factors([8, 2, 3]) == [3, 8]
    cfg.check_trained([2, 4])
    with pytest.raises(ValueError, match=r"adaptive pooling factors \[8\] were never trained.*\[2, 4\]"):
        cfg.check_trained([2, 8], "adaptive ")


def test_lm_schedule():
    from arc_encoder_train.lm import cosine_with_warmup

    for step in range(0, 140, 7):  # warm-up scales a cosine that runs from step 0
        expect = min(1.0, (step + 1) / 20) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / 100))))
        assert cosine_with_warmup(step, 20, 100, 0.05) == expect


def test_one_adaptive_argument_group():
    from arc_encoder.arguments import adaptive_policies, adaptive_policy
    from arc_encoder.cli.main import build_parser
    from arc_encoder_train.cli import argparse_parser

    parser = build_parser()
    head = {"compress": ["compress", "c", "--decoder", "d", "--text", "t", "--output", "o"],
            "cache build": ["cache", "build", "c", "--decoder", "d", "--corpus", "x", "--output", "o"],
            "eval info": ["eval", "info", "c", "--decoder", "d", "--data", "x"]}
    keys = ("adaptive", "adaptive_factors", "adaptive_target", "adaptive_strength")
    parsed = {k: parser.parse_args(v) for k, v in head.items()}
    parsed["cache-build (GPU)"] = argparse_parser("cache-build").parse_args(["c", "--decoder", "d", "--corpus", "x",
                                                                              "--output", "o"])
    defaults = {k: tuple(getattr(ns, key) for key in keys) for k, ns in parsed.items()}
    assert len(set(defaults.values())) == 1, defaults  # same shape and defaults everywhere
    for k, v in head.items():
        ns = parser.parse_args(v + ["--adaptive", "--adaptive-factors", "2,4", "--adaptive-strength", "2"])
        assert (ns.adaptive, ns.adaptive_factors, ns.adaptive_strength) == (["zlib"], [2, 4], 2.0), k
    enc = EncoderConfig(base_model="x", pooling_factor=4, pooling_factors=(2, 4, 8))
    ns = parser.parse_args(head["eval info"] + ["--adaptive", "zlib,decoder_nll"])
    assert [(p.factors, p.target, p.density) for p in adaptive_policies(ns, enc)] == [
        ((2, 4, 8), 4.0, "zlib"), ((2, 4, 8), 4.0, "decoder_nll")]
    with pytest.raises(ValueError, match="one density"):
        adaptive_policy(ns, enc)
    with pytest.raises(SystemExit):
        parser.parse_args(head["compress"] + ["--adaptive", "gzip"])


def test_one_decoder_loader(tmp_path):
    from arc_encoder.tiny import train_tokenizer
    from conftest import TEXT

    model, decoder = make_model()
    path = tmp_path / "dec"
    decoder.save_pretrained(path)
    train_tokenizer([TEXT], vocab_size=101).save_pretrained(path)
    model.projector("dec").config.decoder = str(path)
    loaded, _, used = model.load_decoder("dec", dtype=torch.float32)
    assert used == str(path) and not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    with pytest.raises(FileNotFoundError, match="decoder 'dec': .*missing does not exist"):
        model.load_decoder("dec", str(tmp_path / "missing"))
    model.projector("dec").config.decoder = ""
    with pytest.raises(FileNotFoundError, match="decoder 'dec': the checkpoint records no local path"):
        model.load_decoder("dec")


def test_planner_reads_curves_from_the_installed_package():
    from arc_encoder.cli.plan import default_curve, packaged_curves
    from arc_encoder.planner.plan import load_quality_curve, load_speed_curve

    speed, quality = default_curve("speed"), default_curve("quality")
    assert speed.parent == quality.parent == packaged_curves()
    assert packaged_curves().is_relative_to(LIB)  # inside the package, not the source checkout
    assert load_speed_curve(speed).shapes is not None and load_quality_curve(quality) is not None


def test_compress_refuses_pooling_factor_with_adaptive(tmp_path, capsys, tokenizer):
    from arc_encoder.cli.main import main

    model, _ = make_model(tokenizer=tokenizer, vocab_size=len(tokenizer), chunk_len=16, pooling_factors=(2, 4, 8))
    path = model.save_pretrained(tmp_path / "m")
    args = ["compress", str(path), "--decoder", "dec", "--text", "a b c d e f g", "--device", "cpu",
            "--output", str(tmp_path / "o.st"), "--pooling-factor", "2", "--adaptive"]
    assert main(args) == 2
    assert "--adaptive-target" in capsys.readouterr().err
