"""The `done` column: a row whose last action ends the episode without EOS (a scored completion cut at a generation
limit). The episode-end helper against a loop, the column through every format, truncation and packing, the trainer's
return targets, and `generate_and_score`'s `truncated_completions`."""

import copy
import math

import pytest
import torch
from datasets import Dataset, IterableDataset
from transformers import LogitsProcessor, StoppingCriteria, StoppingCriteriaList

import trl_qhead.trainer
from tests.conftest import make_tiny_gpt2
from tests.test_data_formats import _datasets, chat_tokenizer  # noqa: F401 (a fixture)
from tests.test_rewards_training import make_word_model, word_tokenizer  # noqa: F401 (a fixture)
from trl_qhead import AutoModelForCausalLMWithQHead, QHeadConfig, QHeadTrainer, generate_and_score
from trl_qhead.data import DataCollatorForQHead, prepare_dataset
from trl_qhead.mdp import action_mask_from_labels, episode_dones, next_tokens

EOS = 0


def _dones_by_loop(actions, action_mask, eos, done, token_dones):
    """The obvious reading: an action ends the episode if it emits EOS, is the last action of a `done` row, or produces
    a token flagged in `token_dones`."""
    B, T = actions.shape
    expected = torch.zeros(B, T)
    for b in range(B):
        positions = [t for t in range(T) if action_mask[b, t]]
        for t in positions:
            if actions[b, t] == eos or (done[b] and t == positions[-1]) or token_dones[b, t + 1]:
                expected[b, t] = 1.0
    return expected


@pytest.mark.parametrize("side", ["right", "left"])
def test_episode_dones_match_a_loop(side):
    gen = torch.Generator().manual_seed(0)
    rows = []
    for i in range(12):
        n = int(torch.randint(2, 9, (1,), generator=gen))
        ids = torch.randint(0, 4, (n,), generator=gen).tolist()  # EOS (0) appears often, mid-row and at the end
        prompt = int(torch.randint(0, n - 1, (1,), generator=gen))
        row = {"input_ids": ids, "completion_mask": [0] * prompt + [1] * (n - prompt), "done": bool(i % 3)}
        row["dones"] = torch.randint(0, 2, (n,), generator=gen).tolist()
        rows.append(row)
    batch = DataCollatorForQHead(pad_token_id=EOS, padding_side=side)(rows)
    action_mask = action_mask_from_labels(batch["labels"], batch["attention_mask"])
    actions = next_tokens(batch["input_ids"])
    dones = episode_dones(actions, action_mask, EOS, done=batch["done"], token_dones=batch["dones"])
    expected = _dones_by_loop(actions, action_mask, EOS, batch["done"], batch["dones"])
    assert torch.equal(dones, expected) and dones.sum() > 0
    # Each source alone: EOS only is the old behaviour; padding (EOS as pad) never counts.
    eos_only = episode_dones(actions, action_mask, EOS)
    assert torch.equal(eos_only, _dones_by_loop(actions, action_mask, EOS, [False] * 12, torch.zeros_like(actions)))
    no_eos = episode_dones(actions, action_mask, None, done=batch["done"])
    assert torch.equal(no_eos, _dones_by_loop(actions, action_mask, -1, batch["done"], torch.zeros_like(actions)))


def _done_at_last_action(rows, pad_token_id=EOS):
    """Per row: whether the collated batch makes its last action terminal, for rows with no EOS in them."""
    batch = DataCollatorForQHead(pad_token_id=pad_token_id)(list(rows))
    action_mask = action_mask_from_labels(batch["labels"], batch["attention_mask"])
    dones = episode_dones(next_tokens(batch["input_ids"]), action_mask, None, done=batch.get("done"))
    return [bool(d[m].any()) for d, m in zip(dones, action_mask, strict=True)]


def test_done_column_in_every_format_and_dropped_by_truncation(gpt2_tokenizer, chat_tokenizer):  # noqa: F811
    tokenized = Dataset.from_dict({"input_ids": [[5, 6, 7, 8], [9, 10, 11], [12, 13]], "done": [True, True, None]})
    rows = prepare_dataset(tokenized, None, max_length=3)
    assert rows["done"] == [False, True, False]  # row 0 was cut by max_length: it bootstraps; None is False
    assert _done_at_last_action(rows) == [False, True, False]
    assert prepare_dataset(tokenized, None, max_length=4)["done"] == [True, True, False]

    for fmt, data in _datasets().items():
        tokenizer = chat_tokenizer if fmt in ("conversational", "messages") else gpt2_tokenizer
        data = data.add_column("done", [True, False])
        rows = prepare_dataset(data, tokenizer, max_length=64)
        assert rows["done"] == [True, False], fmt
        cut = prepare_dataset(data, tokenizer, max_length=2)
        assert cut["done"] == [False, False], fmt
        streamed = prepare_dataset(IterableDataset.from_generator(data.__iter__), tokenizer, max_length=64)
        assert [row["done"] for row in streamed] == [True, False], fmt


def test_done_survives_packing_at_the_document_end():
    docs = [[1, 2, 3], [4, 5, 6, 7], [8, 9]]
    data = Dataset.from_dict({"input_ids": docs, "done": [True, False, True]})
    rows = prepare_dataset(data, None, max_length=5, packing=True)  # wrapped: [1 2 3 4 5], [6 7 8 9]
    assert rows["input_ids"] == [[1, 2, 3, 4, 5], [6, 7, 8, 9]]
    batch = DataCollatorForQHead(pad_token_id=EOS)(list(rows))
    action_mask = action_mask_from_labels(batch["labels"], batch["attention_mask"])
    dones = episode_dones(next_tokens(batch["input_ids"]), action_mask, None, token_dones=batch["dones"])
    # Terminal: the actions producing 3 and 9 (the ends of the `done` documents); 7 ends a document that is not.
    assert dones.tolist() == [[0, 1, 0, 0, 0], [0, 0, 1, 0, 0]]

    # bfd truncates the 4-token document to 3 (its end is gone) and keeps the others whole.
    bfd = prepare_dataset(data, None, max_length=3, packing=True, packing_strategy="bfd")
    ends = {tuple(ids): flags for ids, flags in zip(bfd["input_ids"], bfd["dones"], strict=True)}
    assert ends == {(1, 2, 3): [0, 0, 1], (4, 5, 6): [0, 0, 0], (8, 9): [0, 1]}


def one_point(completions, **kwargs) -> list[float]:
    return [1.0] * len(completions)


class ScriptedTokens(LogitsProcessor):
    """Forces `scripts[row][step]` at each generation step: chosen EOS-ended and cut completions."""

    def __init__(self, scripts, prompt_width):
        self.scripts, self.prompt_width = scripts, prompt_width

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.prompt_width
        forced = torch.full_like(scores, -math.inf)
        for row, script in enumerate(self.scripts):
            forced[row, script[min(step, len(script) - 1)]] = 0.0
        return forced


def test_generate_and_score_marks_done_by_eos_and_truncated_completions(word_tokenizer):  # noqa: F811
    model = make_word_model().pretrained_model
    prompts = Dataset.from_dict({"prompt": ["a", "c"]})
    b, eos = 2, EOS
    # Per generated row: EOS after one token, cut at the limit, EOS exactly at the limit, EOS first.
    scripts = [[b, eos], [b, b, b], [b, b, eos], [eos]]
    data = {
        mode: generate_and_score(
            model,
            word_tokenizer,
            prompts,
            one_point,
            num_generations=2,
            max_new_tokens=3,
            batch_size=2,
            logits_processor=[ScriptedTokens(scripts, prompt_width=1)],
            show_progress=False,
            truncated_completions=mode,
        )
        for mode in ("terminal", "bootstrap")
    }
    completions = [ids[1:] for ids in data["terminal"]["input_ids"]]
    assert completions == [[b, eos], [b, b, b], [b, b, eos], [eos]]
    assert data["terminal"]["done"] == [True, True, True, True]
    assert data["bootstrap"]["done"] == [True, False, True, True]
    # As training rows: the cut completion bootstraps only under "bootstrap".
    for mode, expected in (("terminal", [True] * 4), ("bootstrap", [True, False, True, True])):
        rows = prepare_dataset(data[mode], word_tokenizer)
        batch = DataCollatorForQHead(pad_token_id=eos)(list(rows))
        action_mask = action_mask_from_labels(batch["labels"], batch["attention_mask"])
        dones = episode_dones(next_tokens(batch["input_ids"]), action_mask, eos, done=batch["done"])
        assert [bool(d[m][-1]) for d, m in zip(dones, action_mask, strict=True)] == expected
    with pytest.raises(ValueError, match="`truncated_completions` must be 'terminal' or 'bootstrap', got 'cut'"):
        generate_and_score(model, word_tokenizer, prompts, truncated_completions="cut", show_progress=False)


class StopAfter(StoppingCriteria):
    """Stops row `i` once it has generated `counts[i]` tokens (`None`: never), as `stop_strings` would."""

    def __init__(self, counts, prompt_width):
        self.counts, self.prompt_width = counts, prompt_width

    def __call__(self, input_ids, scores, **kwargs):
        n = input_ids.shape[1] - self.prompt_width
        return torch.tensor([c is not None and n >= c for c in self.counts], device=input_ids.device)


def test_generate_and_score_drops_the_padding_of_rows_a_stopping_criterion_ended(word_tokenizer):  # noqa: F811
    # A pad token that is not EOS: `generate` fills the rows that stopped early with it.
    tokenizer = copy.deepcopy(word_tokenizer)
    tokenizer.pad_token = "e"
    pad = tokenizer.pad_token_id
    model = make_word_model().pretrained_model
    b = 2
    data = generate_and_score(
        model, tokenizer, Dataset.from_dict({"prompt": ["a", "c"]}), one_point, num_generations=2, max_new_tokens=3,
        batch_size=2, logits_processor=[ScriptedTokens([[b], [b], [b], [EOS]], prompt_width=1)],
        generation_kwargs={"stopping_criteria": StoppingCriteriaList([StopAfter([1, None, 2, None], 1)])},
        show_progress=False, truncated_completions="bootstrap",
    )  # fmt: skip
    completions = [ids[1:] for ids in data["input_ids"]]
    assert completions == [[b], [b, b, b], [b, b], [EOS]]
    assert all(pad not in ids for ids in completions)
    # Stopped early: generation ended them. Cut at the limit: it bootstraps under "bootstrap".
    assert data["done"] == [True, False, True, True]
    assert data["completion_mask"][0] == [0, 1]


def test_trainer_targets_stop_at_done_and_bootstrap_otherwise(gpt2_tokenizer, monkeypatch):
    """gamma = 1, Monte Carlo, one sequence reward per row and a nonzero Q head: the target of every action of a `done`
    row is its reward exactly; a cut row without `done` adds V of the state where it was cut."""
    model = AutoModelForCausalLMWithQHead(make_tiny_gpt2(), q_head_init="normal")
    with torch.no_grad():
        # An offset, so that V(s) (a policy average of q) is far from 0 and a wrong bootstrap would show.
        model.q_head.bias.normal_(1.5, 0.5, generator=torch.Generator().manual_seed(0))
    rows = [[5, 9, 11, 40, 41], [3, 4, 5, 6, 7, 8], [8, 9, 10, 12, 13, 14]]  # no EOS (50256) anywhere
    data = Dataset.from_dict(
        {
            "input_ids": rows,
            "completion_mask": [[0, 0, 1, 1, 1], [0, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]],
            "reward": [0.75, -1.25, 2.0],
            "done": [True, False, True],
        }
    )
    args = QHeadConfig(output_dir="/tmp/unused", gamma=1.0, report_to=[], use_cpu=True, max_length=5)
    trainer = QHeadTrainer(model, args, train_dataset=data, processing_class=gpt2_tokenizer)
    assert trainer.train_dataset["done"] == [True, False, False]  # the third row is cut by max_length=5
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])

    targets = []
    compute_returns = trl_qhead.trainer.compute_returns

    def spy(*args, **kwargs):
        targets.append(compute_returns(*args, **kwargs))
        return targets[-1]

    monkeypatch.setattr(trl_qhead.trainer, "compute_returns", spy)
    model.eval()
    trainer.compute_loss(model, batch)
    (returns,) = targets

    action_mask = action_mask_from_labels(batch["labels"], batch["attention_mask"])
    with torch.no_grad():
        out = model(batch["input_ids"], batch["attention_mask"], return_q=True)
    values = (torch.softmax(out.logits.float(), -1) * out.q_values).sum(-1)  # V(s) = sum_a pi(a|s) q(s, a)
    for row, reward in enumerate([0.75, -1.25, 2.0]):
        g = returns[row][action_mask[row]]
        if row == 0:
            assert torch.equal(g, torch.full_like(g, reward))  # r on the last action, nothing bootstrapped
        else:
            v_cut = values[row, action_mask[row].nonzero().max() + 1]
            assert v_cut.abs() > 0.1  # a bootstrap that would show
            torch.testing.assert_close(g, torch.full_like(g, reward) + v_cut, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("value", ["yes", 2, 0.5])
def test_bad_done_values_raise_naming_the_field_and_row(value):
    data = Dataset.from_dict({"input_ids": [[1, 2, 3]], "done": [value]})  # Arrow columns hold one type
    with pytest.raises(ValueError, match=r"`done` of example 0 is .*bool"):
        prepare_dataset(data, None)
    with pytest.raises(ValueError, match=r"`done` of batch row 1 is .*bool"):
        DataCollatorForQHead(pad_token_id=0)(
            [{"input_ids": [1, 2], "done": True}, {"input_ids": [4, 5], "done": value}]
        )
