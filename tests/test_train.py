"""train.py end to end on tiny models built from the fixtures, on CPU.
Run: python -m pytest -q tests/test_train.py

Single-process runs call train.main in this process; two-process runs launch
`python -m torch.distributed.run --standalone --nproc_per_node 2 train.py` (gloo)."""
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml
from safetensors.torch import load_file

from conftest import ROOT, load_script
from speechllm import checkpoint
from speechllm.audio import pad_batch
from speechllm.metrics import wer
from speechllm.model import SpeechLLM
from speechllm.train_config import ModelConfig

train = load_script("train")

TEXTS = ["hello world", "speech to text", "yeah", "this is a small test", "so i was", "okay", "speech to", "world this is"]
LABELS = ["COMPLETE", "INCOMPLETE", "BACKCHANNEL", "COMPLETE", "INCOMPLETE", "BACKCHANNEL", "INCOMPLETE", "COMPLETE"]


def speech_clips(root: Path, fixtures: Path) -> Path:
    """Eight 0.75 s slices of the fixture speech, all the same length: the log-mel frontend runs
    in float32 by design, and clips of equal length give bit-identical features in any batch, so
    the exactness tests measure the training loop and nothing else. Transcripts differ in length."""
    a0 = sf.read(fixtures / "audio_0.wav", dtype="float32")[0]
    a1 = sf.read(fixtures / "audio_1.wav", dtype="float32")[0]
    src = np.concatenate([a0, a1])
    rows = []
    (root / "clips").mkdir(parents=True, exist_ok=True)
    for i, (text, label) in enumerate(zip(TEXTS, LABELS)):
        sf.write(root / "clips" / f"s{i}.wav", src[i * 4000:i * 4000 + 12000], 16000)
        rows.append({"audio_filepath": f"clips/s{i}.wav", "text": text, "label": label})
    return write_manifest(root / "train.jsonl", rows)


def distinct_clips(root: Path, fixtures: Path) -> Path:
    """Six clips that a frozen random encoder tells apart: speech, tones, noise, a chirp, a square wave."""
    t = np.arange(12000) / 16000
    noise = np.random.default_rng(0).standard_normal(12000)
    signals = [sf.read(fixtures / "audio_0.wav", dtype="float32")[0][4000:16000], 0.3 * np.sin(2 * np.pi * 300 * t),
               0.1 * noise, 0.3 * np.sin(2 * np.pi * 2500 * t), 0.3 * np.sin(2 * np.pi * (200 + 3000 * t) * t),
               0.2 * np.sign(np.sin(2 * np.pi * 120 * t))]
    labels = ["COMPLETE", "COMPLETE", "INCOMPLETE", "INCOMPLETE", "BACKCHANNEL", "BACKCHANNEL"]
    (root / "clips").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (x, label) in enumerate(zip(signals, labels)):
        sf.write(root / "clips" / f"d{i}.wav", np.asarray(x, np.float32), 16000)
        rows.append({"audio_filepath": f"clips/d{i}.wav", "text": "x", "label": label})
    return write_manifest(root / "distinct.jsonl", rows)


def write_manifest(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_config(path: Path, fixtures: Path, manifest: Path, out_dir: Path, **sections) -> Path:
    """A tiny-model config; keyword arguments update its sections (one level deep)."""
    cfg = {
        "model": {"pretrained_asr": str(fixtures / "asr_ctc.nemo"), "pretrained_llm": str(fixtures / "llm_hf"),
                  "projector": {"dropout": 0.0}, "freeze": "encoder_frozen"},
        "trainer": {"out_dir": str(out_dir), "max_steps": 3, "precision": "fp64", "log_every_n_steps": 1,
                    "val_check_interval": 0, "save_every_n_steps": 3, "keep_last": 10, "progress_bar": False,
                    "tensorboard": False, "max_new_tokens": 4},
        "data": {"task": "turntaking",
                 "train_ds": {"manifest_filepath": str(manifest), "batch_size": 4, "num_workers": 0,
                              "weighted_sampling": True}},
        "optim": {"lr": 1e-3, "sched": {"name": "cosine", "warmup_steps": 1, "min_lr": 1e-5}},
    }
    for section, values in sections.items():
        cfg[section].update(values)
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(*argv: str) -> int:
    """train.main in this process. One thread: tiny models gain nothing from a second, and on a
    busy 2-core machine two OpenMP threads can wait on each other for milliseconds per op."""
    torch.set_num_threads(1)
    return train.main([str(a) for a in argv])


def torchrun(config: Path, *overrides: str, timeout: int = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train.py"), "--config", str(config), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def weights(step_dir: Path) -> dict:
    return load_file(step_dir / "model.safetensors")


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def records(out_dir: Path, split: str) -> list[dict]:
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


# -----------------------------------------------------------------------------
# exactness: one process, accumulation, two processes (fp64, dropout off, encoder frozen so that
# BatchNorm uses its running statistics: batch statistics differ with the batch split by design)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, fixtures):
    """One process, a batch of 4, 3 steps: the run the others must reproduce."""
    root = tmp_path_factory.mktemp("exact")
    manifest = speech_clips(root, fixtures)
    config = write_config(root / "exact.yaml", fixtures, manifest, root / "ref")
    assert run("--config", config) == 0
    return config, root, weights(root / "ref" / "step_3")


def test_accumulating_2x2_equals_a_batch_of_4(reference):
    config, root, ref = reference
    out = root / "accum"
    assert run("--config", config, f"trainer.out_dir={out}", "data.train_ds.batch_size=2",
               "trainer.accumulate_grad_batches=2") == 0
    err = max_diff(ref, weights(out / "step_3"))
    print(f"accumulation 2x2 vs batch 4: max |dparam| = {err:.2e}")
    assert err < 1e-6


def test_two_processes_equal_one_at_the_same_global_batch(reference):
    config, root, ref = reference
    out = root / "ddp"
    torchrun(config, f"trainer.out_dir={out}", "data.train_ds.batch_size=2")
    err = max_diff(ref, weights(out / "step_3"))
    print(f"DDP 2 x 2 vs 1 x 4: max |dparam| = {err:.2e}")
    assert err < 1e-5
    # The logged global loss is the same number too.
    ref_loss = [r["loss"] for r in records(root / "ref", "train")]
    assert np.allclose([r["loss"] for r in records(out, "train")], ref_loss, rtol=1e-6)


def test_logged_losses_are_means_over_the_log_interval(reference):
    """log_every_n_steps 3 logs once, at step 3: the tag loss is the mean of the three steps' (one
    process, one micro-batch each), the loss their token-weighted mean, strictly between the
    smallest and the largest (the transcripts differ in length), not the last step's alone."""
    config, root, _ = reference
    out = root / "window"
    assert run("--config", config, f"trainer.out_dir={out}", "trainer.log_every_n_steps=3") == 0
    steps, (logged,) = records(root / "ref", "train"), records(out, "train")
    assert [r["step"] for r in steps] == [1, 2, 3] and logged["step"] == 3
    assert logged["tag_loss"] == pytest.approx(np.mean([r["tag_loss"] for r in steps]), rel=1e-12)
    losses = [r["loss"] for r in steps]
    assert min(losses) < logged["loss"] < max(losses) and logged["loss"] != pytest.approx(losses[-1], rel=1e-9)


def test_two_processes_with_accumulation_and_zero_optimizer(reference):
    """2 ranks x 2 micro-steps (no_sync on the first) x batch 1, optimizer state sharded."""
    config, root, ref = reference
    out = root / "zero"
    torchrun(config, f"trainer.out_dir={out}", "data.train_ds.batch_size=1", "trainer.accumulate_grad_batches=2",
             "trainer.zero_optimizer=true", "trainer.save_every_n_steps=2", "trainer.max_steps=3")
    err = max_diff(ref, weights(out / "step_3"))
    print(f"DDP + ZeRO 2 x 2 x 1 vs 1 x 4: max |dparam| = {err:.2e}")
    assert err < 1e-5
    state = checkpoint.load_state(out / "step_2")  # consolidated from both ranks' shards
    n_trainable = sum(1 for g in state["optimizer"]["param_groups"] for _ in g["params"])
    assert len(state["optimizer"]["state"]) == n_trainable and len(state["rng"]) == 2


# -----------------------------------------------------------------------------
# resume (fp32, dropout on, BatchNorm training, DataLoader workers: the RNG and data position matter)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, fixtures):
    root = tmp_path_factory.mktemp("resume")
    manifest = speech_clips(root, fixtures)
    config = write_config(root / "resume.yaml", fixtures, manifest, root / "full",
                          model={"freeze": "all_trainable", "projector": {"dropout": 0.1}},
                          trainer={"precision": "fp32", "max_steps": 4, "save_every_n_steps": 2, "val_check_interval": 2},
                          data={"task": "turntaking", "validation_ds": {"manifest_filepath": str(manifest), "batch_size": 4,
                                                                        "num_workers": 0},
                                "train_ds": {"manifest_filepath": str(manifest), "batch_size": 3, "num_workers": 1,
                                             "weighted_sampling": True}})
    assert run("--config", config) == 0
    return config, root


def resume_from_step_2(config: Path, full: Path, out: Path) -> float:
    """Copy full/step_2 into a fresh out, resume there to step 4 -> max |dparam| against full/step_4."""
    out.mkdir()
    shutil.copytree(full / "step_2", out / "step_2")
    assert run("--config", config, f"trainer.out_dir={out}", "--resume", "auto") == 0
    return max_diff(weights(full / "step_4"), weights(out / "step_4"))


def test_resume_from_step_k_equals_the_uninterrupted_run(uninterrupted):
    config, root = uninterrupted
    out = root / "resumed"
    err = resume_from_step_2(config, root / "full", out)
    print(f"resume at step 2 vs uninterrupted, step 4: max |dparam| = {err:.2e}")
    assert err <= 1e-6
    # the optimizer moments too
    a, b = checkpoint.load_state(root / "full" / "step_4"), checkpoint.load_state(out / "step_4")
    for k, s in a["optimizer"]["state"].items():
        assert torch.allclose(s["exp_avg_sq"], b["optimizer"]["state"][k]["exp_avg_sq"], rtol=0, atol=1e-12)
    assert (a["epoch"], a["position"]) == (b["epoch"], b["position"])


def test_resume_with_lora_tag_rows_and_speaker_kernels(tmp_path, fixtures):
    """The export holds merged weights; the training state keeps the adapters and the bases under
    them, so a resumed Stage-2 run (dropout in LoRA and the kernels) continues exactly."""
    manifest = speech_clips(tmp_path, fixtures)
    config = write_config(tmp_path / "stage2.yaml", fixtures, manifest, tmp_path / "full",
                          model={"freeze": "llm_and_projector", "speaker_kernels": {"layers": [0]},
                                 "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.1}},
                          trainer={"precision": "fp32", "max_steps": 4, "save_every_n_steps": 2})
    assert run("--config", config) == 0
    out = tmp_path / "resumed"
    err = resume_from_step_2(config, tmp_path / "full", out)
    print(f"Stage 2 with adapters, resume at step 2 vs uninterrupted: max |dparam| = {err:.2e}")
    assert err <= 1e-6
    extra = checkpoint.load_state(out / "step_4")["model_extra"]
    assert {k.rsplit(".", 1)[-1] for k in extra} == {"weight", "bias", "lora_A", "lora_B", "tag_delta"}
    assert not any(k.startswith(("encoder.", "projector.", "spk_kernels.")) for k in extra)


def test_sigkill_during_a_checkpoint_write_resumes_cleanly(uninterrupted):
    """The run dies half-way through writing step_4's trainer state; the partial folder is never
    taken for a checkpoint, and --resume auto continues from step_2 to the same weights."""
    config, root = uninterrupted
    out = root / "killed"
    script = textwrap.dedent(f"""
        import io, os, signal, sys, importlib.util, torch
        real_save = torch.save
        def dying_save(obj, f, *args, **kwargs):
            if "step_4" in str(f):
                buf = io.BytesIO(); real_save(obj, buf)
                with open(f, "wb") as fh:
                    fh.write(buf.getvalue()[: len(buf.getvalue()) // 2]); fh.flush(); os.fsync(fh.fileno())
                os.kill(os.getpid(), signal.SIGKILL)
            return real_save(obj, f, *args, **kwargs)
        torch.save = dying_save
        spec = importlib.util.spec_from_file_location("train_script", {str(ROOT / "train.py")!r})
        train = importlib.util.module_from_spec(spec); spec.loader.exec_module(train)
        sys.exit(train.main(["--config", {str(config)!r}, "trainer.out_dir={out}"]))
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == -9, r.stderr[-3000:]
    assert (out / ".step_4.tmp" / "trainer_state.pt").is_file() and not (out / "step_4").exists()
    assert checkpoint.latest(out) == out / "step_2"
    SpeechLLM.from_pretrained(out / "step_2")  # the surviving checkpoint loads as a model
    assert run("--config", config, f"trainer.out_dir={out}", "--resume", "auto") == 0
    assert not (out / ".step_4.tmp").exists()
    err = max_diff(weights(root / "full" / "step_4"), weights(out / "step_4"))
    print(f"killed at step 4's write, resumed from step 2: max |dparam| = {err:.2e}")
    assert err <= 1e-6


def test_checkpoints_are_kept_last_k_plus_best_and_refused_without_resume(uninterrupted):
    config, root = uninterrupted
    best = json.loads((root / "full" / "best.json").read_text())
    assert best["monitor"] == "macro_f1" and best["step"] in (2, 4)
    out = root / "prune"
    assert run("--config", config, f"trainer.out_dir={out}", "trainer.max_steps=6",
               "trainer.save_every_n_steps=1", "trainer.keep_last=2", "trainer.val_check_interval=0") == 0
    assert checkpoint.steps(out) == [5, 6]
    saved = yaml.safe_load((out / "step_6" / "config.yaml").read_text())
    assert saved["trainer"]["keep_last"] == 2  # the resolved config travels with the checkpoint
    assert run("--config", config, f"trainer.out_dir={out}") == 1  # would overwrite: refused


# -----------------------------------------------------------------------------
# stability, learning, data errors


def test_a_non_finite_loss_skips_the_step(tmp_path, fixtures, monkeypatch):
    manifest = speech_clips(tmp_path, fixtures)
    config = write_config(tmp_path / "nan.yaml", fixtures, manifest, tmp_path / "run",
                          trainer={"save_every_n_steps": 1, "max_bad_steps": 2})
    real_forward, calls = SpeechLLM.forward, []

    def forward(self, *args, **kwargs):
        loss, stats = real_forward(self, *args, **kwargs)
        calls.append(1)
        return (loss * float("nan") if len(calls) in bad else loss), stats

    monkeypatch.setattr(SpeechLLM, "forward", forward)
    bad = {2}
    assert run("--config", config) == 0
    w1, w2, w3 = (weights(tmp_path / "run" / f"step_{k}") for k in (1, 2, 3))
    assert max_diff(w1, w2) == 0.0 and max_diff(w2, w3) > 0  # step 2 skipped, step 3 trained
    assert [r["skipped"] for r in records(tmp_path / "run", "train")] == [0, 1, 1]
    bad, calls[:] = {1, 2, 3}, []
    assert run("--config", config, f"trainer.out_dir={tmp_path / 'stop'}") == 3  # 2 in a row: stop


def test_a_tiny_model_overfits_a_handful_of_clips(tmp_path, fixtures):
    """Stage-2 setup: LLM, projector and encoder frozen; the tag rows and LoRA learn (all clips
    right from about step 30). The exported checkpoint (adapters merged) predicts every tag.
    fp32, because what is tested is the recipe: a bf16 run's trajectory depends on the CPU's bf16
    kernels (on an AVX2-only CPU it ended at 5 of 6 clips), and bf16 training is tested against
    fp32 step by step below."""
    manifest = distinct_clips(tmp_path, fixtures)
    config = write_config(
        tmp_path / "overfit.yaml", fixtures, manifest, tmp_path / "run",
        model={"freeze": "llm_and_projector", "prompt": {"answer_format": "tag_only", "user": "<audio>"},
               "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0}},
        trainer={"precision": "fp32", "max_steps": 60, "save_every_n_steps": 60, "val_check_interval": 30},
        data={"task": "turntaking", "train_ds": {"manifest_filepath": str(manifest), "batch_size": 6, "num_workers": 0},
              "validation_ds": {"manifest_filepath": str(manifest), "batch_size": 6, "num_workers": 0}},
        optim={"lr": 3e-2, "sched": {"name": "cosine", "warmup_steps": 5, "min_lr": 1e-3}})
    assert run("--config", config) == 0
    dev = records(tmp_path / "run", "dev")[-1]
    assert dev["tag_accuracy"] == 1.0 and dev["macro_f1"] == 1.0
    model = SpeechLLM.from_pretrained(tmp_path / "run" / "step_60")
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    audio, lengths = pad_batch([sf.read(tmp_path / r["audio_filepath"], dtype="float32")[0] for r in rows])
    out = model.predict(audio, lengths, 1)
    assert [o["tag"] for o in out] == [f"<{r['label']}>" for r in rows]
    # the CTC head (frozen with the encoder) is scored on the same clips, whatever the answer format
    assert dev["ctc_wer"] == pytest.approx(wer([r["text"] for r in rows], [o["ctc_transcript"] for o in out]))


def test_bf16_autocast_follows_fp32_and_auto_says_what_it_chose(tmp_path, fixtures, capsys):
    """Three bf16-autocast steps give the fp32 run's losses within bf16 rounding (2^-8 relative per
    matmul input; 3 % leaves room for a few layers of it), on any CPU; the weights are not compared
    because Adam's first steps move every weight by about lr whatever its gradient's size, so a
    rounding flip of a tiny gradient's sign shows at full size. `precision: auto` runs what
    speechllm.precision measures as faster here, and says so."""
    manifest = distinct_clips(tmp_path, fixtures)
    losses, finals = {}, {}
    for precision in ("fp32", "bf16", "auto"):
        config = write_config(tmp_path / f"{precision}.yaml", fixtures, manifest, tmp_path / precision,
                              trainer={"precision": precision, "max_steps": 3, "save_every_n_steps": 3},
                              optim={"lr": 1e-3, "sched": {"name": "constant", "warmup_steps": 0}})
        assert run("--config", config) == 0
        losses[precision] = [r["loss"] for r in records(tmp_path / precision, "train")]
        finals[precision] = weights(tmp_path / precision / "step_3")
    assert len(losses["fp32"]) == 3 and losses["fp32"][2] < losses["fp32"][0]
    for bf16, fp32 in zip(losses["bf16"], losses["fp32"], strict=True):
        assert abs(bf16 - fp32) < 0.03 * fp32
    from speechllm.precision import fast_dtype
    chosen = "bf16" if fast_dtype("cpu") == torch.bfloat16 else "fp32"
    assert f"precision {chosen} (auto: " in capsys.readouterr().out
    assert max_diff(finals["auto"], finals[chosen]) == 0.0


def test_speaker_kernels_buckets_and_a_manifest_mixture(tmp_path, fixtures):
    """Kernels added to a fresh model and trained (llm_and_projector) from manifest speaker
    segments; duration buckets; two manifests drawn 70/30."""
    manifest = speech_clips(tmp_path, fixtures)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    for i, r in enumerate(rows):
        r["speakers"] = [[0.0, 0.4, "A"], [0.3, 0.75, "B"]] if i % 2 else []
        r["target_speaker"] = "B" if i % 4 == 1 else None
    first, second = write_manifest(tmp_path / "a.jsonl", rows[:5]), write_manifest(tmp_path / "b.jsonl", rows[5:])
    config = write_config(tmp_path / "spk.yaml", fixtures, first, tmp_path / "run",
                          model={"freeze": "llm_and_projector", "speaker_kernels": {"layers": [0, 1]}},
                          trainer={"precision": "fp32", "max_steps": 2, "save_every_n_steps": 2},
                          data={"task": "turntaking", "train_ds": {
                              "manifest_filepath": [str(first), str(second)], "probabilities": [0.7, 0.3],
                              "batch_size": 8, "batch_duration": 2.0, "bucket_duration_bins": [0.5, 1.0],
                              "num_workers": 0}})
    assert run("--config", config) == 0
    model = SpeechLLM.from_pretrained(tmp_path / "run" / "step_2")
    assert model.cfg.speaker.layers == (0, 1)
    w = weights(tmp_path / "run" / "step_2")
    assert w["spk_kernels.1.3.weight"].abs().sum() > 0  # zero-initialised, so it learned
    assert records(tmp_path / "run", "train")[-1]["skipped"] == 0


def test_a_bad_manifest_line_stops_the_run_before_training(tmp_path, fixtures, capsys):
    manifest = speech_clips(tmp_path, fixtures)
    lines = manifest.read_text().splitlines()
    lines[4] = json.dumps({"audio_filepath": "clips/missing.wav", "text": "x", "label": "COMPLETE"})
    manifest.write_text("\n".join(lines) + "\n")
    config = write_config(tmp_path / "bad.yaml", fixtures, manifest, tmp_path / "run")
    assert run("--config", config) == 1
    assert f"{manifest}:5: audio file" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_config_errors_and_help(tmp_path, fixtures, capsys):
    config = write_config(tmp_path / "c.yaml", fixtures, tmp_path / "m.jsonl", tmp_path / "run")
    assert run("--config", config, "trainer.max_stepz=3") == 2
    assert "trainer.max_stepz" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        run("--help")
    assert e.value.code == 0 and "--resume" in capsys.readouterr().out


def test_prompt_fields_apply_over_an_init_from_checkpoint():
    """A next stage may change how the model answers (the demo's tag_only stage), not its placeholder."""
    demo = ROOT / "checkpoints" / "demo"
    own = SpeechLLM.from_pretrained(demo).cfg.prompt
    other = "tag_only" if own.answer_format == "transcript_tag" else "transcript_tag"
    model = train.build_model(ModelConfig(init_from=str(demo), prompt={"answer_format": other}), None, 0)
    assert model.cfg.prompt.answer_format == other and model.cfg.prompt.user == own.user
    assert train.build_model(ModelConfig(init_from=str(demo)), None, 0).cfg.prompt == own
    with pytest.raises(ValueError, match="audio_token"):
        train.build_model(ModelConfig(init_from=str(demo), prompt={"audio_token": "<speech>", "user": "<speech>"}), None, 0)


def test_default_target_speaker_is_the_one_talking_when_talk_stops(fixtures):
    """Training picks the same speaker as infer.py's --target-speaker auto: B, who talks last."""
    from speechllm.model import assemble
    from speechllm.activity import target_masks
    from speechllm.speaker import SpeakerKernelConfig

    model = assemble(fixtures / "asr_ctc.nemo", fixtures / "llm_hf", speaker=SpeakerKernelConfig(layers=(0,)))
    segs = [[0.0, 0.6, "A"], [0.5, 1.3, "B"]]
    batch = {"speakers": [segs, segs], "target_speaker": [None, "A"], "duration": [1.6, 1.6],
             "lengths": torch.tensor([25600, 25600])}
    s, g = train.speaker_masks(model, batch, "cpu")
    t = s.shape[1]
    for i, who in enumerate(["B", "A"]):
        want_s, want_g = target_masks([tuple(x) for x in segs], who, t, 1.6)
        assert torch.equal(s[i], want_s) and torch.equal(g[i], want_g)
    assert not torch.equal(s[0], s[1])
