"""The entity-linking quality bench's result folder (bench/el_quality.py): what the summary table is made of."""

import json
from pathlib import Path

import pytest


def _write(out: Path, task: str, config: str, settings: dict, train: bool = True) -> None:
    (out / task).mkdir(parents=True, exist_ok=True)
    record = {"task": task, "config": config, "settings": settings, "ingredients": {"train": train}}
    (out / task / f"{config}.json").write_text(json.dumps(record))


def test_summary_holds_every_finished_result_in_the_folder_in_table_order(script, tmp_path: Path) -> None:
    """A run over one task must not drop the other tasks' rows: the table is read from the whole folder, tasks
    and configurations in the bench's order, whichever run wrote them."""
    bench = script("bench/el_quality.py")
    settings = bench.settings_of(1, "test", 20.0, [])
    _write(tmp_path, "s800-species", "no_abbreviations", settings)
    _write(tmp_path, "s800-species", "untouched", settings, train=False)
    _write(tmp_path, "ncbi-disease", "all", settings)
    _write(tmp_path, "ncbi-disease", "untouched", settings | {"epochs": 3}, train=False)
    rows = [(r["task"], r["config"]) for r in bench.finished_records(tmp_path, settings)]
    assert rows == [
        ("ncbi-disease", "untouched"),
        ("ncbi-disease", "all"),
        ("s800-species", "untouched"),
        ("s800-species", "no_abbreviations"),
    ]


def test_a_result_made_with_other_settings_is_refused_with_its_path(script, tmp_path: Path) -> None:
    bench = script("bench/el_quality.py")
    _write(tmp_path, "ncbi-disease", "all", bench.settings_of(2, "test", 20.0, []))
    with pytest.raises(bench.SettingsMismatch, match="ncbi-disease/all.json"):
        bench.finished_records(tmp_path, bench.settings_of(1, "test", 20.0, []))
