"""Bring upstream checkpoints in: NeMo `.nemo` archives today.

A `.nemo` file is a tar (uncompressed since NeMo 1.7, gzip before) holding `model_config.yaml`,
`model_weights.ckpt` (a `torch.save`d state dict, no prefix) and artifacts renamed
`<uuid>_<name>`, such as the SentencePiece `..._tokenizer.model`. We never extract it: the small
members are read in memory, and the weights are streamed into a temporary file whose name we choose,
then loaded with `weights_only=True`, so an archive from elsewhere can neither run code nor write
outside that file.

Key renaming is a visible table per source format. `remap` applies one and reports every problem at
once: source tensors nothing consumed, target tensors nothing filled, and shape mismatches.
"""
import os
import tarfile
import tempfile
from pathlib import Path

import torch
import yaml

# NeMo key prefix -> our key prefix. Our module names mirror NeMo's, so most rows are identities;
# None means "known and deliberately not imported".
NEMO_CTC_KEYS = {
    "preprocessor.featurizer.window": "preprocessor.window",
    "preprocessor.featurizer.fb": "preprocessor.fb",
    "encoder.": "encoder.",
    "decoder.decoder_layers.0.": "decoder.decoder_layers.0.",
}

# NeMo model classes we know how to import as a CTC ASR model.
NEMO_CTC_TARGETS = ("EncDecCTCModelBPE", "EncDecCTCModel")


class ConversionError(ValueError):
    pass


def remap(table: dict, source: dict, expected: dict, what: str) -> dict:
    """Rename `source` keys with `table` (prefix -> prefix or None) and check them against
    `expected` (our key -> tensor or shape). Raises ConversionError listing every problem."""
    out, unused, dropped = {}, [], []
    for key, tensor in source.items():
        prefix = max((p for p in table if key.startswith(p)), key=len, default=None)
        if prefix is None:
            unused.append(key)
        elif table[prefix] is None:
            dropped.append(key)
        else:
            out[table[prefix] + key[len(prefix):]] = tensor
    missing = sorted(set(expected) - set(out))
    unexpected = sorted(set(out) - set(expected))
    mismatched = [
        f"{k}: checkpoint {tuple(out[k].shape)} vs model {tuple(_shape(expected[k]))}"
        for k in sorted(set(out) & set(expected))
        if tuple(out[k].shape) != tuple(_shape(expected[k]))
    ]
    problems = []
    if unused:
        problems.append(f"{len(unused)} tensors nothing maps: {_short(unused)}")
    if unexpected:
        problems.append(f"{len(unexpected)} tensors the model does not have: {_short(unexpected)}")
    if missing:
        problems.append(f"{len(missing)} model tensors missing from the checkpoint: {_short(missing)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches: {_short(mismatched)}")
    if problems:
        raise ConversionError(f"cannot import {what}:\n  " + "\n  ".join(problems))
    return out


def _shape(x):
    return x.shape if hasattr(x, "shape") else x


def _short(names, n=20):
    return ", ".join(names[:n]) + (f", ... ({len(names) - n} more)" if len(names) > n else "")


# ----------------------------------------------------------------------------------------------
# .nemo archives


class NemoArchive:
    """Read-only view of a `.nemo` tar: `config` (dict), `artifact(name)` bytes, `state_dict()`."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such .nemo file")
        try:
            self._tar = tarfile.open(self.path, "r:")  # NeMo >= 1.7 writes plain tar
        except tarfile.ReadError:
            try:
                self._tar = tarfile.open(self.path, "r:gz")
            except (tarfile.ReadError, OSError) as e:
                raise ConversionError(f"{self.path}: not a .nemo archive (not a tar file): {e}") from None
        # Members by base name, "./model_config.yaml" -> "model_config.yaml". Only regular files count;
        # links, devices and directories are ignored, and nothing is ever extracted.
        self._members = {}
        for m in self._tar.getmembers():
            if m.isfile():
                self._members.setdefault(os.path.basename(m.name), m)
        if "model_config.yaml" not in self._members or "model_weights.ckpt" not in self._members:
            raise ConversionError(
                f"{self.path}: a .nemo archive needs model_config.yaml and model_weights.ckpt; "
                f"found {sorted(self._members)}"
            )
        self.config = yaml.safe_load(self._read("model_config.yaml"))

    def _read(self, name) -> bytes:
        return self._tar.extractfile(self._members[name]).read()

    @property
    def target(self) -> str:
        return str(self.config.get("target") or self.config.get("_target_") or "")

    def artifact(self, ref: str) -> bytes:
        """Bytes of an artifact referenced from the config as 'nemo:<uuid>_<name>' (or a bare name)."""
        name = os.path.basename(ref.removeprefix("nemo:"))
        if name not in self._members:
            raise ConversionError(f"{self.path}: artifact {ref!r} is not in the archive")
        return self._read(name)

    def state_dict(self) -> dict:
        # Stream the weights into a file we name, then memory-map it: an fp32 0.6B model is 2.4 GB
        # and reading it into a bytes object first would double peak memory.
        src = self._tar.extractfile(self._members["model_weights.ckpt"])
        with tempfile.NamedTemporaryFile(suffix=".ckpt") as tmp:
            while chunk := src.read(1 << 24):
                tmp.write(chunk)
            tmp.flush()
            try:
                sd = torch.load(tmp.name, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise ConversionError(f"{self.path}: cannot read model_weights.ckpt safely: {e}") from None
            # Materialise before the temporary file goes away.
            sd = {k: v.clone() for k, v in sd.items()}
        if "state_dict" in sd and isinstance(sd["state_dict"], dict):  # a Lightning checkpoint
            sd = sd["state_dict"]
        return sd

    def close(self):
        self._tar.close()


def read_nemo_tokenizer(archive: NemoArchive) -> bytes:
    tok = archive.config.get("tokenizer") or {}
    ref = tok.get("model_path")
    if ref is None:
        names = [n for n in archive._members if n.endswith("tokenizer.model")]
        if len(names) != 1:
            raise ConversionError(f"{archive.path}: no SentencePiece tokenizer model found")
        ref = names[0]
    return archive.artifact(ref)


def convert_nemo(path, out_dir, legacy_frontend: bool = False):
    """`.nemo` -> `out_dir` with config.json, model.safetensors and tokenizer.model.
    Returns the ASRModel it wrote."""
    from .asr import ASRModel

    model = ASRModel.from_nemo(path, legacy_frontend=legacy_frontend)
    model.save_pretrained(out_dir)
    return model


def load_nemo_state(archive: NemoArchive, model: torch.nn.Module, table: dict) -> None:
    sd = remap(table, archive.state_dict(), model.state_dict(), f"{archive.path} ({archive.target})")
    model.load_state_dict(sd, strict=True)



# ----------------------------------------------------------------------------------------------
# speaker models: SortFormer diarizer, multitalker (speaker-kernel) ASR

# SortformerEncLabelModel, offline path. Module names mirror NeMo's, so apart from the frontend every
# row is an identity; the table exists to say what is (not) imported.
NEMO_SORTFORMER_KEYS = {
    "preprocessor.featurizer.window": "preprocessor.window",
    "preprocessor.featurizer.fb": "preprocessor.fb",
    "encoder.": "encoder.",
    "sortformer_modules.encoder_proj.": "sortformer_modules.encoder_proj.",
    "sortformer_modules.first_hidden_to_hidden.": "sortformer_modules.first_hidden_to_hidden.",
    "sortformer_modules.single_hidden_to_spks.": "sortformer_modules.single_hidden_to_spks.",
    # Linear(2 * tf_d_model -> num_spks): in every checkpoint, read by no forward path in NeMo 3.0.0.
    "sortformer_modules.hidden_to_spks.": None,
    "transformer_encoder.layers.": "transformer_encoder.layers.",
}
NEMO_SORTFORMER_TARGETS = ("SortformerEncLabelModel",)

# SpeakerKernelMixin kernels sit at the model's top level in NeMo and in ASRModel alike.
NEMO_SPK_KERNEL_KEYS = {
    "spk_kernels.": "spk_kernels.",
    "bg_spk_kernels.": "bg_spk_kernels.",
}

# EncDecMultiTalkerRNNTBPEModel: we import the encoder side only. There is no RNNT decoding here, so
# the prediction network and joint are left out, and ASRModel.from_nemo logs their names.
NEMO_MULTITALKER_KEYS = {
    "preprocessor.featurizer.window": "preprocessor.window",
    "preprocessor.featurizer.fb": "preprocessor.fb",
    "encoder.": "encoder.",
    **NEMO_SPK_KERNEL_KEYS,
    "decoder.": None,  # RNNT prediction network (embedding + LSTM)
    "joint.": None,  # RNNT joint network
}
NEMO_MULTITALKER_TARGETS = ("EncDecMultiTalkerRNNTBPEModel",)


def dropped_keys(table: dict, source: dict) -> list[str]:
    """Source keys that `table` deliberately leaves out (their longest matching prefix maps to None)."""
    out = []
    for key in source:
        prefix = max((p for p in table if key.startswith(p)), key=len, default=None)
        if prefix is not None and table[prefix] is None:
            out.append(key)
    return out


def convert_nemo_any(path, out_dir, legacy_frontend: bool = False):
    """`convert_nemo` for every archive we can import: a SortFormer diarizer becomes a SortFormer
    directory, anything else goes to ASRModel (which refuses what it cannot read). Returns the model."""
    archive = NemoArchive(path)
    target = archive.target
    archive.close()
    if target.endswith(NEMO_SORTFORMER_TARGETS):
        from .sortformer import SortFormer

        model = SortFormer.from_nemo(path, legacy_frontend=legacy_frontend)
        model.save_pretrained(out_dir)
        return model
    return convert_nemo(path, out_dir, legacy_frontend=legacy_frontend)
