"""Data: every named prompt set and corpus (with its public upstream), the SAE training chat mix, and the loaders of
the benchmark files the capability evals read.
"""

from .benchmarks import (  # noqa: F401
    GSM8K_CHAT_INSTRUCTION,
    HUMANEVAL_CHAT_INSTRUCTION,
    LETTERS,
    MMLU_CHAT_INSTRUCTION,
    TQA_PRIMER,
    humaneval_path,
    load_gsm8k,
    load_gsm8k_chat,
    load_humaneval,
    load_mmlu,
    load_mmlu_chat,
    load_truthfulqa,
    mmlu_prompt,
    read_jsonl,
    stratified_sample,
)
from .chatmix import MixDoc, chat_mix  # noqa: F401
from .fetch import FetchResult, fetch_on_demand, fetch_sets, resolve_file  # noqa: F401
from .prompts import (  # noqa: F401
    PromptItem,
    data_root,
    item_text,
    load_prompts,
    load_texts,
    read_rows,
    rows_to_items,
)
from .sources import (  # noqa: F401
    REGISTRY,
    DataSet,
    find_file,
    get_set,
    list_sets,
    search_roots,
    user_data_dir,
)
from .spread import by_reference, embedded  # noqa: F401  (also registers turns:<spec> / embedded:<spec>)
