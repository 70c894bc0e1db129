"""FastConformer-CTC speech recogniser: NeMo's EncDecCTCModelBPE without NeMo.

    audio (B, N) @16 kHz --preprocessor--> (B, n_mels, T_mel) --encoder--> (B, T, D)
          --decoder (1x1 conv)--> log-probs (B, T, vocab+1), blank = last index

A checkpoint directory holds config.json, model.safetensors and the SentencePiece tokenizer.model;
`ASRModel.from_nemo` reads a `.nemo` archive directly, and `convert_weights.py nemo` writes the
directory once so later loads are a memory-mapped safetensors read.

Optional speaker kernels (speaker.py) steer the encoder towards one speaker: `encode(features,
lengths, spk_targets, bg_spk_targets)`. `from_nemo` also reads NeMo's multitalker RNNT model
(EncDecMultiTalkerRNNTBPEModel) for its preprocessor, encoder and kernels; without an RNNT decoder
here, such a model encodes but cannot transcribe (vocab_size None: no CTC head).
"""
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
import torch.nn as nn
from tqdm import tqdm

from .audio import SAMPLE_RATE, AudioError, LogMelFrontend, PreprocessorConfig, check_audio, load_audio, pad_batch
from .config import refuse_unknown
from .convert import NEMO_CTC_KEYS, ConversionError, dropped_keys, open_nemo, read_nemo_tokenizer, reading, remap
from .fastconformer import FastConformer, FastConformerConfig
from .speaker import SpeakerKernelConfig, build_kernels, kernel_hook
from .weights import read_config, read_state, require, save_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ASRConfig:
    preprocessor: PreprocessorConfig
    encoder: FastConformerConfig
    vocab_size: int | None  # SentencePiece pieces, without the CTC blank; None: no CTC head
    speaker: SpeakerKernelConfig | None = None  # speaker kernels; None: none

    def to_dict(self) -> dict:
        d = {
            "model_type": "fastconformer_ctc",
            "preprocessor": self.preprocessor.to_dict(),
            "encoder": self.encoder.to_dict(),
            "vocab_size": self.vocab_size,
        }
        if self.speaker is not None:
            d["speaker_kernels"] = self.speaker.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ASRConfig":
        if d.get("model_type") != "fastconformer_ctc":
            raise ValueError(f"not an ASR checkpoint config: model_type={d.get('model_type')!r}")
        refuse_unknown(d, ("model_type", "preprocessor", "encoder", "vocab_size", "speaker_kernels"))
        return cls(
            preprocessor=PreprocessorConfig.from_dict(d["preprocessor"]),
            encoder=FastConformerConfig.from_dict(d["encoder"]),
            vocab_size=d["vocab_size"],
            speaker=SpeakerKernelConfig.from_dict(d["speaker_kernels"]) if "speaker_kernels" in d else None,
        )


class CTCDecoder(nn.Module):
    """NeMo ConvASRDecoder: a 1x1 Conv1d to vocab+1 classes, the blank last."""

    def __init__(self, d_in: int, vocab_size: int):
        super().__init__()
        self.decoder_layers = nn.Sequential(nn.Conv1d(d_in, vocab_size + 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder_layers(x.transpose(1, 2)).transpose(1, 2)  # (B, T, V+1) logits


class CTCHead(nn.Module):
    """A CTC decoder's weights carried by the Speech-LLM: the transcript drafter of speculative
    decoding, and, with the model's ctc_loss_weight > 0, an auxiliary CTC loss on the encoder
    (the demo trains its head that way). The same 1x1 conv to vocab+1 classes (blank last) as
    CTCDecoder, as a (V+1, D_enc) matrix. With ctc_loss_weight 0 the loss never reaches it and
    optim.setup_trainable freezes it. Keys: ctc.weight (V+1, D_enc), ctc.bias (V+1,)."""

    def __init__(self, d_in: int, vocab_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(vocab_size + 1, d_in))
        self.bias = nn.Parameter(torch.zeros(vocab_size + 1))

    @classmethod
    def of(cls, decoder: CTCDecoder) -> "CTCHead":
        conv = decoder.decoder_layers[0]
        head = cls(conv.in_channels, conv.out_channels - 1)
        with torch.no_grad():
            head.weight.copy_(conv.weight[:, :, 0])
            head.bias.copy_(conv.bias)
        return head

    @property
    def blank_id(self) -> int:
        return self.weight.shape[0] - 1

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """encoded (B, T, D_enc) -> (B, T, V+1)."""
        return x @ self.weight.to(x.dtype).T + self.bias.to(x.dtype)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
        """encoded (B, T, D_enc), lengths (B,) -> greedy CTC piece ids per item."""
        with torch.no_grad():
            return ctc_greedy(self.logits(x), lengths, self.blank_id)


def ctc_greedy(log_probs: torch.Tensor, lengths: torch.Tensor, blank: int) -> list[list[int]]:
    """Best path per item: argmax per valid frame, merge repeats, drop blanks."""
    out = []
    for frames, n in zip(log_probs.argmax(-1).tolist(), lengths.tolist()):
        ids, prev = [], None
        for t in frames[:n]:
            if t != prev and t != blank:
                ids.append(t)
            prev = t
        out.append(ids)
    return out


class ASRModel(nn.Module):
    def __init__(self, cfg: ASRConfig, tokenizer_model: bytes | None = None):
        super().__init__()
        self.cfg = cfg
        self.preprocessor = LogMelFrontend(cfg.preprocessor)
        self.encoder = FastConformer(cfg.encoder)
        self.decoder = CTCDecoder(cfg.encoder.out_dim, cfg.vocab_size) if cfg.vocab_size is not None else None
        self.spk_kernels = self.bg_spk_kernels = None
        if cfg.speaker is not None:
            # Top-level attributes, so the keys are NeMo's: spk_kernels.<L>.0.weight, ...
            self.spk_kernels, self.bg_spk_kernels = build_kernels(cfg.speaker, cfg.encoder.d_model, cfg.encoder.n_layers)
        self.tokenizer_model = tokenizer_model
        self.tokenizer = None
        if tokenizer_model is not None:
            self.tokenizer = spm.SentencePieceProcessor(model_proto=tokenizer_model)

    @property
    def out_dim(self) -> int:
        """Width of the encoded frames, as WhisperEncoder.out_dim."""
        return self.cfg.encoder.out_dim

    @property
    def blank_id(self) -> int:
        return self.cfg.vocab_size

    # -- the three stages ------------------------------------------------------------------------

    def features(self, audio: torch.Tensor, lengths: torch.Tensor):
        """audio (B, N) float at 16 kHz, lengths (B,) samples -> (B, n_mels, T_mel), (B,) frames."""
        return self.preprocessor(audio, lengths)

    def encode(self, features: torch.Tensor, lengths: torch.Tensor, spk_targets: torch.Tensor | None = None,
               bg_spk_targets: torch.Tensor | None = None, **kw):
        """(B, n_mels, T_mel), (B,) -> encoded (B, T, D), lengths (B,).

        With speaker kernels, spk_targets / bg_spk_targets (B, T) are the target speaker's and the
        other speakers' activity per encoder frame; None gives NeMo's single-speaker defaults."""
        hook = kernel_hook(self.spk_kernels, self.bg_spk_kernels, spk_targets, bg_spk_targets)
        return self.encoder(features, lengths, layer_hook=hook, **kw)

    def forward(self, audio: torch.Tensor, lengths: torch.Tensor):
        """audio (B, N), lengths (B,) samples -> CTC log-probs (B, T, vocab+1), lengths (B,)."""
        self._require_ctc()
        feats, feat_lens = self.features(audio, lengths)
        x, enc_lens = self.encode(feats, feat_lens)
        # log_softmax in fp32 even under autocast: CTC decisions hinge on small margins.
        return torch.log_softmax(self.decoder(x).float(), dim=-1), enc_lens

    def _require_ctc(self):
        if self.decoder is None:
            raise RuntimeError("this ASRModel has no CTC decoder (it came from an archive without one, "
                               "e.g. an RNNT model); it can encode() but not transcribe")

    # -- inference -------------------------------------------------------------------------------

    @torch.inference_mode()
    def transcribe(self, inputs, batch_size: int = 8, progress: bool = False) -> list[str]:
        """Paths or 1-D float arrays (16 kHz) -> transcripts, in input order."""
        self._require_ctc()
        if self.tokenizer is None:
            raise RuntimeError("this ASRModel has no tokenizer; load it from a checkpoint directory or .nemo")
        single = isinstance(inputs, (str, Path)) or (
            isinstance(inputs, (np.ndarray, torch.Tensor)) and inputs.ndim == 1
        )
        inputs = [inputs] if single else list(inputs)
        hop = self.cfg.preprocessor.hop_length
        clips = [prepare_clip(x, f"input #{i}", hop) for i, x in enumerate(inputs)]
        order = sorted(range(len(clips)), key=lambda i: -len(clips[i]))  # similar lengths share a batch
        texts = [""] * len(clips)
        device = next(self.parameters()).device
        batches = range(0, len(order), batch_size)
        for start in tqdm(batches, desc="transcribe", unit="batch", disable=not progress):
            idx = order[start:start + batch_size]
            audio, lengths = pad_batch([clips[i] for i in idx])
            log_probs, enc_lens = self(audio.to(device), lengths.to(device))
            for i, ids in zip(idx, ctc_greedy(log_probs, enc_lens, self.blank_id)):
                texts[i] = self.tokenizer.decode(ids)
        return texts[0] if single else texts

    # -- checkpoints -----------------------------------------------------------------------------

    @classmethod
    def from_nemo(cls, path, legacy_frontend: bool = False) -> "ASRModel":
        archive, table = open_nemo(path, "fastconformer_ctc", "an ASR model we can import")
        with reading(archive, path):
            target = archive.target
            ctc = table is NEMO_CTC_KEYS  # else the multitalker RNNT model: encoder and kernels only
            c = archive.config
            pre = PreprocessorConfig.from_nemo(c["preprocessor"], legacy=legacy_frontend)
            enc = FastConformerConfig.from_nemo(c["encoder"])
            speaker = SpeakerKernelConfig.from_nemo(c, enc)
            vocab = int(c["decoder"]["num_classes"]) if ctc else None
            model = cls(ASRConfig(pre, enc, vocab, speaker), read_nemo_tokenizer(archive))
            source = archive.state_dict()
            sd = remap(table, source, model.state_dict(), f"{path} ({target})")
            model.load_state_dict(sd, strict=True)
            if left_out := dropped_keys(table, source):
                log.warning("%s: %d RNNT decoder/joint tensors not imported (there is no RNNT decoding here, "
                            "so this model can encode but not transcribe): %s", path, len(left_out), ", ".join(left_out))
        if vocab is not None and model.tokenizer.get_piece_size() != vocab:
            raise ConversionError(
                f"{path}: tokenizer has {model.tokenizer.get_piece_size()} pieces but the CTC head expects {vocab}"
            )
        return model.eval()

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = None) -> "ASRModel":
        path = Path(path)
        require(path, ("config.json", "model.safetensors"), "an ASR checkpoint directory")
        cfg = read_config(path / "config.json", ASRConfig.from_dict)
        tok = (path / "tokenizer.model").read_bytes() if (path / "tokenizer.model").is_file() else None
        with torch.device("meta"):
            model = cls(cfg)
        model.tokenizer_model = tok
        model.tokenizer = spm.SentencePieceProcessor(model_proto=tok) if tok else None
        model.load_state_dict(read_state(path, model.state_dict()), strict=True, assign=True)
        if dtype is not None:
            model.to(dtype)  # the frontend stays fp32 (LogMelFrontend._apply)
        return model.eval()

    def save_pretrained(self, path) -> None:
        tok = {"tokenizer.model": self.tokenizer_model} if self.tokenizer_model is not None else {}
        save_dir(path, self.cfg.to_dict(), self.state_dict(), tok)


def prepare_clip(x, name: str, min_samples: int) -> np.ndarray:
    """A path (loaded and resampled to 16 kHz) or a 1-D array already at 16 kHz -> checked float32
    samples. Raises AudioError naming the input when it cannot make one encoder frame."""
    if isinstance(x, (str, Path)):
        name, audio = str(x), load_audio(x)
    else:
        audio = check_audio(np.asarray(x.cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float32), name)
    if len(audio) < min_samples:
        raise AudioError(
            f"{name}: {len(audio)} samples ({len(audio) / SAMPLE_RATE * 1000:.1f} ms) is too short; "
            f"at least {min_samples} samples ({min_samples / SAMPLE_RATE * 1000:.0f} ms) make one encoder frame"
        )
    return audio
