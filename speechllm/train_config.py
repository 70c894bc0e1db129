"""Training configuration: a YAML file with NeMo speechlm2's sections (model, trainer, data, optim;
seed 002), overridden on the command line with dotted pairs, as NeMo/Hydra does:

    torchrun --nproc_per_node=4 train.py --config conf/stage2_turntaking.yaml \
        trainer.max_steps=1000 data.train_ds.batch_size=8 model.lora.r=16

Each section is a frozen dataclass whose defaults and comments are the documentation. Values are
parsed as YAML (`8` is an int, `null` is None, `[a, b]` a list); a key that no dataclass has
stops the run with its dotted name. There is no interpolation and no inheritance between files.
"""
import dataclasses
from dataclasses import dataclass, field

import yaml

from .config import build
from .data import TRANSCRIPTS
from .weights import yaml_problem


@dataclass(frozen=True)
class LoRAConfig:
    """LoRA on the LLM's linear layers (HF PEFT's LoraConfig fields, as NeMo SALM passes them)."""
    r: int = 8
    lora_alpha: float = 32.0  # the update is scaled by lora_alpha / r
    lora_dropout: float = 0.1
    # PEFT's default for model_type qwen2; "all-linear" (seed 004): every Linear of the LLM but its head
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    task_type: str = "CAUSAL_LM"  # accepted for NeMo/PEFT compatibility; only CAUSAL_LM exists here

    def __post_init__(self):
        if isinstance(self.target_modules, str):  # `target_modules: all-linear`, as PEFT spells it
            object.__setattr__(self, "target_modules", (self.target_modules,))
        if self.r < 1:
            raise ValueError(f"model.lora.r must be >= 1, got {self.r}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"model.lora.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.task_type != "CAUSAL_LM":
            raise ValueError(f"model.lora.task_type must be CAUSAL_LM, got {self.task_type!r}")


@dataclass(frozen=True)
class ModelConfig:
    # Where the weights come from: a Speech-LLM directory (Stage 2 starts from Stage 1's step_N/),
    # or, for a fresh Stage-1 model, an encoder (a NeMo FastConformer .nemo or its converted
    # directory, or a Hugging Face Whisper directory) plus a Hugging Face Qwen2 / Qwen3 / Qwen3.5 directory.
    init_from: str | None = None
    pretrained_asr: str | None = None
    pretrained_llm: str | None = None
    projector: dict = field(default_factory=dict)  # ProjectorConfig fields over assemble()'s defaults (fresh model)
    prompt: dict = field(default_factory=dict)  # PromptConfig fields: a fresh model's, or over init_from's own
    speaker_kernels: dict | None = None  # SpeakerKernelConfig fields: add kernels if the model has none
    tag_loss_weight: float | None = 5.0  # seed 000; null keeps the loaded model's value
    # an auxiliary CTC loss on the encoder through the model's CTC head (model.forward); null keeps the model's value
    ctc_loss_weight: float | None = None
    # Freezing (seed 000's strategy names), then NeMo's regex lists over full parameter names
    # (re.match: anchored at the start; frozen iff some freeze pattern matches and no prevent pattern does).
    freeze: str = "all_trainable"  # all_trainable | encoder_frozen | projector_only | llm_and_projector
    freeze_params: tuple[str, ...] = ()
    prevent_freeze_params: tuple[str, ...] = ()
    train_tag_rows: bool | None = None  # train the tag rows of a frozen embedding; null: with llm_and_projector or LoRA
    lora: LoRAConfig | None = None

    def __post_init__(self):
        if self.init_from is None and (self.pretrained_asr is None or self.pretrained_llm is None):
            raise ValueError("set model.init_from (a Speech-LLM directory) or both model.pretrained_asr "
                             "(.nemo) and model.pretrained_llm (a Hugging Face Qwen2 directory)")


@dataclass(frozen=True)
class TrainerConfig:
    out_dir: str = "runs/speechllm"  # checkpoints step_N/, metrics.jsonl, TensorBoard events
    max_steps: int = 3000  # optimizer steps; the cosine schedule ends here
    accumulate_grad_batches: int = 1  # micro-batches per optimizer step on each process
    precision: str = "auto"  # auto: bf16 where measurably faster (speechllm.precision); bf16: autocast over fp32 weights; fp32; fp64 (exactness tests)
    gradient_clip_val: float = 20.0  # max global grad norm (seed 000); 0 disables clipping, the norm is still logged
    max_bad_steps: int = 20  # stop after this many steps in a row with a non-finite loss or gradient
    log_every_n_steps: int = 10
    val_check_interval: int = 500  # steps between dev-set evaluations (0: never)
    save_every_n_steps: int = 500  # steps between checkpoints; one is always written at the end
    keep_last: int = 3  # checkpoints kept besides the best one
    monitor: str = "macro_f1"  # dev metric that picks the best checkpoint: macro_f1, tag_accuracy, loss, wer
    seed: int = 1234  # model init, data order (the same on every rank) and, offset by rank, dropout
    device: str = "auto"  # auto: cuda:LOCAL_RANK when CUDA is available, else cpu
    zero_optimizer: bool = False  # shard the optimizer state across ranks (ZeroRedundancyOptimizer)
    find_unused_parameters: bool = False  # DDP: needed only when some trainable tensor gets no gradient
    max_new_tokens: int = 64  # evaluation: transcript length limit
    progress_bar: bool = True
    tensorboard: bool = True  # when torch.utils.tensorboard imports

    def __post_init__(self):
        if self.precision not in ("auto", "bf16", "fp32", "fp64"):
            raise ValueError(f"trainer.precision must be auto, bf16, fp32 or fp64, got {self.precision!r}")
        if self.monitor not in ("macro_f1", "tag_accuracy", "loss", "wer"):
            raise ValueError(f"trainer.monitor must be macro_f1, tag_accuracy, loss or wer, got {self.monitor!r}")
        for name in ("max_steps", "accumulate_grad_batches", "log_every_n_steps", "save_every_n_steps", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"trainer.{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class DatasetConfig:
    manifest_filepath: tuple[str, ...] = ()  # one or more NeMo JSONL manifests
    probabilities: tuple[float, ...] | None = None  # sample manifests with these weights (seed 004); null: pool them
    batch_size: int = 16  # clips per micro-batch and process; with batch_duration, the cap
    batch_duration: float | None = None  # bucketing: seconds of audio per batch (seed 002; lhotse's max_duration)
    bucket_duration_bins: tuple[float, ...] | None = None  # upper edges of the duration buckets
    min_duration: float = 0.0  # seconds; shorter clips are dropped
    max_duration: float = 30.0
    num_workers: int = 2  # DataLoader processes that decode audio
    shuffle: bool = True
    # Training split only:
    weighted_sampling: bool = False  # draw with replacement, weight = 1 / class frequency (seed 000)
    max_weight: float = 50.0  # cap on that weight (seed 000)
    complete_ratio: float | None = None  # keep at most ratio x #INCOMPLETE COMPLETE clips (seed 000: 1.0)
    # Label filters (seed 000), any split:
    tt_confidence_threshold: float | None = None  # drop COMPLETE/INCOMPLETE below it (seed 000: 0.9)
    bc_priority: bool = False  # llm_label vs ten_label conflicts: BACKCHANNEL wins, other conflicts dropped

    def __post_init__(self):
        object.__setattr__(self, "manifest_filepath", _strings(self.manifest_filepath))
        if self.probabilities is not None and len(self.probabilities) != len(self.manifest_filepath):
            raise ValueError(f"{len(self.probabilities)} probabilities for {len(self.manifest_filepath)} manifests")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class DataConfig:
    task: str = "turntaking"  # asr: transcript targets (Stage 1); turntaking: transcript + tag (Stage 2)
    # How the answer's transcript is written, in training and dev WER alike. as_written: each line's
    # `text`. ctc: as the encoder's CTC head emits it (parakeet: lowercase, no punctuation, numbers
    # spelled out; the line's `text_norm` where it has one), so speculative decoding's CTC draft is
    # what the model writes and is accepted (data.ctc_text).
    transcript: str = "as_written"
    train_ds: DatasetConfig = field(default_factory=DatasetConfig)
    validation_ds: DatasetConfig | None = None

    def __post_init__(self):
        if self.task not in ("asr", "turntaking"):
            raise ValueError(f"data.task must be asr or turntaking, got {self.task!r}")
        if self.transcript not in TRANSCRIPTS:
            raise ValueError(f"data.transcript must be {' or '.join(TRANSCRIPTS)}, got {self.transcript!r}")
        if not self.train_ds.manifest_filepath:
            raise ValueError("data.train_ds.manifest_filepath is empty")


@dataclass(frozen=True)
class SchedConfig:
    name: str = "cosine"  # cosine: warmup then cosine to min_lr at max_steps; wsd (seed 004); constant
    warmup_steps: int = 0  # linear warmup from 0
    min_lr: float = 0.0
    decay_steps: int | None = None  # wsd: length of the final linear decay; null: 10% of max_steps

    def __post_init__(self):
        if self.name not in ("cosine", "wsd", "constant"):
            raise ValueError(f"optim.sched.name must be cosine, wsd or constant, got {self.name!r}")


@dataclass(frozen=True)
class OptimConfig:
    name: str = "adamw"  # the only one: AdamW with decoupled weight decay
    lr: float = 2e-5
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01
    no_decay_norm_and_bias: bool = False  # NeMo 3.0.0's option: no weight decay on biases and norms
    sched: SchedConfig = field(default_factory=SchedConfig)

    def __post_init__(self):
        if self.name != "adamw":
            raise ValueError(f"optim.name {self.name!r} is not supported (adamw)")


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _strings(x) -> tuple[str, ...]:
    return (str(x),) if isinstance(x, str) else tuple(str(s) for s in x)


def _plain(x):
    """Tuples -> lists, so the dump is plain YAML."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    return [_plain(v) for v in x] if isinstance(x, (list, tuple)) else x


def apply_override(d: dict, item: str) -> None:
    """'a.b.c=value' -> d["a"]["b"]["c"] = yaml(value), creating missing (or null) sections."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ValueError(f"override {item!r} is not key=value (e.g. trainer.max_steps=1000)")
    *parents, last = key.split(".")
    node = d
    for p in parents:
        if node.get(p) is None:  # absent, or e.g. `lora: null` in the file before model.lora.r=16
            node[p] = {}
        node = node[p]
        if not isinstance(node, dict):
            raise ValueError(f"override {item!r}: {p!r} is not a section")
    try:
        node[last] = yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise ValueError(f"override {item!r}: the value is not plain YAML ({yaml_problem(e)})") from None


def load_config(path, overrides=()) -> TrainConfig:
    """The YAML file with the overrides applied. safe_load builds plain data only: a tag such as
    !!python/object is refused (ValueError naming the file), never run."""
    try:
        with open(path, encoding="utf-8") as f:
            d = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not plain YAML ({yaml_problem(e)})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text (UTF-8) YAML file") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a mapping of sections (model, trainer, data, optim), got {type(d).__name__}")
    for item in overrides:
        apply_override(d, item)
    return build(TrainConfig, d)
