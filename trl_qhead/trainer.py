"""`QHeadTrainer`: transformers' `Trainer` with the Q-head loss. Wiring only: `compute_loss` calls, in order, `mdp`
(masks), the model's forward, `rewards`, `mdp` (episode ends), `returns` and `losses`, where the math lives."""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from typing import Any

import torch
from accelerate import PartialState
from datasets import Dataset, IterableDataset, load_dataset
from torch import nn
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainerCallback

from .backbone import plain_lm_head
from .config import QHeadConfig
from .data import DataCollatorForQHead, prepare_dataset
from .losses import qhead_loss
from .mdp import action_mask_from_labels, episode_dones, next_tokens, value_mask
from .modeling import AutoModelForCausalLMWithQHead, add_adapters
from .q_values import gather_candidate_q
from .reference import as_reference, frozen_copy, reference_logprobs
from .returns import compute_returns
from .reward_functions import RewardFunc, RewardFunctions
from .rewards import RewardComputer
from .soft import candidate_targets, chunked_soft_state_values

REWARD_MOMENTS_NAME = "reward_moments.json"


class QHeadTrainer(Trainer):
    """Trains a causal LM and its Q head on `L = L_LM + q_weight * L_Q` (see `QHeadConfig` and docs/DESIGN.md).

    Args:
        model: an `AutoModelForCausalLMWithQHead`, a transformers causal LM (a fresh Q head is added), or a name or
            path to load one from.
        args: a `QHeadConfig`; defaults to one writing to `<model name>-QHead`.
        train_dataset, eval_dataset: datasets in any format `trl_qhead.data` recognises, map-style or streaming. When
            `train_dataset` is `None`, `args.dataset_name` (and its `dataset_*` fields) is loaded.
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
    ):
        model_id = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", None)
        if args is None:
            args = QHeadConfig(output_dir=f"{str(model_id or 'model').split('/')[-1]}-QHead")
        elif not isinstance(args, QHeadConfig):
            raise TypeError(f"`args` must be a QHeadConfig, got {type(args).__name__}.")
        model = self._build_model(model, peft_config)

        if processing_class is None:
            if not model_id:
                raise ValueError("`processing_class` is required when the model has no name or path to load it from.")
            processing_class = AutoTokenizer.from_pretrained(model_id)
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
        for dataset in (train_dataset, eval_dataset):
            columns = getattr(dataset, "column_names", None) or []
            if "candidate_ids" in columns and args.reward_normalization is not None and args.candidate_weight > 0:
                raise ValueError(
                    "The dataset has candidate labels (`candidate_ids`), whose effects are in the reward's own units, "
                    f"and `reward_normalization={args.reward_normalization!r}` rescales the returns they are added "
                    "to: set `reward_normalization=None` (or `candidate_weight=0`)."
                )
        train_dataset = self._prepare(train_dataset, processing_class, args, with_rewards)
        if eval_dataset is not None:
            eval_dataset = self._prepare(eval_dataset, processing_class, args, with_rewards)
        if with_rewards and any(isinstance(d, IterableDataset) for d in (train_dataset, eval_dataset)):
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
    def _build_model(model, peft_config) -> AutoModelForCausalLMWithQHead:
        if isinstance(model, AutoModelForCausalLMWithQHead):
            if peft_config is not None:
                model.pretrained_model = add_adapters(model.pretrained_model, peft_config)
        elif isinstance(model, (str, nn.Module)):
            model = AutoModelForCausalLMWithQHead.from_pretrained(model, peft_config=peft_config)
        else:
            raise TypeError(f"`model` must be a model, a name or a path, got {type(model).__name__}.")
        if (model.is_loaded_in_4bit or model.is_loaded_in_8bit) and not model.is_peft_model:
            raise ValueError(
                "The model is loaded in 4 or 8 bits and has no adapters: quantised weights cannot be trained. Pass a "
                "`peft_config` (e.g. `LoraConfig`) to train LoRA adapters and the Q head on top of it (QLoRA)."
            )
        return model

    @staticmethod
    def _prepare(dataset, tokenizer, args: QHeadConfig, reward_columns: bool = False):
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
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]

        # 1. Masks: which positions hold an action, and where the returns will read V(s).
        actions = next_tokens(input_ids)  # (B, T)
        action_mask = action_mask_from_labels(inputs["labels"], attention_mask)  # (B, T) bool
        values_needed = value_mask(action_mask, attention_mask, args.gae_lambda)  # (B, T) bool
        soft = args.q_target == "soft"

        # 2. One forward: log pi(a_t|s_t) and Q(s_t, a_t) with grad, V(s) without, and no (B, T, V) logits.
        outputs = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
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
            self._reference_logprobs(model, input_ids, attention_mask, actions, action_mask)
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
        )  # (B, T)

        # 4. Episode ends: EOS, and a row's `done` flag at its last action (a scored completion cut at a limit).
        dones = episode_dones(
            actions, action_mask, self.eos_token_id, done=inputs.get("done"), token_dones=inputs.get("dones")
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
        )  # (B, T)

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
            **candidates,
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
        """`V*(s_t)` at `values_needed` (`soft.chunked_soft_state_values`), from the forward's full logits when it
        made them (heads that are not a plain `W h + b`), else from the LM head's weight, chunk by chunk."""
        unwrapped = self.accelerator.unwrap_model(model)
        q_head = unwrapped.q_head
        kwargs = {"q_weight": q_head.weight, "q_bias": q_head.bias, "chunk_size": self.args.value_chunk_size}
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

        def to_actions(x: torch.Tensor) -> torch.Tensor:
            shifted = torch.zeros_like(x)
            shifted[:, :-1] = x[:, 1:]
            return shifted

        ids = to_actions(inputs["candidate_ids"])  # (B, T, k)
        mask = to_actions(inputs["candidate_mask"]) & action_mask.bool().unsqueeze(-1) & (ids != actions.unsqueeze(-1))
        scale = self.args.reward_scale
        effects = to_actions(inputs["candidate_rewards"]).float() * scale  # (B, T, k)
        sampled = to_actions(inputs["candidate_sampled_reward"]).float() * scale  # (B, T)
        q_head = self.accelerator.unwrap_model(model).q_head
        return {
            "candidate_q": gather_candidate_q(outputs.hidden_states, q_head, ids),
            "candidate_targets": candidate_targets(returns, effects, sampled),
            "candidate_mask": mask,
        }

    def _gather_rows(self, values: torch.Tensor) -> torch.Tensor:
        """Per-row values of every process (NaN pads uneven batches, and NaN rows are left out of the statistics)."""
        return self.accelerator.gather(self.accelerator.pad_across_processes(values, pad_index=math.nan))

    @torch.no_grad()
    def _reference_logprobs(self, model, input_ids, attention_mask, actions, action_mask=None) -> torch.Tensor:
        chunk_size = self.args.value_chunk_size
        if self.ref_model is not None:
            return reference_logprobs(self.ref_model, input_ids, attention_mask, actions, action_mask, chunk_size)
        backbone = self.accelerator.unwrap_model(model).pretrained_model
        with as_reference(backbone):
            return reference_logprobs(backbone, input_ids, attention_mask, actions, action_mask, chunk_size)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

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
        q_rates = [(p, lr) for p, lr in ((q_head.weight, weight_lr), (q_head.bias, bias_lr)) if id(p) in in_optimizer]
        q_ids = {id(p) for p, _ in q_rates}
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in q_ids]
        optimizer.param_groups = [group for group in optimizer.param_groups if group["params"]]
        for lr in dict.fromkeys(lr for _, lr in q_rates):  # one group per distinct rate
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
            metrics = {f"eval_{name}": value for name, value in metrics.items()}
        super().log({**logs, **metrics}, start_time)
        self._metrics[mode].clear()

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

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        if self.is_fsdp_enabled:
            # Loading into the unwrapped modules would write into FSDP's shards; not supported yet.
            raise NotImplementedError(
                "Resuming a QHeadTrainer run under FSDP is not supported yet: resume with DDP or DeepSpeed, or load "
                "the checkpoint with `AutoModelForCausalLMWithQHead.from_pretrained` and start a new run."
            )
        model = self.accelerator.unwrap_model(model if model is not None else self.model)
        model.load_checkpoint(resume_from_checkpoint)
        moments = os.path.join(resume_from_checkpoint, REWARD_MOMENTS_NAME)
        if self.args.reward_normalization == "running" and os.path.isfile(moments):
            with open(moments) as f:
                self.reward_computer.moments.load_state_dict(json.load(f))


def _check_vocabulary(tokenizer: Any, model: AutoModelForCausalLMWithQHead) -> None:
    """The tokenizer's ids must all be rows of the model's LM and Q heads."""
    n_tokens = len(tokenizer)
    if n_tokens > model.vocab_size:
        raise ValueError(
            f"`processing_class` has {n_tokens} tokens but the model's vocabulary has {model.vocab_size}: they do not "
            "belong together (resize the model's embeddings, or pass the model's own tokenizer)."
        )
