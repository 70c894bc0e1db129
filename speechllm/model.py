"""The Speech-LLM: listen to a clip, write its transcript, then one turn-taking tag.

    audio (B, N) 16 kHz --features--> (B, n_mels, T_mel) 10 ms
          --encoder (+ speaker kernels)--> (B, T, D_enc) 80 ms (FastConformer) or 20 ms (Whisper)
          --projector--> (B, T', D) 160 ms (conv_transformer, stride 2)
    prompt ids with one <audio> --embed, splice--> (B, L, D) --LLM--> logits (B, L, V)

Any encoder with any LLM: the encoder is a FastConformer (NeMo's log-mel front end in
`preprocessor`, optional speaker kernels) or a Whisper encoder (its own front end and 30 s window,
no speaker kernels), `cfg.encoder_kind`; the LLM is Qwen2/Qwen2.5, Qwen3 or Qwen3.5, by the
model_type of `cfg.llm` (speechllm.llm). Seed 004's system is Whisper + causal_transformer + Qwen3.5.

The prompt is Qwen's chat format: a user turn holding <audio> and an instruction, then the
assistant answers "transcript <TAG>" (or just "<TAG>" with answer_format "tag_only"), closed by
<|im_end|>. The product is the tag's probabilities: a softmax over the three tag logits at the
position where the tag is written. The tag set is tokenizer.TAGS, fixed.

Dimension letters: B batch, N samples, T frames, L tokens, D width, V vocabulary.
"""
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import sentencepiece
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import speculative
from .asr import CTCHead
from .audio import LogMelFrontend, PreprocessorConfig
from .config import build, refuse_unknown
from .encoders import encoder_kind, load_encoder
from .fastconformer import FastConformer, FastConformerConfig
from .llm import build_llm, llm_config, llm_name, load_llm
from .projector import ProjectorConfig, build_projector
from .qwen2 import Qwen2Config, init_token_rows
from .qwen3_5 import Qwen3_5Config
from .sentences import normalize
from .speaker import SpeakerKernelConfig, build_kernels, kernel_hook
from .speaker import init_weights as init_speaker_kernels
from .tokenizer import TAGS, Tokenizer, fit_embeddings
from .weights import read_config, read_state, require, save_dir
from .whisper import WhisperEncoder, WhisperEncoderConfig, WhisperFrontend

IGNORE = -100  # label of positions that carry no loss
NO_KERNELS = "speaker kernels are FastConformer-only (NeMo's SpeakerKernelMixin); this Speech-LLM's encoder is Whisper"


@dataclass(frozen=True)
class PromptConfig:
    user: str = "<audio>\nTranscribe the speech, then tag whether the speaker's turn is complete."
    system: str | None = None  # no system turn by default (NeMo's qwen formatter has none either)
    audio_token: str = "<audio>"
    answer_format: str = "transcript_tag"  # or "tag_only"

    def __post_init__(self):
        if self.answer_format not in ("transcript_tag", "tag_only"):
            raise ValueError(f"prompt answer_format {self.answer_format!r} is not 'transcript_tag' or 'tag_only'")
        if self.user.count(self.audio_token) != 1:
            raise ValueError(f"the prompt's user turn must hold exactly one {self.audio_token}: {self.user!r}")

    @classmethod
    def from_dict(cls, d: dict, where: str = "prompt.") -> "PromptConfig":
        d = dict(d)
        tags = d.pop("tags", TAGS)  # config.json files written before the tag set was fixed list it
        if tuple(tags) != TAGS:
            raise ValueError(f"{where}tags {list(tags)}: the tag set is fixed, {list(TAGS)}")
        return build(cls, d, where)


@dataclass(frozen=True)
class CTCConfig:
    """The encoder archive's CTC head, kept as the transcript drafter (speculative.py); its pieces
    are the SentencePiece model in encoder_tokenizer.model, the blank is id vocab_size."""
    vocab_size: int


@dataclass(frozen=True)
class SpeechLLMConfig:
    preprocessor: PreprocessorConfig | None  # FastConformer's NeMo log-mel; None with Whisper (its own, in `encoder`)
    encoder: FastConformerConfig | WhisperEncoderConfig
    projector: ProjectorConfig
    llm: Qwen2Config | Qwen3_5Config
    prompt: PromptConfig = field(default_factory=PromptConfig)
    tag_loss_weight: float = 5.0  # seed 000: the tag token's cross-entropy counts 5x
    speaker: SpeakerKernelConfig | None = None  # speaker kernels in the encoder; None: none
    ctc: CTCConfig | None = None  # the CTC draft head; None (older checkpoints, SALM imports): no draft
    ctc_loss_weight: float = 0.0  # an auxiliary CTC loss on the encoder through `ctc` (0: the head is not trained)

    def __post_init__(self):
        if self.encoder_kind == "whisper":
            if self.speaker is not None:
                raise ValueError(NO_KERNELS)
            if self.preprocessor is not None:
                raise ValueError("a Whisper Speech-LLM has no NeMo preprocessor: Whisper's front end is part of "
                                 "its encoder config")
        elif self.preprocessor is None:
            raise ValueError("a FastConformer Speech-LLM needs its preprocessor config")
        if self.ctc_loss_weight < 0 or (self.ctc_loss_weight > 0 and self.ctc is None):
            raise ValueError(f"ctc_loss_weight {self.ctc_loss_weight}: must be >= 0, and > 0 needs a CTC head")

    @property
    def encoder_kind(self) -> str:
        """'fastconformer' or 'whisper'; config.json says it as `encoder_kind` (absent: fastconformer)."""
        return "whisper" if isinstance(self.encoder, WhisperEncoderConfig) else "fastconformer"

    def describe(self) -> str:
        """One line for messages, e.g. 'Whisper encoder 4 x 384, causal_transformer projector, Qwen3.5 24 x 1024'."""
        e = self.encoder
        enc = (f"Whisper encoder {e.encoder_layers} x {e.d_model}" if self.encoder_kind == "whisper"
               else f"FastConformer {e.n_layers} x {e.d_model}")
        return (f"{enc}, {self.projector.kind} projector, "
                f"{llm_name(self.llm)} {self.llm.num_hidden_layers} x {self.llm.hidden_size}")

    def to_dict(self) -> dict:
        return {
            "model_type": "speechllm", "encoder_kind": self.encoder_kind,
            "preprocessor": self.preprocessor.to_dict() if self.preprocessor else None, "encoder": self.encoder.to_dict(),
            "projector": self.projector.to_dict(), "llm": self.llm.to_hf(),
            "prompt": asdict(self.prompt), "tag_loss_weight": self.tag_loss_weight,
            "speaker_kernels": self.speaker.to_dict() if self.speaker else None,
        } | ({"ctc": asdict(self.ctc), "ctc_loss_weight": self.ctc_loss_weight} if self.ctc else {})

    @classmethod
    def from_dict(cls, d: dict) -> "SpeechLLMConfig":
        if d.get("model_type") != "speechllm":
            raise ValueError(f"not a Speech-LLM config: model_type={d.get('model_type')!r}")
        refuse_unknown(d, ("model_type", "encoder_kind", "preprocessor", "encoder", "projector", "llm", "prompt",
                           "tag_loss_weight", "speaker_kernels", "ctc", "ctc_loss_weight"))
        kind = d.get("encoder_kind", "fastconformer")  # files written before Whisper have no encoder_kind
        if kind not in ("fastconformer", "whisper"):
            raise ValueError(f"encoder_kind {kind!r} is not 'fastconformer' or 'whisper'")
        whisper = kind == "whisper"
        return cls(
            preprocessor=PreprocessorConfig.from_dict(d["preprocessor"]) if d.get("preprocessor") is not None else None,
            encoder=WhisperEncoderConfig.from_dict(d["encoder"]) if whisper else FastConformerConfig.from_dict(d["encoder"]),
            projector=ProjectorConfig.from_dict(d["projector"]),
            llm=llm_config(d["llm"]),
            prompt=PromptConfig.from_dict(d.get("prompt", {})),
            tag_loss_weight=d.get("tag_loss_weight", 5.0),
            speaker=SpeakerKernelConfig.from_dict(d["speaker_kernels"]) if d.get("speaker_kernels") else None,
            ctc=build(CTCConfig, d["ctc"], "ctc.") if d.get("ctc") else None,
            ctc_loss_weight=d.get("ctc_loss_weight", 0.0),
        )


class SpeechLLM(nn.Module):
    def __init__(self, cfg: SpeechLLMConfig, tokenizer: Tokenizer, encoder_tokenizer: bytes | None = None):
        super().__init__()
        self.cfg = cfg
        if cfg.encoder_kind == "whisper":  # its front end is part of the encoder (encoder.frontend)
            self.preprocessor, self.encoder = None, WhisperEncoder(cfg.encoder)
        else:
            self.preprocessor = LogMelFrontend(cfg.preprocessor)
            self.encoder = FastConformer(cfg.encoder)
        self.spk_kernels = self.bg_spk_kernels = None
        if cfg.speaker is not None:  # top-level, so the keys are NeMo's: spk_kernels.<L>.0.weight, ...
            self.spk_kernels, self.bg_spk_kernels = build_kernels(cfg.speaker, cfg.encoder.d_model, cfg.encoder.n_layers)
        self.projector = build_projector(cfg.projector)
        self.llm = build_llm(cfg.llm)
        self.ctc = CTCHead(cfg.encoder.out_dim, cfg.ctc.vocab_size) if cfg.ctc else None
        self.tokenizer = tokenizer
        self.encoder_tokenizer = encoder_tokenizer  # the encoder's SentencePiece model, kept with it
        self.audio_id = tokenizer.token_to_id(cfg.prompt.audio_token)
        self.tag_ids = [tokenizer.token_to_id(t) for t in TAGS]
        if max(self.tag_ids + [self.audio_id]) >= cfg.llm.vocab_size:
            raise ValueError(f"the tokenizer's special tokens need {max(self.tag_ids) + 1} embedding rows; "
                             f"the LLM has {cfg.llm.vocab_size} (use tokenizer.fit_embeddings)")

    # -- audio side ------------------------------------------------------------------------------

    def embed_audio(self, audio: torch.Tensor, lengths: torch.Tensor, spk_targets=None, bg_spk_targets=None,
                    ctc: bool = False):
        """audio (B, N), lengths (B,) samples -> audio embeddings (B, T', D), lengths (B,), and with
        ctc (a model with a CTC head) the greedy CTC piece ids per clip as a third value.

        spk_targets / bg_spk_targets (B, T) are the target speaker's and the other speakers' activity
        per 80 ms encoder frame (speaker.py); None gives NeMo's single-speaker defaults."""
        x, lens = self.encode(*self.features(audio, lengths), spk_targets, bg_spk_targets)  # (B, T, D_enc)
        embeds = self.projector(x, lens)  # (B, T', D)
        return (*embeds, self.ctc(x, lens)) if ctc else embeds

    def features(self, audio: torch.Tensor, lengths: torch.Tensor):
        """audio (B, N) at 16 kHz, lengths (B,) samples -> log-mel (B, n_mels, T_mel) float32, (B,) frames:
        NeMo's front end (FastConformer), or Whisper's (T_mel always 3000, a 30 s window)."""
        if self.cfg.encoder_kind == "whisper":
            return self.encoder.features(audio, lengths)
        return self.preprocessor(audio, lengths)

    def encode(self, features: torch.Tensor, lengths: torch.Tensor, spk_targets=None, bg_spk_targets=None):
        """features(...)'s output -> encoded (B, T, D_enc), (B,) frames, as ASRModel / WhisperEncoder.encode."""
        if self.cfg.encoder_kind == "whisper":
            if spk_targets is not None or bg_spk_targets is not None:
                raise ValueError(NO_KERNELS)
            return self.encoder.encode(features, lengths)
        hook = kernel_hook(self.spk_kernels, self.bg_spk_kernels, spk_targets, bg_spk_targets)
        return self.encoder(features, lengths, layer_hook=hook)

    @property
    def hop_length(self) -> int:
        """Samples per feature frame: the least audio that makes one encoder frame."""
        return (self.cfg.encoder if self.cfg.encoder_kind == "whisper" else self.cfg.preprocessor).hop_length

    @property
    def max_samples(self) -> int | None:
        """The longest clip the encoder takes: Whisper's window (30 s), or None (any length)."""
        return self.cfg.encoder.n_samples if self.cfg.encoder_kind == "whisper" else None

    # -- prompts ---------------------------------------------------------------------------------

    def prompt_ids(self) -> list[int]:
        """The prompt up to the open assistant turn; it holds one <audio> id."""
        p = self.cfg.prompt
        turns = ([{"role": "system", "content": p.system}] if p.system else []) + [{"role": "user", "content": p.user}]
        return self.tokenizer.encode_chat(turns, add_generation_prompt=True)

    def answer_ids(self, transcript: str | None, tag: str | None) -> tuple[list[int], int | None]:
        """Ids of the assistant's answer, closed by <|im_end|>, and the index of the tag in it.
        Stage 1 (ASR) passes tag None; tag_only ignores the transcript."""
        if tag is not None and tag not in TAGS:
            raise ValueError(f"unknown tag {tag!r}; expected one of {TAGS}")
        text = [] if self.cfg.prompt.answer_format == "tag_only" or not transcript else self.tokenizer.encode(transcript.strip() + " ")
        if tag is None:
            return (self.tokenizer.encode(transcript.strip()) if transcript else []) + [self.tokenizer.im_end_id], None
        return text + [self.tokenizer.token_to_id(tag), self.tokenizer.im_end_id], len(text)

    def splice(self, audio_embeds, audio_lens, rows: list[list[int]], labels: list[list[int]] | None = None,
               weights: list[list[float]] | None = None):
        """Replace the <audio> id of each row by that row's valid audio frames; left-pad the batch.

        rows: token ids per item, each with exactly one <audio>. labels: per-row targets aligned with
        rows (IGNORE where no loss), or None; weights: their loss weights, aligned the same way
        (default 1 per label). Returns inputs_embeds (B, L, D), attention_mask (B, L) bool,
        position_ids (B, L), and with labels, labels (B, L) and weights (B, L) float32. Audio
        positions and padding carry label IGNORE and weight 0."""
        embed = self.llm.model.embed_tokens
        if labels is not None and weights is None:
            weights = [[0.0 if t == IGNORE else 1.0 for t in row] for row in labels]
        seqs, labs, wts = [], [], []
        for i, ids in enumerate(rows):
            where = [j for j, t in enumerate(ids) if t == self.audio_id]
            if len(where) != 1:
                raise ValueError(f"prompt row {i} holds {len(where)} {self.cfg.prompt.audio_token} tokens; expected 1")
            j, n = where[0], int(audio_lens[i])
            text = embed(torch.tensor(ids, device=audio_embeds.device))  # (L_i, D)
            seqs.append(torch.cat([text[:j], audio_embeds[i, :n].to(text.dtype), text[j + 1:]]))
            if labels is not None:
                labs.append(labels[i][:j] + [IGNORE] * n + labels[i][j + 1:])
                wts.append(weights[i][:j] + [0.0] * n + weights[i][j + 1:])
        width = max(len(s) for s in seqs)
        B, D = len(seqs), seqs[0].shape[-1]
        inputs = seqs[0].new_zeros(B, width, D)
        mask = torch.zeros(B, width, dtype=torch.bool, device=inputs.device)
        target = torch.full((B, width), IGNORE, dtype=torch.long, device=inputs.device)
        weight = torch.zeros(B, width, device=inputs.device)
        for i, s in enumerate(seqs):
            inputs[i, width - len(s):] = s
            mask[i, width - len(s):] = True
            if labels is not None:
                target[i, width - len(s):] = torch.tensor(labs[i], device=inputs.device)
                weight[i, width - len(s):] = torch.tensor(wts[i], device=inputs.device)
        # Positions count real tokens only, as transformers' generate does for left padding.
        position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
        return (inputs, mask, position_ids) + ((target, weight) if labels is not None else ())

    # -- training --------------------------------------------------------------------------------

    def forward(self, audio, lengths, transcripts: list[str | None], tags: list[str | None],
                spk_targets=None, bg_spk_targets=None):
        """Training loss: token cross-entropy over the assistant's answer (transcript, tag, <|im_end|>);
        the prompt and audio positions carry none. The tag token weighs `tag_loss_weight`, every other
        answer token 1, and the loss is sum(w * ce) / sum(w) over the batch: a weighted token mean, so
        long transcripts count more than short ones, as in NeMo SALM's token-level mean.
        With ctc_loss_weight > 0, each clip's CTC negative log-likelihood of its transcript
        (sentences.normalize'd, in the head's SentencePiece pieces) joins the numerator, times the
        weight: loss = (sum(w * ce) + ctc_loss_weight * sum(ctc)) / sum(w), so micro-batches and
        ranks still combine into the global batch's exact value (train.py).
        Returns (loss, stats): the plain token loss and the tag loss for logging (and ctc_loss, per
        target piece), and `weight`, sum(w), which makes this batch's share of a larger batch's
        token mean (train.py)."""
        x, lens = self.encode(*self.features(audio, lengths), spk_targets, bg_spk_targets)  # (B, T, D_enc)
        audio_embeds, audio_lens = self.projector(x, lens)  # (B, T', D)
        prompt = self.prompt_ids()
        rows, labels, weights = [], [], []
        for transcript, tag in zip(transcripts, tags):
            answer, tag_at = self.answer_ids(transcript, tag)
            w = [1.0] * len(answer)
            if tag_at is not None:
                w[tag_at] = self.cfg.tag_loss_weight
            rows.append(prompt + answer)
            labels.append([IGNORE] * len(prompt) + answer)
            weights.append([0.0] * len(prompt) + w)
        inputs, mask, pos, target, weight = self.splice(audio_embeds, audio_lens, rows, labels, weights)
        h = self.llm(inputs_embeds=inputs, attention_mask=mask, position_ids=pos, return_hidden=True)  # (B, L, D)
        # The token at t is predicted from position t - 1. The head (D x V, V = 152k) runs only on
        # the few answer positions, not on the whole sequence.
        target, weight = target[:, 1:], weight[:, 1:]
        sel = target != IGNORE
        # float32 at least (bf16 logits would round the loss); float64 stays float64 for exactness tests
        logits = self.llm.lm_head(h[:, :-1][sel])
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # (n_answer, V)
        ce = F.cross_entropy(logits, target[sel], reduction="none")
        w = weight[sel]  # each label's own weight, spliced with it
        is_tag = torch.isin(target[sel], torch.tensor(self.tag_ids, device=ce.device))
        total = (ce * w).sum()
        stats = {"token_loss": ce.mean().detach(), "tag_loss": ce[is_tag].mean().detach() if is_tag.any() else None,
                 "weight": w.sum().detach()}
        if self.cfg.ctc_loss_weight > 0:
            ctc, n_pieces = self.ctc_loss(x, lens, transcripts)
            total = total + self.cfg.ctc_loss_weight * ctc
            stats["ctc_loss"] = (ctc / max(n_pieces, 1)).detach()
        return total / w.sum(), stats

    def ctc_loss(self, x: torch.Tensor, lens: torch.Tensor, transcripts: list[str | None]) -> tuple[torch.Tensor, int]:
        """Sum over clips of the CTC negative log-likelihood of each transcript (normalised as the
        head writes it) given encoded x (B, T, D_enc); clips without one add nothing. Returns
        (the sum, the number of target pieces). An impossible alignment (more pieces than frames)
        counts 0 (zero_infinity), not inf."""
        rows = [i for i, t in enumerate(transcripts) if t and t.strip()]
        if not rows:  # zero, but through the head: DDP expects a gradient for every trainable tensor
            return self.ctc.logits(x[:, :1]).sum() * 0, 0
        targets = [self.ctc_tokenizer.encode(normalize(transcripts[i])) for i in rows]
        logits = self.ctc.logits(x[rows])  # (b, T, V+1)
        # float32 at least, as for the token loss; (T, b, V+1), the layout F.ctc_loss takes
        log_probs = logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1).transpose(0, 1)
        flat = torch.tensor([p for t in targets for p in t], dtype=torch.long, device=x.device)
        nll = F.ctc_loss(log_probs, flat, lens[rows], torch.tensor([len(t) for t in targets], device=x.device),
                         blank=self.ctc.blank_id, reduction="sum", zero_infinity=True)
        return nll, sum(len(t) for t in targets)

    # -- inference -------------------------------------------------------------------------------

    @torch.inference_mode()
    def predict(self, audio, lengths, max_new_tokens: int = 64, spk_targets=None, bg_spk_targets=None, *,
                decoding: str | None = None, prompt_cache: bool = True, drafts: list[list[int]] | None = None) -> list[dict]:
        """audio (B, N), lengths (B,) -> per clip: transcript, tag, probs (softmax over the tag logits
        at the tag position), tag_mass (their share of the full-vocabulary softmax), tag_forced (the
        model closed its answer without a tag, so the tag was read at its last step), timings (s);
        decoding, llm_passes (LLM forward passes after the prompt), draft_tokens, accepted_tokens;
        with a CTC head, ctc_transcript.

        decoding: "greedy", "speculative" (the CTC transcript verified as a draft, speculative.py:
        the greedy answer in fewer LLM passes), or None: speculative where the model has a CTC head.
        prompt_cache: reuse the keys and values of the prompt text before <audio>. drafts: LLM ids
        per clip to verify instead of the CTC transcript's (tests, benchmarks)."""
        decoding = speculative.choose(self, decoding, drafts is not None)
        t0 = time.perf_counter()
        ctc_ids = None
        if self.can_draft:
            audio_embeds, audio_lens, ctc_ids = self.embed_audio(audio, lengths, spk_targets, bg_spk_targets, ctc=True)
        else:
            audio_embeds, audio_lens = self.embed_audio(audio, lengths, spk_targets, bg_spk_targets)
        t1 = time.perf_counter()
        B = len(audio_lens)
        ctc_texts = [self.ctc_tokenizer.decode(ids) for ids in ctc_ids] if ctc_ids is not None else None
        if decoding == "speculative" and drafts is None:
            drafts = [speculative.draft_ids(self, t) for t in ctc_texts]
        stop = self.tag_ids + self.tokenizer.eos_ids
        dec, prefix_s = speculative.answer(self, audio_embeds, audio_lens, max_new_tokens, stop, decoding, drafts,
                                           prompt_cache)
        t2 = time.perf_counter()
        out = []
        for i in range(B):
            ids = dec.tokens[i]
            at = next((k for k, t in enumerate(ids) if t in self.tag_ids), None)
            forced = at is None
            if forced:  # read the tag where the answer ended (its last generated step)
                at = next((k for k, t in enumerate(ids) if t in stop), len(ids) - 1)
            tag_logits = dec.kept[i, at]  # (3,) float32
            probs = torch.softmax(tag_logits, -1)
            out.append({
                "transcript": self.tokenizer.decode(ids[:at], skip_special_tokens=True).strip(),
                "tag": TAGS[int(probs.argmax())],
                "probs": dict(zip(TAGS, probs.tolist())),
                "tag_mass": float(torch.exp(tag_logits - dec.lse[i, at]).sum()),
                "tag_forced": forced,
                **({"ctc_transcript": ctc_texts[i]} if ctc_texts is not None else {}),
                "decoding": decoding, "llm_passes": dec.passes[i],
                "draft_tokens": len(drafts[i]) if decoding == "speculative" else 0,
                "accepted_tokens": dec.accepted[i],
                "timings": {"audio_s": round(t1 - t0, 4), "llm_s": round(t2 - t1, 4), "prefix_s": round(prefix_s, 4),
                            **dec.timings},
            })
        return out

    @property
    def can_draft(self) -> bool:
        """A CTC head with its SentencePiece model, so predict can draft the transcript (a head
        without its pieces drafts nothing)."""
        return self.ctc is not None and self.encoder_tokenizer is not None

    @property
    def ctc_tokenizer(self) -> sentencepiece.SentencePieceProcessor:
        """The CTC head's SentencePiece model (encoder_tokenizer.model)."""
        if getattr(self, "_spm", None) is None:
            if self.encoder_tokenizer is None:
                raise ValueError("this Speech-LLM has a CTC head but no encoder SentencePiece model")
            self._spm = sentencepiece.SentencePieceProcessor(model_proto=self.encoder_tokenizer)
        return self._spm

    # -- new parts -------------------------------------------------------------------------------

    def new_speaker_kernels(self, cfg: SpeakerKernelConfig, seed: int = 0) -> None:
        """Freshly initialised speaker kernels (speaker.init_weights: they add exactly 0 at first),
        in place of any the model has. Seeded on their own, so the draw does not depend on what
        else is new."""
        if self.cfg.encoder_kind == "whisper":
            raise ValueError(NO_KERNELS)
        torch.manual_seed(seed)
        self.spk_kernels, self.bg_spk_kernels = build_kernels(cfg, self.cfg.encoder.d_model, self.cfg.encoder.n_layers)
        init_speaker_kernels(self.spk_kernels, self.bg_spk_kernels)
        self.cfg = replace(self.cfg, speaker=cfg)

    def new_projector(self, cfg: ProjectorConfig, seed: int = 0) -> None:
        """A freshly initialised projector (its init_weights), seeded on its own."""
        torch.manual_seed(seed)
        self.projector = build_projector(cfg)
        self.projector.init_weights()
        self.cfg = replace(self.cfg, projector=cfg)

    # -- checkpoints -----------------------------------------------------------------------------

    def save_pretrained(self, path) -> None:
        """config.json, model.safetensors (the tied LM head stored once), tokenizer.json (+ config),
        and the encoder's SentencePiece model as encoder_tokenizer.model."""
        state = self.state_dict()
        if self.cfg.llm.tie_word_embeddings:
            del state["llm.lm_head.weight"]  # safetensors refuses tensors that share memory
        self.tokenizer.save_pretrained(path)
        spm = {"encoder_tokenizer.model": self.encoder_tokenizer} if self.encoder_tokenizer is not None else {}
        save_dir(path, self.cfg.to_dict(), state, spm)

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = None) -> "SpeechLLM":
        """Load a directory written by save_pretrained. dtype None keeps the stored dtype; the
        log-mel frontend always stays float32."""
        path = Path(path)
        require(path, ("config.json", "model.safetensors", "tokenizer.json"), "a Speech-LLM checkpoint directory")
        cfg = read_config(path / "config.json", SpeechLLMConfig.from_dict)
        tok = Tokenizer.from_pretrained(path, extra_special_tokens=(cfg.prompt.audio_token, *TAGS))
        spm = path / "encoder_tokenizer.model"
        if cfg.ctc and not spm.is_file():
            raise FileNotFoundError(f"{path}: config.json has a ctc head but encoder_tokenizer.model, its pieces, is missing")
        with torch.device("meta"):
            model = cls(cfg, tok, spm.read_bytes() if spm.is_file() else None)
        expected = model.state_dict()
        tied = cfg.llm.tie_word_embeddings
        if tied:  # the file holds the embedding once (a head stored anyway is ignored)
            del expected["llm.lm_head.weight"]
        state = read_state(path, expected, ignore=("llm.lm_head.weight",) if tied else ())
        if tied:
            state["llm.lm_head.weight"] = state["llm.model.embed_tokens.weight"]
        model.load_state_dict(state, strict=True, assign=True)
        if tied:
            model.llm.tie_weights()  # assign=True gave the head its own Parameter object
        if cfg.encoder_kind == "whisper":  # its window and filters are computed, never stored: build them for real
            model.encoder.frontend = WhisperFrontend(cfg.encoder)
        if dtype is not None:
            model.to(dtype)  # the frontend stays float32 (LogMelFrontend._apply, WhisperFrontend._apply)
        if model.preprocessor is not None:
            model.preprocessor.float()  # also when the file stored the frontend's buffers in bf16
        return model.eval()


def fitted_projector(d_enc: int, d_llm: int, fields: dict | None = None) -> ProjectorConfig:
    """The default projector for these widths, `fields` over it. Each kind has its own defaults:
    conv_transformer (seed 000) works at the LLM's width, with 64-wide heads and a 4x MLP;
    causal_transformer is seed 004's: 4 layers at width 512, 8 heads, MLP 2048, and stride 1
    (one LLM position per encoder frame: 50 per second from Whisper, 1500 for a 30 s clip)."""
    fields = dict(fields or {})
    kind = fields.get("kind", "conv_transformer")
    fitted = ProjectorConfig(kind=kind, in_dim=d_enc, out_dim=d_llm, n_heads=max(1, d_llm // 64), ffn_dim=4 * d_llm)
    if kind == "causal_transformer":
        fitted = replace(fitted, stride=1, n_layers=4, hidden=512, n_heads=8, ffn_dim=2048)
    return ProjectorConfig.from_dict({**fitted.to_dict(), **fields})


def assemble(encoder_nemo, llm_dir, projector: ProjectorConfig | dict | None = None, prompt: PromptConfig | None = None,
             speaker: SpeakerKernelConfig | None = None, seed: int = 0) -> SpeechLLM:
    """A fresh Speech-LLM, the Stage-1 starting point: an encoder (load_encoder: a FastConformer
    .nemo archive or its converted directory, or a Hugging Face Whisper directory), an LLM directory
    (load_llm: Qwen2 / Qwen2.5, Qwen3, Qwen3.5), a new projector, and the <audio> and tag tokens.
    Pretrained weights are kept as they are; only new parameters are initialised.
    A FastConformer CTC archive's decoder is kept as the transcript drafter (speculative.py), with
    its SentencePiece model.

    projector: its config, or fields over the default for its kind at the encoder's and the LLM's
    widths (fitted_projector; conv_transformer unless `kind` says otherwise). speaker: new speaker
    kernels, unless the archive's own (trained) ones have this config; None keeps the archive's,
    if any. FastConformer only: a Whisper encoder has none and refuses them."""
    asr = load_encoder(encoder_nemo)  # an ASRModel, or a WhisperEncoder
    whisper = encoder_kind(asr) == "whisper"
    if whisper and speaker is not None:
        raise ValueError(NO_KERNELS)
    llm = load_llm(llm_dir, dtype=torch.float32)
    prompt = prompt or PromptConfig()
    tok = Tokenizer.from_pretrained(llm_dir, extra_special_tokens=(prompt.audio_token, *TAGS))
    fit_embeddings(llm, tok)
    if not isinstance(projector, ProjectorConfig):
        projector = fitted_projector(asr.out_dim, llm.config.hidden_size, projector)
    # a CTC archive's decoder travels along as the draft head
    ctc = CTCConfig(asr.cfg.vocab_size) if not whisper and asr.decoder is not None else None
    if whisper:
        cfg = SpeechLLMConfig(None, asr.cfg, projector, llm.config, prompt)
    else:
        cfg = SpeechLLMConfig(asr.cfg.preprocessor, asr.cfg.encoder, projector, llm.config, prompt,
                              speaker=asr.cfg.speaker, ctc=ctc)
    with torch.device("meta"):
        model = SpeechLLM(cfg, tok, None if whisper else asr.tokenizer_model)
    if whisper:
        model.encoder, model.llm = asr, llm
    else:
        model.preprocessor, model.encoder, model.llm = asr.preprocessor, asr.encoder, llm
        model.spk_kernels, model.bg_spk_kernels = asr.spk_kernels, asr.bg_spk_kernels
        model.ctc = CTCHead.of(asr.decoder) if ctc else None
    if speaker is not None and speaker != asr.cfg.speaker:
        model.new_speaker_kernels(speaker, seed)
    model.new_projector(projector, seed)
    init_token_rows(llm, [model.audio_id, *model.tag_ids])
    return model.eval()
