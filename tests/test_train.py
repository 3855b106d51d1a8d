"""Training jobs on tiny saved decoders (CPU, seconds): loss goes down, adapt trains only the
projector, the reconstruction ratio holds, resume is exact, bad configs fail before training."""

import gzip
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from arc_encoder.config import EncoderConfig, ProjectorOptions
from arc_encoder.samples import is_reconstruction
from arc_encoder.tiny import tiny_causal_lm, tiny_config, train_tokenizer
from arc_encoder_train import cli, jobs
from arc_encoder_train.config import (
    AdaptConfig, DataConfig, DecoderConfig, FinetuneConfig, OptimConfig, PretrainConfig, RunConfig, TrainerConfig,
)
from arc_encoder_train.data import BatchStream, pretrain_samples
from conftest import TEXT

DOCS = [TEXT[i:] + " " + TEXT[: i] for i in range(0, 400, 37)]


def save_decoder(path: Path, tok, hidden=24, heads=3, kv=1, vocab=None, seed=0) -> str:
    cfg = tiny_config("llama", vocab_size=vocab or len(tok), hidden_size=hidden, num_heads=heads,
                      num_kv_heads=kv, num_layers=2, intermediate_size=29,
                      initializer_range=0.3)  # peaked logits: the loss can move in a few steps
    tiny_causal_lm(cfg, seed=seed).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    tok = train_tokenizer([TEXT], vocab_size=300)
    enc = root / "enc"
    cfg = tiny_config("llama", vocab_size=len(tok), hidden_size=32, num_layers=3, intermediate_size=37)
    tiny_causal_lm(cfg, seed=1).save_pretrained(enc)
    tok.save_pretrained(enc)
    decs = {"a": save_decoder(root / "dec_a", tok), "b": save_decoder(root / "dec_b", tok, hidden=20, heads=2, seed=3)}
    for split in ("train", "validation"):
        with gzip.open(root / f"{split}.jsonl.gz", "wt") as f:
            for d in DOCS:
                f.write(json.dumps({"text": d}) + "\n")
    with open(root / "qa.jsonl", "w") as f:
        for i in range(12):
            f.write(json.dumps({"context": DOCS[i % len(DOCS)][:200], "question": "What is a list?",
                                "answer": "A mutable sequence."}) + "\n")
    return root, str(enc), decs, tok


def pretrain_cfg(setup, tmp_path, decoders=("a",), steps=6, ratio=0.5, name="t") -> PretrainConfig:
    root, enc, decs, _ = setup
    return PretrainConfig(
        encoder=EncoderConfig(base_model=enc, layers_removed=1, pooling_factor=2),
        decoders=[DecoderConfig(name=n, path=decs[n], projector=ProjectorOptions(hidden_dim=16)) for n in decoders],
        data=DataConfig(train_files=[str(root / "train.jsonl.gz")], validation_files=[str(root / "validation.jsonl.gz")],
                      context_tokens=12, target_tokens=6, batch_size=3, val_batches=1, reconstruction_ratio=ratio,
                      shuffle_buffer=4),
        optim=OptimConfig(lr=3e-3, warmup_steps=0),
        trainer=TrainerConfig(max_steps=steps, accelerator="cpu", devices=1, val_check_interval=3,
                                checkpoint_every_n_steps=3, progress_bar=False, log_every_n_steps=1),
        run=RunConfig(name=name, runs_dir=str(tmp_path / "runs"), checkpoints_dir=str(tmp_path / "ckpt")),
    )


def steps_on_fixed_batch(module, batch, n=10, lr=1e-2) -> list[float]:
    opt = module.configure_optimizers()["optimizer"]
    for group in opt.param_groups:
        group["lr"] = lr
    module._move_decoders()
    losses = []
    for _ in range(n):
        loss = module.training_step(batch, 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def first_batch(dm):
    dm.trainer = None
    return next(iter(dm.train_dataloader()))


def test_reconstruction_ratio_is_honoured(setup, tmp_path):
    for ratio in (0.0, 0.2, 0.3, 0.5, 1.0):
        assert sum(is_reconstruction(i, ratio) for i in range(100)) == round(100 * ratio)
    root, _, _, tok = setup
    spec = DataConfig(train_files=[str(root / "train.jsonl.gz")], context_tokens=8, target_tokens=4, batch_size=2,
                    reconstruction_ratio=0.25)
    from arc_encoder_train.data import DecoderTokenizers
    stream = BatchStream(spec, [DecoderTokenizers("a", tok, True), DecoderTokenizers("b", tok, True)], tok,
                         pretrain_samples)
    import itertools
    batches = list(itertools.islice(iter(stream), 40))
    assert [b.decoder for b in batches[:4]] == ["a", "b", "a", "b"]  # round-robin over decoders
    for name in ("a", "b"):
        tasks = [b.task for b in batches if b.decoder == name]
        assert tasks.count("reconstruction") == 5 and tasks.count("continuation") == 15
    recon = next(b for b in batches if b.task == "reconstruction")
    assert recon.target_ids == recon.context_ids and recon.marker == "reconstruction"
    with pytest.raises(ValueError, match="reconstruction_ratio"):
        DataConfig(reconstruction_ratio=1.5)


def test_pretrain_two_decoders_loss_decreases(setup, tmp_path):
    module, dm, _, _ = jobs.prepare_pretrain(pretrain_cfg(setup, tmp_path, decoders=("a", "b")))
    assert set(module.model.projectors.keys()) == {"a", "b"}
    # Decoders are plain attributes: not in the trained state, never trainable.
    assert not any(k.startswith("decoders") for k in module.state_dict())
    assert all(not p.requires_grad for d in module.decoders.values() for p in d.parameters())
    batch = first_batch(dm)
    losses = steps_on_fixed_batch(module, batch)
    assert losses[-1] < losses[0] - 0.1, losses


def test_adapt_trains_only_the_new_projector(setup, tmp_path):
    root, _, decs, _ = setup
    cfg = pretrain_cfg(setup, tmp_path, steps=3)
    line = jobs.pretrain(cfg)
    assert line.startswith("pretrain done: 3 steps")
    ckpt = tmp_path / "ckpt" / "t"
    acfg = AdaptConfig(from_checkpoint=str(ckpt), decoder=DecoderConfig(name="b", path=decs["b"], projector=ProjectorOptions(hidden_dim=16)),
                           data=cfg.data, optim=OptimConfig(lr=3e-3, warmup_steps=0),
                           trainer=replace(cfg.trainer, max_steps=3), run=replace(cfg.run, name="adapt"))
    module, dm, _, _ = jobs.prepare_adapt(acfg)
    proj_b = module.model.projector("b")
    assert module.num_trainable_parameters() == proj_b.num_parameters()
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    losses = steps_on_fixed_batch(module, first_batch(dm), n=6)
    assert losses[-1] < losses[0], losses
    changed = {k for k, v in module.model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("projectors.b.") for k in changed), changed
    assert "projectors.b.special_tokens" in changed
    # Full job: exports a copy of the checkpoint plus projector b; the source is untouched.
    line = jobs.adapt(replace(acfg, run=replace(acfg.run, name="adapt2")))
    assert "trainable parameters" in line
    from arc_encoder import ARCModel
    out = ARCModel.from_pretrained(tmp_path / "ckpt" / "adapt2")
    assert set(out.projectors.keys()) == {"a", "b"}
    assert set(ARCModel.from_pretrained(ckpt).projectors.keys()) == {"a"}


def test_finetune_loss_on_answer_decreases(setup, tmp_path):
    root, _, decs, _ = setup
    cfg = pretrain_cfg(setup, tmp_path, steps=1)
    jobs.pretrain(cfg)
    data = replace(cfg.data, train_files=[str(root / "qa.jsonl")], validation_files=[str(root / "qa.jsonl")])
    fcfg = FinetuneConfig(from_checkpoint=str(tmp_path / "ckpt" / "t"), decoders=cfg.decoders, data=data,
                              optim=OptimConfig(lr=3e-3, warmup_steps=0), trainer=cfg.trainer,
                              run=replace(cfg.run, name="ft"))
    module, dm, _, _ = jobs.prepare_finetune(fcfg)
    batch = first_batch(dm)
    assert batch.task == "qa" and batch.target_ids == batch.continuation_ids
    losses = steps_on_fixed_batch(module, batch)
    assert losses[-1] < losses[0] - 0.1, losses


def test_resume_reproduces_steps_optimizer_and_losses(setup, tmp_path):
    straight = pretrain_cfg(setup, tmp_path, steps=6, name="straight")
    jobs.pretrain(straight)
    half = pretrain_cfg(setup, tmp_path, steps=3, name="resumed")
    half.optim.total_steps = 6  # "killed" at step 3 of a 6-step schedule
    jobs.pretrain(half)
    with pytest.raises(FileExistsError, match="--run.resume"):
        jobs.pretrain(half)
    jobs.pretrain(replace(half, trainer=replace(half.trainer, max_steps=6), run=replace(half.run, resume=True)))
    a = torch.load(tmp_path / "runs/straight/checkpoints/last.ckpt", weights_only=False)
    b = torch.load(tmp_path / "runs/resumed/checkpoints/last.ckpt", weights_only=False)
    assert a["global_step"] == b["global_step"] == 6
    assert a["arc_next_batch_index"] == b["arc_next_batch_index"] == 6
    assert b["arc_train_losses"] == pytest.approx(a["arc_train_losses"], abs=1e-5)
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][k], v, atol=1e-5, rtol=1e-4)
    sa, sb = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert int(sa[k]["step"]) == int(sb[k]["step"]) == 6
        torch.testing.assert_close(sb[k]["exp_avg_sq"], sa[k]["exp_avg_sq"], atol=1e-7, rtol=1e-3)
    metrics = (tmp_path / "runs/resumed/logs/metrics.csv").read_text()
    assert "val/loss_compressed" in metrics and "val/recon_acc" in metrics and "val/loss_full" in metrics


def test_bad_configs_fail_before_training(setup, tmp_path):
    from arc_encoder_train.config import preset_path

    root, _, decs, tok = setup
    cfg = pretrain_cfg(setup, tmp_path)
    missing = replace(cfg, decoders=[DecoderConfig(name="a", path=str(tmp_path / "nope"))])
    with pytest.raises(FileNotFoundError, match="decoder 'a'.*nope does not exist"):
        jobs.prepare_pretrain(missing)
    wrong = save_decoder(tmp_path / "wrong", tok, vocab=len(tok) + 7)
    with pytest.raises(ValueError, match="decoder 'w'.*mismatched tokenizer"):
        jobs.prepare_pretrain(replace(cfg, decoders=[DecoderConfig(name="w", path=wrong)]))
    with pytest.raises(FileNotFoundError, match="data file"):
        jobs.prepare_pretrain(replace(cfg, data=replace(cfg.data, train_files=[str(tmp_path / "x.jsonl")])))
    assert not (tmp_path / "runs" / "t").exists()  # nothing written before the checks pass
    assert cli.main(["pretrain", "--config", str(preset_path("tiny")), "--data.no_such_key", "1"]) != 0


def _paper_config(setup, tmp_path, name: str, extra=()) -> Path:
    """A packaged paper config with its placeholders pointed at the tiny stand-ins."""
    import yaml
    root, enc, decs, _ = setup
    text = (Path(jobs.__file__).parent / "configs" / name).read_text()
    for placeholder, real in (("/models/Llama-3.2-3B", enc), ("/models/Llama-3.1-8B", decs["a"]),
                              ("/models/Mistral-7B-v0.3", decs["b"]), *extra):
        assert placeholder in text or placeholder == "/models/Llama-3.2-3B"  # the encoder: pretrain only
        text = text.replace(placeholder, real)
    data = yaml.safe_load(text)
    data["run"]["runs_dir"] = str(tmp_path / "runs")
    data["run"]["checkpoints_dir"] = str(tmp_path / "ckpt")
    patched = tmp_path / name
    patched.write_text(yaml.safe_dump(data))
    return patched


def test_paper_configs_build_with_tiny_stand_ins(setup, tmp_path):
    """paper_fsdp.yaml (pretrain at x8) and paper_finetune_arc4.yaml (fine-tune at x4: ARC4)."""
    root = setup[0]
    patched = _paper_config(setup, tmp_path, "paper_fsdp.yaml", (
        ("/data/pretrain/train.jsonl", str(root / "train.jsonl.gz")),
        ("/data/pretrain/validation.jsonl", str(root / "validation.jsonl.gz"))))
    job, cfg = cli.parse(["pretrain", "--config", str(patched), "--encoder.layers_removed", "1"])
    assert cfg.trainer.strategy == "fsdp" and cfg.trainer.precision == "bf16-mixed" and cfg.trainer.devices == 8
    assert [d.name for d in cfg.decoders] == ["llama3_8b", "mistral_7b"]
    # Table 10 and the reference's pretraining config
    o, d = cfg.optim, cfg.data
    assert (o.lr, o.max_projector_lr, o.weight_decay, o.warmup_steps, o.initial_lr, o.final_lr, o.anneal) == (
        1e-5, pytest.approx(5e-5), 0.1, 1000, 1e-20, 1e-10, "cos")
    assert (d.context_tokens, d.target_tokens, d.batch_size, d.reconstruction_ratio) == (256, 256, 16, 0.2)
    assert [spec.projector.bos for spec in cfg.decoders] == ["reference", "reference"]  # repo: no BOS before windows
    assert (cfg.encoder.pooling_factor, cfg.trainer.max_steps, cfg.trainer.gradient_clip_val) == (8, 80000, 1.0)
    module, dm, _, _ = jobs.prepare_pretrain(cfg)
    assert set(module.model.projectors.keys()) == {"llama3_8b", "mistral_7b"}
    assert module.decoders["llama3_8b"].dtype == torch.bfloat16
    assert module.model.projector("mistral_7b").config.hidden_dim == 2048
    # Stage 2: the pretrain export fine-tuned at x4.
    small = replace(cfg, trainer=replace(cfg.trainer, max_steps=1, accelerator="cpu", devices=1, strategy="auto",
                                         precision="32-true", progress_bar=False), optim=replace(cfg.optim, warmup_steps=0),
                    data=replace(cfg.data, context_tokens=12, target_tokens=6, batch_size=2, val_batches=1))
    small.decoders = [replace(x, dtype="float32", projector=replace(x.projector, hidden_dim=16)) for x in cfg.decoders]
    jobs.pretrain(small)
    ft = _paper_config(setup, tmp_path, "paper_finetune_arc4.yaml", (
        ("/data/finetune/train.jsonl", str(root / "qa.jsonl")), ("/data/finetune/validation.jsonl", str(root / "qa.jsonl")),
        ("checkpoints/paper-fsdp", str(tmp_path / "ckpt" / "paper-fsdp"))))
    _, fcfg = cli.parse(["finetune", "--config", str(ft)])
    o = fcfg.optim
    assert (fcfg.pooling_factor, o.lr, o.max_projector_lr, o.weight_decay, o.warmup_steps, o.final_lr) == (
        4, 2e-6, 3e-5, 0.05, 50, 1e-8)
    assert (fcfg.trainer.max_steps, fcfg.data.batch_size, fcfg.data.max_context_tokens) == (8000, 8, 2048)
    module, _, _, _ = jobs.prepare_finetune(fcfg)
    assert module.model.config.encoder.pooling_factor == 4 and module.model.encoder.config.pooling_factor == 4
    assert module.model.compress([list(range(5, 21))], "llama3_8b").lengths.tolist() == [4]  # 16 tokens at x4


def test_optimizer_follows_the_reference(setup, tmp_path):
    """AdamW groups (encoder + special tokens at lr, projectors at 5x), weight decay on every
    trained tensor, and torch's OneCycleLR with the reference's arguments, against the
    one-cycle formula written out here."""
    import math

    cfg = pretrain_cfg(setup, tmp_path, decoders=("a", "b"), steps=40)
    cfg.optim = OptimConfig(lr=2e-3, warmup_steps=10, initial_lr=1e-6, final_lr=1e-5)
    module, _, _, _ = jobs.prepare_pretrain(cfg)
    conf = module.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    enc, proj = opt.param_groups
    model = module.model
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    specials = ids(p.special_tokens for p in model.projectors.values())
    assert ids(enc["params"]) == ids(model.encoder.parameters()) | specials
    assert ids(proj["params"]) == ids(model.projectors.parameters()) - specials
    assert enc["weight_decay"] == proj["weight_decay"] == 0.1 and enc["eps"] == 1e-8 and enc["betas"][1] == 0.95

    def one_cycle(step, top, total=40, warm=10):
        start, low = top / (2e-3 / 1e-6), top / (2e-3 / 1e-6) / (2e-3 / 1e-5)
        anneal = lambda a, b, pct: b + (a - b) / 2 * (1 + math.cos(math.pi * pct))  # noqa: E731
        end_warm = warm - 1
        if step <= end_warm:
            return anneal(start, top, step / end_warm)
        return anneal(top, low, (step - end_warm) / (total - 1 - end_warm))

    for step in range(40):
        assert enc["lr"] == pytest.approx(one_cycle(step, 2e-3), rel=1e-9), step
        assert proj["lr"] == pytest.approx(one_cycle(step, 1e-2), rel=1e-9), step
        if step in (0, 9, 39):  # torch's momentum cycle, which the reference keeps: beta1 0.95 -> 0.85 -> 0.95
            assert enc["betas"][0] == pytest.approx({0: 0.95, 9: 0.85, 39: 0.95}[step])
        opt.step()
        sched.step()
    with pytest.raises(ValueError, match="optim.total_steps=20 is shorter than trainer.max_steps=40"):
        jobs.prepare_pretrain(replace(cfg, optim=replace(cfg.optim, total_steps=20)))
    with pytest.raises(ValueError, match="warmup_steps=40 must be < the schedule's 40 steps"):
        jobs.prepare_pretrain(replace(cfg, optim=replace(cfg.optim, warmup_steps=40)))
    assert OptimConfig(lr=1e-4, projector_lr=7e-4).max_projector_lr == 7e-4


def test_token_cache_returns_tokenizer_ids_and_respects_its_bound():
    from arc_encoder.tiny import train_tokenizer
    from arc_encoder_train.data import TokenCache

    tok = train_tokenizer(["hello world, hello tokens"] * 3, vocab_size=280)
    cache = TokenCache(max_tokens=4)
    ids = tok("hello world", add_special_tokens=False)["input_ids"]
    assert cache(tok, "hello world") == ids == cache(tok, "hello world")
    assert cache.held(tok) == (len(ids) if len(ids) <= 4 else 0)
    long = "hello tokens hello world hello"
    assert cache(tok, long) == tok(long, add_special_tokens=False)["input_ids"]  # over the bound: not stored
    assert cache.held(tok) <= 4
    other = train_tokenizer(["completely different text here"] * 3, vocab_size=270)
    assert cache(other, "hello world") == other("hello world", add_special_tokens=False)["input_ids"]


def test_batches_are_not_walked_on_transfer():
    """Lightning's default transfer walks every token list (slow); ours hands the Batch over as is."""
    import torch

    from lightning.pytorch import LightningModule

    from arc_encoder.samples import Batch
    from arc_encoder_train.data import ARCDataModule
    from arc_encoder_train.module import ARCTrainingModule

    batch = Batch("d", "continuation", [[1, 2]], [[1, 2]], [[]], [[3]], [[1]])
    assert ARCDataModule.transfer_batch_to_device(None, batch, torch.device("cpu"), 0) is batch
    # Only the data module has the hook: overriding it on the module too makes Lightning warn on every run.
    assert ARCTrainingModule.transfer_batch_to_device is LightningModule.transfer_batch_to_device


def test_mixed_pooling_pretrain_draws_factors_and_saves_them(setup, tmp_path):
    from arc_encoder.model import ARCModel

    cfg = pretrain_cfg(setup, tmp_path, steps=3, name="mixed")
    cfg.encoder.pooling_factors = [2, 3, 5]
    module, dm, _, export_dir = jobs.prepare_pretrain(cfg)
    batch = first_batch(dm)
    module._move_decoders()
    module.training_step(batch, 0)
    assert len(batch.pooling_factors) == len(batch) and set(batch.pooling_factors) <= {2, 3, 5}
    jobs.pretrain(replace(cfg, run=replace(cfg.run, name="mixed-run")))
    model = ARCModel.from_pretrained(tmp_path / "ckpt" / "mixed-run")
    assert model.encoder.config.pooling_factors == (2, 3, 5)
    assert model.compress([[5] * 15], "a", pooling_factors=[[5]]).lengths.tolist() == [3]
    bad = pretrain_cfg(setup, tmp_path, name="bad")
    bad.encoder.pooling_factors = [3, 5]  # the default factor 2 must be one of them
    with pytest.raises(ValueError, match="must be one of"):
        jobs.prepare_pretrain(bad)


def test_pretrain_continues_from_a_checkpoint(setup, tmp_path):
    """`pretrain --from_checkpoint`: the run starts from the checkpoint's encoder and projectors (a decoder it
    lacks gets a new projector) and exports a new checkpoint; the source is untouched."""
    from arc_encoder import ARCModel

    cfg = pretrain_cfg(setup, tmp_path, steps=3)
    jobs.pretrain(cfg)
    source = tmp_path / "ckpt" / "t"
    before = ARCModel.from_pretrained(source)
    root, _, decs, _ = setup
    more = replace(cfg, from_checkpoint=str(source), run=replace(cfg.run, name="t2"),
                   decoders=cfg.decoders + [DecoderConfig(name="b", path=decs["b"], projector=ProjectorOptions(hidden_dim=16))])
    module, _, _, _ = jobs.prepare_pretrain(more)
    start = module.model.state_dict()
    for key, value in before.state_dict().items():
        assert torch.equal(start[key], value), key  # the checkpoint's weights, not a fresh encoder
    assert set(module.model.projectors.keys()) == {"a", "b"}
    line = jobs.pretrain(replace(more, run=replace(more.run, name="t3")))
    assert line.startswith("pretrain done: 3 steps")
    after = ARCModel.from_pretrained(tmp_path / "ckpt" / "t3")
    assert any(not torch.equal(after.state_dict()[k], v) for k, v in before.state_dict().items())
    assert set(ARCModel.from_pretrained(source).projectors.keys()) == {"a"}


def test_known_model_paths_resolve_to_their_conversion(monkeypatch, tmp_path):
    import arc_encoder.gguf as gguf

    monkeypatch.setattr(gguf, "ensure_converted", lambda model: tmp_path / model.name)
    assert jobs.resolve_path("known:smollm2-135m", RunConfig()) == str(tmp_path / "smollm2-135m")
    with pytest.raises(ValueError, match="not a known model; known: known:smollm2-135m"):
        jobs.resolve_path("known:llama-70b", RunConfig())
