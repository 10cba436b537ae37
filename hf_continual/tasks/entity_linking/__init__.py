"""Medical entity linking (DESIGN.md "Medical entity linking"): PubTator corpora, concept dictionaries,
a TF-IDF retriever, a dual-encoder ``PreTrainedModel`` and stream tasks built from them."""

from .abbrev import abbreviation_map, add_query_column, expand_mention
from .data import TENSOR_COLUMNS, DualEncoderCollator, build_training_examples
from .dictionary import (
    Dictionary,
    DictionaryEntry,
    iter_medic_entries,
    iter_tsv_entries,
    load_dictionary,
    normalize_name,
)
from .errors import DataFormatError, DictionaryFormatError, PubTatorFormatError
from .evaluation import RetrievalEvaluator, accuracy_at_k, model_fingerprint
from .model import DualEncoderConfig, DualEncoderModel, DualEncoderOutput
from .pubtator import (
    MESH_OMIM_ID_RULES,
    IdRules,
    PubTatorDocument,
    PubTatorMention,
    documents_to_dataset,
    iter_text_lines,
    load_pubtator_mentions,
    normalize_concept_id,
    parse_pubtator_lines,
    read_pubtator,
    split_concept_ids,
)
from .retriever import TfidfRetriever
from .tasks import (
    TASK_REGISTRY,
    CorpusSpec,
    DictionarySpec,
    EntityLinkingTask,
    build_entity_linking_task,
    cached_dictionary,
    cached_retriever,
    default_data_dir,
    resolve_corpus,
)

__all__ = [
    "MESH_OMIM_ID_RULES",
    "TASK_REGISTRY",
    "TENSOR_COLUMNS",
    "CorpusSpec",
    "DataFormatError",
    "Dictionary",
    "DictionaryEntry",
    "DictionaryFormatError",
    "DictionarySpec",
    "DualEncoderCollator",
    "DualEncoderConfig",
    "DualEncoderModel",
    "DualEncoderOutput",
    "EntityLinkingTask",
    "IdRules",
    "PubTatorDocument",
    "PubTatorFormatError",
    "PubTatorMention",
    "RetrievalEvaluator",
    "TfidfRetriever",
    "abbreviation_map",
    "accuracy_at_k",
    "add_query_column",
    "build_entity_linking_task",
    "build_training_examples",
    "cached_dictionary",
    "cached_retriever",
    "default_data_dir",
    "documents_to_dataset",
    "expand_mention",
    "iter_medic_entries",
    "iter_text_lines",
    "iter_tsv_entries",
    "load_dictionary",
    "load_pubtator_mentions",
    "model_fingerprint",
    "normalize_concept_id",
    "normalize_name",
    "parse_pubtator_lines",
    "read_pubtator",
    "resolve_corpus",
    "split_concept_ids",
]
