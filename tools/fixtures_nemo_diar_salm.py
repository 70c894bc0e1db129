"""The NeMo fixtures that build on the others: the Sortformer diarizer (diar_sortformer.nemo, on the
two-speaker mix) and SALM (salm/, from asr_ctc.nemo and llm_hf/), each with the outputs NeMo computes
from it. Called by tools/make_fixtures.py; the configs, randomisation and helpers are
tools/fixtures_nemo.py's."""
import json
import math
import os
from pathlib import Path

import torch

from fixtures_nemo import MIX, conformer_cfg, pad, preprocessor_cfg, quiet_nemo, randomise
from make_fixtures import min_margin, read_wav, save_tensors, seed_all, versions, write_json


# ----------------------------------------------------------------------------------------------
# Sortformer diarizer (offline)


def sortformer_config() -> dict:
    return {"sample_rate": 16000, "pil_weight": 0.5, "ats_weight": 0.5, "max_num_of_spks": 4, "streaming_mode": False,
            "model_defaults": {"fc_d_model": 32, "tf_d_model": 24}, "train_ds": None, "validation_ds": None,
            "test_ds": None,
            "preprocessor": {k: v for k, v in preprocessor_cfg(dither=1e-5).items()
                             if k not in ("log", "pad_to", "pad_value")},  # pad_to: the class default, 16
            "sortformer_modules": {"_target_": "nemo.collections.asr.modules.sortformer_modules.SortformerModules",
                                   "num_spks": 4, "dropout_rate": 0.5, "fc_d_model": 32, "tf_d_model": 24},
            "encoder": conformer_cfg(80, 32, 16),
            "transformer_encoder": {
                "_target_": "nemo.collections.asr.modules.transformer.transformer_encoders.TransformerEncoder",
                "num_layers": 2, "hidden_size": 24, "inner_size": 64, "num_attention_heads": 4,
                "attn_score_dropout": 0.5, "attn_layer_dropout": 0.5, "ffn_dropout": 0.5, "hidden_act": "relu",
                "pre_ln": False, "pre_ln_final_layer_norm": True},
            "loss": {"_target_": "nemo.collections.asr.losses.bce_loss.BCELoss", "weight": None, "reduction": "mean"}}


RUNS = {"batch": [0, 1], "single0": [0], "single1": [1]}


@torch.no_grad()
def sortformer_reference(model, clips):
    seen = {}
    mods = model.sortformer_modules
    hooks = [model.encoder.register_forward_pre_hook(
                 lambda m, a, k: seen.__setitem__("features", k.get("audio_signal", a[0] if a else None)),
                 with_kwargs=True),
             model.encoder.register_forward_hook(lambda m, a, o: seen.__setitem__("encoder", o)),
             mods.encoder_proj.register_forward_hook(lambda m, a, o: seen.__setitem__("encoder_proj", o)),
             model.transformer_encoder.register_forward_hook(
                 lambda m, a, o: seen.__setitem__("transformer_output", o)),
             mods.single_hidden_to_spks.register_forward_hook(lambda m, a, o: seen.__setitem__("spk_logits", o)),
             mods.single_hidden_to_spks.register_forward_hook(lambda m, a, o: seen.__setitem__("head_in", a[0]))]
    t, runs, snapshots = {}, {}, {}
    for run, items in RUNS.items():
        audio, lengths = pad([clips[i] for i in items])
        preds = model.forward(audio_signal=audio, audio_signal_length=lengths)
        snapshots[run] = dict(seen)
        enc, enc_lens = seen["encoder"]
        feat_lens = model.preprocessor(input_signal=audio / 1.0, length=lengths)[1]
        t |= {f"{run}.input_signal_length": lengths, f"{run}.peak_scale": 1 / (audio.max() + model.eps),
              f"{run}.features_length": feat_lens, f"{run}.encoder_output": enc, f"{run}.encoded_length": enc_lens,
              f"{run}.encoder_proj": seen["encoder_proj"], f"{run}.transformer_output": seen["transformer_output"],
              f"{run}.spk_logits": seen["spk_logits"], f"{run}.preds": preds}
        if run == "batch":
            t["batch.features"] = seen["features"]
        valid = torch.arange(preds.shape[1])[None] < enc_lens[:, None]
        runs[run] = {"clips": [MIX[i] for i in items], "input_signal_length": lengths.tolist(),
                     "peak_scale": t[f"{run}.peak_scale"].item(), "features_length": feat_lens.tolist(),
                     "features_frames_fed_to_encoder": seen["features"].shape[-1],
                     "encoded_length": enc_lens.tolist(),
                     "active_fraction_per_speaker": (preds[valid] > 0.5).float().mean(0).tolist(),
                     "min_abs_prob_minus_half": (preds[valid] - 0.5).abs().min().item(),
                     "padded_frames_are_exact_zero": bool((preds[~valid] == 0).all())}
    for h in hooks:
        h.remove()
    return t, runs, snapshots


@torch.no_grad()
def tune_head(model, clips, fractions=(0.55, 0.35, 0.15, 0.0)):
    """A random head gives speaker probabilities near 0.5 everywhere. Rescale each speaker's row
    of single_hidden_to_spks to logit std 2.5 over the batch's valid frames and set its bias so
    that speaker k is active on about fractions[k] of them (speaker 3 never: an absent speaker)."""
    _, runs, seen = sortformer_reference(model, clips)
    head = model.sortformer_modules.single_hidden_to_spks
    seen = seen["batch"]
    h = seen["head_in"][torch.arange(seen["head_in"].shape[1])[None] < torch.tensor(runs["batch"]["encoded_length"])[:, None]]
    logits = h @ head.weight.T  # (N, 4) without bias
    head.weight.mul_((2.5 / logits.std(0))[:, None])
    logits = h @ head.weight.T
    for k, f in enumerate(fractions):
        head.bias[k] = -(logits[:, k].max() + 2.5) if f == 0 else -torch.quantile(logits[:, k], 1 - f)


def last_talker(preds) -> list[int]:
    """Speakers above 0.5 at the last frame where anyone is."""
    active = (preds > 0.5).nonzero()
    if not len(active):
        return []
    last = int(active[:, 0].max())
    return (preds[last] > 0.5).nonzero().flatten().tolist()


def make_diar_sortformer(out: Path):
    from omegaconf import OmegaConf
    from nemo.collections.asr.models import SortformerEncLabelModel

    quiet_nemo()
    clips = [read_wav(out / name) for name in MIX]
    for seed in range(7000, 7300):
        seed_all(seed)
        model = SortformerEncLabelModel(cfg=OmegaConf.create(sortformer_config())).eval()
        randomise(model)
        tune_head(model, clips)
        t, runs, _ = sortformer_reference(model, clips)
        last = last_talker(t["single0.preds"][0])
        if len(last) == 1 and last != [1]:  # let speaker 1 be the one who talks last in the mix
            head, k = model.sortformer_modules.single_hidden_to_spks, last[0]
            with torch.no_grad():
                head.weight[[1, k]] = head.weight[[k, 1]].clone()
                head.bias[[1, k]] = head.bias[[k, 1]].clone()
            t, runs, _ = sortformer_reference(model, clips)
            last = last_talker(t["single0.preds"][0])
        margin = min(r["min_abs_prob_minus_half"] for r in runs.values())
        # NeMo's post-processing ends a segment still open at the last frame 10 ms before that
        # frame's end (binarization's last index); want a seed where someone talks at the end of a
        # clip, so that the RTTM reference covers that rule (probs_to_segments' unit_s).
        open_end = any((t[f"single{i}.preds"][0, -1] > 0.5).any() for i in range(2))
        if last == [1] and open_end:
            print(f"  diar seed {seed}: speaker 1 talks last, someone at the end, min |p - 0.5| {margin:.4f}")
            if margin > 1e-3:
                break
    else:
        raise RuntimeError("no diarizer seed passed")
    model.save_to(str(out / "diar_sortformer.nemo"))
    model = SortformerEncLabelModel.restore_from(str(out / "diar_sortformer.nemo"), map_location="cpu").eval()
    t, runs, _ = sortformer_reference(model, clips)
    save_tensors(out / "diar_sortformer_ref.safetensors", t)
    segments, tensors = model.diarize(audio=[str(out / name) for name in MIX], batch_size=1,
                                      include_tensor_outputs=True, num_workers=0, verbose=False)
    api = {"call": "model.diarize(audio=[<wav>, ...], batch_size=1, include_tensor_outputs=True, num_workers=0, "
                   "verbose=False)",
           "max_abs_diff_vs_single_preds": [(tensors[i].reshape(t[f"single{i}.preds"][0].shape) -
                                             t[f"single{i}.preds"][0]).abs().max().item() for i in range(2)],
           "segments_default_postprocessing": {name: [segment_line(s) for s in segs] for name, segs in zip(MIX, segments)}}
    info = json.loads((out / "audio.json").read_text())["audio_2spk.wav"]
    b1 = t["single1.preds"][0, : t["single1.encoded_length"][0]]
    bb = t["batch.preds"][1, : t["single1.encoded_length"][0]]
    b0 = t["single0.preds"][0]
    write_json(out / "diar_sortformer_ref.json", {
        "versions": versions(), "seed": seed, "model_class": "nemo.collections.asr.models.SortformerEncLabelModel",
        "file": "diar_sortformer.nemo", "mix": info, "batch_clips": list(MIX),
        "audio_convention": "float32 = int16 / 32768, 16 kHz mono; batch rows right-padded with zeros",
        "call": {"method": "SortformerEncLabelModel.forward(audio_signal, audio_signal_length)",
                 "mode": "eval(), no_grad, CPU, fp32, streaming_mode false"},
        "diarize_api": api, "runs": runs, "eps": model.eps,
        "batch_vs_single_upstream": [
            {"clip": MIX[0], "max_abs_diff_preds": (t["batch.preds"][0] - b0).abs().max().item()},
            {"clip": MIX[1], "max_abs_diff_preds": (bb - b1).abs().max().item()}],
        "head_tuning": tune_head.__doc__, "config": OmegaConf.to_container(model.cfg, resolve=True),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "notes": ["process_signal scales the whole padded batch by 1 / (max + eps) (the signed max), so a row's "
                  "output depends on the other rows: compare run by run.",
                  "features are the encoder's input, already trimmed to features_length.max()."]})


def segment_line(segment) -> str:
    """NeMo's segment as '<start> <end> speaker_<k>' with 3 decimals."""
    if isinstance(segment, str):
        start, end, spk = segment.split()
    else:
        start, end, spk = segment
    spk = spk if str(spk).startswith("speaker_") else f"speaker_{int(spk)}"
    return f"{float(start):.3f} {float(end):.3f} {spk}"


# ----------------------------------------------------------------------------------------------
# SALM (speechlm2): asr_ctc.nemo's encoder + a Conformer modality adapter + llm_hf/

SALM_PROMPTS = {"single": ["Transcribe the audio: <|audio|>"],
                "batch": ["Transcribe the audio: <|audio|>", "<|audio|> What is said here?"]}
SALM_AUDIO = {"single": ["audio_0.wav"], "batch": ["audio_0.wav", "audio_1.wav"]}


def salm_config() -> dict:
    adapter = conformer_cfg(64, 64, 32, subsampling_factor=1, ff_expansion_factor=2, dropout=0,
                            dropout_pre_encoder=0, dropout_att=0)
    return {"pretrained_llm": "llm_hf", "pretrained_asr": "asr_ctc.nemo", "pretrained_weights": True,
            "freeze_params": ["^llm\\..+$", "^embed_tokens\\..+$", "^perception\\.preprocessor\\..+$",
                              "^perception\\.encoder\\..+$"],
            "prevent_freeze_params": [], "prompt_format": "qwen", "audio_locator_tag": "<|audio|>",
            "perception": {"target": "nemo.collections.speechlm2.modules.perception.AudioPerceptionModule",
                           "modality_adapter": adapter}}


def salm_prompt_ids(model, text: str) -> list[int]:
    from nemo.collections.common.prompts import PromptFormatter

    formatter = PromptFormatter.resolve(model.cfg.prompt_format)(model.tokenizer)
    return formatter.encode_dialog(turns=[{"role": "user", "content": text}])["input_ids"].tolist()


def salm_prompts(model, out: Path) -> dict:
    """The batch's second prompt gets words until its row is left-padded by exactly 11 (what
    tests/test_salm.py checks): prompt tokens + audio frames - 1 for the tag, per row."""
    frames = [math.ceil(len(read_wav(out / f)) // 160 / 8) for f in SALM_AUDIO["batch"]]
    row0 = len(salm_prompt_ids(model, SALM_PROMPTS["batch"][0])) - 1 + frames[0]
    words = "What is said here in this short clip of speech".split()
    for n in range(4, len(words) + 1):
        for end in ("?", "??", "?!?"):
            text = "<|audio|> " + " ".join(words[:n]) + end
            if row0 - (len(salm_prompt_ids(model, text)) - 1 + frames[1]) == 11:
                return {"single": SALM_PROMPTS["single"], "batch": [SALM_PROMPTS["batch"][0], text]}
    raise RuntimeError("no second prompt gives a left padding of 11")


@torch.no_grad()
def salm_reference(model, out: Path, prompts: dict):
    from nemo.collections.speechlm2.data.salm_dataset import left_collate_vectors
    from nemo.collections.speechlm2.models.salm import replace_placeholders_and_build_targets

    seen = {}
    model.perception.encoder.register_forward_hook(lambda m, a, o: seen.__setitem__("encoder", o))
    model.perception.modality_adapter.register_forward_hook(lambda m, a, o: seen.__setitem__("adapter", o))
    tag, pad_id = model.audio_locator_tag_id, model.text_pad_id
    t, cases = {}, {}
    for case in ("single", "batch"):
        rows = [salm_prompt_ids(model, p) for p in prompts[case]]
        tokens = left_collate_vectors([torch.tensor(r) for r in rows], padding_value=pad_id)
        audio, lengths = pad([read_wav(out / f) for f in SALM_AUDIO[case]])
        text_embeds = model.embed_tokens(tokens.where(tokens != tag, 0))
        audio_embeds, audio_lens = model.perception(input_signal=audio, input_signal_length=lengths)
        (enc, enc_lens), (adapted, _) = seen["encoder"], seen["adapter"]
        embeds = [audio_embeds[i, :n] for i, n in enumerate(audio_lens.tolist())]
        inputs, _, mask = replace_placeholders_and_build_targets(
            input_ids=tokens, embeds=text_embeds, padding_id=pad_id, placeholder_id=tag, replacements=embeds,
            target_ids=None)
        logits = model(inputs, attention_mask=mask)["logits"]
        gen = model.generate(prompts=tokens, audios=audio, audio_lens=lengths, max_new_tokens=8, do_sample=False,
                             return_dict_in_generate=True, output_logits=True)
        scores = torch.stack(gen.logits)  # (n, B, V)
        t |= {f"{case}.prompt_ids": tokens, f"{case}.audio_lens": lengths, f"{case}.text_embeds": text_embeds,
              f"{case}.encoder_output": enc, f"{case}.encoded_length": enc_lens, f"{case}.adapter_output": adapted,
              f"{case}.audio_embeds": audio_embeds, f"{case}.input_embeds": inputs, f"{case}.attention_mask": mask,
              f"{case}.gen_ids": gen.sequences, f"{case}.gen_scores": scores}
        if case == "single":
            t["single.logits"] = logits
        else:
            t["batch.last_logits"] = logits[:, -1]
        tok = model.tokenizer.tokenizer
        cases[case] = {
            "prompts": prompts[case], "audio_files": SALM_AUDIO[case], "input_embeds_shape": list(inputs.shape),
            "left_padding": (~mask).sum(1).tolist(),
            "rows": [{"prompt_text": p, "turns": [{"role": "user", "content": p}],
                      "formatted_prompt": tok.decode(r), "prompt_ids": r,
                      "min_top2_logit_margin_valid_positions": min_margin(logits[i][mask[i]]),
                      "gen_ids": gen.sequences[i].tolist(), "gen_text": tok.decode(gen.sequences[i])}
                     for i, (p, r) in enumerate(zip(prompts[case], rows))],
            "gen_min_top2_logit_margin": min_margin(scores)}
    return t, cases


def make_salm(out: Path):
    from nemo.collections.speechlm2.models import SALM

    quiet_nemo()
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    here = os.getcwd()
    os.chdir(out)  # SALM's config names pretrained_llm / pretrained_asr relative to the fixture folder
    try:
        for seed in range(8000, 8020):
            seed_all(seed)
            model = SALM(salm_config()).eval()
            randomise(model, skip=[n for n in ("llm", "embed_tokens", "perception.preprocessor", "perception.encoder")])
            prompts = salm_prompts(model, out)
            t, cases = salm_reference(model, out, prompts)
            gen = torch.cat([t["single.gen_ids"].flatten(), t["batch.gen_ids"].flatten()]).tolist()
            margin = min([r["min_top2_logit_margin_valid_positions"] for c in cases.values() for r in c["rows"]] +
                         [c["gen_min_top2_logit_margin"] for c in cases.values()])
            print(f"  salm seed {seed}: margin {margin:.4f}, eos in gen {400 in gen}")
            if margin > 2e-3 and 400 not in gen:
                break
        else:
            raise RuntimeError("no SALM seed passed")
        # The published layout (canary-qwen): NeMo's config.json + model.safetensors, the tokenizer
        # (with the audio tag) at the root and the LLM's config in llm_backbone/, which
        # SALM.from_pretrained then uses instead of pretrained_llm / the LLM's own tokenizer.
        model.save_pretrained(str(out / "salm"))
        model.tokenizer.tokenizer.save_pretrained(str(out / "salm"))
        model.llm.config.save_pretrained(str(out / "salm" / "llm_backbone"))
        model.llm.generation_config.save_pretrained(str(out / "salm" / "llm_backbone"))
        os.chdir(here)  # from_pretrained must not need the fixture folder
        model = SALM.from_pretrained(str(out / "salm")).eval()
        os.chdir(out)
        t, cases = salm_reference(model, out, prompts)
    finally:
        os.chdir(here)
    save_tensors(out / "salm_ref.safetensors", t)
    single_row0 = t["single.input_embeds"].shape[1]
    write_json(out / "salm_ref.json", {
        "versions": versions(), "seed": seed, "model_class": "nemo.collections.speechlm2.models.SALM",
        "checkpoint_dir": "salm", "checkpoint_files": sorted(str(p.relative_to(out / "salm"))
                                                             for p in (out / "salm").rglob("*") if p.is_file()),
        "construction": {"call": "SALM(cfg) with cwd = the fixture folder, HF_HUB_OFFLINE=1", "cfg": salm_config(),
                         "randomised_after_construction": "perception.modality_adapter.* and perception.proj.*"},
        "tokens": {"audio_locator_tag": model.audio_locator_tag, "audio_locator_tag_id": model.audio_locator_tag_id,
                   "embedding_rows": model.embed_tokens.num_embeddings, "text_pad_id": model.text_pad_id,
                   "text_eos_id": model.text_eos_id, "text_bos_id": model.text_bos_id},
        "cases": cases, "single_input_length": single_row0,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "notes": ["Audio is not stored: a case's audios are its audio_files right-padded with zeros.",
                  "gen_scores are the raw logits of each generated step, (n, B, V)."]})
