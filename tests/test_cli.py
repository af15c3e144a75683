"""The command line: help, config lookup, generate/bench on a tiny model, and bad input -> exit code 2."""

import json

import pytest

from cllm.cli import main, resolve_config_args


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
    for command in ("fit", "validate", "test", "predict", "trajectories", "generate", "bench", "export"):
        assert f"  {command} " in out


def test_config_name_resolves_in_cwd_first_then_bundled(tmp_path, monkeypatch):
    from cllm.cli import bundled_config_dir

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


def test_bench_writes_the_documented_json(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"x = {i} +"}) + "\n" for i in range(3)))
    output = tmp_path / "r.json"
    argv = ["bench", "--model", "tiny", "--prompts", str(prompts), "--n", "4", "--max-new-tokens", "10"]
    code, out, _ = run([*argv, "--batch-size", "2", "--dtype", "float64", "--output", str(output)], capsys)
    assert code == 0, out
    result = json.loads(output.read_text())
    for key in ("model", "n", "max_new_tokens", "batch_size", "num_prompts", "dtype", "device", "speedup"):
        assert key in result
    assert set(result["ar"]) >= {"tokens", "seconds", "tokens_per_s"}
    assert set(result["jacobi"]) >= {"tokens", "seconds", "tokens_per_s", "steps", "accepted_tokens_per_step"}
    assert result["jacobi"]["ar_agreement"] == 1.0
    assert result["ar"]["tokens"] == result["jacobi"]["tokens"] == 30
    assert "greedy AR" in out and "Jacobi n=4" in out


def test_bench_humaneval_prompt_set_loads():
    from cllm.data_modules.prompts import load_prompts

    prompts = load_prompts("humaneval")
    assert len(prompts) == 164 and prompts[0].id == "HumanEval/0"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "--model", "no/such-model-xyz", "--prompt", "hi"], "unknown model spec"),
        (["generate", "--model", "./missing-folder", "--prompt", "hi"], "not a model folder"),
        (["bench", "--model", "tiny", "--prompts", "missing.jsonl"], "prompt file not found: missing.jsonl"),
        (["bench", "--model", "tiny", "--prompts", "EMPTY"], "is empty"),
        (["bench", "--model", "tiny:context=32", "--prompts", "LONG"], "longer than the model's context (32)"),
        (["bench", "--model", "tiny", "--prompts", "BAD"], "bad.jsonl:2: malformed JSON"),
        (["bench", "--model", "tiny", "--prompts", "humaneval", "--n", "0"], "--n must be >= 1"),
        (["bench", "--model", "tiny"], "--prompts"),
        (["nonsense"], "unknown command"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "long.jsonl").write_text(json.dumps({"prompt": "word " * 40}) + "\n")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"prompt": \n')
    argv = [{"EMPTY": "empty.jsonl", "LONG": "long.jsonl", "BAD": "bad.jsonl"}.get(a, a) for a in argv]
    code, _, err = run(argv, capsys)
    assert code == 2
    assert message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
