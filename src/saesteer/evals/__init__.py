"""Evaluations: refusal and over-refusal, judges, broken (incoherent) answers, multi-turn attacks, capability tasks
and the lm-eval model.
"""

from .broken import BrokenConfig, label_broken, outcome_rates, repeat_fraction, robust_threshold  # noqa: F401
from .calibration import balanced_accuracy, fit_threshold, roc_auc, split_by_prompt  # noqa: F401
from .capability import (  # noqa: F401
    GENERATIVE_TASKS,
    GSM8K_FLEX,
    GSM8K_STOP,
    GSM8K_STRICT,
    PUBLISHED,
    TASKS,
    CapabilityConfig,
    extract_code,
    gsm8k_chat_extract,
    gsm8k_correct,
    gsm8k_extract,
    humaneval_pass,
    humaneval_program,
    mean_summary,
    mmlu_chat_extract,
    run_capability,
    steering_context,
    write_capability,
)
from .judges import (  # noqa: F401
    JUDGE_SYSTEM,
    WILDGUARD_FORMAT,
    ChatBackend,
    ClassifierJudge,
    HFBackend,
    Judge,
    ModelJudge,
    OpenAIBackend,
    PrefixJudge,
    Verdict,
    agreement,
    cohen_kappa,
    judge_chat_texts,
    judge_messages,
    load_human_labels,
    make_judge,
    normalize_answer,
    parse_label,
    parse_wildguard,
    register_judge_kind,
)
from .logitjudge import LogitJudge, calibrate, read_calibration  # noqa: F401  (registers the judge kind ``logit``)
from .loglik import (  # noqa: F401
    count_sequences,
    encode_pair,
    loglikelihoods,
    max_length,
    plan,
)
from .multiturn import (  # noqa: F401
    ATTACKER_SYSTEM,
    SUCCESS_SYSTEM,
    MultiTurnConfig,
    crescendo_batch,
    crescendo_one,
    parse_attacker,
    parse_score,
    run_crescendo,
    run_replay,
    summarize_crescendo,
    summarize_replay,
    user_turns,
)
from .probejudge import ProbeJudge  # noqa: F401  (importing it registers the judge kind ``probe``)
from .refusal import (  # noqa: F401
    RefusalEvalConfig,
    generate_answers,
    load_subsets,
    rate_over_decided,
    refusal_rate,
    run_refusal_eval,
    summarize,
    user_text,
    verdict_stability,
    write_results,
)
from .sandbox import SandboxLimits, SandboxResult, available_isolation, run_many, run_python  # noqa: F401
