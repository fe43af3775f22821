"""`QHeadConfig`: the training arguments of `QHeadTrainer`, TRL style (a `TrainingArguments` subclass)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from transformers import TrainingArguments

PACKING_STRATEGIES = ("wrapped", "bfd", "bfd_split")
REWARD_NORMALIZATIONS = (None, "batch", "running")
Q_TARGETS = ("mean", "soft")


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
            across states from little data) learn at the pace of the weight.
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
        completion_only_loss (`bool`, *optional*, defaults to `True`):
            Train the LM and Q losses on completion tokens only where the data separates a completion (prompt/
            completion formats, a `completion_mask` column). `False` trains on the prompt's tokens too.

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
        packing_strategy (`str`, *optional*, defaults to `"wrapped"`):
            `"wrapped"` concatenates and cuts; `"bfd"` / `"bfd_split"` are TRL's best-fit-decreasing strategies.
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

    # Our collator needs the reward and mask columns that the model's forward does not name.
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep dataset columns for the collator."})
    logging_steps: float = field(default=10, metadata={"help": "Log every X update steps."})

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
        for name in ("q_head_learning_rate", "q_head_bias_learning_rate"):
            value = getattr(self, name)
            if value is not None and not (
                isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
            ):
                raise ValueError(f"`{name}` must be a finite number > 0 or None, got {value!r}.")
        if self.q_target not in Q_TARGETS:
            raise ValueError(f"`q_target` must be one of {Q_TARGETS}, got {self.q_target!r}.")
        if self.q_target == "soft":
            beta = self.target_beta
            if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not (math.isfinite(beta) and beta > 0):
                raise ValueError(f"`target_beta` must be a finite number > 0 with q_target='soft', got {beta!r}.")
            self.target_beta = float(beta)
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
