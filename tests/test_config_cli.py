"""Config validation errors name the key and the file; the CLI turns them into exit code 2."""

import subprocess
import sys

import pytest

from fedmoe.config import ConfigError, load_config


def test_defaults_are_the_default_run_and_match_configs_default_yaml():
    from pathlib import Path

    cfg = load_config(None)
    assert (cfg.model.name, cfg.algorithm.name, cfg.federation.rounds) == ("builtin:tiny-moe", "fedit", 3)
    assert (cfg.data.partition.scheme, cfg.data.partition.num_clients, cfg.data.partition.alpha) == ("dirichlet", 4, 0.5)
    written = load_config(Path(__file__).parent.parent / "configs" / "default.yaml")
    assert written == cfg


def test_unknown_key_is_named_with_the_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: 1e-4\n  learning_rate: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "unknown key 'train.learning_rate'" in str(e.value) and str(p) in str(e.value)


def test_an_unknown_key_close_to_a_known_one_gets_a_suggestion(tmp_path):
    """train.batchsize -> 'did you mean train.batch_size?', from a YAML file and from --set alike, at every depth; a
    key like none of its section's gets no guess."""
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  batchsize: 4\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert e.value.args[0].splitlines()[1] == ("  - unknown key 'train.batchsize': remove it or check its spelling; did "
                                               "you mean 'train.batch_size'?")
    for override, suggestion in (("train.batchsize=4", "train.batch_size"), ("trian.lr=1", "train"),
                                 ("algorithm.flame.temprature=2", "algorithm.flame.temperature"),
                                 ("data.partition.num_client=2", "data.partition.num_clients")):
        with pytest.raises(ConfigError) as e:
            load_config(None, [override])
        key = override.split("=")[0] if suggestion != "train" else "trian"
        assert f"unknown key '{key}': remove it or check its spelling; did you mean '{suggestion}'?" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.zzz=1"])
    assert str(e.value).endswith("unknown key 'train.zzz': remove it or check its spelling")


def test_a_value_that_fits_no_member_of_a_union_key_is_one_line():
    """data.source is text or a list of text: pydantic gives an error per member (and per bad item of the list), which
    were printed as keys no config has (data.source.str, data.source.list[str].0). One line names the key and its
    members, with the value; other errors keep their own lines."""
    cases = {"data.source=5": "  - data.source: should be str or list[str] (got 5)",
             "data.source=[1, 2]": "  - data.source: should be str or list[str] (got [1, 2])",
             "eval.mmlu={a: 1}": "  - eval.mmlu: should be str or list[str] (got {'a': 1})",
             "train.activation_checkpointing=1.5": "  - train.activation_checkpointing: should be bool or int (got 1.5)"}
    for override, line in cases.items():
        with pytest.raises(ConfigError) as e:
            load_config(None, [override])
        assert str(e.value).splitlines()[1:] == [line], str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.lr=x", "data.source=[1, 2]", "eval.batch_size=y"])
    lines = str(e.value).splitlines()[1:]
    assert len(lines) == 3 and lines[0] == cases["data.source=[1, 2]"], lines  # in the sections' order, as before
    assert lines[1].startswith("  - train.lr: ") and lines[2].startswith("  - eval.batch_size: "), lines


def test_bad_value_is_named():
    with pytest.raises(ConfigError, match=r"train.lr: .*greater than 0.*-1"):
        load_config(None, ["train.lr=-1"])
    with pytest.raises(ConfigError, match="data.partition.scheme"):
        load_config(None, ["data.partition.scheme=random"])
    with pytest.raises(ConfigError, match="split fractions"):
        load_config(None, ["data.split=[0.5,0.1,0.1]"])
    with pytest.raises(ConfigError, match="client_top_k has 2 entries but data.partition.num_clients is 4"):
        load_config(None, ["algorithm.client_top_k=[1,2]"])


def test_broken_yaml_names_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  lr: 1e-4\n  batch_size: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: line \d+"):
        load_config(p)


def test_overrides_parse_yaml_values_and_nest():
    cfg = load_config(None, ["train.lr=1e-4", "lora.attention_targets=[q_proj]", "eval.max_examples=null", "seed=3"])
    assert cfg.train.lr == 1e-4 and cfg.lora.attention_targets == ["q_proj"] and cfg.eval.max_examples is None
    assert cfg.seed == 3
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.lr"])
    with pytest.raises(ConfigError, match="seed: Input should be a valid integer"):
        load_config(None, ["seed.x=1"])
    with pytest.raises(ConfigError, match="'lr' is a value"):
        load_config(None, ["train.lr=1", "train.lr.x=2"])


def test_yaml_on_and_off_mean_the_words_for_train_bf16(tmp_path):
    """YAML 1.1 reads a bare on / off as true / false: `bf16: on` in a file and `--set train.bf16=on`
    are the setting's words, not a type error; a number is still refused."""
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  bf16: off\n")
    assert load_config(str(f)).train.bf16 == "off"
    assert load_config(None, ["train.bf16=on"]).train.bf16 == "on"
    with pytest.raises(ConfigError, match="train.bf16"):
        load_config(None, ["train.bf16=1"])


def test_cli_reports_config_errors_with_exit_code_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "fedmoe.cli", "run", "--set", "train.nope=1"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2
    assert "unknown key 'train.nope'" in r.stdout + r.stderr
    r = subprocess.run([sys.executable, "-m", "fedmoe.cli", "run", "--resume", str(tmp_path / "nothing")],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and f"{tmp_path / 'nothing'} does not exist" in r.stdout + r.stderr


def test_cli_runs_a_tiny_experiment_end_to_end(tmp_path):
    """A user's model folder (transformers shows a "Loading weights" bar for it), run --quiet: no bar at all."""
    from helpers import hf_folder

    hf_folder(tmp_path, "olmoe")
    args = ["data.max_examples=120", "data.max_length=48", "data.partition.num_clients=2", "train.max_steps=1",
            "train.batch_size=2", "eval.max_examples=2", "eval.max_new_tokens=3", "data.max_test_per_client=3",
            "federation.rounds=1", "lora.rank=2", f"output_dir={tmp_path}", "name=cli", f"model.name={tmp_path / 'base'}"]
    cmd = [sys.executable, "-m", "fedmoe.cli", "run", "--quiet"] + [x for a in args for x in ("--set", a)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "Loading weights" not in r.stdout + r.stderr and "%|" not in r.stdout + r.stderr
    assert "| global model |" in r.stdout and f"report: {tmp_path}/cli/report.md" in r.stdout
    assert (tmp_path / "cli" / "summary.json").is_file()


def test_every_positional_argument_shows_its_help():
    """`fedmoe CMD --help` shows what each positional argument is (click 8.5 with typer 0.20 printed only the
    argument's name: requirements.lock pins click 8.4)."""
    import re

    import click
    import typer
    from typer.testing import CliRunner

    from fedmoe.cli import app

    group = typer.main.get_command(app)
    checked = 0
    for name, command in group.commands.items():
        args = [p for p in command.params if isinstance(p, click.Argument)]
        if not args:
            continue
        out = re.sub(r"[\s│]+", " ", CliRunner().invoke(app, [name, "--help"], terminal_width=200).stdout)
        for p in args:
            help_text = getattr(p, "help", None)
            assert help_text, f"fedmoe {name}: argument {p.name} has no help"
            assert " ".join(help_text.split()[:4]) in out, (name, p.name, out[:2000])
            checked += 1
    assert checked >= 8


def test_the_start_line_names_the_server_optimizer_and_mu(monkeypatch):
    """`fedmoe run --set algorithm.server_optimizer.name=fedyogi --set algorithm.fedit.proximal_mu=0.01` said only
    "fedit on ...": its first line names the optimizer with η as resolved (lr: null -> FedYogi's 1e-2), its β, τ, and
    μ; a plain run's line is as before."""
    from typer.testing import CliRunner

    import fedmoe.federation.entry as entry
    from fedmoe.cli import app

    def stop(*a, **k):
        raise ValueError("stopped before the run")

    monkeypatch.setattr(entry, "start_run", stop)
    sets = ["algorithm.server_optimizer.name=fedyogi", "algorithm.server_optimizer.beta2=0.9",
            "algorithm.fedit.proximal_mu=0.01"]
    res = CliRunner().invoke(app, ["run", *[x for s in sets for x in ("--set", s)]])
    out = " ".join(res.output.split())  # rich wraps the line at the terminal's width
    assert res.exit_code == 2 and "stopped before the run" in out
    assert ("fedmoe run: fedit on builtin:tiny-moe, 4 clients, 3 rounds · server optimizer fedyogi (η = 0.01, β1 = 0.9, "
            "β2 = 0.9, τ = 0.001) · FedProx μ = 0.01") in out
    res = CliRunner().invoke(app, ["run", "--set", "federation.robust.rule=median"])
    assert "fedmoe run: fedit on builtin:tiny-moe, 4 clients, 3 rounds · robust aggregation: median" in \
        " ".join(res.output.split())


def test_a_sweep_axis_set_on_a_config_without_a_sweep_is_refused():
    """`fedmoe run --set 'sweep.seed=[0,1]'` on a config with no sweep: section was told to run it with `fedmoe run`
    (what it ran): the message now says there is no sweep to change an axis of, and what to do."""
    from fedmoe.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"--set sweep.seed=\[0,1\]: changes an axis of a sweep, and the default "
                                          r"config has no sweep: section"):
        load_config(None, ["sweep.seed=[0,1]"])


def test_a_set_value_that_is_not_yaml_is_one_line_naming_where():
    """`--set train.lr=[1`: the YAML error on one line, where and why, and how to give text (it printed the parser's
    multi-line message with a caret drawing)."""
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.lr=[1"])
    assert str(e.value) == ("--set train.lr: value '[1' is not valid YAML (at line 1, column 3: expected ',' or ']', "
                            "but got '<stream end>'); a text value with YAML's signs in it goes in quotes: "
                            "--set 'train.lr=\"...\"'")


def test_min_replies_above_what_a_round_samples_is_refused_for_a_new_run(tmp_path):
    """4 clients at fraction 0.5 sample 2 a round: min_replies 3 could never be met (it was lowered to 2, unsaid).
    A new run is refused before anything is written; the config itself still loads (an older fedmoe's run of it
    resumes and exports)."""
    from fedmoe.federation import start_run

    cfg = load_config(None, ["federation.fraction=0.5", "federation.min_replies=3", f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"federation.min_replies = 3 is more than the 2 clients a round samples"):
        start_run(cfg)
    assert not any(tmp_path.iterdir())
