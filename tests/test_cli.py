"""The command line: help, config lookup, generate/bench on a tiny model, and bad input -> exit code 2."""

import json

import pytest

from cllm.arguments import resolve_config_args
from cllm.cli import main


def run(argv, capsys):
    """Run the CLI in-process; return (exit code, stdout, stderr)."""
    try:
        main(argv)
        code = 0
    except SystemExit as stop:
        code = stop.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_help_lists_every_command(capsys):
    code, out, _ = run(["--help"], capsys)
    assert code == 0
    for command in ("fit", "validate", "trajectories", "generate", "evaluate", "bench", "export"):
        assert f"  {command} " in out


def test_config_name_resolves_in_cwd_first_then_bundled(tmp_path, monkeypatch):
    from cllm.arguments import bundled_config_dir

    bundled = sorted(p.name for p in bundled_config_dir().glob("*.yaml"))
    if not bundled:
        pytest.skip("no bundled configs yet")
    name = bundled[0]
    monkeypatch.chdir(tmp_path)
    assert resolve_config_args(["fit", "--config", name]) == ["fit", "--config", str(bundled_config_dir() / name)]
    (tmp_path / name).write_text("{}\n")
    assert resolve_config_args(["fit", f"--config={name}"]) == ["fit", f"--config={name}"]


def test_generate_prints_completion_and_statistics(capsys):
    code, out, _ = run(["generate", "--model", "tiny", "--prompt", "def add(a, b):", "--max-new-tokens", "12"], capsys)
    assert code == 0
    assert "12 tokens in" in out and "accepted tokens/step" in out


def test_bench_is_evaluate_without_quality(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"x = {i} +"}) + "\n" for i in range(4)))
    argv = ["bench", "--model", "tiny", "--prompts", str(prompts), "--n", "4", "--max-new-tokens", "10"]
    argv += ["--dtypes", "float64", "--no_compile", "--repeats", "1", "--warmup", "1", "--output", str(tmp_path / "r")]
    code, out, _ = run(argv, capsys)
    assert code == 0, out
    result = json.loads((tmp_path / "r" / "results.json").read_text())
    entry = result["models"]["cllm"]["p"]
    assert entry["ar"]["variant"] == "ar eager float64" and entry["timed_prompts"] == 3
    assert "valid" not in entry and entry["decoders"]["recycle"]["quality"] == {}  # no quality: bench
    assert entry["decoders"]["jacobi"]["agreement_with_ar"] == 1.0
    assert "| cllm | jacobi n=4 float64 |" in out


@pytest.mark.parametrize("decoder", ["recycle", "multiblock+recycle"])
def test_generate_takes_a_decoder(capsys, decoder):
    argv = ["generate", "--model", "tiny", "--prompt", "ab ab ab ab", "--max-new-tokens", "8", "--decoder", decoder]
    code, out, _ = run(argv, capsys)
    assert code == 0 and f"[{decoder} n=16]" in out and "8 tokens in" in out


def test_bench_humaneval_prompt_set_loads():
    from cllm.data_modules.prompts import load_prompts

    prompts = load_prompts("humaneval")
    assert len(prompts) == 164 and prompts[0].id == "HumanEval/0"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "--model", "no/such-model-xyz", "--prompt", "hi"], "unknown model spec"),
        (["generate", "--model", "./missing-folder", "--prompt", "hi"], "model folder not found"),
        (["bench", "--model", "tiny", "--prompts", "missing.jsonl"], "prompt file not found: missing.jsonl"),
        (["bench", "--model", "tiny", "--prompts", "EMPTY"], "is empty"),
        (["bench", "--model", "tiny:context=32", "--prompts", "LONG"], "longer than the model's context (32)"),
        (["bench", "--model", "tiny", "--prompts", "BAD"], "bad.jsonl:2: malformed JSON"),
        (["bench", "--model", "tiny", "--prompts", "humaneval", "--n", "0"], "--n must be >= 1"),
        (["bench", "--model", "tiny"], "--prompts"),
        (["bench", "--model", "tiny", "--prompts", "humaneval", "--decoder", "medusa"], "unknown --decoder 'medusa'"),
        (["generate", "--model", "tiny", "--prompt", "x", "--n", "auto"], "--n auto is a bench option"),
        (["evaluate", "--model", "tiny", "--prompts", "humaneval", "--n", "auto"], "--n_values 8 16 32"),
        (["evaluate", "--model", "tiny", "--prompts", "humaneval", "--base", "tiny"], "--base names the same model"),
        (["evaluate", "--model", "tiny", "--prompts", "BAD1", "--warmup", "2"], "leave none to time after --warmup 2"),
        (["evaluate", "--model", "tiny", "--prompts", "humaneval", "--repeats", "0"], "--repeats must be >= 1"),
        (["evaluate", "--model", "tiny", "--prompts", "humaneval", "--decoder", "eagle"], "unknown --decoder 'eagle'"),
        (["generate", "--model", "tiny", "--prompt", "x", "--threshold", "2"], "--threshold must be in [0, 1]"),
        (["nonsense"], "unknown command"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "long.jsonl").write_text((json.dumps({"prompt": "word " * 40}) + "\n") * 3)
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"prompt": \n')
    (tmp_path / "one.jsonl").write_text('{"prompt": "ok"}\n')
    names = {"EMPTY": "empty.jsonl", "LONG": "long.jsonl", "BAD": "bad.jsonl", "BAD1": "one.jsonl"}
    argv = [names.get(a, a) for a in argv]
    code, _, err = run(argv, capsys)
    assert code == 2
    assert message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


# One convention on every command: --print_config, both flag spellings, one-line errors naming the option.
# (command arguments, the flag in both spellings with its value, the key it sets in the printed config)
SPELLINGS = [
    (["trajectories", "--model", "tiny"], "max_new_tokens", "30", ("max_new_tokens",)),
    (["generate", "--model", "tiny", "--prompt", "hi"], "max_new_tokens", "30", ("max_new_tokens",)),
    (["bench", "--model", "tiny", "--prompts", "humaneval"], "max_new_tokens", "3", ("max_new_tokens",)),
    (["evaluate", "--model", "tiny", "--prompts", "humaneval"], "warmup", "3", ("warmup",)),
    (["export", "--ckpt", "a.ckpt", "--output", "out"], "dtype", "float64", ("dtype",)),
    (["ablate", "--base", "tiny.yaml"], "dry_run", "true", ("dry_run",)),
    (["fit", "--config", "tiny.yaml"], "trainer.max_steps", "3", ("trainer", "max_steps")),
    (["validate", "--config", "tiny.yaml"], "trainer.limit_val_batches", "2", ("trainer", "limit_val_batches")),
]


def printed_config(argv, capsys) -> dict:
    import yaml

    code, out, err = run([*argv, "--print_config"], capsys)
    assert code in (0, None), err
    return yaml.safe_load(out)


@pytest.mark.parametrize("argv, flag, value, key", SPELLINGS, ids=[s[0][0] for s in SPELLINGS])
def test_every_command_prints_its_config_and_takes_both_spellings(argv, flag, value, key, capsys):
    configs = []
    for spelling in (flag, flag.replace("_", "-")):
        config = printed_config([*argv, f"--{spelling}", value], capsys)
        for part in key:
            config = config[part]
        configs.append(config)
    assert configs[0] == configs[1] and str(configs[0]).lower() == value


def test_dashed_print_config_and_bare_and_negated_booleans(capsys):
    config = printed_config(["trajectories", "--model", "tiny", "--clean", "--no-chat-template"], capsys)
    assert config["clean"] is True and config["chat_template"] is False
    code, _, _ = run(["trajectories", "--model", "tiny", "--print-config"], capsys)
    assert code in (0, None)


def test_config_file_feeds_any_command(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gen.yaml").write_text("model: tiny\nprompt: hello\nmax_new_tokens: 7\n")
    assert printed_config(["generate", "--config", "gen.yaml"], capsys)["max_new_tokens"] == 7


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["generate", "--model", "tiny", "--prompt", "x", "--n", "abc"],
            "--n: expected int or one of 'auto', got 'abc'",
        ),
        (
            ["trajectories", "--model", "tiny", "--init", "zz"],
            "--init: expected one of 'context', 'repeat', 'pad', got 'zz'",
        ),
        (["bench", "--model", "tiny", "--prompts", "p", "--limit", "x"], "--limit: expected int or null, got 'x'"),
        (["generate", "--model", "tiny"], "--prompt is required"),
        (["export", "--ckpt", "a", "--output", "b", "--bogus", "1"], "unrecognized arguments: --bogus 1"),
        (["fit", "--config", "tiny.yaml", "--trainer.max_steps=abc"], "--trainer.max_steps: expected int, got 'abc'"),
        (["ablate", "--root", "r"], "give one of --base BASE.yaml or --recipe RECIPE.yaml"),
    ],
)
def test_bad_flag_is_one_line_naming_the_option(argv, message, capsys):
    code, _, err = run(argv, capsys)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_a_repeated_list_flag_adds_to_the_earlier_one():
    from cllm.arguments import normalize_flags

    argv = ["--decoder", "jacobi", "--n", "4", "--decoder", "recycle", "multiblock"]
    assert normalize_flags(argv, lists=frozenset({"decoder"})) == [
        "--n",
        "4",
        '--decoder=["jacobi", "recycle", "multiblock"]',
    ]


def test_fit_destroys_the_process_group_it_leaves(tmp_path, monkeypatch):
    """Lightning leaves the gloo group up; left to interpreter exit its threads can abort a finished Slurm step."""
    import torch.distributed as dist

    from cllm import lightning_cli

    def fake_cli():  # stands in for a finished distributed fit
        store = dist.FileStore(str(tmp_path / "store"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)

    monkeypatch.setattr(lightning_cli, "CLLMLightningCLI", fake_cli)
    monkeypatch.setattr("sys.argv", ["cllm"])
    lightning_cli.run_lightning(["fit"])
    assert not dist.is_initialized()
