"""A user's mistakes end in one `error:` line naming the input (no traceback, non-zero exit, nothing
destroyed); doubtful inputs are said out loud; a manifest's rttm_filepath is read. Every bad input
is built here, in tmp_path, from the fixtures or the bundled demo model (issue 15, points 3-7).
Run: python -m pytest -q tests/test_errors.py"""
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml
from safetensors.torch import load_file, save_file

from conftest import ROOT, STREAM_CLIPS, load_script, run_main
from speechllm.activity import main as activity
from speechllm.activity import read_rttm, target_masks, write_manifest_rttms
from speechllm.data import ClipDataset, collate, load_split, read_manifest
from speechllm.model import assemble
from speechllm.sortformer import SortFormer
from speechllm.train_config import DatasetConfig

DEMO = ROOT / "checkpoints" / "demo"
EXAMPLES = STREAM_CLIPS
WAV = EXAMPLES / "complete_1.wav"  # 4.817 s

infer = load_script("infer")
convert_weights = load_script("convert_weights")
train = load_script("train")


def one_error(r, *words, code=1):
    """r ended with exit status `code` and exactly one `error:` line, holding every word; no traceback."""
    assert r.returncode == code, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, r.stderr
    for w in words:
        assert str(w) in errors[0], (w, errors[0])
    return errors[0]


@pytest.fixture
def run_infer(capsys):
    return lambda *args: run_main(infer.main, args, capsys)


@pytest.fixture
def run_convert(capsys):
    return lambda *args: run_main(convert_weights.main, args, capsys)


@pytest.fixture
def run_train(capsys):
    def run(*args):
        torch.set_num_threads(1)
        return run_main(train.main, args, capsys)
    return run


def demo_copy(tmp_path, name="ckpt"):
    return shutil.copytree(DEMO, tmp_path / name)


def manifest(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def train_config(tmp_path, manifest_path, **trainer) -> str:
    """A config that would fine-tune the demo model for one step on `manifest_path`."""
    cfg = {"model": {"init_from": str(DEMO)},
           "trainer": {"out_dir": str(tmp_path / "run"), "max_steps": 1, "progress_bar": False,
                       "tensorboard": False, "precision": "fp32", **trainer},
           "data": {"train_ds": {"manifest_filepath": str(manifest_path), "batch_size": 2, "num_workers": 0}}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    return str(tmp_path / "c.yaml")


def nemo_with_config(src, dst, text: bytes):
    """A copy of the .nemo `src` whose model_config.yaml is `text`."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w:") as tout:
        for m in tin.getmembers():
            if m.isfile():
                data = text if m.name.endswith("model_config.yaml") else tin.extractfile(m).read()
                info = tarfile.TarInfo(m.name)
                info.size = len(data)
                tout.addfile(info, io.BytesIO(data))
    return dst


# ----------------------------------------------------------------------------------------------
# point 3: devices, broken files, bad settings


def test_a_device_this_machine_lacks(run_infer, run_train, tmp_path):
    missing = "cuda:99" if torch.cuda.is_available() else "cuda"
    one_error(run_infer(WAV, "--device", missing), f"--device {missing}", "cuda")
    one_error(run_infer(WAV, "--device", "tpu"), "--device tpu", "not a device name")
    config = train_config(tmp_path, EXAMPLES / "clips.jsonl")
    one_error(run_train("--config", config, f"trainer.device={missing}"), f"trainer.device {missing}", code=2)
    assert not (tmp_path / "run").exists()


def broken_safetensors(d):
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])


def garbled_header(d):
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[:8] + b"{garbage" + data[16:])


def garbage_tokenizer(d):
    (d / "tokenizer.json").write_text("this is not a tokenizer {")


def edit_config(change):
    def edit(d):
        cfg = json.loads((d / "config.json").read_text())
        change(cfg)
        (d / "config.json").write_text(json.dumps(cfg))
    return edit


@pytest.mark.parametrize("damage, words", [
    (broken_safetensors, ["model.safetensors", "not a readable safetensors file"]),
    (garbled_header, ["model.safetensors", "not a readable safetensors file"]),
    (garbage_tokenizer, ["tokenizer.json", "not a readable tokenizer"]),
    (edit_config(lambda c: c.pop("encoder")), ["config.json", "missing 'encoder'"]),
    (edit_config(lambda c: c["encoder"].update(n_layers="four")), ["config.json", "encoder.n_layers", "integer"]),
    (edit_config(lambda c: c["llm"].pop("hidden_size")), ["config.json", "hidden_size"]),
    (edit_config(lambda c: c["llm"].update(hidden_size="128")), ["config.json", "llm: hidden_size", "integer"]),
    (edit_config(lambda c: c["llm"].update(num_hidden_layers=2.0)), ["config.json", "num_hidden_layers", "integer"]),
    (edit_config(lambda c: c["llm"].update(rms_norm_eps="tiny")), ["config.json", "rms_norm_eps", "number"]),
], ids=["truncated-safetensors", "garbled-header", "garbage-tokenizer", "config-without-encoder",
        "config-wrong-type", "config-without-llm-key", "llm-int-as-string", "llm-int-as-float", "llm-float-as-word"])
def test_a_broken_checkpoint_directory(run_infer, tmp_path, damage, words):
    d = demo_copy(tmp_path)
    damage(d)
    one_error(run_infer(WAV, "--checkpoint", d), str(d), *words)


def test_a_broken_nemo_archive(run_convert, run_infer, fixtures, tmp_path):
    src = fixtures / "asr_ctc.nemo"
    data = src.read_bytes()
    (tmp_path / "cut.nemo").write_bytes(data[: len(data) // 2])
    one_error(run_convert("nemo", tmp_path / "cut.nemo", tmp_path / "out"), "cut.nemo", "truncated")
    one_error(run_infer(WAV, "--checkpoint", tmp_path / "cut.nemo"), "cut.nemo", "truncated")
    nemo_with_config(src, tmp_path / "broken.nemo", b"encoder: [unclosed\n")
    one_error(run_convert("nemo", tmp_path / "broken.nemo", tmp_path / "out"), "broken.nemo", "model_config.yaml",
              "not plain YAML", "line 2")
    marker = tmp_path / "ran"
    nemo_with_config(src, tmp_path / "tagged.nemo", f"a: !!python/object/apply:pathlib.Path.touch [{marker}]\n".encode())
    one_error(run_convert("nemo", tmp_path / "tagged.nemo", tmp_path / "out"), "tagged.nemo", "python/object")
    nemo_with_config(src, tmp_path / "list.nemo", b"- 1\n- 2\n")
    one_error(run_convert("nemo", tmp_path / "list.nemo", tmp_path / "out"), "list.nemo", "not a mapping")
    assert not marker.exists() and not (tmp_path / "out").exists()


class Touch:
    """Unpickling this would create a file: torch.load(weights_only=True) must refuse it instead."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_a_training_state_that_is_not_weights_only(run_train, tmp_path):
    step = demo_copy(tmp_path, "run/step_1")
    marker = tmp_path / "ran"
    torch.save({"optimizer": {}, "payload": Touch(marker)}, step / "trainer_state.pt")
    config = train_config(tmp_path, EXAMPLES / "clips.jsonl")
    one_error(run_train("--config", config, "--resume", step), "trainer_state.pt", "weights-only")
    assert not marker.exists()
    (step / "trainer_state.pt").write_bytes(b"PK\x03\x04 not a torch file")
    one_error(run_train("--config", config, "--resume", step), "trainer_state.pt", "not a readable training state")


def test_a_config_or_override_that_is_not_yaml(run_train, tmp_path):
    config = train_config(tmp_path, EXAMPLES / "clips.jsonl")
    one_error(run_train("--config", config, "trainer.max_steps=[1"), "trainer.max_steps=[1", "not plain YAML", code=2)
    marker = tmp_path / "ran"
    tag = f"trainer.max_steps=!!python/object/apply:pathlib.Path.touch [{marker}]"
    one_error(run_train("--config", config, tag), "not plain YAML", "python/object", code=2)
    (tmp_path / "bad.yaml").write_text("model: {init_from: x\ntrainer: [\n")
    one_error(run_train("--config", tmp_path / "bad.yaml"), "bad.yaml", "not plain YAML", code=2)
    (tmp_path / "list.yaml").write_text("- model\n")
    one_error(run_train("--config", tmp_path / "list.yaml"), "list.yaml", "mapping", code=2)
    assert not marker.exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("field", ["duration", "offset"])
def test_nan_duration_or_offset_in_a_manifest(run_infer, run_train, tmp_path, field):
    path = manifest(tmp_path / "m.jsonl", [{"audio_filepath": str(WAV), "label": "COMPLETE", "duration": 1.0},
                                           f'{{"audio_filepath": "{WAV}", "label": "COMPLETE", "{field}": NaN}}'])
    one_error(run_infer("--manifest", path), f"{path}:2", field, "finite")
    one_error(run_train("--config", train_config(tmp_path, path)), f"{path}:2", field, "finite")


def test_numbers_out_of_range(run_infer):
    for option in ("--batch-size", "--max-new-tokens"):
        one_error(run_infer(WAV, option, "0"), f"argument {option}", ">= 1", code=2)
    one_error(run_infer(WAV, "--target-speaker", "-1"), "argument --target-speaker", "-1", code=2)


def test_a_target_speaker_the_diarizer_does_not_track(run_infer, fixtures, tmp_path):
    assemble(fixtures / "asr_spk_kernel.nemo", fixtures / "llm_hf").save_pretrained(tmp_path / "sllm")
    SortFormer.from_nemo(fixtures / "diar_sortformer.nemo").save_pretrained(tmp_path / "diar")
    one_error(run_infer(fixtures / "audio_2spk.wav", "--checkpoint", tmp_path / "sllm", "--diarizer", tmp_path / "diar",
                        "--target-speaker", "4"), "--target-speaker 4", "out of range", "4 speakers")


def test_a_checkpoint_that_cannot_answer(run_infer, fixtures):
    one_error(run_infer(WAV, "--checkpoint", fixtures / "asr_spk_kernel.nemo"), "asr_spk_kernel.nemo",
              "without a CTC decoder", "RNNT")
    one_error(run_infer(WAV, "--checkpoint", fixtures / "llm_hf"), "llm_hf", "neither transcribes nor tags")


def test_an_output_path_that_is_a_file(run_convert, fixtures, tmp_path, capsys):
    (tmp_path / "taken").write_text("precious")
    one_error(run_convert("nemo", fixtures / "asr_ctc.nemo", tmp_path / "taken"), "taken", "existing file")
    # python -m speechllm.activity: the RTTM folder, or the new manifest, where a file / folder is
    SortFormer.from_nemo(fixtures / "diar_sortformer.nemo").save_pretrained(tmp_path / "diar")
    path = manifest(tmp_path / "m.jsonl", [{"audio_filepath": str(fixtures / "audio_1.wav")}])
    args = [path, "--diarizer", tmp_path / "diar", "--out", tmp_path / "new.jsonl"]
    one_error(run_main(activity, args + ["--rttm-dir", tmp_path / "taken"], capsys), "taken", "existing file")
    (tmp_path / "folder").mkdir()
    one_error(run_main(activity, args[:-1] + [tmp_path / "folder"], capsys), "folder", "is a directory")
    assert (tmp_path / "taken").read_text() == "precious"


# ----------------------------------------------------------------------------------------------
# point 4: convert_weights.py destroys nothing


def test_convert_weights_writes_over_no_model_and_never_over_its_input(run_convert, fixtures, tmp_path):
    out = tmp_path / "asr"
    assert run_convert("nemo", fixtures / "asr_ctc.nemo", out).returncode == 0
    before = (out / "model.safetensors").read_bytes()
    one_error(run_convert("nemo", fixtures / "asr_ctc.nemo", out), "already holds a model", "--force")
    assert run_convert("nemo", fixtures / "asr_ctc.nemo", out, "--force").returncode == 0
    assert (out / "model.safetensors").read_bytes() == before  # the same conversion, written again
    # An input directory is never an output, --force or not: here the LLM that assemble reads.
    llm = shutil.copytree(fixtures / "llm_hf", tmp_path / "llm")
    files = {p.name: p.read_bytes() for p in llm.iterdir()}
    for force in ([], ["--force"]):
        one_error(run_convert("assemble", "--encoder", fixtures / "asr_ctc.nemo", "--llm", llm, "--out", llm, *force),
                  "is the input", "destroy")
    one_error(run_convert("salm", fixtures / "salm", "--out", fixtures / "salm", "--force"), "is the input")
    assert {p.name: p.read_bytes() for p in llm.iterdir()} == files


# ----------------------------------------------------------------------------------------------
# point 5: manifests are checked, audio included, before anything runs


def truncated_wav(path, seconds=2.0):
    """A WAV whose header announces `seconds` but whose data stops halfway (a partial copy)."""
    rng = np.random.default_rng(0)
    sf.write(path, (0.1 * rng.standard_normal(int(16000 * seconds))).astype(np.float32), 16000, subtype="PCM_16")
    data = path.read_bytes()
    path.write_bytes(data[: 44 + (len(data) - 44) // 2])
    return path


def test_every_manifest_line_and_its_audio_is_checked_before_anything_runs(run_infer, run_train, tmp_path):
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "junk.wav").write_bytes(b"RIFF but nothing else")
    truncated_wav(tmp_path / "cut.wav", 2.0)  # holds 1 s
    good = {"audio_filepath": str(WAV), "label": "COMPLETE", "duration": 4.817}
    cases = [({"audio_filepath": "missing.wav"}, "missing.wav not found"),
             ({"audio_filepath": "empty.wav"}, "empty.wav is empty"),
             ({"audio_filepath": "junk.wav"}, "junk.wav is not readable"),
             ({"audio_filepath": str(WAV), "offset": 4.0, "duration": 1.5}, "runs past the end"),
             ({"audio_filepath": str(WAV), "offset": 5.0}, "past the end"),
             ({"audio_filepath": "cut.wav", "duration": 2.0}, "cut.wav, which holds 1.000 s")]
    for row, words in cases:
        path = manifest(tmp_path / "m.jsonl", [good, {"label": "INCOMPLETE", **row}])
        one_error(run_infer("--manifest", path, "--checkpoint", tmp_path / "never-loaded"), f"{path}:2", words)
        one_error(run_train("--config", train_config(tmp_path, path)), f"{path}:2", words)
        assert not (tmp_path / "run").exists()


def test_no_metrics_over_zero_clips(run_infer, tmp_path):
    path = manifest(tmp_path / "m.jsonl", [{"audio_filepath": str(WAV), "label": "COMPLETE"}])
    r = run_infer("--manifest", path, "--max-seconds", "1")  # the only clip is refused
    assert r.returncode == 1 and "accuracy" not in r.stdout and "macro" not in r.stdout
    assert "none of its 1 clips could be run" in r.stderr and "max-seconds" in r.stderr


# ----------------------------------------------------------------------------------------------
# point 6: wrong answers said out loud


def test_weights_or_outputs_that_are_not_finite_are_refused(run_infer, tmp_path):
    nan, huge = demo_copy(tmp_path, "nan"), demo_copy(tmp_path, "huge")
    state = load_file(DEMO / "model.safetensors")
    save_file({**state, "projector.conv.weight": state["projector.conv.weight"] * float("nan")},
              str(nan / "model.safetensors"), metadata={"format": "pt"})
    one_error(run_infer(WAV, "--checkpoint", nan), str(nan), "NaN or infinite", "projector.conv.weight")
    # Finite weights whose activations overflow float32: softmax(inf, inf, x) is NaN.
    save_file({**state, "llm.model.norm.weight": state["llm.model.norm.weight"].float() * 1e38},
              str(huge / "model.safetensors"), metadata={"format": "pt"})
    r = run_infer(WAV, "--checkpoint", huge, "--dtype", "float32")
    one_error(r, str(huge), "not finite")
    assert r.stdout == ""


def test_silence_a_short_clip_and_a_cut_file_are_flagged_next_to_the_tag(run_infer, tmp_path):
    sf.write(tmp_path / "silence.wav", np.zeros(16000, np.float32), 16000)
    speech = sf.read(WAV, dtype="float32")[0]
    sf.write(tmp_path / "short.wav", speech[16000:16000 + 3200], 16000)  # 0.2 s
    truncated_wav(tmp_path / "cut.wav", 2.0)
    r = run_infer(WAV, tmp_path / "silence.wav", tmp_path / "short.wav", tmp_path / "cut.wav")
    assert r.returncode == 0, r.stderr
    lines = dict(line.split("\t", 1) for line in r.stdout.splitlines())
    assert "warning" not in lines[str(WAV)]
    assert "warning: digital silence" in lines[str(tmp_path / "silence.wav")]
    assert "warning: 0.20 s is shorter than one word" in lines[str(tmp_path / "short.wav")]
    assert "warning: the file ends early: its header announces 2.00 s, it holds 1.00 s" in lines[str(tmp_path / "cut.wav")]
    for line in lines.values():  # the warning comes after the tag and its probabilities
        assert line.split("\t")[0].split()[0] in ("<COMPLETE>", "<INCOMPLETE>", "<BACKCHANNEL>")
    rows = [json.loads(x) for x in run_infer(WAV, tmp_path / "silence.wav", "--json").stdout.splitlines()]
    assert "warnings" not in rows[0] and rows[1]["warnings"][0].startswith("digital silence")


# ----------------------------------------------------------------------------------------------
# point 7: rttm_filepath, written by python -m speechllm.activity, is read by training and infer.py


@pytest.fixture(scope="module")
def speaker_model(fixtures):
    return assemble(fixtures / "asr_spk_kernel.nemo", fixtures / "llm_hf", seed=0)


MIX_RTTM = ("SPEAKER audio_2spk 1 0.100 2.123 <NA> <NA> A <NA> <NA>\n"
            "SPEAKER audio_2spk 1 1.673 2.235 <NA> <NA> B <NA> <NA>\n")  # the mix's turns (fixture README)


@pytest.fixture(scope="module")
def rttm_manifest(fixtures, tmp_path_factory):
    """Two cuts of the two-speaker mix with its turns in an RTTM: the whole clip (the target is then
    the one talking last, B) and 1.0-3.5 s with target_speaker A."""
    tmp = tmp_path_factory.mktemp("rttm")
    (tmp / "turns").mkdir()
    (tmp / "turns" / "mix.rttm").write_text(MIX_RTTM)
    mix = str(fixtures / "audio_2spk.wav")
    rows = [{"audio_filepath": mix, "label": "COMPLETE", "rttm_filepath": "turns/mix.rttm"},
            {"audio_filepath": mix, "offset": 1.0, "duration": 2.5, "label": "INCOMPLETE", "target_speaker": "A",
             "rttm_filepath": "turns/mix.rttm"}]
    return manifest(tmp / "m.jsonl", rows)


def test_rttm_filepath_becomes_each_clips_speakers(rttm_manifest, fixtures, tmp_path):
    whole, cut = read_manifest(rttm_manifest)
    close = lambda got, want: [s for *_, s in got] == [s for *_, s in want] and np.allclose(
        [t[:2] for t in got], [t[:2] for t in want], atol=1e-9)
    assert close(whole.speakers, [[0.1, 2.223, "A"], [1.673, 3.908, "B"]])
    assert close(cut.speakers, [[0.0, 1.223, "A"], [0.673, 2.5, "B"]])  # clip time, cut at its end
    # What python -m speechllm.activity writes is what the reader takes.
    manifest(tmp_path / "in.jsonl", [{"audio_filepath": str(fixtures / "audio_2spk.wav"), "offset": 0.5, "duration": 3.0}])
    write_manifest_rttms(tmp_path / "in.jsonl", tmp_path / "out.jsonl",
                         SortFormer.from_nemo(fixtures / "diar_sortformer.nemo"))
    entry = json.loads((tmp_path / "out.jsonl").read_text())
    turns = read_rttm(tmp_path / entry["rttm_filepath"])["audio_2spk"]
    want = [[max(a, 0.5) - 0.5, min(b, 3.5) - 0.5, spk] for a, b, spk in turns if b > 0.5 and a < 3.5]
    (u,) = read_manifest(tmp_path / "out.jsonl")
    assert len(want) > 1 and u.speakers == want


def test_training_masks_come_from_the_rttm(speaker_model, rttm_manifest):
    split = load_split([rttm_manifest], "turntaking", DatasetConfig(manifest_filepath=(rttm_manifest,)), train=False)
    batch = collate([ClipDataset(split.items)[i] for i in range(2)])
    s, g = train.speaker_masks(speaker_model, batch, "cpu")
    frames = train.encoder_frames(speaker_model, batch["lengths"]).tolist()
    for i, (u, target) in enumerate(zip(split.items, ["B", "A"])):  # B talks last; the cut names A
        want_s, want_g = target_masks([tuple(x) for x in u.speakers], target, frames[i], u.duration)
        assert torch.equal(s[i, :frames[i]], want_s) and torch.equal(g[i, :frames[i]], want_g)
        assert 0 < want_s.sum() < frames[i] and want_g.sum() > 0  # neither all target nor silent


def test_infer_manifest_uses_the_rttm_and_each_clips_target(speaker_model, rttm_manifest, run_infer, tmp_path,
                                                            monkeypatch):
    speaker_model.save_pretrained(tmp_path / "sllm")
    calls = []
    predict = infer.predict_with_activity

    def recording(model, audio, lengths, speakers, target, *args, **kw):
        out = predict(model, audio, lengths, speakers, target, *args, **kw)
        calls.append((speakers[0], target[0], out[0]))
        return out

    monkeypatch.setattr(infer, "predict_with_activity", recording)
    r = run_infer("--manifest", rttm_manifest, "--checkpoint", tmp_path / "sllm", "--dtype", "float32",
                  "--max-new-tokens", "4", "--batch-size", "1", "--json")
    assert r.returncode == 0, r.stderr
    whole, cut = read_manifest(rttm_manifest)
    by_clip = {len(segs) and round(segs[-1][1], 3): (segs, target, out) for segs, target, out in calls}
    assert sorted(by_clip) == [2.5, 3.908]
    assert by_clip[3.908][:2] == ([tuple(x) for x in whole.speakers], "auto") and by_clip[3.908][2]["speaker"] == "B"
    assert by_clip[2.5][:2] == ([tuple(x) for x in cut.speakers], "A") and by_clip[2.5][2]["speaker"] == "A"
    report = json.loads(r.stdout.splitlines()[-1])
    hits = (by_clip[3.908][2]["tag"] == whole.label) + (by_clip[2.5][2]["tag"] == cut.label)
    assert report["accuracy"] == hits / 2


# ----------------------------------------------------------------------------------------------
# under torchrun: one error line, every rank stops with the same status


def test_torchrun_reports_a_bad_manifest_once(tmp_path):
    """Rank 0 starts 2 s late, so rank 1 finds the bad line first: it must wait for rank 0's
    message (torchrun kills the remaining ranks as soon as one exits)."""
    path = manifest(tmp_path / "m.jsonl", [f'{{"audio_filepath": "{WAV}", "label": "COMPLETE", "duration": NaN}}'])
    late = tmp_path / "late_rank0.py"
    late.write_text("import os, runpy, sys, time\n"
                    "if os.environ['RANK'] == '0':\n    time.sleep(2)\n"
                    f"sys.argv[0] = {str(ROOT / 'train.py')!r}\n"
                    "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(late), "--config", train_config(tmp_path, path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode != 0
    errors = [line for line in (r.stdout + r.stderr).splitlines() if line.startswith("error:")]
    assert errors == [f"error: {path}:1: duration must be a finite number of seconds, got nan"]
    # torchrun itself then summarises the failed ranks (ChildFailedError): both exited with 1.
    assert "exitcode  : 1" in r.stderr and "[1]:" in r.stderr


def test_train_py_own_launcher_ends_with_the_error_alone(tmp_path):
    """`train.py --nproc-per-node 2`: the same two ranks, the same one error line and status,
    without torchrun's ChildFailedError traceback and summary."""
    path = manifest(tmp_path / "m.jsonl", [f'{{"audio_filepath": "{WAV}", "label": "COMPLETE", "duration": NaN}}'])
    cmd = [sys.executable, str(ROOT / "train.py"), "--nproc-per-node", "2", "--config", train_config(tmp_path, path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 1
    assert [line for line in r.stderr.splitlines() if line.strip()] == \
        [f"error: {path}:1: duration must be a finite number of seconds, got nan"]
    assert "ChildFailedError" not in r.stdout + r.stderr and "Traceback" not in r.stdout + r.stderr


def test_train_py_own_launcher_trains_and_refuses_zero(tmp_path):
    path = manifest(tmp_path / "m.jsonl", [f'{{"audio_filepath": "{WAV}", "label": "COMPLETE"}}'] * 4)
    cmd = [sys.executable, str(ROOT / "train.py"), "--nproc-per-node", "2", "--config", train_config(tmp_path, path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "# 2 process(es)" in r.stdout and (tmp_path / "run" / "step_1" / "model.safetensors").exists()
    r = subprocess.run(cmd[:2] + ["--nproc-per-node", "0"] + cmd[4:], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "--nproc-per-node must be at least 1" in r.stderr
