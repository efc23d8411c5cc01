"""The ``quietstar`` command line: options and their defaults, config files, clear errors with
exit status 2, and ``generate``."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys

import pytest
import yaml
from helpers import tiny_model_folder, training_workspace
from transformers import GenerationConfig

import quietstar.model.quietstar_model as quietstar_model

from quietstar.model.quietstar_model import END_THOUGHT, START_THOUGHT
from quietstar.train import TrainConfig
from quietstar.train.cli import main


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return training_workspace(tmp_path_factory.mktemp("cli"), corpus_repeats=10)


def small_run(workspace, out, *extra):
    return ["train", "--model", str(workspace / "model"), "--data", str(workspace / "corpus.txt"), "--out", str(out),
            "--cache-dir", str(workspace / "cache"), "--seq-len", "16", "--grad-accum", "1", "--thought-tokens", "2",
            "--talk-tokens", "2", "--tokenizer-workers", "0", *extra]


def test_train_help_lists_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for field in dataclasses.fields(TrainConfig):
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        assert "--" + field.name.replace("_", "-") in text, field.name
        assert f"(default: {default!r})" in text, field.name


def test_flags_override_the_config_file_which_overrides_the_defaults(workspace, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"max-steps": 2, "lr": 1e-3, "seed": 5}))
    assert main(small_run(workspace, tmp_path / "run", "--config", str(config), "--lr", "2e-3")) == 0
    resolved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert (resolved["max_steps"], resolved["lr"], resolved["seed"], resolved["warmup_steps"]) == (2, 2e-3, 5, 20)
    assert (tmp_path / "run" / "checkpoint-2").is_dir()


@pytest.mark.parametrize(
    "change,message",
    [
        (["--data", "no/such/file.txt"], "data file 'no/such/file.txt' does not exist"),
        (["--lr", "-1"], "lr must be a finite number > 0"),
        (["--model", "no/such/model"], "model 'no/such/model' is not"),
        (["--thought-tokens", "0"], "thought_tokens must be an int >= 1"),
        (["--seq-len", "1"], "seq_len must be an int >= 2"),
    ],
)
def test_a_users_mistake_is_one_line_naming_it_and_exit_status_2(workspace, tmp_path, capsys, change, message):
    argv = small_run(workspace, tmp_path / "run", "--max-steps", "1")
    flag = change[0]
    argv = argv[: argv.index(flag)] + change + argv[argv.index(flag) + 2 :] if flag in argv else argv + change
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error and len(error.strip().splitlines()) == 1


def test_missing_options_bad_config_keys_and_unknown_flags_are_usage_errors(workspace, tmp_path, capsys):
    assert main(["train", "--data", "x.txt"]) == 2
    assert "--model, --out required" in capsys.readouterr().err
    config = tmp_path / "bad.yaml"
    config.write_text("learning_rate: 0.1\n")
    assert main(small_run(workspace, tmp_path / "run", "--config", str(config))) == 2
    assert "unknown option 'learning_rate'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--no-such-flag"])
    assert exit_info.value.code == 2


@pytest.mark.parametrize(
    "options,message",
    [
        ({"resume": "no"}, "resume must be true or false, got 'no'"),
        ({"data": 5}, "data must be a list of paths, got 5"),
        ({"out": 3}, "out must be a string, got 3"),
        ({"deterministic": 1}, "deterministic must be true or false, got 1"),
    ],
)
def test_a_config_file_option_of_the_wrong_kind_is_an_error_naming_it(options, message):
    values = {"model": "m", "data": ["d.txt"], "out": "o", **options}
    with pytest.raises(ValueError, match=re.escape(message)):
        TrainConfig.from_dict(values)


def test_a_number_yaml_reads_as_a_string_is_still_a_number_and_paths_may_be_path_objects(tmp_path):
    config = TrainConfig.from_dict(yaml.safe_load("model: m\ndata: d.txt\nout: o\nlr: 1e-5\n"))
    assert config.lr == 1e-5  # PyYAML reads 1e-5 (no dot) as the string '1e-5'
    with pytest.raises(ValueError, match="lr must be a finite number > 0.0, got 'fast'"):
        TrainConfig.from_dict({"model": "m", "data": ["d.txt"], "out": "o", "lr": "fast"})
    config = TrainConfig(model=str(tmp_path), data=[tmp_path / "d.txt"], out=tmp_path / "run")
    assert config.out == str(tmp_path / "run") and config.data == [str(tmp_path / "d.txt")]
    config.write_yaml(tmp_path / "c.yaml")  # plain strings: YAML writes them
    for text, expected in (("off", "off"), ("on", "on"), ("true", "on"), ("false", "off")):  # YAML 1.1 bools
        config = TrainConfig.from_dict(yaml.safe_load(f"model: m\ndata: d.txt\nout: o\ngradient_checkpointing: {text}\n"))
        assert config.gradient_checkpointing == expected


def test_generate_prints_each_tokens_thought_between_markers(workspace, capsys):
    argv = ["generate", "--model", str(workspace / "model"), "--prompt", "The quick", "--max-new-tokens", "3", "--thought-tokens", "2"]
    assert main(argv + ["--show-thoughts"]) == 0
    shown = capsys.readouterr().out
    assert shown.startswith("The quick") and shown.count(START_THOUGHT) == 3 and shown.count(END_THOUGHT) == 3
    assert main(argv) == 0
    plain = capsys.readouterr().out
    assert plain.startswith("The quick") and START_THOUGHT not in plain


def test_python_dash_m_quietstar_runs_the_command_line(workspace):
    done = subprocess.run([sys.executable, "-m", "quietstar", "generate", "--model", str(workspace / "missing"), "--prompt", "x"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "is not a QuietStarModel checkpoint" in done.stderr


def test_generate_stops_at_every_end_id_the_generation_config_lists(tmp_path, monkeypatch):
    """Instruction-tuned models list several end ids (end of turn, end of text); the command
    passes them all with the tokenizer's EOS (0 here), not only the latter."""
    folder = tmp_path / "model"
    tiny_model_folder(folder)
    GenerationConfig(eos_token_id=[5, 7], pad_token_id=1).save_pretrained(folder)
    seen = {}
    generate = quietstar_model.QuietStarModel.generate
    monkeypatch.setattr(quietstar_model.QuietStarModel, "generate", lambda self, *a, **k: seen.update(k) or generate(self, *a, **k))
    assert main(["generate", "--model", str(folder), "--prompt", "The quick", "--max-new-tokens", "2"]) == 0
    assert seen["eos_token_id"] == [0, 5, 7]
