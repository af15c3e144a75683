"""`cllm results`: the table is generated from committed reports, checked against a committed expected page."""

import json
import shutil
from pathlib import Path

import pytest

from cllm.errors import UserError
from cllm.results_table import BEGIN, END, ResultsSettings, write

FIXTURES = Path(__file__).parent / "fixtures"


def reports(tmp_path: Path) -> Path:
    root = tmp_path / "docs" / "results"
    for name in ("evaluate", "recipe"):  # a `cllm evaluate` report and a `cllm run` report
        (root / name).mkdir(parents=True)
        shutil.copy(FIXTURES / name / "results.json", root / name / "results.json")
    return root


def test_the_page_and_the_readme_block_are_generated_from_the_reports(tmp_path):
    root = reports(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text(f"# intro\n\n{BEGIN}\nstale\n{END}\n\nafter\n")
    write(ResultsSettings(root=str(root), output=str(tmp_path / "docs" / "results.md"), readme=str(readme)))
    page = (tmp_path / "docs" / "results.md").read_text().replace(str(root), "docs/results")
    assert page == (FIXTURES / "results_table.md").read_text()
    text = readme.read_text()
    assert "stale" not in text and text.startswith("# intro") and text.endswith("after\n")
    assert "(docs/results/recipe/results.md)" in text  # links relative to the README, not to docs/
    assert "And 6 rows of evaluations outside a recipe: [results.md](docs/results.md)." in text  # not the rows
    assert "| [evaluate](" not in text


def test_no_report_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="no results.json written by"):
        write(ResultsSettings(root=str(tmp_path), output=str(tmp_path / "r.md"), readme=""))


@pytest.mark.parametrize("readme_text", [None, "# no block here\n"], ids=["missing", "no-block"])
def test_a_bad_readme_is_one_clear_error_before_anything_is_written(tmp_path, readme_text):
    readme, output = tmp_path / "README.md", tmp_path / "docs" / "results.md"
    if readme_text is not None:
        readme.write_text(readme_text)
    with pytest.raises(UserError, match="no such file" if readme_text is None else "no <!-- results:begin -->"):
        write(ResultsSettings(root=str(reports(tmp_path)), output=str(output), readme=str(readme)))
    assert not output.exists()


def test_a_nested_sampled_report_gets_rows_naming_its_folder_and_decoding(tmp_path):
    root = reports(tmp_path)
    report = json.loads((FIXTURES / "evaluate" / "results.json").read_text())
    report["decoding"] = "T=0.7 top_k=0 top_p=1 seed=0"
    (root / "sampling" / "t0.7").mkdir(parents=True)
    (root / "sampling" / "t0.7" / "results.json").write_text(json.dumps(report))
    body = write(ResultsSettings(root=str(root), output=str(tmp_path / "docs" / "results.md"), readme=""))
    sampled = [line for line in body.splitlines() if line.startswith("| [sampling/t0.7](results/sampling/t0.7/")]
    assert len(sampled) == 6 and all("| T=0.7 top_k=0 top_p=1 |" in line for line in sampled)


def test_a_cross_fitted_gain_stands_in_brackets_after_the_warm_up_choice(tmp_path):
    root = reports(tmp_path)
    report = json.loads((root / "recipe" / "results.json").read_text())
    gain = next(iter(report["training_gain"].values()))
    gain["cross_fitted"] = {"median": 1.2, "ci95": [1.05, 1.4], "n_prompts": 4, "folds": []}
    (root / "recipe" / "results.json").write_text(json.dumps(report))
    body = write(ResultsSettings(root=str(root), output=str(tmp_path / "docs" / "results.md"), readme=""))
    assert "| 1.34x [1.30, 1.64] (1.20x [1.05, 1.40]) |" in body


@pytest.mark.parametrize(
    "clean, shown",
    [
        (1.1, "1.095 -> **1.048** (1.100 non-degenerate), degen. 0.00 -> 0.25 |"),
        (None, "1.095 -> **1.048** (every output degenerate), degen. 0.00 -> 0.25 |"),
        ("absent", "1.095 -> **1.048**, degen. 0.00 -> 0.25 |"),  # a report from before the figure existed
    ],
)
def test_degenerate_outputs_are_named_beside_the_trained_tokens_per_step(tmp_path, clean, shown):
    root = reports(tmp_path)
    report = json.loads((root / "recipe" / "results.json").read_text())
    jacobi = report["models"]["cllm"]["eval"]["decoders"]["jacobi"]
    jacobi["degenerate_rate"] = 0.25
    if clean != "absent":
        jacobi["tokens_per_step_non_degenerate"] = clean
    (root / "recipe" / "results.json").write_text(json.dumps(report))
    body = write(ResultsSettings(root=str(root), output=str(tmp_path / "docs" / "results.md"), readme=""))
    assert shown in body


def test_a_report_timing_only_the_fast_path_jacobi_shows_its_tokens_per_step(tmp_path):
    root = reports(tmp_path)
    report = json.loads((root / "recipe" / "results.json").read_text())
    for model in report["models"].values():  # jacobi+compile instead of eager jacobi, on both models
        decoders = model["eval"]["decoders"]
        decoders["jacobi+compile"] = decoders.pop("jacobi")
    (root / "recipe" / "results.json").write_text(json.dumps(report))
    body = write(ResultsSettings(root=str(root), output=str(tmp_path / "docs" / "results.md"), readme=""))
    assert "1.095 -> **1.048**" in body
