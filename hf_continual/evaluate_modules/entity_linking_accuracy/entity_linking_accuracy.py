"""`evaluate` module: entity-linking acc@k over ranked candidate concepts.

Loaded by path, offline:
``evaluate.load(hf_continual.metrics.evaluate_module_path("entity_linking_accuracy"))``. The computation is
:func:`hf_continual.tasks.entity_linking.evaluation.accuracy_at_k` (the one implementation); this file only
adapts it to the ``evaluate`` interface.
"""

import datasets
import evaluate

from hf_continual.tasks.entity_linking.evaluation import accuracy_at_k

_DESCRIPTION = """\
acc@k of entity linking: a mention is correct at k when one of the first k distinct concepts among its
ranked candidates carries one of its gold ids. A candidate is a concept id or a list of ids (the id set of a
dictionary name); candidates with the same id set count once, so synonyms of one concept take one rank.
Mentions without a gold id stay in the denominator as errors.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list`): per mention, its candidates best first; a candidate is an id (`str`) or a
        list of ids (`list` of `str`, e.g. the ids of a name shared by several concepts).
    references (`list` of `list` of `str`): per mention, its gold ids (any of them counts; empty: unlinkable).
    k (`list` of `int`, optional, defaults to `[1, 5]`): the cut-offs.
Returns:
    `acc@k` (`float`, fraction of mentions correct at k) and `correct@k` (`float`, their number) for each k.
Examples:
    >>> metric = evaluate.load("hf_continual/evaluate_modules/entity_linking_accuracy")
    >>> metric.compute(predictions=[["D1", "D2"], ["D3", "D2"]], references=[["D2"], ["D3"]], k=[1, 2])
    {'acc@1': 0.5, 'correct@1': 1.0, 'acc@2': 1.0, 'correct@2': 2.0}
"""

_CITATION = """\
@inproceedings{sung2020biosyn,
  title={Biomedical Entity Representations with Synonym Marginalization},
  author={Sung, Mujeen and Jeon, Hwisang and Lee, Jinhyuk and Kang, Jaewoo},
  booktitle={ACL},
  year={2020}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class EntityLinkingAccuracy(evaluate.Metric):
    """acc@k of ranked concept candidates (see ``hf_continual.tasks.entity_linking.evaluation``)."""

    def _info(self) -> evaluate.MetricInfo:
        references = datasets.Sequence(datasets.Value("string"))
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features(
                    {
                        "predictions": datasets.Sequence(datasets.Sequence(datasets.Value("string"))),
                        "references": references,
                    }
                ),
                datasets.Features(
                    {"predictions": datasets.Sequence(datasets.Value("string")), "references": references}
                ),
            ],
            reference_urls=["https://arxiv.org/abs/2005.00239"],
        )

    def _compute(self, predictions, references, k=(1, 5)):
        candidates = [[c] if isinstance(c, str) else list(c) for ranked in predictions for c in ranked]
        ranked, start = [], 0
        for row in predictions:
            ranked.append(range(start, start + len(row)))
            start += len(row)
        return accuracy_at_k(ranked, candidates, references, ks=k)
