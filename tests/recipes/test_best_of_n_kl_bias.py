"""recipes/best_of_n_kl_bias.py: its true distributions hold the shares they claim, and its table shows the bias of
the exact best-of-N KL shrinking as base samples accumulate (a short run)."""

import pytest

from recipes import best_of_n_kl_bias as study
from trl_qhead.evaluation import best_of_n_kl


def test_population_holds_the_shares_it_claims():
    truth = study.population(1000, 0.6)
    assert len(truth) == 1000 and truth.count(0.0) == 600
    assert sum(r < 0 for r in truth) == 80 and sum(r > 0 for r in truth) == 320
    assert len(set(r for r in truth if r != 0.0)) == 400  # every other text on a level of its own
    assert best_of_n_kl(16, [study.population(1000, 0.0)]) < best_of_n_kl(16)  # 1000 levels: just below the bound


def test_the_table_shows_the_bias_shrinking_with_the_base_samples(capsys):
    text = study.main(["--zeros", "0", "0.9", "--ns", "16", "--ms", "4", "16", "128", "--replicates", "200"])
    assert text in capsys.readouterr().out
    entries, _ = study.kl_table([0.0, 0.9], [16], [4, 16, 128], replicates=200, size=1000, seed=0)
    for entry in entries:
        biases = [entry["cells"][m]["bias"] for m in (4, 16, 128)]
        assert biases[0] < biases[1] < biases[2] < 0.01  # biased low, less so with more samples
        assert entry["true_kl"] <= entry["bound"] + 1e-12
    assert entries[1]["true_kl"] < entries[0]["true_kl"] - 0.3  # 90% ties: far below the bound
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| share at 0.0"))
    assert header.count("| m = ") == 3
    assert sum(line.startswith("| 0.9 | 16 |") for line in lines) == 1
    rewards = [line for line in lines if line.startswith("| 16 |") or line.startswith("| 128 |")]
    assert len(rewards) == 2  # the reward table, for the m that hold whole groups of 16


def test_bad_flags_are_refused():
    with pytest.raises(ValueError, match="--zeros"):
        study.main(["--zeros", "1.0"])
    with pytest.raises(ValueError, match="--replicates"):
        study.main(["--replicates", "1"])
