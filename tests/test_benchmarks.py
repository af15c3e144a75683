"""Quality scoring of the evaluation (`cllm.scoring.quality`) on hand-made outputs."""

from cllm.data_modules.prompts import load_prompts


def test_json_quality_scores_against_the_generating_record():
    from cllm.scoring import quality

    prompts = load_prompts("json-extract:test", limit=2)
    texts = [prompts[0].answer, "not json"]
    assert quality("json-extract", prompts, texts) == {"valid": 0.5, "exact": 0.5, "fields": 0.5}
    assert quality("stdlib-code", prompts, texts) == {}
