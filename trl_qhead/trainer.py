"""`QHeadTrainer`: transformers' `Trainer` with the Q-head loss. Wiring only: `compute_loss` calls, in order, `mdp`
(masks), the model's forward, `rewards`, `mdp` (episode ends), `returns` and `losses`, where the math lives."""

from __future__ import annotations

import json
import math
import os
import shutil
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from datasets import Dataset, IterableDataset, load_dataset
from torch import nn
from transformers import (
    AutoTokenizer,
    EvalPrediction,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
from transformers.utils import logging

from .backbone import attention_inputs, plain_lm_head
from .config import QHeadConfig
from .data import DataCollatorForQHead, prepare_dataset
from .hub import qhead_model_card
from .losses import qhead_loss
from .mdp import episode_dones, step_grid, tokens_to_actions
from .modeling import AutoModelForCausalLMWithQHead, add_adapters
from .persistence import (
    CHECKPOINT_COMPLETE_NAME,
    Q_HEAD_CONFIG_NAME,
    Q_HEAD_WEIGHTS_NAME,
    checkpoint_problem,
    last_complete_checkpoint,
    load_sharded_checkpoint,
    mark_checkpoint_complete,
)
from .reference import as_reference, frozen_copy, reference_logprobs
from .returns import compute_returns
from .reward_functions import RewardFunc, RewardFunctions
from .rewards import RewardComputer
from .soft import candidate_targets, chunked_soft_state_values
from .training_settings import TRAINING_SETTINGS_NAME, save_training_settings

REWARD_MOMENTS_NAME = "reward_moments.json"
# Re-exported: they lived here before `persistence.py`.
__all__ = ["QHeadTrainer", "checkpoint_problem", "last_complete_checkpoint", "load_sharded_checkpoint"]

logger = logging.get_logger(__name__)


class QHeadTrainer(Trainer):
    """Trains a causal LM and its Q head on `L = L_LM + q_weight * L_Q` (see `QHeadConfig` and docs/DESIGN.md).

    Args:
        model: an `AutoModelForCausalLMWithQHead`, a transformers causal LM (a fresh Q head is added), or a name or
            path to load one from.
        args: a `QHeadConfig`, or plain `TrainingArguments` (converted as `SFTTrainer` converts them); defaults to one
            writing to `<model name>-QHead`.
        train_dataset, eval_dataset: datasets in any format `trl_qhead.data` recognises, map-style or streaming;
            `eval_dataset` may be a dict of them (metrics logged as `eval_<name>_*`). When `train_dataset` is `None`,
            `args.dataset_name` (and its `dataset_*` fields) is loaded.
        processing_class: the tokenizer; loaded from the model's name or path when `None`.
        data_collator: defaults to `DataCollatorForQHead`.
        ref_model: reference policy for `use_lm_rewards`. Not needed for a PEFT model (its adapters are disabled for
            the reference pass); for other models, a frozen copy is made when it is `None`.
        peft_config: wrap the model's backbone with these PEFT adapters.
        callbacks, optimizers: as for `transformers.Trainer`.
        reward_funcs: reward functions and models, as for TRL's `GRPOTrainer`: a callable
            `f(prompts=..., completions=..., completion_ids=..., **dataset_columns)` (sync or async) returning one
            float per completion (a sequence reward on the last action), `None` (does not apply), or a list of floats
            aligned with `completion_ids` (per-token rewards); a `PreTrainedModel` scoring prompt + completion with
            `logits[:, 0]`; a name or path loaded with `AutoModelForSequenceClassification` (`num_labels=1`); or a
            list of these, weighted by `args.reward_weights`. See `trl_qhead.rewards`.
        reward_processing_classes: tokenizers of the reward models (one, or a list aligned with `reward_funcs`).
        formatting_func: as for `SFTTrainer`: `f(example) -> str`, the text to train on, applied to every example of
            the train and eval datasets (`trl_qhead.data.apply_formatting_func`).
        compute_metrics: as for `Trainer`; its `EvalPrediction.predictions` are `(log pi(a_t|s_t), Q(s_t, a_t))`, two
            `[N, T]` arrays (zero off the actions), and `label_ids` the labels (-100 off targets; the action at
            position t is token t + 1).

    Example:
    ```python
    >>> from datasets import Dataset
    >>> from trl_qhead import QHeadConfig, QHeadTrainer
    >>> dataset = Dataset.from_dict({"text": ["The cat sat on the mat.", "A dog barked."]})
    >>> trainer = QHeadTrainer("gpt2", QHeadConfig(output_dir="out", max_steps=10), train_dataset=dataset)
    >>> trainer.train()
    ```
    """

    _tag_names = ["trl", "trl-qhead"]

    def __init__(
        self,
        model: AutoModelForCausalLMWithQHead | PreTrainedModel | str,
        args: QHeadConfig | None = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: Dataset | IterableDataset | None = None,
        processing_class: PreTrainedTokenizerBase | None = None,
        data_collator=None,
        ref_model: PreTrainedModel | None = None,
        peft_config=None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple = (None, None),
        reward_funcs: RewardFunc | list[RewardFunc] | None = None,
        reward_processing_classes: PreTrainedTokenizerBase | list[PreTrainedTokenizerBase] | None = None,
        compute_metrics: Callable[[EvalPrediction], dict] | None = None,
        formatting_func: Callable[[dict], str] | None = None,
    ):
        model_id = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", None)
        if args is None:
            args = QHeadConfig(output_dir=f"{str(model_id or 'model').split('/')[-1]}-QHead")
        elif isinstance(args, TrainingArguments) and not isinstance(args, QHeadConfig):
            args = _as_qhead_config(args)
        elif not isinstance(args, QHeadConfig):
            raise TypeError(f"`args` must be a QHeadConfig or TrainingArguments, got {type(args).__name__}.")
        model_init_kwargs = dict(args.model_init_kwargs or {})
        if isinstance(model, str):
            model_init_kwargs.setdefault("trust_remote_code", args.trust_remote_code)
        elif model_init_kwargs:
            logger.warning("`model_init_kwargs` are ignored: the model is already loaded (as SFTTrainer does).")
            model_init_kwargs = {}
        model = self._build_model(model, peft_config, **model_init_kwargs)
        if args.q_head_only:  # the policy stays the base model exactly: only the Q head's parameters train
            own = model.q_head.q_network_parameters(model.pretrained_model)  # a context head's adapter is its own
            if model.is_peft_model and not own:
                raise ValueError(
                    "`q_head_only=True` trains the Q head alone on the frozen policy, but the model has adapters "
                    "(`peft_config`): drop them, or set `q_head_only=False` to train them with the LM loss."
                )
            for parameter in model.pretrained_model.parameters():
                if id(parameter) not in own:
                    parameter.requires_grad_(False)
        # A context head trains its own network on the Q loss alone, whatever the config says: the LM loss cannot
        # reach the frozen policy (`check_training`), and the policy computes its states as at decode time.
        self.q_head_only = args.q_head_only or model.q_head.leaves_policy_frozen

        if processing_class is None:
            if not model_id:
                raise ValueError("`processing_class` is required when the model has no name or path to load it from.")
            _check_tokenizer_files(model_id)
            tokenizer_kwargs = {
                k: model_init_kwargs[k] for k in ("revision", "trust_remote_code") if k in model_init_kwargs
            }
            processing_class = AutoTokenizer.from_pretrained(model_id, **tokenizer_kwargs)
        if args.eos_token is not None:
            _set_eos_token(processing_class, model, args.eos_token)
        if args.chat_template_path is not None:
            with open(args.chat_template_path, encoding="utf-8") as f:
                processing_class.chat_template = f.read()
        if getattr(processing_class, "pad_token_id", None) is None:
            processing_class.pad_token = processing_class.eos_token
        _check_vocabulary(processing_class, model)
        reward_functions = None
        if reward_funcs is not None:
            reward_functions = RewardFunctions(reward_funcs, reward_processing_classes, args.reward_weights)
        elif args.reward_weights is not None:
            raise ValueError("`reward_weights` was set but the trainer has no `reward_funcs` to weigh.")

        if train_dataset is None:
            if args.dataset_name is None:
                raise ValueError("Pass `train_dataset`, or set `dataset_name` in the config to load one.")
            train_dataset = load_dataset(
                args.dataset_name,
                args.dataset_config,
                data_files=args.dataset_data_files,
                split=args.dataset_split,
                streaming=args.streaming,
            )
        with_rewards = reward_functions is not None
        evals = eval_dataset if isinstance(eval_dataset, dict) else {"eval_dataset": eval_dataset}
        for name, dataset in {"train_dataset": train_dataset, **evals}.items():
            args.check_dataset_columns(dataset, name)
        if args.q_labels == "effects":
            if reward_functions is not None:
                raise ValueError("`q_labels='effects'` trains on candidate effects alone: drop `reward_funcs`.")
            columns = getattr(train_dataset, "column_names", None)  # None: a stream that does not say
            if columns is not None and "candidate_ids" not in columns:
                raise ValueError(
                    "`q_labels='effects'` needs candidate labels: the training data has no `candidate_ids` column "
                    "(see `generate_and_score(labels=CandidateLabels(k))`)."
                )
        vocab_size = model.vocab_size  # token ids index the rows of the LM and Q heads
        train_dataset = self._prepare(train_dataset, processing_class, args, with_rewards, vocab_size, formatting_func)
        if isinstance(eval_dataset, dict):  # several evaluation sets, logged as `eval_<name>_*` (as SFTTrainer)
            eval_dataset = {
                k: _keep_prompts(
                    d, self._prepare(d, processing_class, args, with_rewards, vocab_size, formatting_func)
                )
                for k, d in eval_dataset.items()
            }
        elif eval_dataset is not None:
            eval_dataset = _keep_prompts(
                eval_dataset,
                self._prepare(eval_dataset, processing_class, args, with_rewards, vocab_size, formatting_func),
            )
        eval_datasets = list(eval_dataset.values()) if isinstance(eval_dataset, dict) else [eval_dataset]
        if with_rewards and any(isinstance(d, IterableDataset) for d in (train_dataset, *eval_datasets)):
            # Batches of a stream are collated on one process and concatenated by Accelerate, which fails on the
            # prompt and column lists reward functions need; each process reads its own shard instead (as TRL's GRPO).
            args.accelerator_config.dispatch_batches = False
        if data_collator is None:
            data_collator = DataCollatorForQHead(pad_token_id=processing_class.pad_token_id)

        if ref_model is not None and not args.use_lm_rewards:
            raise ValueError("`ref_model` is only used with `use_lm_rewards=True`; set it or drop `ref_model`.")
        if args.use_lm_rewards and ref_model is None and not model.is_peft_model:
            ref_model = frozen_copy(model.pretrained_model)

        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
            compute_metrics=compute_metrics,
        )
        # Lets transformers count the targets of all accumulated micro-batches and processes (`num_items_in_batch`)
        # from our `labels`, so token-level losses are normalised exactly as its own causal-LM loss is.
        self.model_accepts_loss_kwargs = True
        self.ref_model = None if ref_model is None else self.accelerator.prepare_model(ref_model, evaluation_mode=True)
        self.eos_token_id = processing_class.eos_token_id
        if reward_functions is not None:
            for i, reward_model in reward_functions.models:
                reward_functions.funcs[i] = self.accelerator.prepare_model(
                    reward_model, evaluation_mode=True, device_placement=True
                )
        self.reward_computer = RewardComputer.from_config(processing_class, reward_functions, args)
        self._metrics: dict[str, dict[str, list]] = {"train": defaultdict(list), "eval": defaultdict(list)}

    @staticmethod
    def _build_model(model, peft_config, **model_init_kwargs) -> AutoModelForCausalLMWithQHead:
        if isinstance(model, AutoModelForCausalLMWithQHead):
            if peft_config is not None:
                model.pretrained_model = add_adapters(model.pretrained_model, peft_config)
        elif isinstance(model, (str, nn.Module)):
            model = AutoModelForCausalLMWithQHead.from_pretrained(model, peft_config=peft_config, **model_init_kwargs)
        else:
            raise TypeError(f"`model` must be a model, a name or a path, got {type(model).__name__}.")
        model.q_head.check_training(model.pretrained_model)  # e.g. a context head leaves the policy the base model
        policy_trains = any(p.requires_grad for p in model.pretrained_model.parameters())  # not so under a Q model
        if (model.is_loaded_in_4bit or model.is_loaded_in_8bit) and not model.is_peft_model and policy_trains:
            raise ValueError(
                "The model is loaded in 4 or 8 bits and has no adapters: quantised weights cannot be trained. Pass a "
                "`peft_config` (e.g. `LoraConfig`) to train LoRA adapters and the Q head on top of it (QLoRA)."
            )
        return model

    @staticmethod
    def _prepare(dataset, tokenizer, args: QHeadConfig, reward_columns=False, vocab_size=None, formatting_func=None):
        # Under `accelerate launch` the main process fills the datasets cache first; the others then read it.
        with PartialState().main_process_first():
            return prepare_dataset(
                dataset,
                tokenizer,
                text_field=args.dataset_text_field,
                max_length=args.max_length,
                packing=args.packing,
                packing_strategy=args.packing_strategy,
                num_proc=args.dataset_num_proc,
                completion_only_loss=args.completion_only_loss,
                reward_columns=reward_columns,
                vocab_size=vocab_size,
                formatting_func=formatting_func,
                reward_scale=args.reward_scale,
                reward_clip=args.reward_clip,
                reward_normalization=args.reward_normalization,
            )

    # ---- loss -------------------------------------------------------------------------------------------------------

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        """One training step's loss, top to bottom: masks, one forward, rewards, episode ends, returns, loss.

        Every tensor below is on the `(B, T)` position grid of docs/DESIGN.md section 1: position `t` holds the
        state `s_t` and, where `action_mask` is set, the action `a_t = x_{t+1}`.
        """
        args: QHeadConfig = self.args
        if self.q_head_only and model.training:
            # Trainer.training_step has just put the whole model in train mode; the frozen policy must compute the
            # features the head will read at decode time (no dropout), or the head learns from noised states.
            self.accelerator.unwrap_model(model).pretrained_model.eval()
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        position_ids = inputs.get("position_ids")  # packed rows: each document its own attention span

        # 1. Masks: which positions hold an action, and where the returns will read V(s); packed rows: which document
        # (episode) each position belongs to (returns never cross from one to the next).
        grid = step_grid(input_ids, inputs["labels"], attention_mask, position_ids, args.gae_lambda)
        actions, action_mask, episodes, values_needed = (
            grid.actions,  # (B, T)
            grid.action_mask,  # (B, T) bool
            grid.episodes,  # (B, T) or None
            grid.values_needed,  # (B, T) bool
        )
        soft = args.q_target == "soft"

        # 2. One forward: log pi(a_t|s_t) and Q(s_t, a_t) with grad, V(s) without, and no (B, T, V) logits.
        outputs = model(
            input_ids=input_ids,
            **attention_inputs(attention_mask, position_ids),
            actions=actions,
            logprob_mask=action_mask,
            value_mask=None if soft else values_needed,
            value_chunk_size=args.value_chunk_size,
            use_cache=False,  # as SFTTrainer: a training forward keeps no KV cache
        )
        if soft:  # V*(s) = beta log sum_a pi(a|s) exp(Q(s, a) / beta) where the returns read V, chunked, no grad
            outputs.state_values = self._soft_state_values(model, outputs, values_needed)

        # 3. Rewards r_t of every source, summed on the action grid.
        ref_logprobs = (
            self._reference_logprobs(model, input_ids, attention_mask, actions, action_mask, position_ids)
            if args.use_lm_rewards
            else None
        )  # (B, T) or None
        rewards, reward_metrics = self.reward_computer(
            inputs,
            action_mask,
            lm_logprobs=ref_logprobs,
            training=model.training,
            gather=self._gather_rows,
            trainer_state=self.state,
            grid=grid,
        )  # (B, T)

        # 4. Episode ends: EOS, and a row's `done` flag at its last action (a scored completion cut at a limit). An
        # unpacked row is one episode: an EOS closing an earlier turn of a multi-turn row does not end it.
        dones = episode_dones(
            actions,
            action_mask,
            self.eos_token_id,
            done=inputs.get("done"),
            token_dones=inputs.get("dones"),
            one_episode_per_row=episodes is None,  # packed rows (position ids): each EOS ends a document
        )  # (B, T)

        # 5. Return targets G_t (constants).
        returns = compute_returns(
            rewards,
            outputs.state_values,
            action_mask,
            gamma=args.gamma,
            gae_lambda=args.gae_lambda,
            dones=dones,
            beta=args.target_beta if soft else None,
            episode_ids=episodes,
        )  # (B, T)

        if args.q_labels == "effects":  # one-step labels: G_t = 0, so a candidate's target is its effect alone
            returns = torch.zeros_like(returns)

        # 5b. Candidate labels: Q(s_t, a) for k tokens per state, gathered, and their targets G_t + r'(a) - r'(a_t).
        candidates = self._candidate_terms(model, inputs, outputs, actions, action_mask, returns)

        # 6. The loss, a pure function of the tensors above.
        loss, stats = qhead_loss(
            outputs.action_logprobs,
            outputs.action_q,
            returns,
            action_mask,
            q_weight=args.q_weight,
            num_items=num_items_in_batch,
            target_beta=args.target_beta if soft else None,
            candidate_weight=args.candidate_weight,
            lm_loss=not self.q_head_only,
            **candidates,
        )
        if not torch.isfinite(loss):  # one sync per micro-batch: a NaN or inf must not reach the weights
            raise FloatingPointError(
                f"The loss is {loss.item()} at step {self.state.global_step + 1} (loss_lm {stats['loss_lm'].item()}, "
                f"loss_q {stats['loss_q'].item()}): look for extreme rewards (`reward_clip`), learning rates or beta."
            )
        if (
            num_items_in_batch is not None
            and args.average_tokens_across_devices
            and self.accelerator.num_processes > 1
        ):
            # `num_items_in_batch` counts every process's targets while DDP averages gradients: undo the average.
            loss = loss * self.accelerator.num_processes

        n_values = values_needed.sum()
        self._record(stats, weight=action_mask.sum())
        self._record({"v_mean": outputs.state_values.sum() / n_values.clamp(min=1)}, weight=n_values)
        self._record_floats(reward_metrics)
        return (loss, outputs) if return_outputs else loss

    @torch.no_grad()
    def _soft_state_values(self, model, outputs, values_needed: torch.Tensor) -> torch.Tensor:
        """`V*(s_t)` at `values_needed` (`soft.chunked_soft_state_values`: the head's `soft_value` on the forward's
        Q features), the policy from the forward's full logits when it made them (LM heads that are not a plain
        `W h + b`), else from the LM head's weight, chunk by chunk."""
        unwrapped = self.accelerator.unwrap_model(model)
        kwargs = {
            "q_head": unwrapped.q_head,
            "q_features": outputs.q_features,
            "chunk_size": self.args.value_chunk_size,
        }
        if outputs.logits is not None:
            kwargs["logits"] = outputs.logits
        else:
            lm_head = plain_lm_head(unwrapped.pretrained_model)
            kwargs.update(lm_weight=lm_head.weight, lm_bias=lm_head.bias)
        return chunked_soft_state_values(outputs.hidden_states, values_needed, self.args.target_beta, **kwargs)

    def _candidate_terms(self, model, inputs, outputs, actions, action_mask, returns) -> dict[str, torch.Tensor]:
        """The candidate arguments of `qhead_loss` (empty without candidate columns or with `candidate_weight=0`).

        The collator's token-aligned `[B, T, k]` columns move onto the action grid (entry `t + 1` to position `t`, as
        `mdp.token_rewards_to_actions`); a pair counts where its position holds an action, the candidate was labelled
        and differs from the sampled token. Effects are multiplied by `reward_scale` (the returns' scale).
        """
        if "candidate_ids" not in inputs or self.args.candidate_weight == 0:
            return {}
        ids = tokens_to_actions(inputs["candidate_ids"])  # (B, T, k)
        mask = (
            tokens_to_actions(inputs["candidate_mask"])
            & action_mask.bool().unsqueeze(-1)
            & (ids != actions.unsqueeze(-1))
        )
        scale = self.args.reward_scale
        effects = tokens_to_actions(inputs["candidate_rewards"]).float() * scale  # (B, T, k)
        sampled = tokens_to_actions(inputs["candidate_sampled_reward"]).float() * scale  # (B, T)
        q_head = self.accelerator.unwrap_model(model).q_head
        return {
            "candidate_q": q_head.gather(outputs.q_features, ids),  # (B, T, k), the forward's features
            "candidate_targets": candidate_targets(returns, effects, sampled),
            "candidate_mask": mask,
        }

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device):
        """`Trainer.get_batch_samples` (the micro-batches of one optimizer step, and their target count), plus the
        step's reward statistics: with `reward_normalization`, the sequence rewards of all these micro-batches on every
        process are normalised together (`RewardComputer.prepare_step`), not each micro-batch on its own, so gradient
        accumulation does not change the numbers trained on."""
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.args.reward_normalization is not None and batch_samples:
            self.reward_computer.prepare_step(batch_samples, gather=self._gather_rows, trainer_state=self.state)
        return batch_samples, num_items_in_batch

    def _gather_rows(self, values: torch.Tensor) -> torch.Tensor:
        """Per-row values of every process (NaN pads uneven batches, and NaN rows are left out of the statistics)."""
        return self.accelerator.gather(self.accelerator.pad_across_processes(values, pad_index=math.nan))

    @torch.no_grad()
    def _reference_logprobs(
        self, model, input_ids, attention_mask, actions, action_mask=None, position_ids=None
    ) -> torch.Tensor:
        args = (input_ids, attention_mask, actions, action_mask, self.args.value_chunk_size, position_ids)
        if self.ref_model is not None:
            return reference_logprobs(self.ref_model, *args)
        backbone = self.accelerator.unwrap_model(model).pretrained_model
        with as_reference(backbone):
            return reference_logprobs(backbone, *args)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        if prediction_loss_only or self.compute_metrics is None:
            with torch.no_grad(), self.compute_loss_context_manager():
                loss = self.compute_loss(model, inputs)
            return loss.detach(), None, None
        # For `compute_metrics`: per-position `log pi(a_t|s_t)` and `Q(s_t, a_t)` (zero off the actions), not the
        # `(B, T, |V|)` logits; `label_ids` are the labels (position t's action is token t + 1, -100 off targets).
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        predictions = (outputs.action_logprobs.detach().float(), outputs.action_q.detach().float())
        return loss.detach(), predictions, inputs["labels"]

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        args: QHeadConfig = self.args
        if args.q_head_learning_rate is None and args.q_head_bias_learning_rate is None:
            return optimizer
        # Move the Q head into its own group(s) before the scheduler is built, so it follows the same schedule.
        q_head = self.accelerator.unwrap_model(self.model).q_head
        weight_lr = args.q_head_learning_rate if args.q_head_learning_rate is not None else args.learning_rate
        bias_lr = args.q_head_bias_learning_rate if args.q_head_bias_learning_rate is not None else weight_lr
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}  # a frozen head is not
        # the head's `|V|` bias at the bias rate (dense, tied; a context head's output's), every other parameter (W, U
        # or its factors; a Q model's trunk) at the weight rate
        bias = getattr(q_head, "bias", None)
        q_params = [(p, bias_lr if p is bias else weight_lr) for p in q_head.parameters()]
        q_rates = [(p, lr) for p, lr in q_params if id(p) in in_optimizer]
        q_ids = {id(p) for p, _ in q_rates}
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in q_ids]
        optimizer.param_groups = [group for group in optimizer.param_groups if group["params"]]
        for lr in dict.fromkeys(lr for _, lr in q_rates if lr > 0):  # one group per rate; a zero rate: frozen
            optimizer.add_param_group({"params": [p for p, r in q_rates if r == lr], "lr": lr, "weight_decay": 0.0})
        return optimizer

    # ---- logging and saving -------------------------------------------------------------------------------------

    def _record(self, stats: dict[str, torch.Tensor], weight: torch.Tensor | float = 1.0) -> None:
        """Keep `(mean * weight, weight)` per metric: the logged value is the mean over every token of every micro-batch
        and process since the last log (as TRL's SFTTrainer logs its token metrics), not a mean of per-batch means.

        Kept on the device and reduced when logged: no host sync or collective in every step.
        """
        mode = "train" if self.model.training else "eval"
        weight = torch.as_tensor(weight, dtype=torch.float32, device=self.accelerator.device).reshape(())
        for name, value in stats.items():
            value = value.detach().float().reshape(()).to(weight.device)
            self._metrics[mode][name].append(torch.stack([value * weight, weight]))

    def _record_floats(self, metrics: dict[str, float]) -> None:
        """Metrics already gathered over processes (the reward statistics): one weight per step and process, so `log`
        averages the steps (over identical copies)."""
        self._record({name: torch.tensor(float(value)) for name, value in metrics.items()})

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        metrics = {}
        for name, values in self._metrics[mode].items():
            if values:
                total, weight = self.accelerator.gather(torch.stack(values)).sum(0).tolist()
                metrics[name] = total / weight if weight > 0 else float("nan")
        if mode == "eval":
            # `evaluate(metric_key_prefix=...)` names its loss `<prefix>_loss` (`eval_a_loss` for a dict of datasets).
            prefix = next((key[: -len("loss")] for key in logs if key.endswith("_loss")), "eval_")
            metrics = {f"{prefix}{name}": value for name, value in metrics.items()}
        super().log({**logs, **metrics}, start_time)
        self._metrics[mode].clear()
        if self.reward_computer.completion_log is not None and self.accelerator.is_main_process:  # as GRPOTrainer
            self.reward_computer.completion_log.write(
                self.state.global_step,
                self.args.output_dir,
                self.reward_computer.functions.names,
                self.args.report_to,
                self.args.num_completions_to_print,
            )

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        # Every process gets here (after any collective gather of `state_dict`); only the main one writes, once.
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        # `state_dict` is the whole model's, gathered by `save_model` under FSDP (FULL_STATE_DICT) and DeepSpeed, where
        # the modules' own parameters may be shards; `save_pretrained` splits it between backbone and Q head.
        self.accelerator.unwrap_model(self.model).save_pretrained(output_dir, state_dict=state_dict)
        if self.args.reward_normalization == "running":
            with open(os.path.join(output_dir, REWARD_MOMENTS_NAME), "w") as f:
                json.dump(self.reward_computer.moments.state_dict(), f)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        # As `Trainer._save`: the arguments beside the model (checkpoints keep them), and TRL's card at every save.
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        save_training_settings(output_dir, self.args, getattr(self.reward_computer.functions, "names", None))
        model_name = (self.args.hub_model_id or Path(self.args.output_dir).name).split("/")[-1]  # not `checkpoint-N`
        self._model_card(model_name).save(os.path.join(output_dir, "README.md"))

    # ---- model card and Hub ------------------------------------------------------------------------------------------

    def create_model_card(
        self,
        model_name: str | None = None,
        dataset_name: str | None = None,
        tags: str | list[str] | None = None,
        **kwargs,
    ) -> None:
        """Write TRL's model card (as `SFTTrainer` does, tags `trl` and `trl-qhead`) with the Q-head settings, the
        reward sources and how to load the model and generate with the tilt, to `args.output_dir/README.md`.
        `Trainer.push_to_hub` calls it; other transformers card arguments (`language`, `finetuned_from`, ...) are
        ignored."""
        if not self.is_world_process_zero():
            return
        if model_name is None:
            model_name = (self.args.hub_model_id or Path(self.args.output_dir).name).split("/")[-1]
        card = self._model_card(model_name, dataset_name=dataset_name, tags=tags)
        os.makedirs(self.args.output_dir, exist_ok=True)
        card.save(os.path.join(self.args.output_dir, "README.md"))

    def _model_card(self, model_name: str, dataset_name: str | None = None, tags: str | list[str] | None = None):
        args: QHeadConfig = self.args
        model = self.accelerator.unwrap_model(self.model)
        base_model = getattr(model.base_model.config, "_name_or_path", None) or None
        if base_model is not None and os.path.isdir(base_model):
            base_model = None  # a local folder is no Hub id to link
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        hub_model_id = getattr(self, "hub_model_id", None) or args.hub_model_id
        q_head = {"hidden_size": model.q_head.in_features, "vocab_size": model.q_head.out_features}
        options = {k: v for k, v in model.q_head.to_config().items() if v is not None}  # its type and options (rank)
        q_head.update(q_head_init=model.q_head_init, **options)
        settings = {
            name: getattr(args, name)
            for name in ("gamma", "gae_lambda", "q_weight", "use_lm_rewards", "q_head_learning_rate", "max_length")
        }
        return qhead_model_card(
            base_model=base_model,
            model_name=model_name,
            hub_model_id=hub_model_id or model_name,
            dataset_name=dataset_name or args.dataset_name,
            tags=[*tags, *self._tag_names],
            q_head=q_head,
            settings=settings,
            reward_sources=self._reward_sources(),
            peft=model.is_peft_model,
        )

    def _reward_sources(self) -> list[str]:
        args: QHeadConfig = self.args
        sources = []
        columns = set(getattr(self.train_dataset, "column_names", None) or [])
        for column, what in (("reward", "sequence rewards"), ("rewards", "per-token rewards")):
            if column in columns:
                sources.append(f"dataset column `{column}` ({what})")
        functions = self.reward_computer.functions
        if functions is not None:
            for name, weight in zip(functions.names, functions.weights.tolist(), strict=True):
                sources.append(f"reward function `{name}` (weight {weight:g})")
        if args.use_lm_rewards:
            sources.append(f"reference log-probs, coefficient {args.lm_reward_coef:g} (`use_lm_rewards`)")
        if sources and (args.reward_scale != 1.0 or args.reward_clip is not None or args.reward_normalization):
            sources.append(
                f"task rewards normalised `{args.reward_normalization}`, scaled by {args.reward_scale:g}, "
                f"clipped at {args.reward_clip}"
            )
        return sources

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        # transformers copies the model files it knows by name from the checkpoint to `output_dir` before uploading
        # it; the Q head's are not among them.
        if self.is_world_process_zero():
            for name in (Q_HEAD_WEIGHTS_NAME, Q_HEAD_CONFIG_NAME, TRAINING_SETTINGS_NAME, "README.md"):
                if os.path.isfile(os.path.join(checkpoint_folder, name)):
                    os.makedirs(self.args.output_dir, exist_ok=True)
                    shutil.copy(os.path.join(checkpoint_folder, name), os.path.join(self.args.output_dir, name))
        super()._push_from_checkpoint(checkpoint_folder)

    def _save_checkpoint(self, model: nn.Module, trial=None) -> None:
        """transformers' `checkpoint-N` folder, then its completion marker.

        transformers writes a checkpoint's files one by one into `checkpoint-N` (model, optimizer, scheduler, RNG
        states, trainer state) and its `get_last_checkpoint` takes the highest N whatever the folder holds, so a run
        killed mid-save would resume from a partial checkpoint, or from one mixing two runs' files. Here, once every
        process has written its part, the main process writes `checkpoint_complete.json` (every file of the folder
        with its size; written to a temporary name, fsync'ed, then renamed): `train(resume_from_checkpoint=True)`
        takes the newest checkpoint whose marker is there and matches the files. The marker of a checkpoint being
        re-written is removed first, and `save_total_limit` rotation runs only after the new marker, so the previous
        complete checkpoint is never deleted before the new one is complete.
        """
        run_dir = self._get_output_dir(trial=trial)
        output_dir = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if self.args.should_save:
            marker = os.path.join(output_dir, CHECKPOINT_COMPLETE_NAME)
            if os.path.isfile(marker):
                os.remove(marker)
        self.accelerator.wait_for_everyone()
        limit = self.args.save_total_limit
        self.args.save_total_limit = None  # rotated below, once this checkpoint is complete
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        self.accelerator.wait_for_everyone()  # every process's files (RNG states, sharded optimizer) are written
        if self.args.should_save:
            mark_checkpoint_complete(output_dir, self.state.global_step)
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, **kwargs):
        """`Trainer.train`; `resume_from_checkpoint=True` resumes from the newest complete checkpoint in `output_dir`
        (one whose `checkpoint_complete.json` matches its files, see `_save_checkpoint`), skipping any a kill left
        incomplete, and raises `ValueError` when there is none. A path is resumed from as given; one whose marker
        does not match its files raises, one without a marker (an older trl-qhead, a plain `Trainer`) is used with
        a warning.

        Afterwards the model is in eval mode (transformers leaves it in train mode), so that generating right after
        training has no dropout."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
        elif isinstance(resume_from_checkpoint, (str, os.PathLike)):
            resume_from_checkpoint = os.fspath(resume_from_checkpoint)
            problem = checkpoint_problem(resume_from_checkpoint)
            if problem is not None and os.path.isfile(os.path.join(resume_from_checkpoint, CHECKPOINT_COMPLETE_NAME)):
                raise ValueError(f"Cannot resume from {resume_from_checkpoint}: {problem}.")
            if problem is not None:
                logger.warning(f"Resuming from {resume_from_checkpoint}, which may be incomplete: {problem}.")
        output = super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)
        self.model.eval()
        return output

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self.is_fsdp_enabled:
            return super()._save_optimizer_and_scheduler(output_dir)
        # Under FSDP transformers also writes the whole model again (`pytorch_model_fsdp.bin`: the frozen base and the
        # Q head, gathered). The checkpoint already holds the model, consolidated by `save_model` (adapters or
        # backbone, plus q_head.safetensors), and `_load_from_checkpoint` resumes from those: only the optimizer
        # (gathered to rank 0, `optimizer.bin`) and the scheduler are written here.
        from accelerate.utils import save_fsdp_optimizer
        from transformers.trainer import SCHEDULER_NAME

        save_fsdp_optimizer(
            self.accelerator.state.fsdp_plugin, self.accelerator, self.optimizer, self.model, output_dir
        )
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        if self.is_fsdp_enabled:
            load_sharded_checkpoint(model if model is not None else self.model, resume_from_checkpoint)
        else:
            model = self.accelerator.unwrap_model(model if model is not None else self.model)
            model.load_checkpoint(resume_from_checkpoint)
        moments = os.path.join(resume_from_checkpoint, REWARD_MOMENTS_NAME)
        if self.args.reward_normalization == "running" and os.path.isfile(moments):
            with open(moments) as f:
                self.reward_computer.moments.load_state_dict(json.load(f))


def _keep_prompts(raw, prepared):
    """The evaluation rows keep their `prompt` column (for TRL's `LogCompletionsCallback`, which generates from
    `trainer.eval_dataset["prompt"]`) where the rows are still one per example (map-style, not packed)."""
    if not isinstance(raw, Dataset) or not isinstance(prepared, Dataset) or "prompt" not in raw.column_names:
        return prepared
    if "prompt" in prepared.column_names or len(prepared) != len(raw):
        return prepared
    return prepared.add_column("prompt", raw["prompt"])


def _as_qhead_config(args: TrainingArguments) -> QHeadConfig:
    """A `QHeadConfig` with the values of plain `TrainingArguments`, as `SFTTrainer` converts them."""
    dict_args = args.to_dict()
    dict_args["hub_token"] = args.hub_token  # `to_dict` hides it
    # transformers' default drops every column the model's forward does not name: our collator needs them.
    dict_args["remove_unused_columns"] = False
    return QHeadConfig(**dict_args)


def _set_eos_token(tokenizer, model: AutoModelForCausalLMWithQHead, eos_token: str) -> None:
    """`eos_token` becomes the tokenizer's EOS and is added to the model's (as SFTTrainer does)."""
    if eos_token not in tokenizer.get_vocab():
        raise ValueError(f"`eos_token` {eos_token!r} is not in the vocabulary of {type(tokenizer).__name__}.")
    tokenizer.eos_token = eos_token
    backbone = model.base_model
    backbone.config.get_text_config().eos_token_id = tokenizer.eos_token_id
    generation_config = getattr(backbone, "generation_config", None)
    if generation_config is not None:
        ids = generation_config.eos_token_id
        ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
        if tokenizer.eos_token_id not in ids:
            generation_config.eos_token_id = [tokenizer.eos_token_id, *ids]


def _check_vocabulary(tokenizer: Any, model: AutoModelForCausalLMWithQHead) -> None:
    """The tokenizer must belong to the model: its ids are all rows of the model's LM and Q heads, it covers the
    special ids the model's config and generation config use (EOS, BOS, pad), and it has an EOS token (episodes
    end, and documents are closed and padded, with it)."""
    n_tokens = len(tokenizer)
    if n_tokens > model.vocab_size:
        raise ValueError(
            f"`processing_class` has {n_tokens} tokens but the model's vocabulary has {model.vocab_size}: they do not "
            "belong together (resize the model's embeddings, or pass the model's own tokenizer)."
        )
    beyond = {name: i for name, i in _model_special_ids(model).items() if n_tokens <= i < model.vocab_size}
    if beyond:
        used = ", ".join(f"{name}={i}" for name, i in beyond.items())
        raise ValueError(
            f"`processing_class` has {n_tokens} tokens but the model uses ids beyond them ({used}): it is not the "
            "model's tokenizer (a model folder without tokenizer files loads as a one-token tokenizer). Pass the "
            "model's own tokenizer."
        )
    if getattr(tokenizer, "eos_token_id", None) is None:
        raise ValueError(
            "`processing_class` has no EOS token: QHeadTrainer ends every document (an episode) with EOS and pads with "
            "it. Set `processing_class.eos_token` to the model's end-of-sequence token."
        )


def _model_special_ids(model: AutoModelForCausalLMWithQHead) -> dict[str, int]:
    """The special token ids of the model's config and generation config (`eos_token_id` may be a list)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    sources = [("", config), ("generation_config.", getattr(model.base_model, "generation_config", None))]
    ids = {}
    for prefix, source in sources:
        for name in ("eos_token_id", "bos_token_id", "pad_token_id", "decoder_start_token_id"):
            value = getattr(source, name, None) if source is not None else None
            values = value if isinstance(value, (list, tuple)) else [value]
            for i in values:
                if isinstance(i, int) and not isinstance(i, bool) and i >= 0:
                    ids[f"{prefix}{name}"] = max(i, ids.get(f"{prefix}{name}", -1))
    return ids


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tekken.json",
)


def _check_tokenizer_files(model_id: str | os.PathLike) -> None:
    """A local model folder must hold a tokenizer: without one, `AutoTokenizer` builds a one-token tokenizer
    (everything encodes to nothing, and token 0 becomes EOS) instead of failing."""
    if os.path.isdir(model_id) and not any(os.path.isfile(os.path.join(model_id, f)) for f in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"{model_id} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}): pass the model's tokenizer as "
            "`processing_class`, or save it into the folder."
        )
