"""Hostile rewards: multi-turn rows (a completion mask with several runs), prompts whose last token merges with the
completion's first, sequence-reward normalisation split over gradient accumulation, and reward functions returning
numbers float32 cannot hold. Each must give the documented number, or fail naming the function."""

import pytest
import torch
from datasets import Dataset

import trl_qhead.trainer
from tests.conftest import make_tiny_gpt2
from trl_qhead import AutoModelForCausalLMWithQHead, QHeadConfig, QHeadTrainer
from trl_qhead.mdp import action_mask_from_labels
from trl_qhead.returns import compute_returns

# ---- multi-turn rows: one episode, the environment's tokens between the turns ----------------------------------------

EOS = 50256  # GPT-2's


def _spy_returns(monkeypatch) -> list[torch.Tensor]:
    """Record every return target the trainer computes."""
    targets, compute = [], trl_qhead.trainer.compute_returns

    def spy(*args, **kwargs):
        targets.append(compute(*args, **kwargs))
        return targets[-1]

    monkeypatch.setattr(trl_qhead.trainer, "compute_returns", spy)
    return targets


@pytest.mark.parametrize("turn_end", [EOS, 13], ids=["turn_ends_with_eos", "turn_ends_without_eos"])
def test_a_two_turn_row_is_one_episode_worked_by_hand(gpt2_tokenizer, monkeypatch, turn_end):
    """Tokens x0..x7: prompt x0 x1, the agent's turn x2 x3, the environment's reply x4 x5, the agent's turn x6 x7 (EOS).
    Actions sit at positions 1, 2 (producing x2, x3) and 5, 6 (producing x6, x7). Per-token rewards 1.0 on x3 (turn 1),
    0.5 on x5 (the environment's token: earned by the action before it, position 2), 2.0 on x7, and a sequence reward
    3.0 on the row's last action. gamma = 0.5, Monte Carlo:

        r = {1: 0, 2: 1.0 + 0.5, 5: 0, 6: 2.0 + 3.0}
        G_6 = 5 (EOS ends the episode), G_5 = 0 + 0.5 * 5 = 2.5
        G_2 = 1.5 + 0.5 * G_5 = 2.75 (the first turn's return goes on to the second turn's first action)
        G_1 = 0 + 0.5 * 2.75 = 1.375

    An EOS closing the first turn (chat models whose EOS is the end-of-turn token) does not end the episode, and the
    Q head's offset (V far from 0) must not show: nothing bootstraps before the row's last action."""
    model = AutoModelForCausalLMWithQHead(make_tiny_gpt2(), q_head_init="normal")
    with torch.no_grad():
        model.q_head.bias.normal_(1.5, 0.5, generator=torch.Generator().manual_seed(0))
    data = Dataset.from_dict(
        {
            "input_ids": [[5, 9, 11, turn_end, 40, 41, 12, EOS]],
            "completion_mask": [[0, 0, 1, 1, 0, 0, 1, 1]],
            "rewards": [[0.0, 0.0, 0.0, 1.0, 0.0, 0.5, 0.0, 2.0]],
            "reward": [3.0],
        }
    )
    args = QHeadConfig(output_dir="/tmp/unused", gamma=0.5, report_to=[], use_cpu=True)
    trainer = QHeadTrainer(model, args, train_dataset=data, processing_class=gpt2_tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[0]])
    targets = _spy_returns(monkeypatch)
    model.eval()
    trainer.compute_loss(model, batch)
    (returns,) = targets
    action_mask = action_mask_from_labels(batch["labels"], batch["attention_mask"])
    assert action_mask[0].nonzero().flatten().tolist() == [1, 2, 5, 6]
    torch.testing.assert_close(returns[0], torch.tensor([0, 1.375, 2.75, 0, 0, 2.5, 5.0, 0]), rtol=0, atol=1e-6)


def test_compute_returns_of_a_two_run_row_with_lambda_worked_by_hand():
    """The same grid, values read: V(s_t) = 10 t, gamma = 0.5, lambda = 0.5, no episode end.

    G_6 = 5 + 0.5 * V(s_7) = 40                                  (the row's last action bootstraps)
    G_5 = 0 + 0.5 * (0.5 * V(s_6) + 0.5 * G_6) = 25
    G_2 = 1.5 + 0.5 * (0.5 * V(s_5) + 0.5 * G_5) = 20.25         (continues to the action at 5, not to V(s_3))
    G_1 = 0 + 0.5 * (0.5 * V(s_2) + 0.5 * G_2) = 10.0625
    """
    rewards = torch.tensor([[0.0, 0.0, 1.5, 0.0, 0.0, 0.0, 5.0, 0.0]])
    values = torch.arange(8, dtype=torch.float32)[None] * 10
    mask = torch.tensor([[0, 1, 1, 0, 0, 1, 1, 0]])
    got = compute_returns(rewards, values, mask, gamma=0.5, gae_lambda=0.5)
    assert got.tolist() == [[0.0, 10.0625, 20.25, 0.0, 0.0, 25.0, 40.0, 0.0]]


# ---- the texts reward functions score are those of the trained tokens ------------------------------------------------


def _recording_reward(calls: list):
    """A TRL-style reward function that keeps what it is handed and scores the completion's text."""

    def texts_seen(prompts, completions, completion_ids, **kwargs):
        calls.extend(zip(prompts, completions, [list(ids) for ids in completion_ids], strict=True))
        return [float(len(c)) for c in completions]

    return texts_seen


def test_a_prompt_merging_with_its_completion_is_scored_as_its_tokens_read(tmp_path, gpt2_tokenizer, monkeypatch):
    """GPT-2 tokenises "Hello wor" + "ld! How are you?" as `Hello`, ` world`, `!`, ...: the completion's first action
    produces ` world`. The reward function gets "Hello" and " world! How are you?", the texts of the prompt tokens and
    of the trained tokens, never the raw prompt with the decoded completion ("Hello wor" + " world! ...")."""
    pairs = [("Hello wor", "ld! How are you?"), ("The cat sa", "t on the mat."), ("2 + 2 =", " 4")]
    data = Dataset.from_dict({"prompt": [p for p, _ in pairs], "completion": [c for _, c in pairs]})
    calls = []
    args = QHeadConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, per_device_train_batch_size=3)
    trainer = QHeadTrainer(
        make_tiny_gpt2(),
        args,
        train_dataset=data,
        processing_class=gpt2_tokenizer,
        reward_funcs=_recording_reward(calls),
    )
    rows = [trainer.train_dataset[i] for i in range(3)]
    batch = trainer.data_collator(rows)
    trainer.compute_loss(trainer.model, batch)
    assert [(p, c) for p, c, _ in calls] == [
        ("Hello", " world! How are you?"),
        ("The cat", " sat on the mat."),
        ("2 + 2 =", " 4"),
    ]
    for (prompt, completion, ids), row in zip(calls, rows, strict=True):
        trained = [t for t, m in zip(row["input_ids"], row["completion_mask"], strict=True) if m]
        assert ids == trained  # the scored completion's ids are the actions
        assert prompt + completion == gpt2_tokenizer.decode(row["input_ids"], skip_special_tokens=True)
        assert completion == gpt2_tokenizer.decode(trained, skip_special_tokens=True)


METASPACE_WORDS = ["<eos>", "\u2581Hello", "\u2581world", "\u2581a", "\u2581b"]


def _metaspace_tokenizer():
    """A SentencePiece-style tokenizer: decoding a sequence drops the leading space of its first token, so a
    completion decoded on its own loses the space that separates it from the prompt."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(METASPACE_WORDS)}, unk_token="<eos>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<eos>")


def _metaspace_model():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(METASPACE_WORDS), n_layer=1, n_embd=16, n_head=2, n_positions=16)
    config.eos_token_id = config.bos_token_id = 0
    return AutoModelForCausalLMWithQHead(GPT2LMHeadModel(config))


@pytest.mark.parametrize("labels", [{}, {"prefix_shaping": True, "candidate_rewards": 2}], ids=["scored", "labelled"])
def test_generated_completions_are_scored_as_the_text_of_prompt_and_completion_tokens(labels):
    """`generate_and_score`: every text a reward function scores (the completion, and with candidate labels every
    prefix and candidate) is `prompt + completion == decode(prompt tokens + completion tokens)`; the stored
    `completion` is the scored text."""
    from trl_qhead import generate_and_score

    tokenizer, calls = _metaspace_tokenizer(), []
    prompts = Dataset.from_dict({"prompt": ["Hello", "Hello world"]})
    data = generate_and_score(
        _metaspace_model(),
        tokenizer,
        prompts,
        _recording_reward(calls),
        num_generations=3,
        max_new_tokens=4,
        seed=0,
        show_progress=False,
        **labels,
    )
    assert calls and any(ids for _, _, ids in calls)
    for prompt, completion, ids in calls:
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert prompt + completion == tokenizer.decode(prompt_ids + ids, skip_special_tokens=True)
    for row in data:
        n = sum(row["completion_mask"])
        whole = tokenizer.decode(row["input_ids"], skip_special_tokens=True)
        assert row["prompt"] + row["completion"] == whole, row
        assert row["completion"] == whole[len(tokenizer.decode(row["input_ids"][:-n])) :]


# ---- sequence-reward normalisation over the optimizer step --------------------------------------------------------


def length_bonus(completions, **kwargs):
    """A reward function with TRL's interface: 0.1 per character of the completion."""
    return [0.1 * len(c) for c in completions]


def train_one_step(output_dir, gpt2_tokenizer, normalization, batch_size, accumulation, reward_funcs=None):
    """Train one optimizer step on the same 4 rows (`batch_size` per device and micro-batch); return the logged loss,
    the gradients before the update, and the trainer. Also run on 2 processes by tests/distributed_normalisation.py."""
    from transformers import TrainerCallback

    rows = [[5, 9, 11, 40, EOS], [3, 4, 5, 6, 7, 8, EOS], [8, 9, 10, EOS], [12, 13, 14, 15, 16, 17, 18, 19]]
    data = Dataset.from_dict({"input_ids": rows, "reward": [1.0, 5.0, -2.0, 10.0]})
    grads = {}

    class KeepGrads(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            grads.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})

    args = QHeadConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        reward_normalization=normalization,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
    )
    model = AutoModelForCausalLMWithQHead(make_tiny_gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    trainer = QHeadTrainer(
        model,
        args,
        train_dataset=data,
        processing_class=gpt2_tokenizer,
        reward_funcs=reward_funcs,
        callbacks=[KeepGrads()],
    )
    trainer.train()
    loss = next(entry["loss"] for entry in trainer.state.log_history if "loss" in entry)
    return loss, grads, trainer


@pytest.mark.parametrize("normalization", ["batch", "running"])
def test_normalisation_is_over_the_optimizer_step_not_the_micro_batch(tmp_path, gpt2_tokenizer, normalization):
    """One batch of 4 rows and 2 micro-batches of 2 with gradient accumulation are the same optimizer step: the same
    sequence rewards are normalised together, so the loss and every gradient agree (up to summation order). Each
    sample is scored once."""
    calls = []

    def counted_length_bonus(completions, **kwargs):
        calls.extend(completions)
        return length_bonus(completions)

    one_loss, one_grads, one = train_one_step(
        tmp_path / "one", gpt2_tokenizer, normalization, 4, 1, [counted_length_bonus]
    )
    assert len(calls) == 4
    two_loss, two_grads, two = train_one_step(
        tmp_path / "two", gpt2_tokenizer, normalization, 2, 2, [counted_length_bonus]
    )
    assert len(calls) == 8
    assert two_loss == pytest.approx(one_loss, rel=1e-5)
    assert one_grads.keys() == two_grads.keys() and "q_head.weight" in one_grads
    for name, grad in one_grads.items():
        torch.testing.assert_close(two_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    if normalization == "running":
        assert one.reward_computer.moments.count == two.reward_computer.moments.count == 4
        assert two.reward_computer.moments.mean == pytest.approx(one.reward_computer.moments.mean)


@pytest.mark.slow
def test_normalisation_is_over_every_process(tmp_path, gpt2_tokenizer):
    """2 processes (gloo, `torch.distributed.run`), each accumulating 2 micro-batches of 1 row, train the same step as
    1 process with 1 batch of 4 rows: the sequence rewards are normalised over every micro-batch of both processes."""
    import socket
    import sys

    from tests.recipe_assets import run

    out = tmp_path / "two.pt"
    with socket.socket() as sock:  # torchrun's static rendezvous needs a real port on both ranks
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}"]
    run([*launch, "tests/distributed_normalisation.py"], timeout=240, NORMALISATION_OUT=str(out), OMP_NUM_THREADS="1")
    two = torch.load(out)
    one_loss, one_grads, _ = train_one_step(tmp_path / "one", gpt2_tokenizer, "batch", 4, 1, [length_bonus])
    assert two["loss"] == pytest.approx(one_loss, rel=1e-5)
    for name in ("q_head.weight", "q_head.bias"):
        torch.testing.assert_close(two["grads"][name], one_grads[name], rtol=1e-4, atol=1e-6, msg=name)


# ---- reward functions returning numbers float32 cannot hold -----------------------------------------------------------


def _returning(output, name="big"):
    def reward(completions, **kwargs):
        return output

    reward.__name__ = name
    return reward


@pytest.mark.parametrize(
    ("funcs", "weights", "message"),
    [
        ([_returning([1.0, 1e39])], None, r"'big' returned 1e\+39 for sample 1, which is not finite in float32"),
        ([_returning([-1e39, 0.0])], None, r"'big' returned -1e\+39 for sample 0, which is not finite in float32"),
        ([_returning([[0.0], [1e39, 0.0]])], None, r"'big' returned a per-token reward of 1e\+39 for sample 1"),
        ([_returning([1e10, 0.0])], [1e30], r"'big' returned 1e\+10 for sample 0, .* times its weight 1e\+30"),
        ([_returning([float("inf"), 0.0])], None, "'big' returned inf for sample 0: rewards must be finite"),
        ([_returning([0.0, float("nan")])], None, "'big' returned nan for sample 1: rewards must be finite"),
        (
            [_returning([3e38, 0.0], "first"), _returning([3e38, 0.0], "second")],
            None,
            r"weighted sum of the rewards of sample 0 overflows float32 .*'first': 3\.\d+e\+38, 'second': 3\.\d+e\+38",
        ),
    ],
    ids=["1e39", "-1e39", "per_token_1e39", "weight_overflow", "inf", "nan", "sum_overflow"],
)
def test_a_reward_float32_cannot_hold_is_an_error_naming_the_function(funcs, weights, message):
    from trl_qhead.reward_functions import RewardFunctions

    with pytest.raises(ValueError, match=message):
        RewardFunctions(funcs, reward_weights=weights).score(["a", "b"], ["x", "y"], [[1], [2, 3]])


def test_an_async_function_returning_1e39_is_named():
    from trl_qhead.reward_functions import RewardFunctions

    async def remote_judge(completions, **kwargs):
        return [1e39 for _ in completions]

    with pytest.raises(ValueError, match=r"'remote_judge' returned 1e\+39 for sample 0"):
        RewardFunctions(remote_judge).score(["a"], ["x"], [[1]])


def test_a_reward_model_returning_nan_is_named(gpt2_tokenizer):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from trl_qhead.reward_functions import RewardFunctions

    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=32, num_labels=1))
    with torch.no_grad():
        model.score.weight[0, 3] = float("nan")  # damaged weights
    funcs = RewardFunctions(model, reward_processing_classes=gpt2_tokenizer)
    with pytest.raises(ValueError, match="Reward model 'GPT2ForSequenceClassification' returned nan for sample 0"):
        funcs.score(["The sky is"], [" blue"], [[4171]])


def test_a_reward_of_1e39_stops_generate_and_score_naming_the_function():
    from trl_qhead import generate_and_score

    with pytest.raises(ValueError, match=r"'big' returned 1e\+39 for sample 0"):
        generate_and_score(
            _metaspace_model(),
            _metaspace_tokenizer(),
            Dataset.from_dict({"prompt": ["Hello"]}),
            _returning([1e39]),
            num_generations=1,
            max_new_tokens=2,
            show_progress=False,
        )


# ---- issue 27: a reward times `reward_scale` that leaves float32; moments of huge rewards ---------------------------


def _scored_batch(tokenizer, **columns):
    from trl_qhead import DataCollatorForQHead, prepare_dataset

    data = Dataset.from_dict({"prompt": ["Hi", "A"], "completion": [" there", " cat sat"], **columns})
    rows = list(prepare_dataset(data, tokenizer, reward_columns=True))
    batch = DataCollatorForQHead(tokenizer.eos_token_id)(rows)
    return batch, action_mask_from_labels(batch["labels"], batch["attention_mask"])


@pytest.mark.parametrize(
    ("output", "message"),
    [
        ([0.0, 1e38], r"The sequence reward of batch row 1 is 1e\+38 .* `reward_scale` \(10\)"),
        (
            [[0.0, 0.0], [0.0, -1e38, 0.0]],
            r"The per-token reward of batch row 1 at action position \d+ is -1e\+38",
        ),
    ],
    ids=["sequence", "per_token"],
)
def test_a_function_reward_times_reward_scale_beyond_float32_names_the_row(gpt2_tokenizer, output, message):
    from trl_qhead.rewards import RewardComputer, RewardFunctions

    batch, action_mask = _scored_batch(gpt2_tokenizer)
    computer = RewardComputer(gpt2_tokenizer, RewardFunctions(_returning(output)), reward_scale=10.0)
    with pytest.raises(ValueError, match=message):  # was: inf, dropped as "no reward" (or "rewards must be finite")
        computer(batch, action_mask)
    fits, _ = RewardComputer(gpt2_tokenizer, RewardFunctions(_returning(output)), reward_scale=3.0)(batch, action_mask)
    assert torch.isfinite(fits).all() and fits.abs().max().item() == pytest.approx(3e38, rel=1e-6)


def test_data_and_function_rewards_summing_beyond_float32_name_the_row(gpt2_tokenizer):
    from trl_qhead.rewards import RewardComputer, RewardFunctions

    batch, action_mask = _scored_batch(gpt2_tokenizer, reward=[0.0, 2e38])  # each fits, their sum does not
    computer = RewardComputer(gpt2_tokenizer, RewardFunctions(_returning([0.0, 2e38])))
    with pytest.raises(ValueError, match="The weighted sum|batch row 1"):
        computer(batch, action_mask)


@pytest.mark.parametrize("normalization", ["batch", "running"])
def test_normalising_rewards_near_float32s_limit_keeps_their_order(gpt2_tokenizer, normalization):
    from trl_qhead.rewards import RewardComputer

    batch, action_mask = _scored_batch(gpt2_tokenizer, reward=[3e38, -3e38])  # their std (4.2e38) overflows float32
    rewards, _ = RewardComputer(gpt2_tokenizer, reward_normalization=normalization)(batch, action_mask)
    last = rewards.sum(1)
    # (R - mean) / (std + 1e-4) with mean 0 and std 3e38 * sqrt(2): +-1/sqrt(2), not 0 (inf std) or NaN
    assert last.tolist() == pytest.approx([2**-0.5, -(2**-0.5)], rel=1e-6)


# ---- issue 27: prefix scores keyed on token ids when a function reads them -------------------------------------------


def _overlong(completion_ids, **kwargs):
    """TRL-style: a penalty of one per completion token."""
    return [-float(len(ids)) for ids in completion_ids]


def test_prefix_scores_of_two_tokenisations_of_one_text_are_kept_apart(gpt2_tokenizer):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from trl_qhead.candidates import PrefixScorer
    from trl_qhead.reward_functions import RewardFunctions

    prompt = gpt2_tokenizer("The")["input_ids"]
    split, whole = gpt2_tokenizer.convert_tokens_to_ids(["Ġc", "at"]), gpt2_tokenizer.convert_tokens_to_ids(["Ġcat"])
    assert gpt2_tokenizer.decode(split) == gpt2_tokenizer.decode(whole) == " cat"
    scorer = PrefixScorer(RewardFunctions(_overlong), gpt2_tokenizer)
    scorer.add_group(0, "The", {})
    keys = [scorer.request(0, prompt, ids) for ids in (split, whole)]
    scorer.flush()
    assert [scorer.score(key) for key in keys] == [-2.0, -1.0]  # was: one memoised score for both
    # a reward model reads only the text: the one text is scored once
    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=32, num_labels=1))
    functions = RewardFunctions(model, reward_processing_classes=gpt2_tokenizer)
    assert not functions.reads_completion_ids
    texts = PrefixScorer(functions, gpt2_tokenizer)
    texts.add_group(0, "The", {})
    keys = [texts.request(0, prompt, ids) for ids in (split, whole)]
    texts.flush()
    direct = functions.score(["The"], [" cat"], [whole]).sequence[0, 0].item()
    assert keys[0] == keys[1] and texts.cost.texts_scored == 1 and texts.score(keys[0]) == pytest.approx(direct)
    assert RewardFunctions([model, _overlong], reward_processing_classes=[gpt2_tokenizer, None]).reads_completion_ids
