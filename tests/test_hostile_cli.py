"""Hostile command lines (issue 27): a model folder that does not exist, and demo counts that cannot work, refused
when the flags are read (before any model loads) with a message that names the flag."""

import pytest

from trl_qhead import cli


@pytest.mark.parametrize("command", ["train", "eval"])
@pytest.mark.parametrize("name", ["/nonexistent/folder", "./missing-model", "a/b/c", "~/models/none"])
def test_a_model_folder_that_does_not_exist_is_named(tmp_path, command, name):
    argv = [command, "--model_name_or_path", name, "--dataset_name", "text", "--output_dir", str(tmp_path),
            "--report_to", "none"]  # fmt: skip
    with pytest.raises(SystemExit, match=f"`--model_name_or_path` '{name}': no such folder"):
        cli.main(argv)  # was (eval): huggingface_hub's "Repo id must be in the form 'repo_name' or ..."


def test_a_tokenizer_folder_that_does_not_exist_is_named(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    argv = ["eval", "--model_name_or_path", str(model_dir), "--tokenizer_name_or_path", "/no/such/tokenizer",
            "--dataset_name", "text", "--output_dir", str(tmp_path), "--report_to", "none"]  # fmt: skip
    with pytest.raises(SystemExit, match="`--tokenizer_name_or_path` '/no/such/tokenizer': no such folder"):
        cli.main(argv)


def test_check_model_source_accepts_folders_and_repo_ids(tmp_path):
    cli.check_model_source(str(tmp_path))  # a folder
    cli.check_model_source("gpt2")  # Hub repo ids (whether they exist is the Hub's to say)
    cli.check_model_source("HuggingFaceTB/SmolLM2-135M")
    with pytest.raises(SystemExit, match="`--model_name_or_path` is required"):
        cli.check_model_source(None)


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--num_generations", "0"),
        ("--num_generations", "1"),  # rewards are centred on their prompt's mean: one completion is always 0
        ("--num_generations", "-3"),
        ("--num_generations", "two"),
        ("--max_new_tokens", "0"),
        ("--train_batch_size", "0"),
        ("--gen_batch_size", "-1"),
        ("--n_train_prompts", "0"),
    ],
)
def test_demo_counts_are_refused_when_the_flags_are_read(capsys, flag, value):
    from recipes.demo_sentiment import parse_args

    with pytest.raises(SystemExit) as exit_info:  # was (--num_generations 0): ZeroDivisionError after the model loaded
        parse_args([flag, value])
    assert exit_info.value.code == 2
    assert f"argument {flag}:" in capsys.readouterr().err


def test_demo_counts_in_range_are_read():
    from recipes.demo_sentiment import parse_args

    args = parse_args(["--num_generations", "2", "--max_new_tokens", "1", "--train_batch_size", "1"])
    assert (args.num_generations, args.max_new_tokens, args.train_batch_size) == (2, 1, 1)


def test_an_empty_model_name_is_named(tmp_path):
    with pytest.raises(SystemExit, match="`--model_name_or_path` is required"):
        cli.main(["eval", "--model_name_or_path", "", "--dataset_name", "text", "--output_dir", str(tmp_path)])
