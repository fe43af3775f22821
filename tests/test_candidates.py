"""Candidate labels (issue 13): `generate_and_score(candidate_rewards=k, candidate_stride=m, prefix_shaping=...)`,
the candidate columns through data preparation and the collator, the candidate / soft Q loss in `QHeadTrainer`, and
the end-to-end check on a one-step bandit (mean target -> E[R], soft target -> beta log E exp(R / beta))."""

import copy
import json
import math

import pytest
import torch
from datasets import Dataset
from transformers import GPT2Config, GPT2ForSequenceClassification

from tests.conftest import make_tiny_gpt2, make_tiny_llama
from trl_qhead import AutoModelForCausalLMWithQHead, QHeadConfig, QHeadTrainer, generate_and_score
from trl_qhead.data import DataCollatorForQHead, prepare_dataset
from trl_qhead.mdp import action_mask_from_labels, episode_dones, next_tokens
from trl_qhead.q_values import gather_action_q, gather_candidate_q
from trl_qhead.returns import compute_returns
from trl_qhead.soft import linex_loss

LEXICON = {"e": 1.0, "a": -0.5, "the": 2.0}


def lexicon_reward(completions, **kwargs) -> list[float]:
    """A toy lexicon: letters and a word counted in the completion (a reward of prefixes, as VADER is)."""
    return [sum(w * c.count(token) for token, w in LEXICON.items()) for c in completions]


class Counting:
    """A reward function that records every (prompt, text, completion ids) it is called on."""

    def __init__(self):
        self.calls: list[list[tuple[str, str, tuple[int, ...]]]] = []

    def __call__(self, prompts, completions, completion_ids, **kwargs):
        self.calls.append(list(zip(prompts, completions, map(tuple, completion_ids), strict=True)))
        return lexicon_reward(completions)


PROMPTS = ["Hello there", "The cat"]


def _labelled(tokenizer, reward, k=4, stride=2, seed=0, **kwargs):
    model = AutoModelForCausalLMWithQHead(make_tiny_gpt2(seed=seed))
    torch.manual_seed(seed)
    data = generate_and_score(
        model,
        tokenizer,
        Dataset.from_dict({"prompt": PROMPTS}),
        reward,
        num_generations=3,
        max_new_tokens=7,
        candidate_rewards=k,
        candidate_stride=stride,
        show_progress=False,
        **kwargs,
    )
    return model, data


def _direct_effects(model, tokenizer, row, score, k, stride):
    """The slow reading of the definition: forward, top-k, decode, score, subtract; one text at a time."""
    ids = row["input_ids"]
    p = row["completion_mask"].index(1)
    completion = ids[p:]
    model.eval()  # GPT-2's dropout: labelling runs in eval mode
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    expected_ids, expected_effects, expected_sampled = {}, {}, {}
    for j in range(0, len(completion), stride):
        top = logits[p - 1 + j].topk(k).indices.tolist()
        base = score(row["prompt"], tokenizer.decode(completion[:j], skip_special_tokens=True))
        expected_ids[p + j] = top
        expected_effects[p + j] = [
            score(row["prompt"], tokenizer.decode(completion[:j] + [a], skip_special_tokens=True)) - base for a in top
        ]
        expected_sampled[p + j] = score(row["prompt"], tokenizer.decode(completion[: j + 1], skip_special_tokens=True))
        expected_sampled[p + j] -= base
    return expected_ids, expected_effects, expected_sampled


def _check_against_direct(model, tokenizer, data, score, k, stride):
    for row in data:
        ids, effects, sampled = _direct_effects(model, tokenizer, row, score, k, stride)
        n = len(row["input_ids"])
        assert len(row["candidate_ids"]) == len(row["candidate_rewards"]) == len(row["candidate_sampled_reward"]) == n
        for i in range(n):
            if i in ids:
                assert row["candidate_ids"][i] == ids[i]
                assert row["candidate_rewards"][i] == pytest.approx(effects[i], abs=1e-4)
                assert row["candidate_sampled_reward"][i] == pytest.approx(sampled[i], abs=1e-4)
            else:  # prompt tokens and states off the stride: the documented fill
                assert row["candidate_ids"][i] == [] and row["candidate_rewards"][i] == []
                assert row["candidate_sampled_reward"][i] == 0.0


@pytest.mark.parametrize("k,stride", [(4, 2), (3, 1)])
def test_candidate_columns_equal_a_direct_computation(gpt2_tokenizer, k, stride):
    model, data = _labelled(gpt2_tokenizer, lexicon_reward, k=k, stride=stride)
    _check_against_direct(model, gpt2_tokenizer, data, lambda p, c: lexicon_reward([c])[0], k, stride)
    cost = json.loads(data.info.description)["labelling_cost"]
    assert cost["k"] == k and cost["stride"] == stride and cost["reward_calls"] >= 1
    assert cost["states_labelled"] == sum(len(range(0, m.count(1), stride)) for m in data["completion_mask"])
    assert cost["topk_seconds"] >= 0 and cost["reward_seconds"] >= 0


def test_candidate_columns_with_a_reward_model(gpt2_tokenizer):
    torch.manual_seed(0)
    reward_model = GPT2ForSequenceClassification(
        GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=64, num_labels=1, pad_token_id=50256)
    )
    tokenizer = copy.deepcopy(gpt2_tokenizer)

    def score(prompt, text):
        with torch.no_grad():
            encoded = tokenizer(prompt + text, return_tensors="pt", add_special_tokens=False)
            return reward_model(**encoded).logits[0, 0].item()

    model, data = _labelled(gpt2_tokenizer, reward_model, k=2, stride=3, reward_processing_classes=tokenizer)
    _check_against_direct(model, gpt2_tokenizer, data, score, 2, 3)


def test_labelling_is_batched_and_memoised(gpt2_tokenizer):
    counting = Counting()
    _, data = _labelled(gpt2_tokenizer, counting, k=4, stride=1, candidate_batch_size=16)
    labelling_calls = counting.calls[1:]  # the first call scores the sampled completions
    seen = [pair for call in labelling_calls for pair in call]
    # a function reads `completion_ids`: texts are memoised by (prompt, ids), two tokenisations of one text apart
    assert len(seen) == len(set(seen)), "a (prompt, completion ids) pair was scored twice"
    assert all(len(call) <= 16 for call in labelling_calls)
    cost = json.loads(data.info.description)["labelling_cost"]
    assert cost["reward_calls"] == len(labelling_calls) > 1
    assert cost["texts_scored"] == len(seen)
    # every lookup: per state the prefix, the k candidates and the sampled prefix (each state's prefix is also the
    # previous state's sampled prefix, counted as a lookup once per request)
    assert cost["texts_requested"] > cost["texts_scored"]  # the shared prefixes were looked up, not rescored
    # the empty completion of each prompt is scored once, not once per completion
    assert sum(1 for prompt, text, ids in seen if not ids) == len(PROMPTS)


def test_prefix_shaping_writes_telescoping_token_rewards(gpt2_tokenizer):
    model, data = _labelled(gpt2_tokenizer, lexicon_reward, k=2, stride=2, prefix_shaping=True)
    for row in data:
        p = row["completion_mask"].index(1)
        assert row["reward"] is None and row["rewards"][:p] == [0.0] * p
        completion = row["input_ids"][p:]
        prefix = [
            lexicon_reward([gpt2_tokenizer.decode(completion[:j], skip_special_tokens=True)])[0]
            for j in range(len(completion) + 1)
        ]
        assert row["rewards"][p:] == pytest.approx([b - a for a, b in zip(prefix, prefix[1:], strict=False)], abs=1e-5)
        assert sum(row["rewards"]) == pytest.approx(row["sequence_reward"] - prefix[0], abs=1e-4)
        # the sampled action's candidate effect is its shaped reward
        for i, ids in enumerate(row["candidate_ids"]):
            if ids:
                assert row["candidate_sampled_reward"][i] == pytest.approx(row["rewards"][i], abs=1e-5)


# ---- data preparation and the collator ----------------------------------------------------------------------------


def _rows():
    return [
        {
            "input_ids": [5, 6, 7, 8],
            "completion_mask": [0, 1, 1, 1],
            "reward": 1.0,
            "candidate_ids": [[], [1, 2], [], [3, 4]],
            "candidate_rewards": [[], [0.5, -0.5], [], [1.0, 2.0]],
            "candidate_sampled_reward": [0.0, 0.25, 0.0, -0.25],
        },
        {
            "input_ids": [9, 10, 11],
            "completion_mask": [0, 1, 1],
            "reward": 0.0,
            "candidate_ids": [[], [12, 13], [14, 15]],
            "candidate_rewards": [[], [0.1, 0.2], [0.3, 0.4]],
            "candidate_sampled_reward": [0.0, 0.5, 0.6],
        },
    ]


@pytest.mark.parametrize("side", ["right", "left"])
def test_collator_puts_candidates_on_the_token_grid(gpt2_tokenizer, side):
    rows = prepare_dataset(Dataset.from_list(_rows()), gpt2_tokenizer)
    batch = DataCollatorForQHead(pad_token_id=0, padding_side=side)([rows[0], rows[1]])
    assert batch["candidate_ids"].shape == (2, 4, 2) and batch["candidate_mask"].dtype == torch.bool
    assert batch["candidate_rewards"].shape == (2, 4, 2) and batch["candidate_sampled_reward"].shape == (2, 4)
    offset = 1 if side == "left" else 0  # row 1 has 3 tokens
    assert batch["candidate_ids"][0].tolist() == [[0, 0], [1, 2], [0, 0], [3, 4]]
    assert batch["candidate_mask"][0].tolist() == [[False, False], [True, True], [False, False], [True, True]]
    assert batch["candidate_rewards"][0, 3].tolist() == [1.0, 2.0]
    assert batch["candidate_ids"][1, offset + 2].tolist() == [14, 15]
    assert batch["candidate_rewards"][1, offset + 1].tolist() == pytest.approx([0.1, 0.2])
    assert batch["candidate_sampled_reward"][1, offset + 2].item() == pytest.approx(0.6)
    assert not batch["candidate_mask"][1, offset].any()
    if side == "left":
        assert not batch["candidate_mask"][1, 0].any()


def test_prepare_dataset_truncates_candidates_with_the_tokens(gpt2_tokenizer):
    rows = prepare_dataset(Dataset.from_list(_rows()), gpt2_tokenizer, max_length=3)
    assert rows[0]["candidate_ids"] == [[], [1, 2], []] and len(rows[0]["candidate_sampled_reward"]) == 3


@pytest.mark.parametrize(
    "column,value,message",
    [
        ("candidate_ids", [[], [1, 2], []], "`candidate_ids` of example 0 has 3 entries for 4 tokens"),
        ("candidate_rewards", [[], [0.5], [], [1.0, 2.0]], "`candidate_rewards` of example 0 has 1 values at token 1"),
        ("candidate_sampled_reward", [0.0, 0.0], "`candidate_sampled_reward` of example 0 has 2 entries"),
        ("candidate_rewards", [[], [math.nan, 0.0], [], [1.0, 2.0]], "NaN"),
        ("candidate_ids", [[], [1, 10**9], [], [3, 4]], "ids must be integers in"),
        ("candidate_ids", [[], [-1, 2], [], [3, 4]], "ids must be integers in"),
        ("candidate_sampled_reward", None, "candidate labels need all three columns"),
    ],
)
def test_bad_candidate_columns_name_the_column_and_row(gpt2_tokenizer, column, value, message):
    rows = _rows()
    rows[0][column] = value
    rows[1][column] = value if column != "candidate_sampled_reward" or value is None else rows[1][column]
    if column == "candidate_sampled_reward" and value is not None:
        rows[1][column] = [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        prepare_dataset(Dataset.from_list(rows), gpt2_tokenizer)


def test_candidates_do_not_pack(gpt2_tokenizer):
    with pytest.raises(ValueError, match="do not survive packing"):
        prepare_dataset(Dataset.from_list(_rows()), gpt2_tokenizer, packing=True, max_length=8)


# ---- hostile arguments --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,message,error",
    [
        (kwargs, message, ValueError)
        for kwargs, message in [
            ({"candidate_rewards": 0}, "positive integer"),
            ({"candidate_rewards": 2.5}, "positive integer"),
            ({"candidate_rewards": 2, "candidate_stride": 0}, "`candidate_stride` must be a positive integer"),
            ({"candidate_rewards": 2, "candidate_stride": -1}, "`candidate_stride` must be a positive integer"),
            ({"candidate_rewards": 50258}, "larger than the model's vocabulary"),
            ({"prefix_shaping": "yes"}, "`prefix_shaping` must be True or False"),
            ({"candidate_lookahead": 2, "candidate_beta": 0.3}, "set `candidate_rewards`"),
            ({"candidate_rewards": 2, "candidate_lookahead": 2}, "needs `candidate_beta`"),
            (
                {"candidate_rewards": 2, "candidate_lookahead": 0, "candidate_beta": 0.3},
                "`candidate_lookahead` \\(k2\\)",
            ),
            ({"candidate_rewards": 2, "candidate_lookahead": True, "candidate_beta": 0.3}, "positive integer"),
            ({"candidate_rewards": 2, "candidate_lookahead": 2, "candidate_beta": -1.0}, "`candidate_beta` must be"),
            (
                {"candidate_rewards": 2, "candidate_lookahead": 50258, "candidate_beta": 0.3},
                "`candidate_lookahead` \\(k=50258\\) is larger",
            ),
            ({"candidate_rewards": 2, "candidate_beta": 0.3}, "without `candidate_lookahead`"),
        ]
    ]
    + [
        (
            {"candidate_rewards": 2, "candidate_lookahead": 2, "candidate_beta": "abc"},
            "`candidate_beta` must be a number > 0, got str 'abc'",
            TypeError,
        )
    ],
)
def test_generate_and_score_rejects_bad_candidate_arguments(gpt2_tokenizer, kwargs, message, error):
    model = AutoModelForCausalLMWithQHead(make_tiny_gpt2())
    with pytest.raises(error, match=message):
        generate_and_score(
            model,
            gpt2_tokenizer,
            Dataset.from_dict({"prompt": ["Hi"]}),
            lexicon_reward,
            num_generations=1,
            max_new_tokens=2,
            show_progress=False,
            **kwargs,
        )


def test_candidates_need_reward_functions(gpt2_tokenizer):
    model = AutoModelForCausalLMWithQHead(make_tiny_gpt2(vocab_size=512))
    with pytest.raises(ValueError, match="pass some"):
        generate_and_score(model, gpt2_tokenizer, [{"prompt": "Hi"}], candidate_rewards=2, show_progress=False)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"q_target": "median"}, "`q_target` must be one of"),
        ({"q_target": "soft"}, "`target_beta` must be a finite number > 0"),
        ({"q_target": "soft", "target_beta": 0.0}, "`target_beta` must be a finite number > 0"),
        ({"q_target": "soft", "target_beta": -1.0}, "`target_beta` must be a finite number > 0"),
        # inf and NaN meet QHeadConfig's check of every float field first, which names the field too
        ({"q_target": "soft", "target_beta": math.inf}, "`target_beta` must be a finite number"),
        ({"q_target": "soft", "target_beta": math.nan}, "`target_beta` must be a finite number"),
        ({"target_beta": 0.5}, "set q_target='soft'"),
        ({"candidate_weight": -1.0}, "`candidate_weight` must be >= 0"),
        ({"candidate_weight": math.inf}, "`candidate_weight` must be a finite number"),
    ],
)
def test_config_validates_q_target_beta_and_candidate_weight(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        QHeadConfig(output_dir=str(tmp_path), **kwargs)


def test_candidates_refuse_reward_normalization(tmp_path, gpt2_tokenizer):
    model = AutoModelForCausalLMWithQHead(make_tiny_gpt2(vocab_size=50257))
    args = QHeadConfig(output_dir=str(tmp_path), reward_normalization="batch", report_to="none", use_cpu=True)
    with pytest.raises(ValueError, match="reward_normalization=None"):
        QHeadTrainer(model, args, train_dataset=Dataset.from_list(_rows()), processing_class=gpt2_tokenizer)


# ---- the loss: gathered rows equal the dense computation ------------------------------------------------------------


def _dense_loss(model, batch, args, eos_token_id):
    """Full Q over the vocabulary, then pick: the obvious reading of the candidate loss (and of V / V*)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], return_q=True)
    logits, q = out.logits.float(), out.q_values  # (B, T, V)
    actions = next_tokens(batch["input_ids"])
    mask = action_mask_from_labels(batch["labels"], batch["attention_mask"])
    log_pi = torch.log_softmax(logits, -1)
    beta = args.target_beta
    if beta is None:
        values = (log_pi.exp() * q).sum(-1).detach()
    else:
        values = (beta * torch.logsumexp(log_pi + q / beta, -1)).detach()
    rewards = torch.zeros_like(values)
    for b in range(len(mask)):
        last = mask[b].nonzero()[-1]
        rewards[b, last] = batch["reward"][b]
    dones = episode_dones(actions, mask, eos_token_id, done=batch.get("done"))
    returns = compute_returns(rewards, values, mask, gamma=args.gamma, dones=dones, beta=beta)
    n = mask.sum()
    lm = -(log_pi.gather(-1, actions.unsqueeze(-1)).squeeze(-1) * mask).sum()

    def pair_loss(qv, y, m):
        if beta is None:
            return (((qv - y) ** 2) * m).sum()
        return 2 * linex_loss(qv, y, beta, m, reduction="sum")

    q_sampled = q.gather(-1, actions.unsqueeze(-1)).squeeze(-1)
    total = pair_loss(q_sampled, returns, mask)
    ids = torch.zeros_like(batch["candidate_ids"])
    ids[:, :-1] = batch["candidate_ids"][:, 1:]
    cmask = torch.zeros_like(batch["candidate_mask"])
    cmask[:, :-1] = batch["candidate_mask"][:, 1:]
    effects = torch.zeros_like(batch["candidate_rewards"])
    effects[:, :-1] = batch["candidate_rewards"][:, 1:]
    sampled = torch.zeros_like(batch["candidate_sampled_reward"])
    sampled[:, :-1] = batch["candidate_sampled_reward"][:, 1:]
    cmask = cmask & mask.unsqueeze(-1) & (ids != actions.unsqueeze(-1))
    q_cand = q.gather(-1, ids)  # picked from the full Q
    targets = returns.unsqueeze(-1) - sampled.unsqueeze(-1) + effects
    total = total + args.candidate_weight * pair_loss(q_cand, targets, cmask)
    return (lm + args.q_weight * total) / n


@pytest.mark.parametrize("q_target,beta", [("mean", None), ("soft", 0.7)])
def test_trainer_candidate_loss_and_gradient_equal_the_dense_computation(tmp_path, gpt2_tokenizer, q_target, beta):
    torch.manual_seed(0)
    model = AutoModelForCausalLMWithQHead(make_tiny_gpt2())
    with torch.no_grad():
        model.q_head.weight.normal_(0, 0.3)
        model.q_head.bias.normal_(0, 0.3)
    model.eval()  # no dropout: the two forwards must see the same network
    rows = _rows()
    rows[0]["candidate_ids"][3] = [3, 8]  # 8 is the sampled token there: skipped (its target is G_t itself)
    rows[1]["done"], rows[0]["done"] = False, True  # one row bootstraps: V (or V*) at its end matters
    args = QHeadConfig(
        output_dir=str(tmp_path),
        q_target=q_target,
        target_beta=beta,
        candidate_weight=0.7,
        q_weight=1.3,
        gamma=0.9,
        report_to="none",
        use_cpu=True,
        value_chunk_size=2,
    )
    trainer = QHeadTrainer(model, args, train_dataset=Dataset.from_list(rows), processing_class=gpt2_tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    fast = trainer.compute_loss(model, batch)
    fast_grads = torch.autograd.grad(fast, [model.q_head.weight, model.q_head.bias])
    dense = _dense_loss(model, batch, args, gpt2_tokenizer.eos_token_id)
    dense_grads = torch.autograd.grad(dense, [model.q_head.weight, model.q_head.bias])
    assert fast.item() == pytest.approx(dense.item(), rel=1e-5)
    for a, b in zip(fast_grads, dense_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert fast_grads[1][[1, 2, 3, 12, 13, 14, 15]].abs().min() > 0  # candidate rows got gradient


def test_gather_candidate_q_is_gather_action_q_per_candidate():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 20)
    hidden = torch.randn(2, 5, 8)
    ids = torch.randint(0, 20, (2, 5, 3))
    q = gather_candidate_q(hidden, head, ids)
    for j in range(3):
        torch.testing.assert_close(q[..., j], gather_action_q(hidden, head, ids[..., j]))
    torch.testing.assert_close(q, head(hidden).gather(-1, ids))


@pytest.mark.parametrize("rank", [None, 4])
def test_gather_candidate_q_with_a_tied_head_equals_its_full_q(rank):
    # T == k here on purpose: a hidden state broadcast against the k candidates without its own axis would pair
    # position t with candidate t and still have the right shape.
    model = AutoModelForCausalLMWithQHead(make_tiny_llama(vocab_size=40), q_head_type="tied", q_head_rank=rank)
    model.reset_q_head("normal")
    with torch.no_grad():
        model.q_head.bias.normal_()
    hidden = torch.randn(2, 3, model.config.hidden_size)
    ids = torch.randint(0, 40, (2, 3, 3))
    q = gather_candidate_q(hidden, model.q_head, ids)
    torch.testing.assert_close(q, model.compute_q(hidden).gather(-1, ids), rtol=1e-5, atol=1e-5)


# ---- end to end: a one-step bandit -------------------------------------------------------------------------------

STATE = 3
ACTIONS = [5, 6, 7, 8]


def _bandit(n_per_action=48, seed=0):
    """One state, four actions, a random reward per sample (a different distribution per action)."""
    g = torch.Generator().manual_seed(seed)
    rows, draws = [], {a: [] for a in ACTIONS}
    for i, a in enumerate(ACTIONS):
        for _ in range(n_per_action):
            r = (i - 1.5) * 0.3 + (0.2 + 0.3 * i) * torch.randn((), generator=g).item()  # skewed spread per action
            draws[a].append(r)
            rows.append({"input_ids": [STATE, a], "completion_mask": [0, 1], "done": True, "reward": r})
    return Dataset.from_list(rows), draws


def _train_bandit(tmp_path, dataset, q_head_type="dense", **config):
    model = AutoModelForCausalLMWithQHead(make_tiny_llama(vocab_size=16), q_head_type=q_head_type)
    model.pretrained_model.requires_grad_(False)  # the Q head alone: the state's hidden vector is fixed
    args = QHeadConfig(
        output_dir=str(tmp_path),
        gamma=1.0,
        max_steps=150,  # measured: every Q within 0.003 of its target (75 steps: the tied soft head 0.09 off)
        per_device_train_batch_size=len(dataset),
        learning_rate=0.05,
        # Q = W[a] . h + b[a]: the weight moves Q by about lr * |h|_1 per Adam step, the bias by lr; a decaying
        # schedule lets Adam settle on the minimiser.
        q_head_learning_rate=2e-3,
        q_head_bias_learning_rate=0.05,
        lr_scheduler_type="linear",
        weight_decay=0.0,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=300,
        **config,
    )
    trainer = QHeadTrainer(model, args, train_dataset=dataset, processing_class=_bandit_tokenizer())
    trainer.train()
    with torch.no_grad():
        q = model(input_ids=torch.tensor([[STATE]]), return_q=True).q_values[0, 0]
    return q


def _bandit_tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(16)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t1")))
    tok.eos_token, tok.pad_token, tok.unk_token = "t0", "t0", "t1"
    return tok


@pytest.mark.parametrize("q_head_type", ["dense", "tied"])
@pytest.mark.parametrize("q_target,beta", [("mean", None), ("soft", 0.5)])
def test_bandit_end_to_end_mean_learns_expectation_soft_learns_soft_value(tmp_path, q_target, beta, q_head_type):
    dataset, draws = _bandit()
    q = _train_bandit(tmp_path, dataset, q_head_type=q_head_type, q_target=q_target, target_beta=beta)
    for a, rs in draws.items():
        rs = torch.tensor(rs, dtype=torch.float64)
        mean = rs.mean().item()
        soft = 0.5 * (torch.logsumexp(rs / 0.5, 0) - math.log(len(rs))).item()
        expected = mean if q_target == "mean" else soft
        assert q[a].item() == pytest.approx(expected, abs=0.02), (a, mean, soft)
    if q_target == "soft":  # the two targets differ here by far more than the tolerance (widest spread: ~var / 2 beta)
        rs = torch.tensor(draws[ACTIONS[-1]], dtype=torch.float64)
        assert 0.5 * (torch.logsumexp(rs / 0.5, 0) - math.log(len(rs))) - rs.mean() > 0.5


def test_bandit_candidates_teach_tokens_never_sampled(tmp_path):
    """Only action 5 is sampled; candidate labels give every action its effect, so Q(s, a) -> E[R | 5] + r'(a) - r'(5)."""
    effects = {5: 0.0, 6: 0.4, 7: -0.3, 8: 1.0}
    g = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(64):
        r = 0.1 + 0.5 * torch.randn((), generator=g).item()
        rows.append(
            {
                "input_ids": [STATE, 5],
                "completion_mask": [0, 1],
                "done": True,
                "reward": r,
                "candidate_ids": [[], ACTIONS],
                "candidate_rewards": [[], [effects[a] for a in ACTIONS]],
                "candidate_sampled_reward": [0.0, 0.0],
            }
        )
    mean = sum(row["reward"] for row in rows) / len(rows)
    q = _train_bandit(tmp_path, Dataset.from_list(rows))
    for a in ACTIONS:
        assert q[a].item() == pytest.approx(mean + effects[a], abs=0.02)


def test_frontier_comparison_gain_ratio_and_its_mean():
    from trl_qhead.evaluation import FrontierRow, frontier_comparison, mean_gain_ratio

    def row(method, kl, reward):
        return FrontierRow(method, "", reward, 0.0, kl, 1, 0.0, 1.0, 1.0, 1)

    rows = [row("base sampling", 0.0, 0.1), row("best-of-N", 1.0, 0.5), row("best-of-N", 2.0, 0.7)]
    rows += [row("Q-tilted", 0.5, 0.2), row("Q-tilted", 1.5, 0.4), row("Q-tilted", 3.0, 0.9)]
    comparison = frontier_comparison(rows)
    ratios = [c["gain_ratio"] for c in comparison]
    assert ratios[:2] == pytest.approx([0.1 / 0.2, 0.3 / 0.5]) and ratios[2] is None  # beyond N=16
    assert mean_gain_ratio(comparison, (0.2, 1.5)) == pytest.approx((0.5 + 0.6) / 2)
    assert mean_gain_ratio(comparison, (2.5, 2.9)) is None


# ---- two-step labels: candidate_lookahead ---------------------------------------------------------------------------


def _direct_two_step(model, tokenizer, row, score, k, k2, beta, horizon, stop_ids):
    """The definition, one continuation at a time: each candidate's effect plus the soft value of its top-k2 next
    tokens, each scored on its own prefix; nothing after a stop token or at the last step."""
    ids = row["input_ids"]
    p = row["completion_mask"].index(1)
    completion = ids[p:]

    def text(tokens):
        return tokenizer.decode(tokens, skip_special_tokens=True)

    def value(j, a):
        here = score(row["prompt"], text(completion[:j] + [a]))
        effect = here - score(row["prompt"], text(completion[:j]))
        if j >= horizon - 1 or a in stop_ids:
            return effect
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids[: p + j] + [a]])).logits[0, -1]
        top = logits.float().log_softmax(-1).topk(k2)
        inside = sum(
            math.exp(lp + (score(row["prompt"], text(completion[:j] + [a, b])) - here) / beta)
            for lp, b in zip(top.values.tolist(), top.indices.tolist(), strict=True)
        )
        return effect + beta * math.log(inside + 1 - top.values.exp().sum().item())

    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    expected = {}
    for j in range(len(completion)):
        top = logits[p - 1 + j].topk(k).indices.tolist()
        expected[p + j] = (top, [value(j, a) for a in top], value(j, completion[j]))
    return expected


def test_two_step_labels_equal_a_direct_computation(gpt2_tokenizer):
    model, data = _labelled(gpt2_tokenizer, lexicon_reward, k=3, stride=1, candidate_lookahead=4, candidate_beta=0.5)
    model.eval()
    score = lambda prompt, completion: lexicon_reward([completion])[0]  # noqa: E731
    stop_ids = {gpt2_tokenizer.eos_token_id}
    differs = 0
    for row in data:
        expected = _direct_two_step(model, gpt2_tokenizer, row, score, 3, 4, 0.5, 7, stop_ids)
        for i, (ids, values, sampled) in expected.items():
            assert row["candidate_ids"][i] == ids
            assert row["candidate_rewards"][i] == pytest.approx(values, abs=1e-4)
            assert row["candidate_sampled_reward"][i] == pytest.approx(sampled, abs=1e-4)
        one_step = _direct_effects(model, gpt2_tokenizer, row, score, 3, 1)[1]
        differs += sum(row["candidate_rewards"][i] != pytest.approx(one_step[i], abs=1e-4) for i in expected)
    assert differs > 0  # the lookahead changed some labels: the comparison above is not the one-step one
    cost = json.loads(data.info.description)["labelling_cost"]
    assert cost["lookahead"] == 4


def test_two_step_labels_are_the_soft_optimal_q_of_a_two_step_episode():
    # Enumerable: 12 tokens, horizon 2, a reward on the pair that is not additive over the tokens, every token a
    # candidate (k = k2 = 12). Q*_beta(s_0, a) = beta log sum_b pi(b | x + a) exp(R(a, b) / beta); the label is it
    # minus R(empty completion) (effects are differences of the prefix scores).
    from transformers import AutoTokenizer

    from tests.conftest import gpt2_tokenizer_dir
    from trl_qhead.candidates import label_completions
    from trl_qhead.reward_functions import RewardFunctions

    tokenizer = AutoTokenizer.from_pretrained(gpt2_tokenizer_dir())  # ids 0..11 decode to distinct characters
    vocab, beta = 12, 0.3
    generator = torch.Generator().manual_seed(0)
    pair_reward = torch.randn(vocab, vocab, generator=generator)
    single_reward = torch.randn(vocab, generator=generator)

    def table_reward(prompts, completions, completion_ids, **kwargs):
        out = []
        for ids in completion_ids:
            ids = list(ids)
            out.append(
                0.25
                if not ids
                else single_reward[ids[0]].item()
                if len(ids) == 1
                else pair_reward[ids[0], ids[1]].item()
            )
        return out

    model = make_tiny_llama(vocab_size=vocab).eval()
    prompt = [3, 5]
    labelled = {}
    for lookahead in (None, vocab):
        columns, _ = label_completions(
            model, tokenizer, RewardFunctions([table_reward]), [prompt], [[7, 2]], [0], ["x"], [{}],
            k=vocab, stride=1, prefix_shaping=False, pad_token_id=0,
            lookahead=lookahead, beta=beta if lookahead else None, horizon=2,
        )  # fmt: skip
        labelled[lookahead] = columns[0]
    with torch.no_grad():
        log_pi = torch.stack(
            [model(input_ids=torch.tensor([prompt + [a]])).logits[0, -1].log_softmax(-1) for a in range(vocab)]
        )
    exact = beta * torch.logsumexp(log_pi + pair_reward / beta, dim=-1) - 0.25  # (vocab,): Q*(s_0, a) - R(empty)
    row = labelled[vocab]
    ids = row["candidate_ids"][len(prompt)]
    assert sorted(ids) == list(range(vocab))
    assert row["candidate_rewards"][len(prompt)] == pytest.approx(exact[ids].tolist(), abs=1e-5)
    assert row["candidate_sampled_reward"][len(prompt)] == pytest.approx(exact[7].item(), abs=1e-5)
    # the last step has no future: its labels are the one-step effects, as without lookahead
    assert row["candidate_rewards"][len(prompt) + 1] == pytest.approx(
        labelled[None]["candidate_rewards"][len(prompt) + 1]
    )
    # one-step labels are not Q* here: R(a) says nothing about the pairs that follow a
    assert labelled[None]["candidate_rewards"][len(prompt)] != pytest.approx(exact[ids].tolist(), abs=1e-2)
