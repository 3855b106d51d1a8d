"""Multi-process training and cache builds with 2 CPU ranks (gloo), checked against one process.

One launch serves every end-to-end test: tests/multigpu_driver.py runs a plan of real commands
in 2 processes started by Lightning's DDP launcher (exactly as `arc-encoder-train pretrain
--trainer.devices 2 --trainer.strategy ddp` starts them), while this process computes the
single-process references at the same global batch. Tiny configs, a few steps each.
"""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from arc_encoder import ARCModel
from arc_encoder.cache.build import build_cache
from arc_encoder_train import jobs
from arc_encoder_train.config import DataConfig, TinyLMConfig
from arc_encoder_train.data import BatchStream, DataPosition, DataRank, DecoderTokenizers, pretrain_samples, qa_samples
from arc_encoder_train.distributed import check_agreement, launched_as_rank_zero
from arc_encoder_train.runs import config_dict
from arc_encoder_train.lm import _TokenBlocks
from conftest import TEXT, make_model
from test_cache_predict import files_of
from test_train import pretrain_cfg, setup  # noqa: F401 - setup is the module fixture (tiny LMs + corpus)

DRIVER = Path(__file__).parent / "multigpu_driver.py"
PER_DEVICE, WORLD = 3, 2


# ---------------------------------------------------------------------------- in-process checks
@pytest.mark.parametrize("env, zero", [
    ({}, True),
    ({"LOCAL_RANK": "1", "NODE_RANK": "0", "WORLD_SIZE": "2"}, False),  # Lightning's re-launched rank
    ({"NODE_RANK": "1"}, False),  # Lightning's launcher, second node
    ({"RANK": "0", "LOCAL_RANK": "0", "GROUP_RANK": "0"}, True),  # torchrun rank 0
    ({"RANK": "5", "LOCAL_RANK": "1", "GROUP_RANK": "2"}, False),  # torchrun
    ({"SLURM_PROCID": "3"}, False),  # srun task
    ({"SLURM_PROCID": "0", "LOCAL_RANK": "1"}, False),  # Lightning's launcher inside an srun task
])
def test_launched_as_rank_zero_reads_every_launcher(monkeypatch, env, zero):
    for name in ("RANK", "SLURM_PROCID", "GROUP_RANK", "NODE_RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert launched_as_rank_zero() is zero


def _ids(batches) -> list:
    return [ids for b in batches for ids in b.encoder_ids]


def test_rank_slices_partition_every_stream_and_resume_across_world_sizes(setup):
    root, _, _, tok = setup
    decs = [DecoderTokenizers("a", tok, True), DecoderTokenizers("b", tok, True)]
    spec = DataConfig(train_files=[str(root / "train.jsonl.gz")], context_tokens=8, target_tokens=4, batch_size=2,
                    shuffle_buffer=4, num_workers=0)

    def stream(world, rank, batch_size, start=0, sample_fn=pretrain_samples, qa=False, n=6):
        s = BatchStream(replace(spec, batch_size=batch_size), decs, tok, sample_fn, qa, start, DataRank(rank, world))
        it = iter(s)
        return [next(it) for _ in range(n)]

    single = stream(1, 0, 6)
    ranks = [stream(3, r, 2) for r in range(3)]
    for i, batch in enumerate(single):
        parts = [rank_batches[i] for rank_batches in ranks]
        assert {(p.index, p.decoder, p.task) for p in parts} == {(batch.index, batch.decoder, batch.task)}
        assert [p.meta["offset"] for p in parts] == [0, 2, 4] and parts[0].encoder_ids != parts[1].encoder_ids
        assert _ids(parts) == batch.encoder_ids  # disjoint slices whose union is the global batch
    # A position saved by 3 processes resumes on 2 processes at the same sample of each decoder.
    pos = DataPosition()
    for b in ranks[0][:3]:
        pos.advance(b)
    assert pos.to_dict() == {"batch": 3, "samples": {"a": 12, "b": 6}}
    resumed = [stream(2, r, 3, start=pos, n=2) for r in range(2)]
    assert _ids([resumed[0][0], resumed[1][0]]) == single[3].encoder_ids
    assert DataPosition(3, None).samples_used(["a", "b"], 6) == {"a": 12, "b": 6}  # older checkpoints
    # QA (finetune) streams are sharded the same way.
    qa = DataConfig(train_files=[str(root / "qa.jsonl")], batch_size=3, num_workers=0, shuffle_buffer=4)
    qa_single = iter(BatchStream(replace(qa, batch_size=6), decs[:1], tok, qa_samples, True))
    qa_ranks = [iter(BatchStream(qa, decs[:1], tok, qa_samples, True, 0, DataRank(r, 2))) for r in range(2)]
    for _ in range(3):
        assert _ids([next(qa_ranks[0]), next(qa_ranks[1])]) == next(qa_single).encoder_ids
    # The lm job's token blocks too.
    lm = TinyLMConfig(seq_len=15, batch_size=2)
    blocks = [iter(_TokenBlocks(spec, tok, lm, DataRank(r, 2))) for r in range(2)]
    whole = iter(_TokenBlocks(spec, tok, replace(lm, batch_size=4)))
    for _ in range(3):
        assert torch.equal(torch.cat([next(blocks[0]), next(blocks[1])]), next(whole))


def test_check_agreement_names_the_disagreeing_rank():
    same = {"config": "c1", "step": 4, "data": {"batch": 4, "samples": {"a": 12}}}
    check_agreement([same, dict(same)])
    with pytest.raises(RuntimeError, match=r"rank 1: .*'step': 2.*same command"):
        check_agreement([same, {**same, "step": 2}])


# ---------------------------------------------------------------------------- one launch, 2 ranks
def _torch_load(path: Path) -> dict:
    return torch.load(path, weights_only=False, map_location="cpu")


@pytest.fixture(scope="module")
def runs(setup, tmp_path_factory):
    """Starts the 2-rank driver, computes the single-process references meanwhile, then waits.

    Plan (every command the real CLI entry point, the same two processes throughout):
      fsdp         --trainer.strategy fsdp with activation checkpointing, 1 of 4 steps
      fsdp-resume  --run.resume to step 2, validation, export
      ddp          pretrain for 4 steps, 2 decoders, 2 loader workers per rank, crashing on both
                   ranks before step 3 (after the step-2 checkpoint), which is then copied
      ddp-resume   --run.resume from that checkpoint to step 4, validation
      cache        arc-encoder-train cache-build --devices 2 --strategy ddp
      fail         pretrain whose training file is missing on rank 1 only
    """
    tmp = tmp_path_factory.mktemp("multigpu")
    started = time.perf_counter()
    base = pretrain_cfg(setup, tmp, decoders=("a", "b"), steps=4, ratio=0.5, name="ddp")
    base.optim.total_steps = 4
    base.trainer = replace(base.trainer, devices=WORLD, strategy="ddp", val_check_interval=4,
                           checkpoint_every_n_steps=2)
    base.data = replace(base.data, batch_size=PER_DEVICE, num_workers=2)
    (tmp / "base.yaml").write_text(json.dumps(config_dict("pretrain", base)))  # JSON is YAML
    model, _ = make_model(tokenizer=setup[3], vocab_size=len(setup[3]), dec_vocab=len(setup[3]), chunk_len=16)
    cache_ckpt = model.save_pretrained(tmp / "cache_ckpt")
    words = TEXT.split()
    (tmp / "docs.jsonl").write_text("".join(json.dumps({"id": f"d{i}", "text": " ".join(words[i : 4 + 6 * i])}) + "\n"
                                            for i in range(9)))
    train = ["pretrain", "--config", str(tmp / "base.yaml")]
    fsdp = [*train, "--trainer.strategy", "fsdp", "--run.name", "fsdp", "--encoder_build.gradient_checkpointing", "true",
            "--data.num_workers", "0", "--trainer.checkpoint_every_n_steps", "1", "--trainer.val_check_interval", "2"]
    cache = ["cache-build", str(cache_ckpt), "--decoder", "dec", "--corpus", str(tmp / "docs.jsonl"), "--docs-per-shard", "2",
             "--batch-size", "3", "--dtype", "bfloat16", "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp"]
    plan = {"out": str(tmp), "jobs": [
        {"name": "fsdp", "entry": "train", "argv": [*fsdp, "--trainer.max_steps", "1"]},
        {"name": "fsdp-resume", "entry": "train", "argv": [*fsdp, "--trainer.max_steps", "2", "--run.resume", "true"]},
        {"name": "ddp", "entry": "train", "argv": train, "crash_at_batch": 2, "expect_code": 2},
        {"name": "keep", "entry": "copy", "argv": [str(tmp / "runs/ddp"), str(tmp / "runs/ddp-step2")]},
        {"name": "ddp-resume", "entry": "train", "argv": [*train, "--run.resume", "true"]},
        {"name": "cache", "entry": "train", "argv": [*cache, "--output", str(tmp / "cache_ddp")]},
        {"name": "fail", "entry": "train", "argv": [*train, "--run.name", "fail"],
         "argv_rank1": [*train, "--run.name", "fail", "--data.train_files", f"[{tmp / 'missing.jsonl'}]"]},
    ]}
    (tmp / "plan.json").write_text(json.dumps(plan))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE",
                                                             "GROUP_RANK", "SLURM_PROCID", "MASTER_PORT")}
    proc = subprocess.Popen([sys.executable, str(DRIVER), str(tmp / "plan.json")], env=env, cwd=tmp,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)

    # Meanwhile, one process at the same global batch (and no loader workers): 4 steps
    # uninterrupted, and 2 of the same 4-step schedule. One thread: the ranks use the other cores.
    references, threads = time.perf_counter(), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = replace(base, data=replace(base.data, batch_size=PER_DEVICE * WORLD, num_workers=0),
                         trainer=replace(base.trainer, devices=1, strategy="auto"))
        jobs.pretrain(replace(single, run=replace(base.run, name="one-4")))
        jobs.pretrain(replace(single, trainer=replace(single.trainer, max_steps=2), run=replace(base.run, name="one-2")))
        _, dm, _, _ = jobs.prepare_pretrain(replace(single, run=replace(base.run, name="stream")))
        dm.trainer = None
        stream = iter(dm.train_dataloader())
        single_batches = [next(stream) for _ in range(4)]
        build_cache(cache_ckpt, "dec", tmp / "docs.jsonl", tmp / "cache_one", model=model.eval(), progress=False,
                    dtype="bfloat16", docs_per_shard=2, batch_size=3)
        references = time.perf_counter() - references
        _, err = proc.communicate(timeout=300)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver's own process group (both ranks)
        err = proc.communicate()[1]
        print(f"2-rank driver stopped; its stderr ends with:\n{err[-3000:]}")
        raise
    finally:
        torch.set_num_threads(threads)
    missing = [r for r in range(WORLD) if not (tmp / f"rank{r}.json").is_file()]
    assert not missing, f"ranks {missing} reported nothing; stderr ends with:\n{err[-3000:]}"
    ranks = [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(WORLD)]
    per_rank = [{j["name"]: j for j in r["jobs"]} for r in ranks]
    print(f"\n2 ranks + references: {time.perf_counter() - started:.1f} s (references {references:.1f} s), "
          f"CPU s per rank {[round(r['cpu_seconds'], 1) for r in ranks]}, rank 0 per command: "
          + ", ".join(f"{name} {job['seconds']} s" for name, job in per_rank[0].items()))
    return {"tmp": tmp, "code": proc.returncode, "stderr": err, "jobs": per_rank, "single_batches": single_batches}


def _job(runs, name: str, rank: int = 0, code: int = 0) -> dict:
    job = runs["jobs"][rank].get(name)
    assert job is not None and job["code"] == code, (name, rank, job, runs["stderr"][-3000:])
    return job


def test_ranks_train_on_disjoint_slices_whose_union_is_the_single_process_stream(runs):
    """Test 1: rank r trains on samples [3r, 3r + 3) of every global batch of 6 (2 loader workers
    per rank), and the resumed run continues with global batches 2 and 3."""
    seen = [_job(runs, "ddp", r, code=2)["batches"] + _job(runs, "ddp-resume", r)["batches"] for r in range(WORLD)]
    single = runs["single_batches"]
    assert [b["index"] for b in seen[0]] == [b["index"] for b in seen[1]] == [0, 1, 2, 3]
    for i, batch in enumerate(single):
        parts = [seen[r][i] for r in range(WORLD)]
        assert [p["decoder"] for p in parts] == [batch.decoder] * WORLD  # round-robin, same on both ranks
        assert [p["offset"] for p in parts] == [0, PER_DEVICE]
        assert parts[0]["encoder_ids"] != parts[1]["encoder_ids"]  # not the same batch twice
        assert parts[0]["encoder_ids"] + parts[1]["encoder_ids"] == batch.encoder_ids


def _assert_same_training(got: dict, want: dict) -> None:
    assert got["global_step"] == want["global_step"]
    assert got["arc_data_position"] == want["arc_data_position"]
    assert got["arc_train_losses"] == pytest.approx(want["arc_train_losses"], abs=1e-5)
    assert got["state_dict"].keys() == want["state_dict"].keys()
    for k, v in want["state_dict"].items():
        torch.testing.assert_close(got["state_dict"][k], v, atol=1e-5, rtol=1e-4)
    sg, sw = got["optimizer_states"][0]["state"], want["optimizer_states"][0]["state"]
    assert sg.keys() == sw.keys()
    for k in sw:
        torch.testing.assert_close(sg[k]["exp_avg"], sw[k]["exp_avg"], atol=1e-6, rtol=1e-3)
        torch.testing.assert_close(sg[k]["exp_avg_sq"], sw[k]["exp_avg_sq"], atol=1e-8, rtol=1e-3)


def test_ddp_two_ranks_equal_one_process_at_the_same_global_batch(runs):
    """Test 2: after 2 steps, 2 ranks x 3 samples == 1 process x 6 samples (weights, Adam state,
    losses, data position); only rank 0 reports, and the run records its global batch."""
    tmp = runs["tmp"]
    _assert_same_training(_torch_load(tmp / "runs/ddp-step2/checkpoints/last.ckpt"),
                          _torch_load(tmp / "runs/one-2/checkpoints/last.ckpt"))
    assert _job(runs, "ddp-resume")["stdout"].startswith("pretrain done: 4 steps")
    assert "pretrain done" not in _job(runs, "ddp-resume", 1)["stdout"]
    first = json.loads((tmp / "runs/ddp/launches.json").read_text())["launches"][0]
    assert (first["world_size"], first["batch_size_per_device"], first["global_batch"]) == (WORLD, PER_DEVICE, 6)
    assert "global batch 6 = 3 per device x 2 x 1 accumulated" in runs["stderr"]


def test_ddp_resume_reproduces_the_uninterrupted_run(runs):
    """Test 3: crashed on both ranks before step 3 of 4 and resumed from last.ckpt (a new trainer
    and data stream; nothing else carries over), 2 ranks end where one uninterrupted process
    ends; rank 0 alone wrote the run directory."""
    tmp = runs["tmp"]
    assert "error: [rank 1] simulated crash before global batch 2" in runs["stderr"]
    _assert_same_training(_torch_load(tmp / "runs/ddp/checkpoints/last.ckpt"),
                          _torch_load(tmp / "runs/one-4/checkpoints/last.ckpt"))
    run = tmp / "runs/ddp"
    assert len(list(run.glob("config*.yaml"))) == 2  # config.yaml + one config.resume-<time>.yaml
    launches = json.loads((run / "launches.json").read_text())["launches"]
    assert [entry["resume"] for entry in launches] == [False, True]
    assert (run / "summary.txt").read_text().startswith("pretrain done: 4 steps")
    assert any("val/loss_compressed" in f.read_text() for f in run.glob("logs/**/metrics.csv"))
    assert ARCModel.from_pretrained(tmp / "ckpt/ddp").projectors.keys() == {"a", "b"}


def test_fsdp_trains_saves_resumes_and_exports(runs):
    """Test 4: FSDP (2 ranks, activation checkpointing) trains a step, saves a sharded
    checkpoint, resumes, and exports from_pretrained weights equal to one process's."""
    tmp = runs["tmp"]
    _job(runs, "fsdp")
    ckpt = tmp / "runs/fsdp/checkpoints/last.ckpt"
    assert ckpt.is_dir() and len(list(ckpt.glob("*.distcp"))) == WORLD  # one shard file per rank
    assert _job(runs, "fsdp-resume")["stdout"].startswith("pretrain done: 2 steps")
    meta = _torch_load(ckpt / "meta.pt")
    want = _torch_load(tmp / "runs/one-2/checkpoints/last.ckpt")
    assert meta["global_step"] == 2 and meta["arc_data_position"] == want["arc_data_position"]
    assert meta["arc_train_losses"] == pytest.approx(want["arc_train_losses"], abs=1e-5)
    got, ref = ARCModel.from_pretrained(tmp / "ckpt/fsdp"), ARCModel.from_pretrained(tmp / "ckpt/one-2")
    ref_state = ref.state_dict()
    for k, v in got.state_dict().items():
        torch.testing.assert_close(v, ref_state[k], atol=1e-5, rtol=1e-4)


def test_two_rank_cache_build_is_byte_identical(runs):
    """Test 5: arc-encoder-train cache-build on 2 ranks writes the single-process files."""
    _job(runs, "cache")
    got, want = files_of(runs["tmp"] / "cache_ddp"), files_of(runs["tmp"] / "cache_one")
    assert len(got) == 3 + 3 * 5 and got == want


def test_a_failure_on_one_rank_fails_the_run_with_its_error(runs):
    """Rank 1 lacks the training file: it exits 2 with an error naming its rank and the file,
    and Lightning's launcher then ends rank 0 (the run's exit status is not 0)."""
    fail = runs["jobs"][1]["fail"]
    assert fail["code"] == 2 and runs["code"] != 0
    assert "arc-encoder-train pretrain: error: [rank 1] data file" in runs["stderr"]
    assert "missing.jsonl" in runs["stderr"]
