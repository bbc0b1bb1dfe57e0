"""Request and response schemas. Job hyperparameters map field for field onto ``core.spec.TrainSpec``."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Hyperparameters(Strict):
    """Training and privacy settings (all optional; defaults are TrainSpec's)."""

    n_epochs: float | None = Field(None, gt=0, description="Passes over the data (expected, Poisson sampling).")
    batch_size: int | None = Field(None, ge=1, description="Expected logical batch size B (q = B/n).")
    learning_rate: float | None = Field(None, gt=0, description="Adam learning rate for the prefix.")
    max_steps: int | None = Field(None, ge=1, description="Cap on optimizer steps.")
    num_virtual_tokens: int | None = Field(None, ge=1, le=512, description="Prefix / soft prompt length.")
    tuning: Literal["prefix", "prompt"] | None = Field(None, description="prefix (white-box) or prompt (black-box).")
    prefix_projection: bool | None = None
    physical_batch_size: int | None = Field(None, ge=1, le=4096)
    max_length: int | None = Field(None, ge=8, le=4096)
    optimizer: Literal["adam", "sgd"] | None = None
    weight_decay: float | None = Field(None, ge=0)
    label_names: list[str] | None = Field(None, description="Verbalizer word per label index.")
    eval_max_examples: int | None = Field(None, ge=1)
    max_new_tokens: int | None = Field(None, ge=1, le=512)
    target_epsilon: float | None = Field(None, gt=0, description="ε for this job (dp methods).",
                                         examples=[3.0])
    target_delta: float | None = Field(None, gt=0, lt=1, description="δ (defaults to the dataset's δ).")
    max_grad_norm: float | None = Field(None, gt=0, description="Per-example clipping bound C.")
    accountant: Literal["rdp", "pld"] | None = None
    guarantee: Literal["formal", "empirical"] | None = Field(
        None, description="formal (default): (ε, δ)-DP. empirical (privacy_flat only, must be asked for): the "
        "paper's recipe (raw-gradient AWP, teacher on the private data); the report and the dataset's ledger "
        "then say no formal bound holds.")
    trainer: Literal["first_order", "zeroth_order"] | None = Field(
        None, description="zeroth_order: forward-only DP-ZO (two perturbed forward passes per step).")
    zo_mu: float | None = Field(None, gt=0, description="DP-ZO perturbation scale μ.")
    # Privacy-Flat (method privacy_flat); each part can be switched off.
    awp: bool | None = Field(None, description="Within-layer: adversarial weight perturbation (AWP).")
    awp_gamma: float | None = Field(None, gt=0, description="AWP radius, relative per prefix layer (γ).")
    awp_fraction: float | None = Field(None, ge=0, le=1, description="Share of the steps, from the start, with AWP.")
    awp_steps: int | None = Field(None, ge=1, le=10, description="Ascent steps (empirical mode only).")
    layer_selection: bool | None = Field(None, description="Cross-layer: keep only the flattening prefix layers.")
    keep_layers: int | None = Field(None, ge=1, description="Prefix layers kept (default ceil(3/4 of them)).")
    layer_removal: Literal["mask", "zero"] | None = Field(None, description="How a removed layer's prefix goes.")
    selection_probe: int | None = Field(None, ge=1, le=4096, description="Probe rows of the layer indicator.")
    distillation: bool | None = Field(None, description="Cross-model: pull toward a non-private teacher prefix.")
    distill_lambda: float | None = Field(None, gt=0, description="λ of ‖P − P_teacher‖₂ in every example's loss.")
    distill_logits: float | None = Field(None, ge=0, description="Weight of a KL(teacher ‖ student) term.")
    teacher_epochs: float | None = Field(None, gt=0, description="Passes of the teacher over its data.")


class MethodBody(Strict):
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)


class Method(Strict):
    type: Literal["dp_prefix", "non_private", "privacy_flat"] = Field("dp_prefix")
    dp_prefix: MethodBody | None = None
    non_private: MethodBody | None = None
    privacy_flat: MethodBody | None = None

    def body(self) -> MethodBody:
        return getattr(self, self.type) or MethodBody()


class JobCreate(Strict):
    model: str = Field(..., description="Base model (see GET /v1/models).", examples=["minilm"])
    training_file: str = Field(..., description="Id of an uploaded file with purpose fine-tune.")
    validation_file: str | None = Field(None, description="Id of an evaluation file (metrics only).")
    public_file: str | None = Field(None, description="Id of a file you declare public (not private data): "
                                    "privacy_flat's teacher and layer probe train on it in formal mode. It "
                                    "must not belong to the training file's dataset.")
    method: Method = Field(default_factory=Method)
    hyperparameters: Hyperparameters | None = Field(None, description="OpenAI's legacy place for settings.")
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    suffix: str | None = Field(None, max_length=64)
    metadata: dict[str, str] | None = Field(None, max_length=16)
    integrations: list[Any] | None = None
    webhook_url: str | None = Field(None, max_length=2000, pattern=r"^https?://")

    def hyper(self) -> Hyperparameters:
        merged = (self.hyperparameters.model_dump(exclude_none=True) if self.hyperparameters else {})
        merged.update(self.method.body().hyperparameters.model_dump(exclude_none=True))
        return Hyperparameters(**merged)


class DatasetUpdate(Strict):
    name: str | None = Field(None, max_length=200)
    epsilon_max: float | None = Field(None, gt=0, description="Total ε the dataset may ever spend.")
    delta: float | None = Field(None, gt=0, lt=1)


class ListPage(BaseModel):
    object: Literal["list"] = "list"
    data: list[dict[str, Any]]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False

    @classmethod
    def of(cls, items: list[dict[str, Any]], has_more: bool) -> ListPage:
        return cls(data=items, first_id=items[0]["id"] if items else None,
                   last_id=items[-1]["id"] if items else None, has_more=has_more)
