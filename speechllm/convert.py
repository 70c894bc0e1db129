"""Bring upstream checkpoints in: NeMo `.nemo` archives, NeMo SALM directories and full training
checkpoints (step_N.pt). This module reads files; it builds no model (the models import it).

A `.nemo` file is a tar (uncompressed since NeMo 1.7, gzip before) holding `model_config.yaml`,
`model_weights.ckpt` (a `torch.save`d state dict, no prefix) and artifacts renamed
`<uuid>_<name>`, such as the SentencePiece `..._tokenizer.model`. We never extract it: the small
members are read in memory, and the weights are streamed into a temporary file whose name we choose,
then loaded with `weights_only=True`, so an archive from elsewhere can neither run code nor write
outside that file.

Key renaming is a visible table per source format, all of them in the block below. `remap` applies
one and reports every problem at once: source tensors nothing consumed, target tensors nothing
filled, and shape mismatches.
"""
import contextlib
import os
import tarfile
import tempfile
from pathlib import Path

import torch
import yaml

from .weights import ConversionError, check_fit, headers, read_json, short, yaml_problem

# ----------------------------------------------------------------------------------------------
# key tables: source key prefix -> our key prefix; the longest matching prefix wins. Our module names
# mirror NeMo's, so most rows are identities; None means "known and deliberately not imported".

# SpeakerKernelMixin kernels sit at the model's top level in NeMo and in ASRModel alike.
NEMO_SPK_KERNEL_KEYS = {
    "spk_kernels.": "spk_kernels.",
    "bg_spk_kernels.": "bg_spk_kernels.",
}

# EncDecCTCModel(BPE): frontend, encoder, CTC head, and speaker kernels when the config has them.
NEMO_CTC_KEYS = {
    "preprocessor.featurizer.window": "preprocessor.window",
    "preprocessor.featurizer.fb": "preprocessor.fb",
    "encoder.": "encoder.",
    "decoder.decoder_layers.0.": "decoder.decoder_layers.0.",
    **NEMO_SPK_KERNEL_KEYS,
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

# SortformerEncLabelModel, offline path. Apart from the frontend every row is an identity; the table
# exists to say what is (not) imported.
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

# NeMo model class (the end of the config's `target`) -> (our model_type, its key table). The one map
# that ASRModel.from_nemo, SortFormer.from_nemo, speechllm.from_nemo and `inspect` read.
NEMO_MODELS = {
    "EncDecCTCModelBPE": ("fastconformer_ctc", NEMO_CTC_KEYS),
    "EncDecCTCModel": ("fastconformer_ctc", NEMO_CTC_KEYS),
    "EncDecMultiTalkerRNNTBPEModel": ("fastconformer_ctc", NEMO_MULTITALKER_KEYS),
    "SortformerEncLabelModel": ("sortformer", NEMO_SORTFORMER_KEYS),
}

# NeMo speechlm2 SALM's model.safetensors -> a SpeechLLM with the "salm" projector. The tied head
# comes from the file's alias metadata (salm.load_state).
SALM_KEYS = {
    "embed_tokens.": "llm.model.embed_tokens.",
    "llm.model.": "llm.model.",
    "llm.lm_head.": "llm.lm_head.",
    "perception.preprocessor.featurizer.": "preprocessor.",
    "perception.encoder.": "encoder.",
    "perception.modality_adapter.": "projector.modality_adapter.",
    "perception.proj.": "projector.proj.",
}

# Component prefixes seen in Speech-LLM training checkpoints -> ours. The longest prefix wins, so an
# ASR model kept whole under `encoder` (encoder.encoder.*, encoder.preprocessor.*) and NeMo SALM's
# `perception.*` both land in the right place.
SPEECHLLM_CKPT_KEYS = {
    "preprocessor.featurizer.": "preprocessor.",
    "preprocessor.": "preprocessor.",
    "encoder.": "encoder.",
    "encoder.preprocessor.featurizer.": "preprocessor.",
    "encoder.encoder.": "encoder.",
    "encoder.decoder.": None,  # the ASR model's CTC head: not part of the Speech-LLM
    "encoder.spk_kernels.": "spk_kernels.",
    "encoder.bg_spk_kernels.": "bg_spk_kernels.",
    "spk_kernels.": "spk_kernels.",
    "bg_spk_kernels.": "bg_spk_kernels.",
    "perception.preprocessor.featurizer.": "preprocessor.",
    "perception.encoder.": "encoder.",
    "perception.modality_adapter.": "projector.modality_adapter.",
    "perception.proj.": "projector.proj.",
    "projector.": "projector.",
    "llm.": "llm.",
    "llm.base_model.model.": "llm.",  # PEFT-wrapped LLM (LoRA factors are merged first)
    "ctc.": "ctc.",  # our CTC draft head (never trained: absent from a file, the base's stays)
    "embed_tokens.": "llm.model.embed_tokens.",  # SALM keeps the embedding outside the LLM
    "decoder.": None,
}


def nemo_model(target: str) -> tuple[str | None, dict | None]:
    """A NeMo config's target class -> (our model_type, key table), or (None, None) if unknown."""
    name = next((c for c in NEMO_MODELS if target.endswith(c)), None)
    return NEMO_MODELS.get(name, (None, None))


def place(table: dict, source: dict) -> tuple[dict, dict, list[str]]:
    """Rename `source` keys with `table`: the longest matching prefix is replaced by its target, and a
    None target drops the key on purpose. -> (our key -> tensor, source key -> our key or None,
    source keys no prefix matches)."""
    ours, where, unplaced = {}, {}, []
    for key, tensor in source.items():
        prefix = max((p for p in table if key.startswith(p)), key=len, default=None)
        if prefix is None:
            unplaced.append(key)
            continue
        where[key] = None if table[prefix] is None else table[prefix] + key[len(prefix):]
        if where[key] is not None:
            ours[where[key]] = tensor
    return ours, where, unplaced


def remap(table: dict, source: dict, expected: dict, what: str) -> dict:
    """`place` `source` with `table` and check the result against `expected` (our key -> tensor or
    shape). Raises ConversionError listing every problem (weights.check_fit)."""
    out, _, unplaced = place(table, source)
    check_fit(out, expected, what, unplaced)
    return out


def dropped_keys(table: dict, source: dict) -> list[str]:
    """Source keys that `table` deliberately leaves out (their longest matching prefix maps to None)."""
    return [k for k, ours in place(table, source)[1].items() if ours is None]


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
        try:
            for m in self._tar.getmembers():
                if m.isfile():
                    self._members.setdefault(os.path.basename(m.name), m)
        except (tarfile.TarError, EOFError, OSError) as e:
            self._tar.close()
            raise ConversionError(f"{self.path}: a broken .nemo archive (truncated or damaged tar: {e})") from None
        if "model_config.yaml" not in self._members or "model_weights.ckpt" not in self._members:
            raise ConversionError(
                f"{self.path}: a .nemo archive needs model_config.yaml and model_weights.ckpt; "
                f"found {sorted(self._members)}"
            )
        # safe_load builds plain data only: a tag such as !!python/object is refused, never run.
        try:
            self.config = yaml.safe_load(self._read("model_config.yaml"))
        except yaml.YAMLError as e:
            self._tar.close()
            raise ConversionError(f"{self.path}: model_config.yaml is not plain YAML ({yaml_problem(e)})") from None
        if not isinstance(self.config, dict):
            self._tar.close()
            raise ConversionError(f"{self.path}: model_config.yaml holds a {type(self.config).__name__}, not a mapping")

    def _read(self, name) -> bytes:
        try:
            return self._tar.extractfile(self._members[name]).read()
        except (tarfile.TarError, EOFError, OSError) as e:
            raise ConversionError(f"{self.path}: {name} cannot be read (truncated archive? {e})") from None

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
            try:
                while chunk := src.read(1 << 24):
                    tmp.write(chunk)
            except (tarfile.TarError, EOFError) as e:
                raise ConversionError(f"{self.path}: model_weights.ckpt cannot be read (truncated archive? {e})") from None
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


def open_nemo(path, model_type: str, what: str) -> tuple[NemoArchive, dict]:
    """A .nemo archive and its key table (NEMO_MODELS), refusing a model class that is not
    `model_type`; `what` names it in the error. The caller closes the archive."""
    archive = NemoArchive(path)
    kind, table = nemo_model(archive.target)
    if kind != model_type:
        archive.close()
        supported = [c for c, (k, _) in NEMO_MODELS.items() if k == model_type]
        raise ConversionError(f"{path}: model class {archive.target or '(none)'} is not {what} "
                              f"(supported: {', '.join(supported)})")
    return archive, table


def read_nemo_tokenizer(archive: NemoArchive) -> bytes:
    tok = archive.config.get("tokenizer") or {}
    ref = tok.get("model_path")
    if ref is None:
        names = [n for n in archive._members if n.endswith("tokenizer.model")]
        if len(names) != 1:
            raise ConversionError(f"{archive.path}: no SentencePiece tokenizer model found")
        ref = names[0]
    return archive.artifact(ref)


# ----------------------------------------------------------------------------------------------
# full Speech-LLM training checkpoints (step_N.pt)

WRAPPERS = ("module", "model", "state_dict", "model_state_dict")  # DeepSpeed, plain, Lightning, ...
COMPONENTS = ("encoder", "perception", "projector", "llm", "spk_kernels", "bg_spk_kernels", "speaker")


def read_checkpoint(path) -> tuple[dict, list[str]]:
    """A torch checkpoint -> (flat state dict, notes on how it was unwrapped). Loaded with
    weights_only=True: a file that needs arbitrary pickled objects is refused, never executed."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such checkpoint") from None
    except Exception as e:
        raise ConversionError(f"{path}: cannot read it safely with weights_only=True: {e}") from None
    notes = []
    while isinstance(obj, dict) and not _is_state(obj):
        wrapper = next((k for k in WRAPPERS if isinstance(obj.get(k), dict)), None)
        parts = {k: v for k, v in obj.items() if k in COMPONENTS and isinstance(v, dict)}
        if wrapper:
            notes.append(f"unwrapped '{wrapper}'" + (f" (ignored: {sorted(set(obj) - {wrapper})})" if len(obj) > 1 else ""))
            obj = obj[wrapper]
        elif parts:
            notes.append(f"joined component state dicts {sorted(parts)}")
            obj = {f"{name}.{k}": v for name, sd in parts.items() for k, v in _flat(sd).items()}
        else:
            raise ConversionError(f"{path}: no state dict found; top-level keys: {sorted(obj)[:20]}")
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    for prefix in ("module.", "_orig_mod.", "model."):  # DDP, torch.compile, a wrapping LightningModule
        if sd and all(k.startswith(prefix) for k in sd) and not _looks_like_ours(sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
            notes.append(f"stripped prefix '{prefix}'")
    return sd, notes


def _is_state(d: dict) -> bool:
    return bool(d) and sum(isinstance(v, torch.Tensor) for v in d.values()) > len(d) // 2


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif isinstance(v, torch.Tensor):
            out[f"{prefix}{k}"] = v
    return out


def _looks_like_ours(sd: dict) -> bool:
    return any(k.split(".", 1)[0] in COMPONENTS + ("preprocessor",) for k in sd)


def merge_lora(sd: dict, scaling: float | None) -> dict:
    """Fold PEFT LoRA factors into their base weights: W + scaling * B @ A, scaling = alpha / r."""
    a_keys = [k for k in sd if ".lora_A." in k]
    if not a_keys:
        return sd
    if scaling is None:
        raise ConversionError(f"the checkpoint holds {len(a_keys)} LoRA factors (e.g. {a_keys[0]}); give --config "
                              "with model.lora.r and lora_alpha so they can be merged")
    sd = dict(sd)
    for a_key in a_keys:
        stem, adapter = a_key.split(".lora_A.")
        a, b = sd.pop(a_key), sd.pop(f"{stem}.lora_B.{adapter}")
        base = f"{stem}.base_layer.weight" if f"{stem}.base_layer.weight" in sd else f"{stem}.weight"
        w = sd.pop(base)
        sd[f"{stem}.weight"] = (w.float() + scaling * (b.float() @ a.float())).to(w.dtype)
    for k in [k for k in sd if ".base_layer." in k]:  # the base biases
        sd[k.replace(".base_layer.", ".")] = sd.pop(k)
    return sd


def load_checkpoint_into(model, path, lora_scaling: float | None = None) -> list[str]:
    """Load a full training checkpoint into a SpeechLLM built with the same architecture. Returns
    report lines; raises listing every model tensor missing or mis-shaped."""
    sd, notes = read_checkpoint(path)
    ours, where, unplaced = place(SPEECHLLM_CKPT_KEYS, merge_lora(sd, lora_scaling))
    expected = model.state_dict()
    if model.cfg.llm.tie_word_embeddings:
        ours.pop("llm.lm_head.weight", None)  # tied: the embedding is the head
        expected = {k: v for k, v in expected.items() if k != "llm.lm_head.weight"}
    expected = {k: v for k, v in expected.items() if not k.startswith("ctc.") or k in ours}  # the draft head stays
    check_fit(ours, expected, str(path), strict=False)  # missing or mis-shaped tensors stop it
    unknown = sorted(set(ours) - set(expected))
    model.load_state_dict({k: ours[k] for k in expected}, strict=False, assign=False)
    dropped = [k for k, v in where.items() if v is None]
    return notes + [f"loaded {len(expected)} tensors"] + (
        [f"not placed (no rule for them): {short(unplaced + unknown)}"] if unplaced or unknown else []) + (
        [f"deliberately dropped: {short(dropped)}"] if dropped else [])


# ----------------------------------------------------------------------------------------------
# inspect: what is in a file, and where each tensor would go


def inspect(path) -> tuple[list[str], list[tuple[str, tuple, str, str]]]:
    """Any file or directory the converter reads -> (notes, rows of (name, shape, dtype, destination)).
    Destination is our key, 'dropped' (known, deliberately not imported) or 'UNPLACED'."""
    path = Path(path)
    if path.is_dir():
        return _inspect_dir(path)
    if path.suffix == ".nemo":
        archive = NemoArchive(path)
        target, sd = archive.target, archive.state_dict()
        archive.close()
        table = nemo_model(target)[1] or NEMO_CTC_KEYS  # an unknown class: where a CTC model's would go
        return [f"NeMo archive, model class {target}"], _rows(sd, table)
    if path.suffix == ".safetensors":
        return ["safetensors file (keys as stored)"], _rows(headers(path), {"": ""})
    sd, notes = read_checkpoint(path)
    return ["torch checkpoint (weights_only)"] + notes, _rows(sd, SPEECHLLM_CKPT_KEYS)


def _inspect_dir(path: Path):
    cfg = read_json(path / "config.json") if (path / "config.json").is_file() else {}
    kind = cfg.get("model_type")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no .safetensors files to inspect")
    found = {name: header for file in files for name, header in headers(file).items()}
    if kind in ("qwen2", "qwen3", "qwen3_5", "qwen3_5_text"):
        return [f"Hugging Face {kind} directory ({len(files)} file(s)); in a Speech-LLM these sit under llm."], \
            _rows(found, {"": "llm."})
    if kind == "nemo_speechlm":
        return ["NeMo SALM directory"], _rows(found, SPEECHLLM_CKPT_KEYS)
    return [f"speechllm directory, model_type {kind}"], _rows(found, {"": ""})


def _rows(sd: dict, table: dict):
    _, where, unplaced = place(table, sd)
    rows = []
    for name, v in sd.items():
        shape, dtype = (tuple(v.shape), str(v.dtype).removeprefix("torch.")) if isinstance(v, torch.Tensor) else v
        dest = "UNPLACED" if name in unplaced else (where[name] or "dropped")
        rows.append((name, shape, dtype, dest))
    return rows


@contextlib.contextmanager
def reading(archive, path):
    """Around building a model from an open .nemo: the archive is closed whatever happens, and a
    model_config.yaml missing a section NeMo always writes (KeyError), or holding one of the wrong
    kind (TypeError), becomes one ConversionError naming the archive."""
    try:
        yield
    except KeyError as e:
        raise ConversionError(f"{path}: model_config.yaml: missing {e.args[0]!r}") from None
    except TypeError as e:
        raise ConversionError(f"{path}: model_config.yaml: {e}") from None
    finally:
        archive.close()
