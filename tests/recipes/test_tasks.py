"""recipes/tasks.py: the context tasks' prompts (counts, balance, the held-out protocol, determinism), their rewards'
dependence on the request, and the yes/no judge against a one-text-at-a-time reference on a tiny GPT-2."""

import json

import pytest
import torch

from recipes import benchmark_frontier as frontier
from recipes import tasks
from tests.conftest import make_tiny_gpt2

pytest.importorskip("vaderSentiment", reason="the `demo` extra (make test installs it)")


def _split(prompt: str, requests) -> tuple[float, str]:
    """(sign, opening) of a context-task prompt, read independently of `tasks.request_signs`."""
    for sign, phrases in requests.items():
        for phrase in phrases:
            if prompt.startswith(phrase + " "):
                return sign, prompt[len(phrase) + 1 :]
    raise AssertionError(prompt)


@pytest.mark.parametrize("requests", [tasks.TONE_REQUESTS, tasks.JUDGE_REQUESTS])
def test_context_task_prompts_follow_the_protocol(requests):
    train, held_out = tasks.context_task_prompts(requests, None, 32, seed=0)
    assert len(train) == len(set(train)) >= 1000 and len(held_out) == len(set(held_out)) == 32
    train_openings = {}
    for prompt in train:
        sign, opening = _split(prompt, requests)
        train_openings.setdefault(opening, set()).add(sign)
    assert all(signs == {1.0, -1.0} for signs in train_openings.values())  # every opening under both requests
    held_out_openings = {}
    for prompt in held_out:
        sign, opening = _split(prompt, requests)
        held_out_openings.setdefault(opening, set()).add(sign)
    assert len(held_out_openings) == 16 and all(s == {1.0, -1.0} for s in held_out_openings.values())
    assert set(held_out_openings) <= set(tasks.load_prompts(tasks.PROMPTS_FILE))  # hand-written openings
    assert not set(held_out_openings) & set(train_openings)  # never seen in training, under any request
    assert not any(opening in prompt for opening in held_out_openings for prompt in train)
    # deterministic from the seed; another seed holds out other openings
    assert tasks.context_task_prompts(requests, None, 32, seed=0) == (train, held_out)
    assert tasks.context_task_prompts(requests, None, 32, seed=1)[1] != held_out
    # every scale is the first N of the largest, in whole pairs: balanced, each opening under both requests
    for n in (64, 256, 1024):
        first, same_held_out = tasks.context_task_prompts(requests, n, 32, seed=0)
        assert first == train[:n] and same_held_out == held_out
        signs = [_split(p, requests)[0] for p in first]
        assert signs == [1.0, -1.0] * (n // 2)
        assert [_split(p, requests)[1] for p in first[0::2]] == [_split(p, requests)[1] for p in first[1::2]]
    with pytest.raises(ValueError, match="even"):
        tasks.context_task_prompts(requests, 63, 32, seed=0)
    with pytest.raises(ValueError, match="training prompts asked for"):
        tasks.context_task_prompts(requests, 2 * len(train) + 2, 32, seed=0)


def test_no_request_is_read_as_one_of_the_other_sign():
    for requests in (tasks.TONE_REQUESTS, tasks.JUDGE_REQUESTS):
        for sign, phrases in requests.items():
            assert len(set(phrases)) == len(phrases) == len(requests[-sign])
            for phrase in phrases:
                assert tasks.request_signs([phrase + " The food"], requests, "test") == [sign]


def test_tone_reward_flips_vader_with_every_request_pair():
    completions = [" wonderful, I loved it!", " awful and sad."]
    plain = tasks.sentiment_reward(prompts=["x", "x"], completions=completions)
    for good, bad in zip(tasks.TONE_REQUESTS[1.0], tasks.TONE_REQUESTS[-1.0], strict=True):
        assert tasks.tone_reward(prompts=[f"{good} The food"] * 2, completions=completions) == pytest.approx(plain)
        flipped = tasks.tone_reward(prompts=[f"{bad} The food"] * 2, completions=completions)
        assert flipped == pytest.approx([-r for r in plain])
    with pytest.raises(ValueError, match="prompt 0"):
        tasks.tone_reward(prompts=["Three stars. The food"], completions=["ok"])
    assert tasks.resolve_reward("judge") is tasks.judge_reward


def test_judge_reward_asks_about_the_review_alone_and_flips_with_the_request():
    asked = []

    def judge(questions):
        asked.extend(questions)
        return [float(len(q)) for q in questions]

    prompts = ["Recommend it. The hotel room was", "Warn against it. The hotel room was"]
    rewards = tasks.judge_reward(prompts, [" clean.", " clean."], judge=judge)
    question = tasks.JUDGE_QUESTION.format(text="The hotel room was clean.")
    assert asked == [question, question]  # the request never reaches the judge
    assert rewards == [len(question), -len(question)]
    with pytest.raises(ValueError, match="judge_reward: prompt 0"):
        tasks.judge_reward(["Five stars. The hotel"], [" ok"], judge=judge)


@pytest.mark.parametrize(
    "chat_template", [None, "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"]
)
def test_yes_no_judge_batches_give_each_question_its_own_log_odds(gpt2_tokenizer, chat_template):
    tokenizer = type(gpt2_tokenizer).from_pretrained(gpt2_tokenizer.name_or_path)
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.chat_template = chat_template
    model = make_tiny_gpt2(seed=3)
    judge = tasks.YesNoJudge(model, tokenizer, batch_size=3)
    questions = ["Is it good?", "Here is a much longer question about a review that goes on?", "Yes?", "No. Or?"]
    scores = judge(questions)
    yes = sorted({tokenizer.encode("Yes")[0], tokenizer.encode(" Yes")[0]})
    no = sorted({tokenizer.encode("No")[0], tokenizer.encode(" No")[0]})
    for question, got in zip(questions, scores, strict=True):
        text = judge.render(question)
        assert (question in text) and (text.endswith("\nAnswer:") == (chat_template is None))
        with torch.no_grad():
            logits = model(torch.tensor([tokenizer.encode(text)])).logits[0, -1]
        probs = torch.softmax(logits.double(), -1)
        assert got == pytest.approx(float(torch.log(probs[yes].sum() / probs[no].sum())), abs=1e-4)


def test_frontier_flags_express_tasks_and_prompt_counts():
    args = frontier.parse_args(["--task", "tone", "--prompt_counts", "256", "64", "1024"])
    assert args.n_train_prompts == 1024 and args.prompt_counts == [256, 64, 1024]
    with pytest.raises(ValueError, match="drop `--prompts_file` and `--reward`"):
        frontier.parse_args(["--task", "tone", "--reward", "tone"])
    with pytest.raises(ValueError, match="prompt_counts"):
        frontier.parse_args(["--prompt_counts", "64", "64"])


def test_frontier_runs_the_tone_task_at_two_prompt_counts(tmp_path, gpt2_tokenizer):
    model_dir = tmp_path / "tiny-gpt2"
    make_tiny_gpt2().save_pretrained(model_dir)
    gpt2_tokenizer.save_pretrained(model_dir)
    args = frontier.parse_args(
        [
            "--model", str(model_dir), "--output_dir", str(tmp_path / "out"), "--task", "tone",
            "--prompt_counts", "2", "4", "--n_eval_prompts", "2", "--num_generations", "2", "--max_new_tokens", "3",
            "--epochs", "1", "--train_batch_size", "4", "--tilted_samples", "1", "--betas", "0.5",
            "--gen_batch_size", "16", "--candidate_k", "2", "--oracle_k", "0", "--configs", "effects/mean/tied",
        ]
    )  # fmt: skip
    results = frontier.run(args)
    runs = results["runs"][1:]
    assert [(r["method"], r["prompts"]) for r in runs] == [("effects/mean/tied n2", 2), ("effects/mean/tied n4", 4)]
    assert results["rows"][0]["method"] == "base sampling" and results["rows"][0]["n"] == 2 * 16  # 2 held-out prompts
    assert json.loads((tmp_path / "out" / "results.json").read_text())["runs"] == results["runs"]
