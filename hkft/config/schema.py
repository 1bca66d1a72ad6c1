"""The preset schema: every key hkft understands, its type, range and default, in one place.

Each section is a pydantic model with ``extra="forbid"``, so a misspelt key is an error (with a
did-you-mean, see ``hkft.config.loading``) instead of being silently ignored.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from hkft.config.tasks import task_names
from hkft.dropout.methods import dropout_method
from hkft.dropout.plan import (
    NEFTUNE_ALPHA,
    Branches,
    Compensation,
    LayerName,
    Pattern,
    check_position_names,
    patterns_for,
)


def _not_a_boolean(value: object) -> object:
    """pydantic would read true as 1, and YAML reads yes/no/on/off as booleans: `batch_size: yes` is a mistake."""
    if isinstance(value, bool):
        raise ValueError("must be a number, not true/false (YAML reads yes, no, on and off as booleans too)")
    return value


Int = Annotated[int, BeforeValidator(_not_a_boolean)]
Float = Annotated[float, BeforeValidator(_not_a_boolean)]


def _known_task(name: str) -> str:
    """A task registered in hkft/tasks/registry.py (the built-in ones, or one a project registered);
    the message is pydantic's own for a choice of values."""
    if name not in task_names():
        *others, last = (repr(known) for known in task_names())
        expected = f"{', '.join(others)} or {last}" if others else last
        raise PydanticCustomError("literal_error", "Input should be {expected}", {"expected": expected})
    return name


Task = Annotated[str, AfterValidator(_known_task)]
Quantization = Literal["none", "8bit", "4bit"]
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
Probability = Annotated[Float, Field(ge=0.0, lt=1.0)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    name: str = Field(description="Hub id or local directory of the base model.")
    task: Task = "classification"
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    gguf_file: str | None = Field(
        None, description="A GGUF file (a path, or a file name in model.name's directory): dequantized once, cached."
    )
    dtype: Dtype = Field("auto", description="Weights dtype: auto = bfloat16 on GPUs that support it, else float32.")
    quantization: Quantization = "none"
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Dtype = "auto"
    attn_implementation: Literal["sdpa", "eager"] = Field(
        "sdpa", description="Attention kernel: sdpa where the family has it (else its eager attention), or eager."
    )
    num_labels: Int | None = Field(None, ge=1, description="Inferred from the training labels when unset.")
    trust_remote_code: bool = False


# lora.init: peft's init_lora_weights. PiSSA and OLoRA also move the top singular directions (PiSSA)
# or a QR factor (OLoRA) out of the base weights; the saved adapter is converted to a plain LoRA of
# rank 2r that applies to the original base. EVA initialises from the SVD of the training data's
# activations at the adapted layers.
LORA_INITS = ("default", "gaussian", "pissa", "pissa_niter_<K>", "olora", "orthogonal", "eva")
BASE_MUTATING_INITS = ("pissa", "olora")


class LoraConfig(Section):
    r: Int = Field(8, gt=0)
    alpha: Float = Field(16, gt=0)
    target_modules: list[str] | Literal["auto", "all-linear"] = Field(
        "auto", description="auto = attention query/value projections of the architecture."
    )
    lora_dropout: Probability = Field(0.0, description="peft's dropout on the LoRA input; hkft's methods are in dropout:.")
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = False
    use_dora: bool = False
    init: str = Field("default", description="peft's init_lora_weights: " + " | ".join(LORA_INITS) + ".")
    loraplus_lr_ratio: Float | None = Field(
        None, gt=0, description="LoRA+: B matrices learn at train.lr times this ratio (16 in the LoRA+ paper)."
    )
    layers_to_transform: list[Int] | None = None
    modules_to_save: list[str] = Field(default_factory=list, description="Extra trained modules; heads are added for you.")

    @field_validator("init")
    @classmethod
    def _known_init(cls, value: str) -> str:
        if value not in LORA_INITS and not re.fullmatch(r"pissa_niter_\d+", value):
            raise ValueError(f"unknown LoRA initialisation {value!r}; choose one of {', '.join(LORA_INITS)}")
        return value

    @model_validator(mode="after")
    def _dora_keeps_the_base(self) -> LoraConfig:
        if self.use_dora and self.mutates_base:
            # DoRA's magnitudes are norms of the mutated weights: the conversion to a plain adapter
            # on the original base would not hold.
            raise ValueError(f"lora.init {self.init} changes the base weights, which DoRA's magnitudes are "
                             "computed from; use one of them, not both")
        return self

    @property
    def mutates_base(self) -> bool:
        """PiSSA and OLoRA subtract their initial adapter from the base weights."""
        return self.init.startswith(BASE_MUTATING_INITS)


class PositionConfig(Section):
    pattern: Pattern
    rate: Probability | None = Field(None, description="Defaults to dropout.rate.")


# The vocabulary (methods, positions, patterns, compensations) is hkft.dropout's: a method registered
# there (hkft.dropout.methods) is a valid dropout.method here.
class DropoutConfig(Section):
    method: str = "hiddenkey"
    rate: Probability = 0.1
    kl_weight: Float = Field(1.0, ge=0.0)
    neftune_alpha: Float = Field(NEFTUNE_ALPHA, gt=0.0, description="Method neftune: noise scale alpha of U(-1,1) * alpha/sqrt(L*d).")
    compensation: Compensation | None = Field(None, description="Overrides the method's compensation.")
    branches: Branches = Field("one", description="KL: back-propagate through one branch or both.")
    layers: LayerName | list[Int] = Field(
        "auto", description="auto = latter-half for decoder-only models, all for encoders."
    )
    positions: dict[str, PositionConfig | None] = Field(
        default_factory=dict, description="Per-position overrides of the method; null switches a position off."
    )

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        dropout_method(value)
        return value

    @field_validator("positions")
    @classmethod
    def _known_positions(cls, value: dict) -> dict:
        check_position_names(value)
        return value


class HubSource(Section):
    hub: str = Field(description="Dataset id on the Hugging Face hub.")
    config: str | None = None
    split: str = "train"


DataSource = str | HubSource
DataFormat = Literal["auto", "text", "prompt-completion", "messages", "sharegpt", "alpaca"]


class DataConfig(Section):
    train: DataSource
    validation: DataSource | None = None
    test: DataSource | None = None
    validation_split: Float = Field(
        0.1, gt=0.0, lt=1.0, description="Share of train held out when no validation set is given."
    )
    text_column: str | list[str] = Field("text", description="One column, or two for text pairs.")
    label_column: str = "label"
    prompt_column: str = "prompt"
    completion_column: str = "completion"
    template: str = Field("{prompt}", description="Causal LM: how a prompt is rendered before its completion.")
    format: DataFormat = Field(
        "auto", description="Causal LM: auto = prompt/completion, messages, sharegpt or alpaca by the columns, else text."
    )
    messages_column: str | None = Field(None, description="Chat: defaults to messages (sharegpt: conversations).")
    chat_template: str | None = Field(None, description="Chat: a Jinja template replacing the tokenizer's.")
    train_on: Literal["all_assistant", "last_assistant"] = Field(
        "all_assistant", description="Chat: the loss on every assistant turn or on the last one."
    )
    max_length: Int = Field(256, gt=0)
    max_samples: Int | None = Field(None, gt=0, description="Use only the first N examples of each split.")
    group_by_length: bool = False
    packing: bool = Field(
        False, description="Causal LM: several training examples per row of up to max_length tokens, kept apart."
    )

    @field_validator("text_column")
    @classmethod
    def _one_or_two_columns(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not 1 <= len(value) <= 2:
            raise ValueError("give one text column, or two for text pairs")
        return value

    @property
    def text_columns(self) -> list[str]:
        return [self.text_column] if isinstance(self.text_column, str) else list(self.text_column)


class OverfittingConfig(Section):
    """The overfitting monitor (``hkft.recipes.monitor``): when it fires, and how sure it must be first."""

    enabled: bool = Field(True, description="Watch every evaluation for overfitting (needs an evaluation split).")
    patience: Int = Field(3, gt=0, description="Evaluations in a row that must show the symptom.")
    min_delta: Float = Field(
        0.02, ge=0, description="How far a later evaluation must beat the best metric to clear an alarm (metric units)."
    )
    min_loss_change: Float = Field(
        0.1, ge=0, lt=1,
        description="How far the validation loss must rise and the training loss fall (relative: 0.1 = 10%) to count.",
    )


class TrainConfig(Section):
    epochs: Float = Field(3.0, gt=0)
    max_steps: Int = Field(-1, ge=-1, description="Overrides epochs when > 0; 0 or -1: epochs decide.")
    lr: Float = Field(5e-4, gt=0)
    batch_size: Int = Field(16, gt=0)
    grad_accum: Int = Field(1, gt=0)
    weight_decay: Float = Field(0.0, ge=0)
    warmup_ratio: Float = Field(0.06, ge=0, lt=1)
    warmup_steps: Int = Field(0, ge=0, description="Overrides warmup_ratio when > 0.")
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    max_grad_norm: Float = Field(1.0, ge=0)
    label_smoothing: Probability = 0.0
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="Mixed precision: auto = bf16 on GPUs that support it, else fp32."
    )
    gradient_checkpointing: bool = False
    seed: Int = 42
    deterministic: bool = False
    eval_strategy: Literal["epoch", "steps", "no"] = "epoch"
    eval_steps: Int | None = Field(None, gt=0)
    save_total_limit: Int = Field(2, gt=0)
    metric_for_best: str | None = Field(None, description="Defaults to the task's main metric.")
    early_stopping_patience: Int | None = Field(None, gt=0)
    overfitting: OverfittingConfig = Field(default_factory=OverfittingConfig)
    logging_steps: Int = Field(10, gt=0)
    num_workers: Int = Field(0, ge=0)

    @field_validator("max_steps")
    @classmethod
    def _zero_steps_means_no_limit(cls, value: int) -> int:
        """transformers would train one step on max_steps=0; -1 is its "no step limit"."""
        return -1 if value == 0 else value

    @field_validator("eval_strategy", mode="before")
    @classmethod
    def _yaml_no_is_a_string(cls, value: object) -> object:
        """YAML 1.1 reads a bare `no` as false."""
        return "no" if value is False else value

    @model_validator(mode="after")
    def _evaluation_rules(self) -> TrainConfig:
        if self.eval_strategy == "steps" and self.eval_steps is None:
            raise ValueError("eval_strategy 'steps' needs train.eval_steps")
        if self.early_stopping_patience is not None and self.eval_strategy == "no":
            raise ValueError("early_stopping_patience stops on validation results, but eval_strategy is no, "
                             "so it would never stop anything: set train.eval_strategy to epoch or steps, or remove "
                             "train.early_stopping_patience")
        return self


class GenerationConfig(Section):
    max_new_tokens: Int = Field(64, gt=0)
    num_beams: Int = Field(1, gt=0)
    length_penalty: Float = 1.0
    no_repeat_ngram_size: Int = Field(0, ge=0)
    max_examples: Int | None = Field(None, gt=0, description="Generate for the first N examples only.")


class EvalConfig(Section):
    batch_size: Int | None = Field(None, gt=0, description="Defaults to train.batch_size.")
    split: Literal["validation", "test"] = "test"
    generate: bool = Field(True, description="Causal LM: also generate and score BLEU / ROUGE-L.")
    compare_base: bool = Field(
        False, description="Causal LM: after training, also score the base model (adapter off), shown side by side."
    )
    generation: GenerationConfig = Field(default_factory=GenerationConfig)


class OutputConfig(Section):
    dir: str | None = Field(None, description="Run directory; defaults to runs/<preset name>.")
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=lambda: ["tensorboard"], description="Also mlflow and wandb (pip install 'hkft[mlflow]' / 'hkft[wandb]').")


class DistributedConfig(Section):
    strategy: Literal["ddp", "fsdp", "deepspeed"] = "ddp"
    deepspeed_config: str | None = Field(None, description="Path of a DeepSpeed JSON config (strategy deepspeed).")
    fsdp: str = Field("full_shard auto_wrap", description="transformers' fsdp option string (strategy fsdp).")


class HkftConfig(Section):
    """A whole preset."""

    description: str = ""
    model: ModelConfig
    lora: LoraConfig = Field(default_factory=LoraConfig)
    dropout: DropoutConfig = Field(default_factory=DropoutConfig)
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)

    @model_validator(mode="after")
    def _cross_field_rules(self) -> HkftConfig:
        if self.model.task == "causal-lm" and self.data.text_column != "text" and len(self.data.text_columns) > 1:
            raise ValueError("causal-lm takes one text column (or prompt_column/completion_column)")
        if self.model.task != "causal-lm" and self.data.format != "auto":
            raise ValueError(f"data.format {self.data.format} is for causal-lm; {self.model.task} reads data.text_column")
        if self.model.task != "causal-lm" and self.data.packing:
            raise ValueError(f"data.packing is for causal-lm; a {self.model.task} head reads one vector per row, "
                             "so examples cannot share a row: set data.packing=false")
        if self.dropout.compensation in ("kl", "js") and self.dropout.kl_weight == 0:
            raise ValueError("dropout.compensation kl/js needs dropout.kl_weight > 0")
        if self.lora.mutates_base and self.model.quantization != "none":
            raise ValueError(f"lora.init {self.lora.init} decomposes the full-precision base weights, which a "
                             f"{self.model.quantization} base does not have; use model.quantization=none")
        output = self.dropout.positions.get("output")
        if output is not None and output.pattern not in patterns_for("output", self.model.task == "causal-lm"):
            raise ValueError("dropout.positions.output: span drops tokens, but a classification or regression "
                             "head reads one vector per example; use pattern element or column")
        return self
