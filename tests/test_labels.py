"""Label sources (`trl_qhead.labels`, issue 24 deliverable 2 and issue 25 deliverable 3): the typed interface that
replaces `generate_and_score`'s `candidate_*` keywords (the same datasets, the deprecation, the checks, a source of
one's own), and future-value labels checked against an enumerable problem solved exactly, with the direction of their
finite-sample bias."""

import dataclasses
import json
import math
import warnings

import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer

from tests.conftest import gpt2_tokenizer_dir, make_tiny_gpt2, make_tiny_llama
from tests.test_candidates import PROMPTS, lexicon_reward
from trl_qhead import (
    AutoModelForCausalLMWithQHead,
    CandidateLabels,
    FutureValueLabels,
    LabelSource,
    PrefixShaping,
    TwoStepLabels,
    generate_and_score,
)
from trl_qhead.candidates import LabelCost, PrefixScorer
from trl_qhead.continuations import cut_continuation, sample_continuations
from trl_qhead.labels import LabelBatch, label_batch
from trl_qhead.reward_functions import RewardFunctions


def _generate(tokenizer, model=None, **kwargs):
    model = model or AutoModelForCausalLMWithQHead(make_tiny_gpt2(seed=0))
    return generate_and_score(
        model,
        tokenizer,
        Dataset.from_dict({"prompt": PROMPTS}),
        lexicon_reward,
        num_generations=3,
        max_new_tokens=6,
        show_progress=False,
        seed=0,
        **kwargs,
    )


# ---- the interface in place of the keywords -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "keywords,labels",
    [
        ({"candidate_rewards": 3, "candidate_stride": 2}, CandidateLabels(k=3, stride=2)),
        (
            {"candidate_rewards": 2, "candidate_lookahead": 3, "candidate_beta": 0.5},
            TwoStepLabels(k=2, lookahead=3, beta=0.5),
        ),
        (
            {"candidate_rewards": 2, "prefix_shaping": True, "candidate_batch_size": 7},
            [CandidateLabels(k=2, batch_size=7), PrefixShaping(batch_size=7)],
        ),
    ],
    ids=["candidates", "two-step", "candidates+shaping"],
)
def test_deprecated_keywords_warn_and_give_the_dataset_of_their_label_sources(gpt2_tokenizer, keywords, labels):
    with pytest.warns(FutureWarning, match="deprecated"):
        old = _generate(gpt2_tokenizer, **keywords)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the new interface does not warn
        new = _generate(gpt2_tokenizer, labels=labels)
    assert old.column_names == new.column_names
    assert "candidate_ids" in new.column_names
    for column in old.column_names:
        assert old[column] == new[column], column
    old_cost = json.loads(old.info.description)["labelling_cost"]
    new_cost = json.loads(new.info.description)["labelling_cost"]
    for key in ("k", "stride", "prefix_shaping", "lookahead", "states_labelled", "texts_scored", "texts_requested"):
        assert old_cost[key] == new_cost[key], key
    assert new_cost["labels"] == [
        type(source).__name__ for source in (labels if isinstance(labels, list) else [labels])
    ]


def test_default_keywords_do_not_warn(gpt2_tokenizer):
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        data = _generate(gpt2_tokenizer, candidate_stride=1, candidate_batch_size=256)
    assert "candidate_ids" not in data.column_names and data.info.description in (None, "")


@pytest.mark.parametrize(
    "build,message,error",
    [
        (build, message, ValueError)
        for build, message in [
            (lambda: CandidateLabels(k=0), "`CandidateLabels.k` must be a positive integer, got 0"),
            (lambda: CandidateLabels(k=True), "`CandidateLabels.k` must be a positive integer"),
            (lambda: CandidateLabels(k=2, stride=0), "`CandidateLabels.stride` must be a positive integer"),
            (lambda: CandidateLabels(k=2, batch_size=2.5), "`CandidateLabels.batch_size`"),
            (
                lambda: TwoStepLabels(k=2, lookahead=0, beta=0.3),
                "`TwoStepLabels.lookahead` must be a positive integer",
            ),
            (lambda: TwoStepLabels(k=2, lookahead=2, beta=0.0), "`TwoStepLabels.beta` must be a finite number > 0"),
            (lambda: TwoStepLabels(k=2, lookahead=2, beta=math.inf), "`TwoStepLabels.beta` must be a finite number"),
            (lambda: PrefixShaping(batch_size=0), "`PrefixShaping.batch_size` must be a positive integer"),
            (lambda: FutureValueLabels(k=2, num_continuations=0, beta=1.0), "`FutureValueLabels.num_continuations`"),
            (lambda: FutureValueLabels(k=2, num_continuations=2, beta=-1.0), "`FutureValueLabels.beta` must be"),
            (
                lambda: FutureValueLabels(k=2, num_continuations=2, beta=1.0, max_horizon=0),
                "`FutureValueLabels.max_hor",
            ),
            (lambda: FutureValueLabels(k=2, num_continuations=2, beta=1.0, stride=-1), "`FutureValueLabels.stride`"),
        ]
    ]
    + [
        (
            lambda: TwoStepLabels(k=2, lookahead=2, beta="abc"),
            "`TwoStepLabels.beta` must be a number > 0, got str 'abc'",
            TypeError,
        )
    ],  # fmt: skip
)
def test_label_sources_check_their_fields_at_construction(build, message, error):
    with pytest.raises(error, match=message.replace("(", r"\(")):
        build()


def test_label_sources_are_frozen_and_normalise_beta():
    source = TwoStepLabels(k=2, lookahead=3, beta=1)
    assert isinstance(source.beta, float) and source.beta == 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        source.k = 4


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"labels": "candidates"}, TypeError, "`labels` must be a LabelSource"),
        ({"labels": []}, TypeError, "`labels` must be a LabelSource"),
        ({"labels": [CandidateLabels(k=2), 3]}, TypeError, r"`labels\[1\]` must be a LabelSource"),
        (
            {"labels": [CandidateLabels(k=2), TwoStepLabels(k=2, lookahead=2, beta=0.3)]},
            ValueError,
            "both write the `candidate_ids` column",
        ),
        ({"labels": CandidateLabels(k=2), "candidate_rewards": 2}, ValueError, "Pass `labels` or the deprecated"),
        ({"labels": CandidateLabels(k=50258)}, ValueError, r"`CandidateLabels.k` \(k=50258\) is larger"),
        ({"labels": TwoStepLabels(k=2, lookahead=60000, beta=1.0)}, ValueError, "`TwoStepLabels.lookahead` \\(k="),
        (
            {"labels": FutureValueLabels(k=2, num_continuations=2, beta=1.0), "truncated_completions": "bootstrap"},
            ValueError,
            "needs a horizon",
        ),
    ],
)
def test_generate_and_score_rejects_bad_labels_before_sampling(gpt2_tokenizer, kwargs, error, message):
    class NoSampling(torch.nn.Module):  # the checks come first: sampling would fail loudly
        def __init__(self):
            super().__init__()
            self.inner = make_tiny_gpt2()

        def get_output_embeddings(self):
            return self.inner.get_output_embeddings()

        def generate(self, *args, **kwargs):
            raise AssertionError("sampled before checking the labels")

    with pytest.raises(error, match=message):
        generate_and_score(
            NoSampling(), gpt2_tokenizer, [{"prompt": "Hi"}], lexicon_reward, max_new_tokens=2, show_progress=False,
            **kwargs,
        )  # fmt: skip


def test_labels_need_reward_functions(gpt2_tokenizer):
    model = AutoModelForCausalLMWithQHead(make_tiny_gpt2(vocab_size=512))
    with pytest.raises(ValueError, match="pass some"):
        generate_and_score(model, gpt2_tokenizer, [{"prompt": "Hi"}], labels=PrefixShaping(), show_progress=False)


@dataclasses.dataclass(frozen=True)
class CompletionLength(LabelSource):
    """A source of one's own (the docs' example): per completion token, the completion's score so far minus its
    score one token earlier, halved: it exercises the shared scorer like the built-in sources do."""

    scale: float = 0.5
    columns = ("half_effects",)

    def label(self, batch):
        keys = [
            [batch.scorer.request(g, p, c[:j]) for j in range(len(c) + 1)]
            for g, p, c in zip(batch.groups, batch.prompt_ids, batch.completion_ids, strict=True)
        ]
        batch.scorer.flush()
        out = []
        for p, row_keys in zip(batch.prompt_ids, keys, strict=True):
            scores = [batch.scorer.score(key) for key in row_keys]
            out.append(
                {
                    "half_effects": [0.0] * len(p)
                    + [self.scale * (b - a) for a, b in zip(scores, scores[1:], strict=False)]
                }
            )
        return out, LabelCost()


def test_a_label_source_of_ones_own_shares_the_scorer_with_the_built_in_ones(gpt2_tokenizer):
    alone = _generate(gpt2_tokenizer, labels=PrefixShaping())
    data = _generate(gpt2_tokenizer, labels=[PrefixShaping(), CompletionLength()])
    for row in data:
        assert len(row["half_effects"]) == len(row["input_ids"])
        assert row["half_effects"] == pytest.approx([0.5 * r for r in row["rewards"]], abs=1e-6)
    cost = json.loads(data.info.description)["labelling_cost"]
    alone_cost = json.loads(alone.info.description)["labelling_cost"]
    assert cost["labels"] == ["PrefixShaping", "CompletionLength"] and cost["scale"] == 0.5
    # the second source asked for the same prefixes: every one a memo hit, none scored again
    assert cost["texts_scored"] == alone_cost["texts_scored"]
    assert cost["texts_requested"] == 2 * alone_cost["texts_requested"]


# ---- continuations --------------------------------------------------------------------------------------------------


def test_cut_continuation_keeps_the_first_stop_token_and_the_limit():
    assert cut_continuation([4, 2, 0, 0], {0}, 4) == [4, 2, 0]
    assert cut_continuation([4, 2, 7, 8], {0}, 2) == [4, 2]
    assert cut_continuation([0, 5], {0}, 1) == [0]


def test_sample_continuations_are_distributed_as_the_policy():
    """One-token continuations of two prefixes of different lengths (left-padded in one call) follow the model's
    next-token distribution at each prefix: a chi-square-free check by total variation with many samples."""
    model = make_tiny_llama(vocab_size=5).eval()
    prefixes, n = [[3, 1, 4], [2]], 4000
    torch.manual_seed(0)
    out = sample_continuations(model, prefixes, [1, 1], n, pad_token_id=0, stop_ids=set())
    for prefix, continuations in zip(prefixes, out, strict=True):
        assert len(continuations) == n and all(len(c) == 1 for c in continuations)
        counts = torch.bincount(torch.tensor([c[0] for c in continuations]), minlength=5).double() / n
        with torch.no_grad():
            expected = model(input_ids=torch.tensor([prefix])).logits[0, -1].double().softmax(-1)
        assert (counts - expected).abs().sum().item() < 0.06


def test_sample_continuations_batch_prefixes_of_similar_limits_and_answer_in_order():
    """A `generate` call runs to its largest limit for every row: prefixes are grouped by limit, so a long limit never
    makes a call of short ones run long; each prefix still gets its own continuations, cut at its own limit. The fake
    `generate` continues a row with its last token + 1, + 2, ... (mod 5), so each answer names its prefix."""
    model = make_tiny_llama(vocab_size=5).eval()
    calls = []

    def fake_generate(input_ids, max_new_tokens, num_return_sequences, **kwargs):
        calls.append((input_ids.shape[0], max_new_tokens))
        new = (input_ids[:, -1:] + torch.arange(1, max_new_tokens + 1)) % 5  # (rows, new tokens)
        return torch.cat([input_ids, new], 1).repeat_interleave(num_return_sequences, 0)

    model.generate = fake_generate
    prefixes, limits = [[1], [2, 3], [4], [1, 2], [3]], [1, 6, 2, 6, 1]
    out = sample_continuations(model, prefixes, limits, 3, pad_token_id=0, stop_ids=set(), batch_size=2)
    assert calls == [(2, 6), (2, 2), (1, 1)]  # limits 6 and 6, then 2 and 1, then 1 (in the caller's order: 6, 6, 1)
    for prefix, limit, continuations in zip(prefixes, limits, out, strict=True):
        assert continuations == [[(prefix[-1] + k) % 5 for k in range(1, limit + 1)]] * 3


# ---- future-value labels on an enumerable problem -------------------------------------------------------------------

VOCAB, STOP, HORIZON = 6, 5, 3
PROMPT, COMPLETION = [3, 4], [1, 2, 0]


def _sequence_reward(ids) -> float:
    """A reward of whole completions that is not additive over tokens: a fixed random number per id sequence."""
    code = 1 + sum((t + 1) * (VOCAB + 1) ** i for i, t in enumerate(ids))
    return torch.randn((), generator=torch.Generator().manual_seed(code)).item()


def table_reward(prompts, completions, completion_ids, **kwargs):
    return [_sequence_reward(list(ids)) for ids in completion_ids]


def _tokenizer():
    tokenizer = AutoTokenizer.from_pretrained(gpt2_tokenizer_dir())  # ids 0..5 decode to distinct characters
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _exact_soft_q(model, prefix: list[int], a: int, room: int, beta: float) -> float:
    """`beta log E_pi[exp(R(prefix + a + continuation) / beta)]` by enumerating every continuation of at most `room`
    tokens (ending early at the stop token) with its probability under the model."""
    if a == STOP or room == 0:
        return _sequence_reward(prefix + [a])
    terms = []

    def walk(tokens, log_p):
        ids = prefix + [a] + tokens
        if len(tokens) == room or (tokens and tokens[-1] == STOP):
            terms.append(log_p + _sequence_reward(ids) / beta)
            return
        with torch.no_grad():
            log_pi = model(input_ids=torch.tensor([PROMPT + ids])).logits[0, -1].double().log_softmax(-1)
        for b in range(VOCAB):
            walk(tokens + [b], log_p + log_pi[b].item())

    walk([], 0.0)
    return beta * torch.logsumexp(torch.tensor(terms, dtype=torch.float64), 0).item()


def _label(model, source, copies: int):
    tokenizer = _tokenizer()
    functions = RewardFunctions([table_reward])
    scorer = PrefixScorer(functions, tokenizer)
    scorer.add_group(0, "x", {})
    batch = LabelBatch(
        model=model,
        tokenizer=tokenizer,
        scorer=scorer,
        prompt_ids=[PROMPT] * copies,
        completion_ids=[COMPLETION] * copies,
        groups=[0] * copies,
        group_prompts=["x"],
        group_columns=[{}],
        sequence_rewards=[None] * copies,
        pad_token_id=0,
        horizon=HORIZON,
        stop_ids=frozenset({STOP}),
    )
    return label_batch([source], batch)


@pytest.fixture(scope="module")
def enumerable():
    model = make_tiny_llama(vocab_size=VOCAB, seed=3).eval()
    beta = 1.0
    exact = {}  # (j, a) -> Q*(s_j, a) - R(c_{<j})
    for j in range(len(COMPLETION)):
        prefix = COMPLETION[:j]
        for a in range(VOCAB):
            exact[j, a] = _exact_soft_q(model, prefix, a, HORIZON - j - 1, beta) - _sequence_reward(prefix)
    return model, beta, exact


def _estimates(rows):
    """(j, a) -> the labels of every copy of the completion, candidates and sampled token alike."""
    p = len(PROMPT)
    out: dict[tuple[int, int], list[float]] = {}
    for row in rows:
        for j in range(len(COMPLETION)):
            for a, value in zip(row["candidate_ids"][p + j], row["candidate_rewards"][p + j], strict=True):
                out.setdefault((j, a), []).append(value)
            out.setdefault((j, COMPLETION[j]), []).append(row["candidate_sampled_reward"][p + j])
    return out


def test_future_value_labels_converge_to_the_exact_soft_q(enumerable):
    model, beta, exact = enumerable
    errors = {}
    for n in (2, 2048):
        torch.manual_seed(0)
        rows, cost = _label(model, FutureValueLabels(k=VOCAB, num_continuations=n, beta=beta), copies=1)
        estimates = _estimates(rows)
        assert set(estimates) == set(exact)
        errors[n] = [abs(values[0] - exact[key]) for key, values in estimates.items() if key[0] < HORIZON - 1]
        # the last step, and the stop token, have no future: their labels are the exact one-step effects
        for key, values in estimates.items():
            if key[0] == HORIZON - 1 or key[1] == STOP:
                assert values[0] == pytest.approx(exact[key], abs=1e-5)
        continued = sum(1 for j in range(HORIZON - 1) for a in range(VOCAB) if a != STOP)
        assert cost.continuations_sampled == n * continued and cost.states_labelled == len(COMPLETION)
    assert max(errors[2048]) < 0.1
    assert sum(errors[2048]) < 0.25 * sum(errors[2])


def test_future_value_labels_are_unbiased_in_exp_space_and_biased_low_in_log_space(enumerable):
    """`mean_i exp(G_i / beta)` estimates `exp(Q* / beta)` without bias; its log, the label, is biased low (Jensen),
    by about `beta Var[exp(G / beta)] / (2 n E[exp(G / beta)]^2)`. 300 independent labels of each (state, candidate)
    with n = 2 continuations: the exp-space mean matches the exact value within its standard error, the log-space
    mean sits below it for every one, and by many standard errors on average."""
    model, beta, exact = enumerable
    torch.manual_seed(1)
    rows, _ = _label(model, FutureValueLabels(k=VOCAB, num_continuations=2, beta=beta), copies=300)
    estimates = _estimates(rows)
    gaps = []
    for (j, a), values in estimates.items():
        if j == HORIZON - 1 or a == STOP:
            continue
        values = torch.tensor(values, dtype=torch.float64)
        target = math.exp(exact[j, a] / beta)
        scaled = (values / beta).exp()
        standard_error = scaled.std().item() / math.sqrt(len(values))
        assert abs(scaled.mean().item() - target) < 4.5 * standard_error, (j, a)
        log_error = values.std().item() / math.sqrt(len(values))
        gaps.append((values.mean().item() - exact[j, a], log_error))
    assert all(gap < 0 for gap, _ in gaps)  # biased low for every (state, candidate)
    mean_gap = sum(gap for gap, _ in gaps) / len(gaps)
    pooled_error = math.sqrt(sum(e**2 for _, e in gaps)) / len(gaps)
    assert mean_gap < -6 * pooled_error


def test_future_value_labels_through_generate_and_score(gpt2_tokenizer):
    """Shapes, the one-step effects where nothing follows, the cost record, and `max_horizon`."""
    model = AutoModelForCausalLMWithQHead(make_tiny_gpt2(seed=0))
    one_step = _generate(gpt2_tokenizer, model, labels=CandidateLabels(k=2))
    data = _generate(gpt2_tokenizer, model, labels=FutureValueLabels(k=2, num_continuations=3, beta=0.5))
    short = _generate(
        gpt2_tokenizer, model, labels=FutureValueLabels(k=2, num_continuations=3, beta=0.5, max_horizon=1)
    )
    assert data["input_ids"] == one_step["input_ids"] == short["input_ids"]  # seeded: the same completions
    eos = gpt2_tokenizer.eos_token_id
    for row, base in zip(data, one_step, strict=True):
        assert row["candidate_ids"] == base["candidate_ids"]
        p = row["completion_mask"].index(1)
        last = p + 6 - 1  # the horizon's last step (max_new_tokens=6): no future
        if last < len(row["input_ids"]):
            assert row["candidate_rewards"][last] == pytest.approx(base["candidate_rewards"][last], abs=1e-5)
        for i in range(p, len(row["input_ids"])):
            for a, value, one in zip(
                row["candidate_ids"][i], row["candidate_rewards"][i], base["candidate_rewards"][i], strict=True
            ):
                if a == eos:  # nothing follows a stop token
                    assert value == pytest.approx(one, abs=1e-5)
    cost = json.loads(data.info.description)["labelling_cost"]
    assert cost["labels"] == ["FutureValueLabels"] and cost["num_continuations"] == 3 and cost["beta"] == 0.5
    assert cost["continuations_sampled"] > 0 and cost["continuations_sampled"] % 3 == 0
    short_cost = json.loads(short.info.description)["labelling_cost"]
    assert short_cost["continuation_tokens"] <= short_cost["continuations_sampled"]  # one token each at most
    assert cost["continuation_tokens"] > short_cost["continuation_tokens"]
