"""`QHeadConfig`: the training arguments of `QHeadTrainer`, TRL style (a `TrainingArguments` subclass)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from transformers import TrainingArguments

from .checks import check_beta

PACKING_STRATEGIES = ("wrapped", "bfd", "bfd_split")
REWARD_NORMALIZATIONS = (None, "batch", "running")
Q_TARGETS = ("mean", "soft")
Q_LABELS = ("returns", "effects")
# The Q head's learning rates when it trains alone on the frozen policy (`q_head_only=True`) and the config leaves them
# unset: the values of `make demo` (recipes/demo_sentiment.py), tuned on SmolLM2-135M's normed hidden state.
Q_HEAD_ONLY_LEARNING_RATE = 2e-5
Q_HEAD_ONLY_BIAS_LEARNING_RATE = 1e-2


@dataclass
class QHeadConfig(TrainingArguments):
    r"""Configuration for [`QHeadTrainer`]: everything of `transformers.TrainingArguments` plus the Q-head fields below.

    Parameters:
        > Q learning

        gamma (`float`, *optional*, defaults to `0.99`):
            Discount factor of the returns, in [0, 1].
        q_weight (`float`, *optional*, defaults to `1.0`):
            Weight of the Q loss: `L = L_LM + q_weight * L_Q`. 0 trains the LM alone (the Q head gets no gradient).
        gae_lambda (`float` or `None`, *optional*, defaults to `None`):
            Lambda of the lambda-return, in [0, 1]. `None` or 1 is Monte Carlo with a bootstrap at the end of the
            context, 0 is TD(0). Values below 1 need `V(s)` at every position (computed chunked, without grad).
        use_lm_rewards (`bool`, *optional*, defaults to `False`):
            Add the reference model's log-probability of each action to its reward: `r_t += log pi_ref(a_t|s_t)`.
            With a PEFT model the reference is the same network with its adapters disabled.
        q_head_learning_rate (`float` or `None`, *optional*, defaults to `None`):
            Learning rate of the Q head (same schedule, no weight decay); `None` uses `learning_rate`. Adam moves
            each parameter by about the learning rate per step, so returns of magnitude R need about R / lr steps:
            a head that starts at zero often wants a larger rate than a LoRA backbone.
        q_head_bias_learning_rate (`float` or `None`, *optional*, defaults to `None`):
            Learning rate of the Q head's bias alone; `None` uses the Q head's rate. `Q(s, a) = W_q[a] . h + b_q[a]`
            sums `hidden_size` weight terms against one bias term, so a weight step moves Q far more than a bias step
            of the same rate: a bias rate 10-1000x the weight's lets the bias (a per-token value that generalises
            across states from little data) learn at the pace of the weight. `0` freezes the bias at its initial
            value: for a reward whose sign depends on the request (docs/context_heads.md), a per-token bias can only
            learn a lexicon that the other request reverses.
        q_target (`str`, *optional*, defaults to `"mean"`):
            What Q learns. `"mean"`: `Q^pi(s, a) = E[G | s, a]`, the squared error on ordinary returns bootstrapped
            from `V(s) = sum_a pi(a|s) Q(s, a)` (the behaviour before this field). `"soft"`: the soft-optimal
            `Q*(s, a) = beta log E[exp(G / beta) | s, a]` whose tilt at `beta = target_beta` is the KL-regularised
            optimum (README "Soft-optimal targets"): returns bootstrap from the soft value
            `V*(s) = beta log sum_a pi(a|s) exp(Q(s, a) / beta)` (`soft.chunked_soft_state_values`), lambda-returns
            blend in exp space (`compute_returns(..., beta=target_beta)`), and the loss is `2 * soft.linex_loss`
            (which tends to the squared error as beta -> inf), for sampled actions and candidates alike.
        target_beta (`float` or `None`, *optional*, defaults to `None`):
            The beta of `q_target="soft"`, a finite number > 0 (required there; the tilt's beta you mean to decode
            with). Must be `None` with `q_target="mean"`.
        candidate_weight (`float`, *optional*, defaults to `1.0`):
            Weight of each (state, candidate) pair of candidate labels (the `candidate_*` data columns, see
            `generate_and_score(candidate_rewards=k)`): the loss adds `candidate_weight * l(Q(s_t, a), y)` per pair,
            `y = G_t + r'(s_t, a) - r'(s_t, a_t)`, to the sum over sampled actions, and the total is divided by the
            number of sampled actions `N` as `L_LM` is. So with weight 1 each pair counts as much as a sampled action,
            and a fully labelled state carries `1 + k` Q terms (a candidate equal to the sampled token is skipped: its
            target is `G_t`, already there). 0 ignores the columns.
        q_labels (`str`, *optional*, defaults to `"returns"`):
            What the Q head regresses on. `"returns"`: each sampled action on its return `G_t`, each candidate of
            candidate labels on `G_t + r'(s_t, a) - r'(s_t, a_t)`. `"effects"`: one-step effect labels, the
            best configuration measured (README "Candidate labels"): the returns are left out (`G_t = 0`), so each
            candidate `a` is regressed on its immediate effect relative to the sampled token, `r'(s_t, a) - r'(s_t,
            a_t)`, and the sampled token on 0: a one-step head, the learned counterpart of `RewardLookahead`, free of
            the noise the sampled return adds to every label of a state and blind to later rewards. Needs candidate
            columns (`generate_and_score(candidate_rewards=k)`); the rows' `reward`/`rewards` are read (and logged)
            but not trained on, so `gamma` and `gae_lambda` do not matter. Cannot combine with `use_lm_rewards`,
            `reward_normalization`, `reward_clip` (they shape returns that are not used), `candidate_weight=0` or
            the trainer's `reward_funcs`.
        q_head_only (`bool`, *optional*, defaults to `False`):
            Train the Q head alone on a frozen policy: the trainer freezes every weight of the model
            (`model.pretrained_model`) and leaves `L_LM` out of the loss (`L = q_weight * L_Q`; `loss_lm` is still
            logged), so the policy stays exactly the base model and only the head's parameters move. The head's
            learning rates default to `Q_HEAD_ONLY_LEARNING_RATE` (2e-5, the weight, or the tied head's `U`) and
            `Q_HEAD_ONLY_BIAS_LEARNING_RATE` (1e-2, the bias) where `q_head_learning_rate` /
            `q_head_bias_learning_rate` are unset (`make demo`'s values). Cannot combine with a model that has
            adapters (`peft_config`), except the adapter of `q_head_type="adapter"` (the Q network: it keeps
            training), or with `q_weight=0`. The context heads (`"adapter"`, `"q_model"`) train this way whatever
            this field says (no LM loss, the policy frozen in eval mode); set it for its learning rates.
        value_chunk_size (`int`, *optional*, defaults to `256`):
            Positions per chunk wherever the loss takes a product over the vocabulary (the LM log-softmax of `L_LM` and
            its gradient, `V(s)`, the reference log-probs): bounds those buffers to a few `value_chunk_size * |V|`
            floats instead of `batch * max_length * |V|`.

        > Rewards (see the "Rewards" section of the README for the order in which they combine)

        reward_weights (`list[float]` or `None`, *optional*, defaults to `None`):
            Weights of the trainer's `reward_funcs`, one per function, as in `GRPOConfig`; `None` weighs each by 1.
        lm_reward_coef (`float`, *optional*, defaults to `1.0`):
            Weight of the reference log-prob reward of `use_lm_rewards`: `r_t += lm_reward_coef * log pi_ref(a_t|s_t)`.
        reward_scale (`float`, *optional*, defaults to `1.0`):
            Multiplies the task rewards (data columns, reward functions and models; not the log-prob reward).
        reward_clip (`float` or `None`, *optional*, defaults to `None`):
            Clips the scaled task rewards to `[-reward_clip, reward_clip]` (sequence rewards, and per-token rewards
            action by action).
        reward_normalization (`str` or `None`, *optional*, defaults to `None`):
            Normalisation of the sequence rewards before scaling: `"batch"` (the mean and std of the optimizer step:
            every micro-batch of a gradient accumulation cycle, over all processes), `"running"` (running mean and
            std over training, updated once per optimizer step) or `None`. Per-token rewards are not normalised.
        log_completions (`bool`, *optional*, defaults to `False`):
            As `GRPOConfig.log_completions`: at every log, the samples the reward functions scored in the latest
            optimizer step (prompt, completion, one column per reward function, and the columns they add with their
            `log_extra` keyword) are printed with `rich` (when installed), written to
            `output_dir/completions/completions_<step>.parquet` and logged to wandb / trackio (see
            `trl_qhead.completion_log`). Needs `reward_funcs`.
        num_completions_to_print (`int` or `None`, *optional*, defaults to `None`):
            Samples printed with `rich` at each log; `None` prints all (as `GRPOConfig`).
        completion_only_loss (`bool`, *optional*, defaults to `True`):
            Train the LM and Q losses on completion tokens only where the data separates a completion (prompt/
            completion formats, a `completion_mask` column). `False` trains on the prompt's tokens too. (TRL's
            `None` means the same: see below.)

        > Data

        dataset_name (`str` or `None`, *optional*, defaults to `None`):
            Dataset to load with `datasets.load_dataset` when the trainer gets no `train_dataset`; a hub name or a
            builder such as `"text"` or `"json"` used with `dataset_data_files`.
        dataset_config (`str` or `None`, *optional*, defaults to `None`):
            Configuration name of that dataset.
        dataset_data_files (`str`, `list[str]` or `None`, *optional*, defaults to `None`):
            Local files for builders such as `"text"` or `"json"`.
        dataset_split (`str`, *optional*, defaults to `"train"`):
            Split to train on.
        streaming (`bool`, *optional*, defaults to `False`):
            Load the dataset as an `IterableDataset`; needs `max_steps > 0`.
        dataset_text_field (`str`, *optional*, defaults to `"text"`):
            Column holding plain text.
        max_length (`int`, *optional*, defaults to `1024`):
            Tokens per training sequence: longer sequences are truncated (and bootstrap at the cut, or end there when
            they carry a scalar `reward`: see `trl_qhead.data`), or packed.
        packing (`bool`, *optional*, defaults to `False`):
            Pack tokenised documents (each ending with EOS, so its last action is terminal) into `max_length` rows;
            each document stays its own episode and attention span.
        padding_free (`bool`, *optional*, defaults to `False`):
            TRL's field, refused when `True`. TRL flattens each batch into one sequence with `position_ids`
            restarting at 0 per row and no attention mask; here that would make each row a packed document, which
            is not the same training: a packed document's EOS ends its episode (an unpacked multi-turn row's earlier
            EOS does not), a row's scalar `reward` becomes a per-token reward (`reward_normalization` normalises
            only sequence rewards), and reward functions score one completion per row. Use `packing=True`: rows
            without padding between documents, positions restarting at 0 and attention kept to each document, as
            TRL's padding-free batches have them, with the packed semantics stated above.
        packing_strategy (`str`, *optional*, defaults to `"wrapped"`):
            `"wrapped"` concatenates and cuts; `"bfd"` / `"bfd_split"` are TRL's best-fit-decreasing strategies
            (TRL's default is `"bfd"`: see below).
        dataset_num_proc (`int` or `None`, *optional*, defaults to `None`):
            Processes for tokenisation (map-style datasets only).

        > Model and chat template (TRL's `SFTConfig` names)

        model_init_kwargs (`dict` or `None`, *optional*, defaults to `None`):
            Keyword arguments of `AutoModelForCausalLMWithQHead.from_pretrained` (`dtype`, `revision`,
            `attn_implementation`, ...) when the trainer's `model` is a name or path; ignored (with a warning) for a
            loaded model.
        trust_remote_code (`bool`, *optional*, defaults to `False`):
            Passed to the model's and tokenizer's `from_pretrained` when the trainer loads them by name.
        chat_template_path (`str` or `None`, *optional*, defaults to `None`):
            A Jinja template file set as the tokenizer's chat template before the data is rendered. (A tokenizer name,
            which `SFTTrainer` clones with its added tokens, is refused: the Q head would have to be resized.)
        eos_token (`str` or `None`, *optional*, defaults to `None`):
            A token of the vocabulary to use as EOS: appended to documents, ends episodes, and added to the model's
            generation config.
        assistant_only_loss (`bool`, *optional*, defaults to `False`):
            Not supported (`True` raises): use prompt/completion rows with `completion_only_loss`.

        > Defaults that differ from TRL's (`_BaseConfig`, `SFTConfig`), with the reason

        learning_rate (`float`, *optional*, defaults to `5e-5`):
            transformers' default, kept (TRL's `SFTConfig`: `2e-5`). The Q head starts at zero and Adam moves each
            weight by about the learning rate per step, so returns of magnitude R take about R / lr steps to reach:
            at 2e-5 a fresh head learns 2.5 times slower. LoRA backbones are trained faster still (the shipped
            recipe uses 2e-4); `q_head_learning_rate` gives the head a rate of its own.
        activation_checkpointing (`bool` or `None`, *optional*, defaults to `None`):
            Off (`None` is `False`): transformers' default, kept (TRL's `gradient_checkpointing`, the deprecated alias
            of this field in transformers >= 5.24, defaults to `True`). Checkpointing re-runs the backbone's forward in
            the backward pass (about 20% slower, says TRL) to save activation memory, which small backbones and the
            CPU runs of the quick start do not need; the Q-head loss itself adds no activation memory that grows with
            the vocabulary (`value_chunk_size`). Turn it on for large backbones or long sequences (PEFT models
            included).
        bf16 (`bool`, *optional*, defaults to `False`):
            transformers' default, kept (TRL's: `True` unless `fp16`). bf16 autocast needs a GPU of the Ampere
            generation or newer (on a CPU it is slow), and it rounds the backbone's hidden states, which the fp32 Q
            head regresses on, and the reference log-probs that `use_lm_rewards` pays as rewards. Set `bf16=True` on
            GPUs that support it.
        remove_unused_columns (`bool`, *optional*, defaults to `False`):
            TRL's `SFTConfig`: `True`. The collator needs the reward, mask and `done` columns that the model's
            forward does not name, and reward functions get the extra columns as keyword arguments (as in GRPO).
        packing_strategy (`str`, *optional*, defaults to `"wrapped"`):
            TRL's `SFTConfig`: `"bfd"`. `"wrapped"` drops no token, where `"bfd"` truncates each document to
            `max_length`; with `"bfd"` a cut document bootstraps at the cut (see `trl_qhead.data`).
        completion_only_loss (`bool`, *optional*, defaults to `True`):
            TRL's `SFTConfig`: `None`, which means the same: completion tokens only where the data marks a
            completion, every token otherwise.

    Example:
    ```python
    >>> from trl_qhead import QHeadConfig
    >>> config = QHeadConfig(output_dir="out", gamma=0.99, gae_lambda=0.95, max_length=256, packing=True)
    ```
    """

    gamma: float = field(default=0.99, metadata={"help": "Discount factor, in [0, 1]."})
    q_weight: float = field(default=1.0, metadata={"help": "Weight of the Q loss; L = L_LM + q_weight * L_Q."})
    gae_lambda: float | None = field(
        default=None, metadata={"help": "Lambda of the lambda-return in [0, 1]; None or 1 is Monte Carlo, 0 is TD(0)."}
    )
    use_lm_rewards: bool = field(
        default=False, metadata={"help": "Add log pi_ref(a_t|s_t) of the reference model to each action's reward."}
    )
    q_head_learning_rate: float | None = field(
        default=None, metadata={"help": "Learning rate of the Q head; None uses learning_rate."}
    )
    q_head_bias_learning_rate: float | None = field(
        default=None, metadata={"help": "Learning rate of the Q head's bias; None uses the Q head's rate."}
    )
    q_target: str = field(default="mean", metadata={"help": "'mean' (E[G]) or 'soft' (beta log E exp(G / beta))."})
    target_beta: float | None = field(default=None, metadata={"help": "beta of q_target='soft' (finite, > 0)."})
    candidate_weight: float = field(
        default=1.0, metadata={"help": "Weight of each (state, candidate) pair of candidate labels, >= 0."}
    )
    q_labels: str = field(
        default="returns", metadata={"help": "'returns' (G_t) or 'effects' (one-step candidate effects only)."}
    )
    q_head_only: bool = field(
        default=False, metadata={"help": "Train the Q head alone on the frozen policy (no LM loss, weights frozen)."}
    )
    value_chunk_size: int = field(
        default=256, metadata={"help": "Positions per chunk of the products over the vocabulary (log pi, V(s))."}
    )

    reward_weights: list[float] | None = field(
        default=None, metadata={"help": "Weights of the reward functions, one per function; None weighs each by 1."}
    )
    lm_reward_coef: float = field(default=1.0, metadata={"help": "Weight of the log-prob reward of use_lm_rewards."})
    reward_scale: float = field(default=1.0, metadata={"help": "Multiplies the task rewards (not the LM reward)."})
    reward_clip: float | None = field(
        default=None, metadata={"help": "Clip the scaled task rewards to [-reward_clip, reward_clip]."}
    )
    reward_normalization: str | None = field(
        default=None, metadata={"help": "Normalise sequence rewards: 'batch', 'running' or None."}
    )
    log_completions: bool = field(
        default=False,
        metadata={"help": "Log the samples the reward functions score (rich, parquet, wandb/trackio), as GRPO."},
    )
    num_completions_to_print: int | None = field(
        default=None, metadata={"help": "Samples printed with rich at each log; None prints all."}
    )
    completion_only_loss: bool = field(
        default=True, metadata={"help": "Train on completion tokens only where the data marks a completion."}
    )

    dataset_name: str | None = field(default=None, metadata={"help": "Dataset for datasets.load_dataset."})
    dataset_config: str | None = field(default=None, metadata={"help": "Configuration name of the dataset."})
    # `list[str]` for the command line (`--dataset_data_files a.txt b.txt`); a single string works from Python too.
    dataset_data_files: list[str] | None = field(
        default=None, metadata={"help": "Local data files (for builders such as 'text' or 'json')."}
    )
    dataset_split: str = field(default="train", metadata={"help": "Split to train on."})
    streaming: bool = field(default=False, metadata={"help": "Stream the dataset (needs max_steps > 0)."})
    dataset_text_field: str = field(default="text", metadata={"help": "Column holding plain text."})
    max_length: int = field(default=1024, metadata={"help": "Tokens per training sequence."})
    packing: bool = field(default=False, metadata={"help": "Pack documents into max_length rows."})
    padding_free: bool = field(default=False, metadata={"help": "Not supported (True raises): use packing=True."})
    packing_strategy: str = field(default="wrapped", metadata={"help": "'wrapped', 'bfd' or 'bfd_split'."})
    dataset_num_proc: int | None = field(default=None, metadata={"help": "Processes for tokenisation."})

    # TRL's (SFTConfig's) model and chat-template options.
    model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "Keyword arguments for AutoModelForCausalLMWithQHead.from_pretrained (dtype, revision, ...), used "
            "when the trainer's `model` is a name or path. A JSON string on the command line."
        },
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow models and tokenizers that ship custom code (model given by name)."}
    )
    chat_template_path: str | None = field(
        default=None,
        metadata={
            "help": "A Jinja chat template file (.jinja/.j2) to set on the tokenizer before the data is rendered."
        },
    )
    eos_token: str | None = field(
        default=None,
        metadata={"help": "End-of-sequence token (must be in the vocabulary): ends episodes, appended to documents."},
    )
    assistant_only_loss: bool = field(
        default=False,
        metadata={"help": "Not supported: conversational rows train on the whole conversation (see README)."},
    )

    # Defaults of TrainingArguments fields: TRL's where ours agree, reasons in the docstring where they do not.
    # Our collator needs the reward and mask columns that the model's forward does not name.
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep dataset columns for the collator."})
    logging_steps: float = field(default=10, metadata={"help": "Log every X update steps (TRL's default)."})
    learning_rate: float = field(
        default=5e-5, metadata={"help": "Initial learning rate for AdamW (TRL's SFTConfig: 2e-5; see docstring)."}
    )
    bf16: bool = field(
        default=False, metadata={"help": "bf16 mixed precision (TRL: True unless fp16; see docstring)."}
    )

    _VALID_DICT_FIELDS = TrainingArguments._VALID_DICT_FIELDS + ["model_init_kwargs"]

    def __post_init__(self):
        _check_float_fields(self)
        if self.assistant_only_loss:
            raise ValueError(
                "`assistant_only_loss=True` is not supported by QHeadTrainer: a `messages` row trains on the whole "
                "conversation. To train on the assistant's reply only, give prompt/completion rows (`prompt` = the "
                "messages before the reply, `completion` = the reply as a list of messages); `completion_only_loss` "
                "(default True) then masks the prompt."
            )
        if self.chat_template_path is not None and not str(self.chat_template_path).endswith((".jinja", ".j2")):
            raise ValueError(
                f"`chat_template_path` must be a Jinja file (.jinja or .j2), got {self.chat_template_path!r}. Cloning "
                "the template of another tokenizer (as SFTTrainer does) may add tokens and resize the embeddings, "
                "which the Q head must match: call `trl.clone_chat_template` on the backbone before wrapping it."
            )
        _check_range("gamma", self.gamma, 0.0, 1.0)
        if self.gae_lambda is not None:
            _check_range("gae_lambda", self.gae_lambda, 0.0, 1.0)
        _check_finite("q_weight", self.q_weight)
        if self.q_weight < 0:
            raise ValueError(f"`q_weight` must be a finite number >= 0, got {self.q_weight!r}.")
        if not isinstance(self.max_length, int) or self.max_length < 2:
            raise ValueError(
                f"`max_length` must be an integer >= 2 (one action needs two tokens), got {self.max_length!r}."
            )
        # a zero bias rate freezes the bias (the trainer leaves it out of the optimizer)
        for name, zero_allowed in (("q_head_learning_rate", False), ("q_head_bias_learning_rate", True)):
            value = getattr(self, name)
            if value is not None and not (
                isinstance(value, (int, float))
                and not isinstance(value, bool)
                and math.isfinite(value)
                and (value > 0 or (zero_allowed and value == 0))
            ):
                lowest = ">= 0" if zero_allowed else "> 0"
                raise ValueError(f"`{name}` must be a finite number {lowest} or None, got {value!r}.")
        if self.q_target not in Q_TARGETS:
            raise ValueError(f"`q_target` must be one of {Q_TARGETS}, got {self.q_target!r}.")
        if self.q_target == "soft":
            if self.target_beta is None:
                raise ValueError("`target_beta` must be a finite number > 0 with q_target='soft', got None.")
            self.target_beta = check_beta(self.target_beta, name="target_beta")
        elif self.target_beta is not None:
            raise ValueError("`target_beta` is the beta of q_target='soft': set q_target='soft' or drop it.")
        _check_finite("candidate_weight", self.candidate_weight)
        if self.candidate_weight < 0:
            raise ValueError(f"`candidate_weight` must be >= 0, got {self.candidate_weight!r}.")
        if not isinstance(self.value_chunk_size, int) or self.value_chunk_size < 1:
            raise ValueError(f"`value_chunk_size` must be a positive integer, got {self.value_chunk_size!r}.")
        if self.reward_weights is not None:
            if not isinstance(self.reward_weights, (list, tuple)) or not self.reward_weights:
                raise ValueError(f"`reward_weights` must be a non-empty list of numbers, got {self.reward_weights!r}.")
            for weight in self.reward_weights:
                _check_finite("reward_weights", weight)
            self.reward_weights = [float(w) for w in self.reward_weights]
        _check_finite("lm_reward_coef", self.lm_reward_coef)
        if self.lm_reward_coef != 1.0 and not self.use_lm_rewards:
            raise ValueError("`lm_reward_coef` weighs the reward of `use_lm_rewards`: set `use_lm_rewards=True`.")
        _check_finite("reward_scale", self.reward_scale)
        if self.reward_scale <= 0:
            raise ValueError(f"`reward_scale` must be > 0, got {self.reward_scale!r}.")
        if self.reward_clip is not None:
            _check_finite("reward_clip", self.reward_clip)
            if self.reward_clip <= 0:
                raise ValueError(f"`reward_clip` must be > 0 (or None for no clipping), got {self.reward_clip!r}.")
        if isinstance(self.reward_normalization, str) and self.reward_normalization.lower() == "none":
            self.reward_normalization = None  # the command line spells None as a string
        if self.reward_normalization not in REWARD_NORMALIZATIONS:
            raise ValueError(
                f"`reward_normalization` must be one of {REWARD_NORMALIZATIONS}, got {self.reward_normalization!r}."
            )
        if not isinstance(self.completion_only_loss, bool):
            raise ValueError(f"`completion_only_loss` must be True or False, got {self.completion_only_loss!r}.")
        if self.padding_free:
            raise ValueError(
                "`padding_free=True` is not supported by QHeadTrainer: flattening a batch of rows into one sequence "
                "would make each row a packed document, whose EOS ends its episode, whose scalar `reward` becomes a "
                "per-token reward that `reward_normalization` leaves alone, and which reward functions cannot score "
                "one by one. Set `packing=True` instead: documents without padding between them, position ids "
                "restarting at each and attention kept to each, as TRL's padding-free batches have them."
            )
        if self.packing_strategy not in PACKING_STRATEGIES:
            raise ValueError(f"`packing_strategy` must be one of {PACKING_STRATEGIES}, got {self.packing_strategy!r}.")
        if not self.dataset_text_field:
            raise ValueError("`dataset_text_field` must be a non-empty column name.")
        if not self.dataset_split:
            raise ValueError("`dataset_split` must be a non-empty split name.")
        if self.streaming and (self.max_steps is None or self.max_steps <= 0):
            raise ValueError(
                "`max_steps` must be > 0 with `streaming=True`: a stream has no length to count epochs by."
            )
        if self.dataset_data_files is not None and self.dataset_name is None:
            raise ValueError("`dataset_data_files` needs `dataset_name` (e.g. 'text' or 'json').")
        _check_q_labels_and_q_head_only(self)
        super().__post_init__()

    def check_dataset_columns(self, dataset, name: str = "dataset") -> None:
        """A ValueError, before the data is prepared, for settings a dataset's columns cannot be trained with.

        Candidate labels (`candidate_ids`, trained with `candidate_weight > 0`) have targets
        `G_t + reward_scale * (r'(s_t, a) - r'(s_t, a_t))`, exact only where every other reward term of `G_t` is the
        same for the candidate as for the sampled token. Three settings break that, so they are refused rather than
        trained on silently wrong targets: `reward_normalization` (rescales `G_t` but not the effects),
        `reward_clip` (clips `G_t`, not the candidate's own reward) and `use_lm_rewards` (the sampled token's
        `lm_reward_coef * log pi_ref(a_t|s_t)` would stay in every candidate's target instead of its own).

        Args:
            dataset: the dataset (its `column_names`; a stream that does not know them is read for its first row),
                or a list of column names; `None` checks nothing.
            name: how the error names the dataset (e.g. `"train_dataset"`).
        """
        if dataset is None or self.candidate_weight == 0:
            return
        if not (self.reward_normalization is not None or self.reward_clip is not None or self.use_lm_rewards):
            return
        columns = dataset if isinstance(dataset, (list, tuple)) else getattr(dataset, "column_names", None)
        if columns is None and hasattr(dataset, "__iter__"):  # a stream of unknown columns: its first row's keys
            columns = list(next(iter(dataset), None) or {})
        if "candidate_ids" not in (columns or []):
            return
        refused = {  # field -> (set?, why), each refused unless at its default (None, None, False)
            "reward_normalization": (
                self.reward_normalization is not None,
                "rescales the returns the effects (in the reward's own units) are added to",
            ),
            "reward_clip": (
                self.reward_clip is not None,
                "clips the sampled return G_t, not each candidate's own reward",
            ),
            "use_lm_rewards": (
                self.use_lm_rewards,
                "would leave the sampled token's `lm_reward_coef * log pi_ref(a_t|s_t)` in every candidate's target "
                "instead of the candidate's own",
            ),
        }
        for field_name, (is_set, why) in refused.items():
            if is_set:
                value, default = getattr(self, field_name), self.__dataclass_fields__[field_name].default
                raise ValueError(
                    f"The {name} has candidate labels (`candidate_ids`), and `{field_name}={value!r}` {why}: set "
                    f"`{field_name}={default!r}`, or `candidate_weight=0` to leave the candidate columns out."
                )


def _check_q_labels_and_q_head_only(config: QHeadConfig) -> None:
    """`q_labels` and `q_head_only`: their values, the combinations they refuse, and the head-only learning rates."""
    if config.q_labels not in Q_LABELS:
        raise ValueError(f"`q_labels` must be one of {Q_LABELS}, got {config.q_labels!r}.")
    if config.q_labels == "effects":
        shaped = {
            "use_lm_rewards": config.use_lm_rewards,
            "reward_normalization": config.reward_normalization is not None,
            "reward_clip": config.reward_clip is not None,
        }
        for name, is_set in shaped.items():
            if is_set:
                raise ValueError(
                    f"`q_labels='effects'` trains on the candidates' one-step effects alone (G_t = 0), so `{name}`, "
                    "which shapes the returns, would do nothing: drop it, or use q_labels='returns'."
                )
        if config.candidate_weight == 0:
            raise ValueError(
                "`q_labels='effects'` trains on candidate labels alone: `candidate_weight` must be > 0 (with 0 every "
                "target would be 0)."
            )
    if not isinstance(config.q_head_only, bool):
        raise ValueError(f"`q_head_only` must be True or False, got {config.q_head_only!r}.")
    if config.q_head_only:
        if config.q_weight == 0:
            raise ValueError("`q_head_only=True` trains the Q head alone on `q_weight * L_Q`: `q_weight` must be > 0.")
        if config.q_head_learning_rate is None:
            config.q_head_learning_rate = Q_HEAD_ONLY_LEARNING_RATE
        if config.q_head_bias_learning_rate is None:
            config.q_head_bias_learning_rate = Q_HEAD_ONLY_BIAS_LEARNING_RATE


def _check_float_fields(config: QHeadConfig) -> None:
    """No field holds NaN or an infinity: ours and every inherited `TrainingArguments` one (`learning_rate`,
    `max_grad_norm`, ...). A non-finite weight or rate would train on (or log) NaN without failing."""
    for spec in fields(config):
        value = getattr(config, spec.name, None)
        values = value if isinstance(value, (list, tuple)) else [value]
        for item in values:
            if isinstance(item, float) and not math.isfinite(item):
                raise ValueError(f"`{spec.name}` must be a finite number, got {value!r}.")


def _check_range(name: str, value, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (low <= value <= high):
        raise ValueError(f"`{name}` must be a number in [{low}, {high}], got {value!r}.")


def _check_finite(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number, got {value!r}.")
