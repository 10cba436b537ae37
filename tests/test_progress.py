"""Progress bars of dictionary loading and TF-IDF building (one switch: hf_continual.progress), and the task
boundary log line of the stream.

Checked by breaking the code on purpose: dropping ``show=`` in ``load_dictionary``'s bar or the TF-IDF bar makes the
forced bars disappear (the ``desc`` assertions fail); reading the file twice for the bar (a second ``list()``)
changes nothing that is asserted here, but a bar that swallowed lines would fail the equality with
``show_progress=False``.
"""

from __future__ import annotations

import gzip
import logging

import pytest
from transformers.utils import logging as hf_logging

from hf_continual.progress import progress
from hf_continual.tasks.entity_linking import TfidfRetriever, load_dictionary

MEDIC = "".join(f"MESH:D{i:06d}||name {i}|synonym {i}\n" for i in range(3000))
TSV = "ChemicalName\tChemicalID\tSynonyms\n" + "".join(
    f"chem {i}\tD{i:06d}\tsyn {i}|alt {i}\n" for i in range(3000)
)


@pytest.mark.parametrize("kind", ["medic", "tsv.gz"])
def test_dictionary_loading_bar_and_same_entries(tmp_path, capsys, kind):
    if kind == "medic":
        path = tmp_path / "medic.txt"
        path.write_text(MEDIC)
    else:
        path = tmp_path / "chem.tsv.gz"
        with gzip.open(path, "wt") as fh:
            fh.write(TSV)
    shown = load_dictionary(path, show_progress=True)
    err = capsys.readouterr().err
    assert f"loading {path.name}" in err and "100%" in err and "indexing names" in err
    quiet = load_dictionary(path, show_progress=False)
    assert capsys.readouterr().err == ""
    assert (
        shown.entries == quiet.entries
        and shown.names == quiet.names
        and len(shown) == (6000 if kind == "medic" else 9000)
    )


def test_default_follows_the_transformers_switch_and_the_terminal():
    """show=None: hidden off a terminal (pytest's stderr) and whenever transformers' bars are disabled."""
    assert progress(range(3), desc="x").disable  # stderr is not a terminal here
    assert not progress(range(3), desc="x", show=True).disable
    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        assert progress(range(3), desc="x").disable is True
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def test_tfidf_bars_and_same_index(capsys):
    names = [f"name {i} of {i % 7}" for i in range(500)]
    shown = TfidfRetriever(names, show_progress=True)
    idx, _ = shown.topk(["name 3 of 3"], 2)
    err = capsys.readouterr().err
    assert "TF-IDF index" in err and "500/500" in err and "TF-IDF top-k" in err
    quiet = TfidfRetriever(names, show_progress=False)
    assert (shown.matrix != quiet.matrix).nnz == 0
    assert idx[0, 0] == 3
    assert capsys.readouterr().err == ""


def test_stream_logs_one_line_per_task_boundary(tmp_path, caplog):
    from hf_continual.stream import run_stream
    from hf_continual.toy import tiny_bert, toy_config, toy_stream

    caplog.set_level(logging.INFO, logger="hf_continual.stream")
    tasks = toy_stream(n_train=16, n_eval=8)[:2]
    args = toy_config(
        str(tmp_path), "ewc", num_train_epochs=1, per_device_train_batch_size=8, fisher_num_samples=8
    )
    result = run_stream(tiny_bert(0), tasks, args)
    lines = [r.getMessage() for r in caplog.records if r.name == "hf_continual.stream"]
    assert [line.split(":")[0] for line in lines] == ["task 1/2 toy-a", "task 2/2 toy-not-a"]
    tensors, _ = result.trainer.continual_state()
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    assert lines[-1].startswith("task 2/2 toy-not-a: 16 examples, 2 steps, train ")
    assert f"continual state {nbytes} bytes" in lines[-1] and nbytes > 0
