"""ContinualCallback on any Trainer: the same training as ContinualTrainer, state in checkpoints, registry, warnings.

Equality tests compare a plain ``Trainer`` (or a subclass) + ``ContinualCallback`` with ``ContinualTrainer`` on the
toy stream: the parameters after every task (``assert_close`` with rtol 1e-5 / atol 1e-6: the two runs do the same
operations, so only reduction-order rounding may differ) and R, the accuracy matrix (exact: counts of correct
predictions, equal once the parameters agree to that tolerance).
"""

import warnings

import pytest
import torch
from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, Trainer, TrainingArguments
from transformers.trainer_utils import set_seed

from hf_continual import ContinualTrainer
from hf_continual.callbacks import ContinualCallback
from hf_continual.toy import tiny_bert, toy_config, toy_stream

TRAIN = dict(
    use_cpu=True,
    report_to="none",
    num_train_epochs=1,
    per_device_train_batch_size=16,
    learning_rate=2e-3,
    weight_decay=0.01,
    seed=0,
    save_strategy="no",
    logging_strategy="no",
    disable_tqdm=True,
)
METHOD = {
    "ewc": dict(continual_lambda=1e4, fisher_num_samples=32, fisher_batch_size=16),
    "kfac": dict(continual_lambda=1e4, fisher_num_samples=32, fisher_batch_size=16),
    "fish": dict(fish_keep_ratio=0.05, fish_num_samples=32, fisher_batch_size=16),
}


def _tasks():
    return toy_stream(n_train=32, n_eval=32)[:2]


def _row(tasks, model):
    return [t.evaluate(model)["accuracy"] for t in tasks]


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _continual_trainer_run(tmp_path, method):
    tasks = _tasks()
    args = toy_config(str(tmp_path / "ct"), method, **{**TRAIN, **METHOD[method]})
    model = tiny_bert(0)
    trainer = ContinualTrainer(model=model, args=args)
    R, snapshots = [], []
    for task in tasks:
        trainer.train_dataset = task.train_dataset
        trainer.train()
        trainer.end_task(task_name=task.name)
        R.append(_row(tasks, model))
        snapshots.append(_params(model))
    return R, snapshots


def _callback_run(tmp_path, method, trainer_cls=Trainer, reuse=False):
    tasks = _tasks()
    args_cls = Seq2SeqTrainingArguments if issubclass(trainer_cls, Seq2SeqTrainer) else TrainingArguments
    args = args_cls(output_dir=str(tmp_path / "plain"), **TRAIN)
    cb = ContinualCallback(method=method, **METHOD[method])
    model = tiny_bert(0)
    R, snapshots, trainer = [], [], None
    for t, task in enumerate(tasks):
        data = cb.prepare_train_dataset(task.train_dataset)
        if trainer is None or not reuse:
            trainer = trainer_cls(model=model, args=args, train_dataset=data, callbacks=[cb])
        else:
            trainer.train_dataset = data
        set_seed(args.seed + t)  # what ContinualTrainer does per task (a seed of its own)
        trainer.train()
        cb.end_task(model, task.train_dataset, task_name=task.name)
        R.append(_row(tasks, model))
        snapshots.append(_params(model))
    return R, snapshots, cb


def _assert_same_runs(a, b):
    (r_a, s_a), (r_b, s_b) = a, b
    for snap_a, snap_b in zip(s_a, s_b):
        for n in snap_a:
            torch.testing.assert_close(
                snap_a[n], snap_b[n], rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}"
            )
    assert r_a == r_b


@pytest.fixture(scope="module")
def reference_runs(tmp_path_factory):
    """ContinualTrainer on the toy stream, once per method (shared by the tests below)."""
    cache = {}

    def get(method):
        if method not in cache:
            cache[method] = _continual_trainer_run(tmp_path_factory.mktemp(method), method)
        return cache[method]

    return get


@pytest.mark.parametrize("method", ["ewc", "kfac", "fish"])
def test_plain_trainer_with_callback_matches_continual_trainer(tmp_path, reference_runs, method):
    """A new plain Trainer per task + one ContinualCallback = ContinualTrainer (same parameters after each task,
    same R). Both share the penalty path, so this checks what differs: the plain Trainer's FISH mask comes from
    its dataloader and its frozen entries are put back after each step (ContinualTrainer regroups AdamW instead).
    Checked to fail with the callback's on_optimizer_step made a no-op (fish: weight decay moves frozen entries)."""
    R, snaps, cb = _callback_run(tmp_path, method)
    _assert_same_runs(reference_runs(method), (R, snaps))
    assert cb.method.tasks_seen == ["toy-a", "toy-not-a"]


@pytest.mark.parametrize(
    "method, trainer_cls, reuse",
    [("ewc", Trainer, True), ("kfac", Seq2SeqTrainer, False), ("fish", "custom", False)],
)
def test_callback_on_subclasses_and_reused_trainer(tmp_path, reference_runs, method, trainer_cls, reuse):
    """The same equality with one reused Trainer (its optimizer state cleared per task), a Seq2SeqTrainer, and a
    custom subclass that overrides compute_loss (here with the model's own loss, so the numbers must agree).
    Checked to fail with the optimizer-state reset of on_train_begin removed (the reused Trainer's Adam moments then
    carry over into the second task)."""
    if trainer_cls == "custom":

        class CustomLossTrainer(Trainer):
            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                outputs = model(**inputs)
                return (outputs.loss, outputs) if return_outputs else outputs.loss

        trainer_cls = CustomLossTrainer
    R, snaps, _ = _callback_run(tmp_path, method, trainer_cls=trainer_cls, reuse=reuse)
    _assert_same_runs(reference_runs(method), (R, snaps))


def _token_rows(n, seq_len, seed, shift):
    """Token classification: label = (token + shift) % 3 at every real position, -100 on padding."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(4, seq_len + 1, (1,), generator=g))
        ids = torch.randint(10, 40, (length,), generator=g)
        pad = seq_len - length
        labels = torch.cat([(ids + shift) % 3, torch.full((pad,), -100)])
        rows.append(
            {
                "input_ids": torch.cat([ids, torch.zeros(pad, dtype=torch.long)]),
                "attention_mask": torch.cat(
                    [torch.ones(length, dtype=torch.long), torch.zeros(pad, dtype=torch.long)]
                ),
                "labels": labels,
            }
        )
    return rows


@pytest.mark.parametrize("method", ["ewc", "kfac"])
def test_token_classification_through_the_callback(tmp_path, method):
    """BertForTokenClassification (per-token loss, -100 padding) through a plain Trainer: the curvature covers the
    model, the penalty is logged, and a large lambda keeps the second task's parameters nearer the first task's
    anchor than lambda 0 does (fails when apply_gradients adds nothing)."""
    from transformers import BertForTokenClassification

    from hf_continual.toy import tiny_bert_config

    tasks = [_token_rows(32, 10, 0, 0), _token_rows(32, 10, 1, 1)]
    distances = {}
    for lam in (0.0, 1e6):
        torch.manual_seed(0)
        model = BertForTokenClassification(tiny_bert_config(num_labels=3))
        cb = ContinualCallback(
            method=method, continual_lambda=lam, fisher_num_samples=32, fisher_batch_size=16
        )
        args = TrainingArguments(
            output_dir=str(tmp_path / f"{method}-{lam}"),
            **{**TRAIN, "logging_strategy": "steps", "logging_steps": 1},
        )
        for t, data in enumerate(tasks):
            trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[cb])
            trainer.train()
            cb.end_task(model, data, task_name=f"t{t}")
            if t == 0:
                anchor = _params(model)
        covered = set(cb.method.terms[0][1].param_names)
        assert "classifier.weight" in covered and "bert.embeddings.word_embeddings.weight" in covered
        if lam:
            logged = [h["continual_penalty"] for h in trainer.state.log_history if "continual_penalty" in h]
            assert logged and all(v >= 0 for v in logged) and max(logged) > 0
        now = _params(model)
        distances[lam] = sum(float((now[n] - anchor[n]).square().sum()) for n in anchor)
    assert distances[1e6] < 0.5 * distances[0.0], distances


def test_checkpoint_of_a_plain_trainer_carries_the_state_and_resumes(tmp_path):
    """on_save writes the continual state into every checkpoint; a new callback on a resumed Trainer reads it back
    (fails when on_save writes nothing or on_train_begin does not load)."""
    from hf_continual.state import has_state

    tasks = _tasks()
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), **{**TRAIN, "save_strategy": "steps", "save_steps": 2}
    )
    model = tiny_bert(0)
    cb = ContinualCallback(method="ewc", **METHOD["ewc"])
    Trainer(model=model, args=args, train_dataset=tasks[0].train_dataset, callbacks=[cb]).train()
    cb.end_task(model, tasks[0].train_dataset, task_name="toy-a")
    trainer = Trainer(model=model, args=args, train_dataset=tasks[1].train_dataset, callbacks=[cb])
    trainer.train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert has_state(checkpoint)

    fresh_model = tiny_bert(1)
    fresh = ContinualCallback(method="ewc", **METHOD["ewc"])
    resumed = Trainer(model=fresh_model, args=args, train_dataset=tasks[1].train_dataset, callbacks=[fresh])
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert fresh.method.tasks_seen == ["toy-a"]
    for (a_anchor, _), (b_anchor, _) in zip(cb.method.terms, fresh.method.terms):
        for n in a_anchor:
            assert torch.equal(a_anchor[n], b_anchor[n]), n
    for n, p in model.named_parameters():  # the resumed run ends where the uninterrupted one did
        torch.testing.assert_close(p, dict(fresh_model.named_parameters())[n], rtol=1e-5, atol=1e-6)


def test_callback_arguments_are_checked():
    with pytest.raises(TypeError, match="unknown continual field"):
        ContinualCallback(method="ewc", continual_lamda=1.0)
    with pytest.raises(ValueError, match="continual_method"):
        ContinualCallback(method="nope")
    with pytest.raises(TypeError, match="not both"):
        ContinualCallback(config=toy_config("x", "ewc"), method="ewc")


def test_registry_refuses_a_duplicate_name_and_config_follows_it():
    """A second registration under a taken name is an error; config.METHODS is the registry's list."""
    from hf_continual.config import METHODS
    from hf_continual.methods import METHOD_REGISTRY, ContinualMethod, register_method

    class Other(ContinualMethod):
        pass

    with pytest.raises(ValueError, match="already registered"):
        register_method("ewc")(Other)
    assert METHOD_REGISTRY["ewc"].__name__ == "EWC"
    assert set(METHODS) == set(METHOD_REGISTRY)


def test_fields_the_method_does_not_use_are_warned_about():
    with pytest.warns(UserWarning, match="kfac_rank"):
        ContinualCallback(method="ewc", kfac_rank=4)
    with pytest.warns(UserWarning, match="fish_penalty"):
        ContinualCallback(method="kfac", fish_penalty="ewc")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ContinualCallback(method="kfac", kfac_rank=4, continual_lambda=1.0)
        ContinualCallback(
            method="fish", fish_penalty="kfac", kfac_rank=4
        )  # K-FAC fields apply through the penalty


def test_push_to_hub_uploads_the_continual_card_and_state(tmp_path, monkeypatch):
    """push_to_hub sends the continual model card and continual_state.* beside the weights. Offline: the Hub
    client the Trainer calls is replaced by a recorder that copies what would be uploaded (fails without the
    create_model_card override: the README is then the Trainer's own card, with no continual-learning tag)."""
    import json
    import shutil
    from types import SimpleNamespace

    import transformers.trainer as hf_trainer

    from hf_continual.state import STATE_META, STATE_TENSORS

    sent = {}

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            return SimpleNamespace(repo_id=f"me/{repo_id}")

        def upload_folder(self, repo_id, folder_path, ignore_patterns=(), **kwargs):
            sent["repo_id"] = repo_id
            shutil.copytree(folder_path, tmp_path / "sent", ignore=shutil.ignore_patterns(*ignore_patterns))
            return SimpleNamespace(commit_url="offline")

    monkeypatch.setattr(hf_trainer, "hf_api", lambda: FakeApi())
    tasks = _tasks()
    args = toy_config(str(tmp_path / "out"), "ewc", **{**TRAIN, **METHOD["ewc"], "num_train_epochs": 1})
    trainer = ContinualTrainer(model=tiny_bert(0), args=args, train_dataset=tasks[0].train_dataset)
    trainer.train()
    trainer.end_task(task_name="toy-a")
    trainer.push_to_hub()
    out = tmp_path / "sent"
    assert sent["repo_id"] == "me/out"
    assert (out / "model.safetensors").is_file() and (out / STATE_TENSORS).is_file()
    assert json.loads((out / STATE_META).read_text())["method_state"]["tasks_seen"] == ["toy-a"]
    card = (out / "README.md").read_text()
    assert "continual-learning" in card and "toy-a" in card and "load_continual_state" in card
