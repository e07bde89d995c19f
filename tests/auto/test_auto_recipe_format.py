"""Recipe files: validation, YAML, and clear errors."""

from __future__ import annotations

import pytest

from openautoglm.auto import load_recipe, save_recipe, validate_recipe

RECIPE = {"format": "openautoglm-recipe", "version": 1, "steps": [
    {"type": "prune_heads", "removed": {"1": [0, 1]}},
    {"type": "quantize", "config": {"scheme": "w4", "group_size": 64, "include": ["model.layers.0.*"], "exclude": []}},
    {"type": "kv_cache", "config": {"bits": [8, 4, None, 2]}}]}


def test_round_trip_json_and_yaml(tmp_path):
    p = save_recipe(RECIPE, tmp_path / "r.json")
    assert load_recipe(p) == RECIPE
    yaml = pytest.importorskip("yaml")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(RECIPE))
    assert load_recipe(tmp_path / "r.yaml") == RECIPE


def test_bad_recipes(tmp_path):
    with pytest.raises(ValueError, match="not an openautoglm recipe"):
        validate_recipe({"steps": []})
    with pytest.raises(ValueError, match="type 'sparsify'"):
        validate_recipe({**RECIPE, "steps": [{"type": "sparsify"}]})
    with pytest.raises(ValueError, match="unknown scheme"):
        validate_recipe({**RECIPE, "steps": [{"type": "quantize", "config": {"scheme": "w3"}}]})
    with pytest.raises(ValueError, match="KV bits 3"):
        validate_recipe({**RECIPE, "steps": [{"type": "kv_cache", "config": {"bits": [3]}}]})
    with pytest.raises(ValueError, match="version 2"):
        validate_recipe({**RECIPE, "version": 2})
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_recipe(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="no such file"):
        load_recipe(tmp_path / "missing.json")
    (tmp_path / "bad.yaml").write_text("format: [unclosed\n  steps: {")
    with pytest.raises(ValueError, match="bad.yaml is not valid YAML"):
        load_recipe(tmp_path / "bad.yaml")
