"""`trl_qhead.rollouts.generate_and_score`: `done` by EOS and `truncated_completions`, stopping criteria, scoring,
logits processors and chat templates."""

import copy
import math

import pytest
import torch
from datasets import Dataset
from transformers import (
    LogitsProcessor,
    StoppingCriteria,
    StoppingCriteriaList,
)
from trl.rewards import think_format_reward

from tests.conftest import make_tiny_gpt2
from tests.test_data_formats import CHAT_TEMPLATE
from tests.test_rewards_training import (
    count_b,
    make_word_model,
    word_tokenizer,  # noqa: F401 (fixtures)
)
from trl_qhead import (
    generate_and_score,
)
from trl_qhead.data import DataCollatorForQHead, prepare_dataset
from trl_qhead.mdp import action_mask_from_labels, episode_dones, next_tokens
from trl_qhead.rewards import RewardComputer

EOS = 0  # the EOS id of these tests' hand-made rows


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


class ForceToken(LogitsProcessor):
    def __init__(self, token: int):
        self.token = token

    def __call__(self, input_ids, scores):
        forced = torch.full_like(scores, -math.inf)
        forced[:, self.token] = 0.0
        return forced


def test_generate_and_score_builds_a_trainable_dataset(word_tokenizer, capsys):
    prompts = Dataset.from_dict({"prompt": ["a", "c d", "e"], "target": ["b", "c", "d"]})
    seen = []

    def matches(completions, target, **kwargs):
        seen.append(target)
        return [1.0 if t in c.split() else None for c, t in zip(completions, target, strict=True)]

    def per_token_b(completion_ids, **kwargs):
        return [[0.5 if token == 2 else 0.0 for token in ids] for ids in completion_ids]

    torch.manual_seed(0)
    backbone = make_word_model().pretrained_model  # a plain causal LM works as well as a Q-head model
    data = generate_and_score(
        backbone,
        word_tokenizer,
        prompts,
        [count_b, matches, per_token_b],
        reward_weights=[1.0, 2.0, 1.0],
        num_generations=3,
        max_new_tokens=5,
        batch_size=2,
    )
    assert "Generating and scoring" in capsys.readouterr().err  # the progress bar
    assert len(data) == 9 and data["prompt"] == ["a"] * 3 + ["c d"] * 3 + ["e"] * 3
    assert seen[0] == ["b"] * 3 + ["c"] * 3  # the first batch: two prompts, three completions each
    for row in data:
        prompt_ids = word_tokenizer(row["prompt"])["input_ids"]
        completion_ids = row["input_ids"][len(prompt_ids) :]
        assert row["input_ids"][: len(prompt_ids)] == prompt_ids
        assert row["completion_mask"] == [0] * len(prompt_ids) + [1] * len(completion_ids)
        assert 1 <= len(completion_ids) <= 5 and 0 not in completion_ids[:-1]  # cut at the first EOS
        # The text the completion's tokens add to the prompt's (this tokenizer joins words with spaces).
        whole = word_tokenizer.decode(row["input_ids"], skip_special_tokens=True)
        assert row["prompt"] + row["completion"] == whole
        assert row["reward_count_b"] == completion_ids.count(2)
        match = 1.0 if row["target"] in row["completion"].split() else None
        assert row["reward_matches"] == match
        assert row["reward"] == row["reward_count_b"] + (2.0 * match if match else 0.0)
        assert row["rewards"] == [0.0] * len(prompt_ids) + [0.5 if t == 2 else 0.0 for t in completion_ids]

    # The dataset trains as it is: the sequence reward on the last action, per-token rewards on theirs.
    rows = list(prepare_dataset(data, word_tokenizer))
    batch = DataCollatorForQHead(0)(rows)
    action_mask = action_mask_from_labels(batch["labels"], batch["attention_mask"])
    rewards, _ = RewardComputer(word_tokenizer)(batch, action_mask)
    assert rewards.sum().item() == pytest.approx(sum(data["reward"]) + sum(map(sum, data["rewards"])))


def test_generate_and_score_passes_logits_processors_and_chat_templates(gpt2_tokenizer):
    tokenizer = copy.deepcopy(gpt2_tokenizer)
    tokenizer.chat_template = CHAT_TEMPLATE
    prompts = [{"prompt": [{"role": "user", "content": "Hi"}]}]
    token = tokenizer(" yes")["input_ids"][0]
    data = generate_and_score(
        make_tiny_gpt2(),
        tokenizer,
        prompts,
        think_format_reward,
        num_generations=2,
        max_new_tokens=3,
        logits_processor=[ForceToken(token)],
        show_progress=False,
    )
    assert data["completion"] == [[{"role": "assistant", "content": " yes yes yes"}]] * 2
    assert tokenizer.decode(data[0]["input_ids"]) == "user:\nHi\nassistant:\n yes yes yes"
    assert data["reward"] == [0.0, 0.0]
    with pytest.raises(ValueError, match="expected a `prompt` column"):
        generate_and_score(make_tiny_gpt2(), tokenizer, Dataset.from_dict({"text": ["x"]}), show_progress=False)


def test_sample_completions_cuts_at_eos_and_reads_the_processor_kl(gpt2_tokenizer):
    from trl_qhead import AutoModelForCausalLMWithQHead, QTiltLogitsProcessor
    from trl_qhead.rollouts import sample_completions

    model = AutoModelForCausalLMWithQHead(make_tiny_gpt2(), q_head_init="normal").eval()
    prompts = ["Hello there", "A"]
    base = sample_completions(model, gpt2_tokenizer, prompts, 3, max_new_tokens=5, batch_size=4, seed=0)
    assert base.kl is None and len(base.completion_ids) == len(base.texts) == 6
    assert base.prompt_ids == [gpt2_tokenizer(p)["input_ids"] for p in prompts]
    eos = gpt2_tokenizer.eos_token_id
    for ids in base.completion_ids:
        assert 1 <= len(ids) <= 5 and eos not in ids[:-1]  # up to and including the first EOS
    assert base.prompt_of(4) == "A"
    again = sample_completions(model, gpt2_tokenizer, prompts, 3, max_new_tokens=5, batch_size=4, seed=0)
    assert again.completion_ids == base.completion_ids  # seeded
    tilted = sample_completions(
        model, gpt2_tokenizer, prompts, 3, max_new_tokens=5, batch_size=6, seed=0,
        logits_processor_factory=lambda: QTiltLogitsProcessor(model, beta=0.5),
    )  # fmt: skip
    assert len(tilted.kl) == 6 and all(k >= -1e-5 for k in tilted.kl)


def test_generate_and_score_pads_with_eos_when_the_tokenizer_has_no_pad_token():
    # GPT-2's tokenizer has no pad token: batched prompts of different lengths could not be padded. As TRL's trainers
    # do, generate_and_score sets pad = EOS, and the result equals that of a tokenizer given pad = EOS by hand.
    from transformers import AutoTokenizer

    from recipes.offline_assets import gpt2_tokenizer_dir

    model = make_tiny_gpt2()
    prompts = Dataset.from_dict({"prompt": ["The movie was", "Hi"]})
    data = {}
    for name in ("no pad", "pad = eos"):
        tokenizer = AutoTokenizer.from_pretrained(gpt2_tokenizer_dir())
        assert tokenizer.pad_token is None
        if name == "pad = eos":
            tokenizer.pad_token = tokenizer.eos_token
        data[name] = generate_and_score(
            model,
            tokenizer,
            prompts,
            one_point,
            num_generations=2,
            max_new_tokens=3,
            batch_size=2,
            seed=0,
            show_progress=False,
        )
        assert tokenizer.pad_token_id == tokenizer.eos_token_id
    assert data["no pad"]["input_ids"] == data["pad = eos"]["input_ids"]
    assert len(data["no pad"]) == 4 and data["no pad"]["reward"] == [1.0] * 4


def test_generate_and_score_refuses_a_tokenizer_without_pad_and_eos_tokens():
    from transformers import AutoTokenizer

    from recipes.offline_assets import gpt2_tokenizer_dir

    tokenizer = AutoTokenizer.from_pretrained(gpt2_tokenizer_dir())
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match="neither a pad nor an EOS token"):
        generate_and_score(
            make_tiny_gpt2(), tokenizer, [{"prompt": "Hi"}], one_point, max_new_tokens=2, show_progress=False
        )
