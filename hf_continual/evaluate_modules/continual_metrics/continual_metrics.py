"""`evaluate` module: continual-learning metrics (ACC, BWT, FWT, forgetting) from an accuracy matrix.

Loaded by path, offline: ``evaluate.load(hf_continual.metrics.evaluate_module_path("continual_metrics"))``.
The computation is :func:`hf_continual.metrics.continual_metrics` (the one implementation); this file only
adapts it to the ``evaluate`` interface. Each row of the accuracy matrix is one input example, so rows can
be added one task at a time with ``add(accuracy_matrix=row)``.
"""

import datasets
import evaluate

from hf_continual.metrics import continual_metrics

_DESCRIPTION = """\
Continual-learning metrics of a task stream from its accuracy matrix R (R[i][j]: score on task j after
training task i) and the starting model's scores b: ACC = mean_j R[T-1][j]; BWT = mean_{j<T-1}
(R[T-1][j] - R[j][j]); FWT = mean_{j>=1} (R[j-1][j] - b[j]); forgetting = mean_{j<T-1}
(max_{l<T-1} R[l][j] - R[T-1][j]). A metric averaging over no task (T = 1), or FWT without b, is None.
"""

_KWARGS_DESCRIPTION = """
Args:
    accuracy_matrix (`list` of `list` of `float`): the T x T matrix R, one row per training stage
        (row i: scores on every task after training task i).
    initial (`list` of `float`, optional): b, the starting model's score on each task (needed for FWT).
Returns:
    acc (`float`), bwt (`float` or None), fwt (`float` or None), forgetting (`float` or None), in the units of R.
Examples:
    >>> metric = evaluate.load("hf_continual/evaluate_modules/continual_metrics")
    >>> metric.compute(accuracy_matrix=[[0.75, 0.25], [0.5, 1.0]], initial=[0.0, 0.5])
    {'acc': 0.75, 'bwt': -0.25, 'fwt': -0.25, 'forgetting': 0.25}
"""

_CITATION = """\
@inproceedings{lopez2017gem,
  title={Gradient Episodic Memory for Continual Learning},
  author={Lopez-Paz, David and Ranzato, Marc'Aurelio},
  booktitle={NeurIPS},
  year={2017}
}
@inproceedings{chaudhry2018riemannian,
  title={Riemannian Walk for Incremental Learning: Understanding Forgetting and Intransigence},
  author={Chaudhry, Arslan and Dokania, Puneet K. and Ajanthan, Thalaiyasingam and Torr, Philip H. S.},
  booktitle={ECCV},
  year={2018}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ContinualMetrics(evaluate.Metric):
    """ACC / BWT / FWT / forgetting of an accuracy matrix (see ``hf_continual.metrics``)."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"accuracy_matrix": datasets.Sequence(datasets.Value("float64"))}),
            reference_urls=["https://arxiv.org/abs/1706.08840", "https://arxiv.org/abs/1801.10112"],
        )

    def _compute(self, accuracy_matrix, initial=None):
        return continual_metrics(accuracy_matrix, initial)
