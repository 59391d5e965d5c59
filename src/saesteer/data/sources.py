"""Where every named data set comes from, pinned: upstream address, sha256 of the bytes the loaders read, licence,
citation; and the one resolution order every loader goes through.

Each named set (``saesteer.data.prompts.NAMED``) lists the files its loader reads, as paths relative to a data root. A file is
either a *verbatim* copy of an upstream file (``sources``: mirrors tried in order, each checked against ``sha256``)
or *converted*: built by a deterministic converter in :mod:`saesteer.data.convert` from upstream inputs (each with its
own sha256 where known), and the result is checked against ``sha256``. The checksums are those of the files in the
development copy (``../shared/data``, see each folder's PROVENANCE.md); the converters were checked to reproduce those
bytes exactly from the originals kept there, except where a file's ``note`` says otherwise.

The addresses themselves could not be probed from the development machine (no internet); a wrong or moved address
fails at fetch time with a checksum or HTTP error, never with silently different data.

Resolution order of a file (:func:`resolve_file`): ``SAESTEER_DATA`` → ``../shared/data`` next to the cwd (or a parent)
or the repository (the development layout) → the user data dir (``platformdirs.user_data_dir("saesteer")/data``,
where ``saesteer data fetch`` writes) → an error naming ``saesteer data fetch NAME``. With ``SAESTEER_FETCH=1`` (or
``fetch=True``) a missing set is fetched into the user data dir on demand instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from saesteer.core import SaesteerError, ensure


# --------------------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class Source:
    """One upstream address: a plain URL, or a file of a Hugging Face repo (downloaded with ``hf_hub_download``)."""

    url: str = ""
    repo_id: str = ""
    filename: str = ""
    revision: str = "main"
    repo_type: str = "dataset"
    member: str = ""
    """Path inside a zip / tar archive at that address (the checksum is then the member's)."""
    note: str = ""

    @property
    def kind(self) -> str:
        return "hf" if self.repo_id else "url"

    def short(self) -> str:
        """A compact form for tables: ``gh:owner/repo@commit7``, ``hf:repo_id@rev`` or the host of a URL."""
        if self.repo_id:
            return f"hf:{self.repo_id}@{self.revision[:7]}"
        gh = "https://raw.githubusercontent.com/"
        if self.url.startswith(gh):
            owner, repo, rev = self.url[len(gh):].split("/")[:3]
            return f"gh:{owner}/{repo}@{rev[:7]}"
        return self.url.split("/")[2] if "://" in self.url else self.url

    def describe(self) -> str:
        s = f"hf://{self.repo_type}s/{self.repo_id}@{self.revision}/{self.filename}" if self.repo_id else self.url
        return s + (f"!{self.member}" if self.member else "")


@dataclass(frozen=True)
class Input:
    """An upstream file a converted file is built from."""

    name: str
    sha256: str | None
    """Checksum of the upstream bytes (None: unknown, only the converted result is checked)."""
    sources: tuple[Source, ...]
    size: int | None = None


@dataclass(frozen=True)
class DataFile:
    """One file a loader reads, relative to the data root."""

    path: str
    sha256: str
    size: int
    sources: tuple[Source, ...] = ()
    """Verbatim copies (mirrors, tried in order)."""
    inputs: tuple[Input, ...] = ()
    convert: str = ""
    """Converter in :mod:`saesteer.data.convert` that turns the inputs' bytes into this file's bytes."""
    note: str = ""

    @property
    def how(self) -> str:
        return "verbatim" if self.sources else "converted" if self.inputs and self.convert else "manual"

    @property
    def fetchable(self) -> bool:
        return self.how != "manual"

    def describe(self) -> str:
        if self.sources:
            return self.sources[0].describe()
        if self.inputs:
            return f"{self.convert}(" + ", ".join(i.sources[0].describe() for i in self.inputs if i.sources) + ")"
        return "(no automatic source)"


@dataclass(frozen=True)
class DataSet:
    """A named set: what it is, the files its loader reads, licence and citation."""

    name: str
    description: str
    files: tuple[DataFile, ...]
    licence: str
    citation: str
    homepage: str = ""
    note: str = ""
    aliases: tuple[str, ...] = field(default=())

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def fetchable(self) -> bool:
        return all(f.fetchable for f in self.files)

    @property
    def source(self) -> str:
        return "; ".join(dict.fromkeys(f.describe() for f in self.files))

    @property
    def short_source(self) -> str:
        """Compact origin(s) of the set's files, with how they are made (verbatim / converted / manual)."""
        parts = []
        for f in self.files:
            srcs = f.sources or tuple(i.sources[0] for i in f.inputs if i.sources)
            parts.append(", ".join(dict.fromkeys(s.short() for s in srcs)) + ("" if f.how == "verbatim" else f" ({f.how})"))
        return "; ".join(dict.fromkeys(parts))


# --------------------------------------------------------------------------------------------- registry
def _gh(repo: str, commit: str, path: str, note: str = "") -> Source:
    return Source(url=f"https://raw.githubusercontent.com/{repo}/{commit}/{path}", note=note)


def _hf(repo_id: str, filename: str, revision: str = "main", note: str = "") -> Source:
    return Source(repo_id=repo_id, filename=filename, revision=revision, note=note)


_RD = ("andyrdt/refusal_direction", "9d852fae1a9121c78b29142de733cb1340770cc3")
_HH = ("anthropics/hh-rlhf", "354e5c3cb8960630860dd5774a6ac2a58313bf4d")
_EASY = ("DaehanKim/EasyRLHF", "45eccb72ddb8c18aa52dc2a184516380e06582fe")
_TQA = ("SimarBhatiaSB7/TruthX", "9f9e3d00dd0114d8adda7a86757f01671be59d5f")
_GSM = ("openai/grade-school-math", "3101c7d5072418e28b9008a6636bde82a006892c")
_ARC = ("zhouqb/order_dependency_problem", "c78952c019f7b3fe3c2c14a1dfc7eaeed2efee48")
_UNPINNED = "revision 'main' is not pinned (no commit recorded); the checksum still pins the bytes"
_PYRIT_WHEEL = "https://files.pythonhosted.org/packages/py3/p/pyrit/pyrit-1.1.0-py3-none-any.whl"
_PYRIT_TAG = "v1.1.0 tag name assumed (the data were taken from the pyrit 1.1.0 wheel)"


_XSTEST_COMPLETIONS = (  # model -> sha256, size of model_completions/xstest_v2_completions_<model>.csv
    ("gpt4", "71af323af8ecdec0efae23992317721441d2cfedddedeef3248f842f4e15c9ca", 259111),
    ("llama2new", "6365cc55ce0a593c7ab8785853d02784be027d97199d4077912b4313cd010099", 517476),
    ("llama2orig", "cbc52550e8ba8197a3e3d97a5af078d27bae4766737cd62df80270126a87ffc6", 470900),
    ("mistralguard", "0ac03817b65e019a8f5b4b3eed805086f9f7fafe538ac9ebd156f80210af6903", 303726),
    ("mistralinstruct", "6a146b65a5b96ec8249729bc2db459697175125998d7cbbcc88f7688ecf31dad", 371935),
)


def _hh_input(subset: str, sha: str, size: int, carrier: Source) -> Input:
    return Input(f"{subset}/test.jsonl.gz", sha, (carrier, _hf("Anthropic/hh-rlhf", f"{subset}/test.jsonl.gz", note=_UNPINNED)),
                 size)


_SETS: list[DataSet] = [
    DataSet(
        "xstest", "XSTest v2: 250 safe prompts that look unsafe + 200 unsafe contrasts (exaggerated safety)",
        (DataFile("xstest/xstest_prompts.jsonl", "23dc53a12ff4d6360adcc5a41768944758a58027886f1edc95da9cc661256969", 80267,
                  inputs=(Input("xstest_prompts.csv", "11783fb294ed017473ee53c207d71f2161c7672c8d0b037501e78387f801cb5a",
                                (_gh("paul-rottger/exaggerated-safety", "d7bb5bd738c1fcbc36edd83d5e7d1b71a3e2d84d",
                                     "xstest_prompts.csv"),), 38719),),
                  convert="xstest"),),
        "CC-BY-4.0",
        "Röttger et al. 2024, XSTest: A Test Suite for Identifying Exaggerated Safety Behaviours in Large Language "
        "Models, NAACL 2024",
        "https://github.com/paul-rottger/exaggerated-safety", aliases=("xstest-safe", "xstest-unsafe"),
    ),
    DataSet(
        "xstest-completions", "XSTest v2 model completions: 5 × 450 answers (GPT-4, Llama-2-70b-chat ×2, Mistral-7B ×2) "
        "with human refusal labels (the logit judge's calibration set)",
        tuple(DataFile(f"xstest/model_completions/xstest_v2_completions_{m}.csv", sha, size,
                       sources=(_gh("paul-rottger/exaggerated-safety", "d7bb5bd738c1fcbc36edd83d5e7d1b71a3e2d84d",
                                    f"model_completions/xstest_v2_completions_{m}.csv"),))
              for m, sha, size in _XSTEST_COMPLETIONS),
        "labels CC-BY-4.0; the completions are subject to the original models' licences (Llama 2, Mistral, OpenAI terms)",
        "Röttger et al. 2024, XSTest: A Test Suite for Identifying Exaggerated Safety Behaviours in Large Language "
        "Models, NAACL 2024",
        "https://github.com/paul-rottger/exaggerated-safety",
    ),
    DataSet(
        "advbench", "AdvBench harmful behaviors (520 instructions with affirmative targets)",
        (DataFile("advbench/advbench.jsonl", "371b344af823d91bd9cfd5479bd5333fa61f5e472fbec23ec6362bad8ba7e668", 120975,
                  inputs=(Input("harmful_behaviors.csv", "6cd1a5c63c07610d7eb67307772ee5606017ee950b5770ab288a2c487489d3e1",
                                (_gh(*_RD, "dataset/raw/advbench.csv"),
                                 _gh("llm-attacks/llm-attacks", "main", "data/advbench/harmful_behaviors.csv",
                                     note=_UNPINNED)), 82125),),
                  convert="advbench"),),
        "MIT",
        "Zou et al. 2023, Universal and Transferable Adversarial Attacks on Aligned Language Models, arXiv:2307.15043",
        "https://github.com/llm-attacks/llm-attacks",
    ),
    DataSet(
        "jbb", "JailbreakBench JBB-Behaviors: 100 harmful + 100 benign topical twins",
        (DataFile("jailbreakbench/jbb_behaviors.jsonl", "65b33e7244cea9ca240293207c6d0ab3c056b737d92d172b20f2c8fb92b23094",
                  62667,
                  inputs=(Input("harmful-behaviors.csv", "45e9a8923b28f547bb372fbaa9af7df8b38c818a80ae50c3bab97704197ff516",
                                (_gh(*_RD, "dataset/raw/jailbreakbench.csv"),), 23111),
                          Input("benign-behaviors.csv", "c0958ac974fb6629527aeff6c81c88154a877190d07313ac377d36951fde5d3e",
                                (_gh("Baisayan/hack", "2b37da1c255e43e16a74ecd3e51c99ea992b5237",
                                     "data/benign-behaviors.csv"),), 20570)),
                  convert="jbb",
                  note="canonical copy: HF JailbreakBench/JBB-Behaviors data/*.csv (different header bytes, so not "
                       "used as a checksummed source)"),),
        "MIT",
        "Chao et al. 2024, JailbreakBench: An Open Robustness Benchmark for Jailbreaking Large Language Models, "
        "NeurIPS 2024 Datasets and Benchmarks",
        "https://huggingface.co/datasets/JailbreakBench/JBB-Behaviors", aliases=("jbb-harmful", "jbb-benign"),
    ),
    *[
        DataSet(
            f"arditi-{kind}",
            f"Arditi et al. {kind} instruction splits (train / val / test)",
            tuple(DataFile(f"refusal_direction_splits/{kind}_{s}.json", sha, size,
                           sources=(_gh(*_RD, f"dataset/splits/{kind}_{s}.json"),))
                  for s, sha, size in rows),
            licence,
            "Arditi et al. 2024, Refusal in Language Models Is Mediated by a Single Direction, NeurIPS 2024",
            "https://github.com/andyrdt/refusal_direction", note=note,
        )
        for kind, rows, licence, note in [
            ("harmful", [("train", "8f5c0eac0efd2a7f99084bbe8d0de2c465e31b1997184783c917969d9de9ece1", 34613),
                         ("val", "305f1d1e6dfa6c50a32d24a18ef815f42b5441eb83e6d7767d242107162fd9f4", 6763),
                         ("test", "5e12ae102c3791dee083a69ab6269a78e033411c629bc3f66f75d2fde196d9ef", 115743)],
             "Apache-2.0 (repo); items from AdvBench/HarmBench/JailbreakBench/StrongREJECT (MIT), MaliciousInstruct, TDC2023",
             ""),
            ("harmless", [("train", "86623b1f8a25aa35df153fc97a556dbcebb6a7c881538ae43ee479ca17f2e002", 2344466),
                          ("val", "772010758e7d771ef4c7e5e4acdfd7598dcece1a6f383f20d382f640913a2a4d", 780532),
                          ("test", "1b5930ce5e855ada758b3116ce7c4aaea9b9d05f8cdd77b385511d4c84173b19", 783466)],
             "CC-BY-NC-4.0 (Stanford Alpaca instructions; repo Apache-2.0)", "non-commercial: Alpaca data licence"),
        ]
    ],
    DataSet(
        "hh-harmless", "Anthropic HH-RLHF harmless-base test: multi-turn red-team conversations, chosen/rejected",
        (DataFile("hh_rlhf_harmless/harmless_base_test.jsonl",
                  "a7e6278c72619a9ee5dbccfad5ba7b0bc581df59926b1105a1a274ea51cf5446", 2387437,
                  inputs=(_hh_input("harmless-base", "ebfaaed21162a4de120ae85366075b34425e2a6303fac59b99555002f7016f03",
                                    742801, _gh(*_HH, "harmless-base/test.jsonl.gz")),),
                  convert="hh_harmless"),),
        "MIT",
        "Bai et al. 2022, Training a Helpful and Harmless Assistant with Reinforcement Learning from Human Feedback, "
        "arXiv:2204.05862",
        "https://huggingface.co/datasets/Anthropic/hh-rlhf",
    ),
    DataSet(
        "hh-helpful", "Anthropic HH-RLHF helpful test splits as chat conversations (chosen replies)",
        (DataFile("hh_rlhf_helpful/hh_helpful_test_chosen.jsonl",
                  "bf15e26c028c3f3fa7a5453bbbacd5ceb2c0506a7a91e2f3bbe2dbb8b1993c39", 7969795,
                  inputs=tuple(_hh_input(sub, sha, size, _gh(*_EASY, f"data/{sub}/test.jsonl.gz")) for sub, sha, size in [
                      ("helpful-base", "8be3fc1a13b27901631696f2be6f184c799f1baeaf145f53ac5db24960adc37b", 875191),
                      ("helpful-online", "2094b210af6b2a792b1169d2930586c4b4b384d3b8a4a14460702d383c17df7f", 1052826),
                      ("helpful-rejection-sampled", "6186fc698c638dd5c6bbb33e0c115762d6fdfac0a18969ff4901545307f89a54",
                       1361747)]),
                  convert="hh_helpful"),),
        "MIT",
        "Bai et al. 2022, Training a Helpful and Harmless Assistant with Reinforcement Learning from Human Feedback, "
        "arXiv:2204.05862",
        "https://huggingface.co/datasets/Anthropic/hh-rlhf",
    ),
    DataSet(
        "wikipedia", "English Wikipedia sample (3,205 WikiExtractor articles, ~6.8M characters)",
        (DataFile("wikipedia_en_sample/enwiki_sample.jsonl",
                  "a46b810e7c4aec574e3caa14dfd72649934a4105438a9406cd72bbdd2040fff0", 7350884,
                  inputs=tuple(Input(f"text/AA/wiki_{k:02d}", None,
                                     (_gh("Vibhas-hs-edu/WikiTasks", "52b1f163137bc40b0f67cbf129d5dab4f6fd5901",
                                          f"text/AA/wiki_{k:02d}"),)) for k in range(0, 64, 8)),
                  note="manual: the conversion (stub filter, newline collapsing) is not reproduced by a converter yet, "
                       "and the 8 source files are not kept locally; copy the file into the data dir by hand"),),
        "CC-BY-SA-3.0 / CC-BY-SA-4.0 (Wikipedia text; also GFDL)",
        "Wikipedia contributors, English Wikipedia (partial dump, WikiExtractor output via Vibhas-hs-edu/WikiTasks)",
        "https://github.com/Vibhas-hs-edu/WikiTasks",
    ),
    DataSet(
        "wikitext2", "WikiText-2 raw test split (perplexity corpus, 60 articles)",
        (DataFile("wikitext2_raw_test/wiki.test.raw", "4f3e427e4aff23acff917a8a51aeae21bf12832256e26914c8fc250dcef4103c",
                  1290547, sources=(_gh("Tylogi/TyloQuant", "7989d038b13ca737da11a95fb90e77ae059f33c0",
                                        "data/wikitext-2-raw/wiki.test.raw"),),
                  note="byte-for-byte the ordered test split of HF Salesforce/wikitext wikitext-2-raw-v1 (which the "
                       "hub serves as parquet only)"),),
        "CC-BY-SA-3.0 (and GFDL)",
        "Merity et al. 2016, Pointer Sentinel Mixture Models, arXiv:1609.07843",
        "https://huggingface.co/datasets/Salesforce/wikitext",
    ),
    DataSet(
        "gsm8k", "GSM8K grade-school math (test 1,319; train 7,473 for few-shot exemplars)",
        tuple(DataFile(f"gsm8k/{s}.jsonl", sha, size, sources=(_gh(*_GSM, f"grade_school_math/data/{s}.jsonl"),))
              for s, sha, size in [("test", "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14", 749738),
                                   ("train", "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465", 4166206)]),
        "MIT",
        "Cobbe et al. 2021, Training Verifiers to Solve Math Word Problems, arXiv:2110.14168",
        "https://github.com/openai/grade-school-math",
    ),
    DataSet(
        "truthfulqa", "TruthfulQA (817 questions): generation fields and MC1/MC2 targets",
        (DataFile("truthfulqa/truthfulqa_generation.jsonl",
                  "896e105249c686c390103efa22db66dd572fb8b65d3c0b725bebc2bb8119d79d", 592435,
                  inputs=(Input("TruthfulQA.csv", "967b82fb1fb6274e4971c6c80caa9d04f844c512b1033c146f26c78270cd384b",
                                (_gh(*_TQA, "TruthfulQA/TruthfulQA.csv"),
                                 _gh("sylinrl/TruthfulQA", "main", "TruthfulQA.csv", note=_UNPINNED)), 477048),),
                  convert="truthfulqa_generation"),
         DataFile("truthfulqa/truthfulqa_mc.jsonl", "4fdfaaab4a23493715dca66cb3b825e21f2c57a315a7760e4763d7fc2517e21c",
                  717499,
                  inputs=(Input("mc_task.json", "75b84d5cc8f0e287c055db1857808e734ea53ade8ee68aad2d007f38896330a8",
                                (_gh(*_TQA, "TruthfulQA/data/mc_task.json"),
                                 _gh("sylinrl/TruthfulQA", "main", "data/mc_task.json", note=_UNPINNED)), 771566),),
                  convert="truthfulqa_mc")),
        "Apache-2.0",
        "Lin, Hilton, Evans 2022, TruthfulQA: Measuring How Models Mimic Human Falsehoods, ACL 2022",
        "https://github.com/sylinrl/TruthfulQA",
    ),
    DataSet(
        "mmlu", "MMLU, 57 subjects: test 14,042 questions, dev 285 few-shot exemplars",
        tuple(DataFile(f"mmlu/mmlu_{s}.jsonl", sha, size,
                       inputs=(Input("data.tar", None, (Source(url="https://people.eecs.berkeley.edu/~hendrycks/data.tar"),)),),
                       convert=f"mmlu_{s}",
                       note="converter written from PROVENANCE (rows of data/<split>/<subject>_<split>.csv, subjects "
                            "sorted) but not checked against data.tar offline; the sha256 check decides")
              for s, sha, size in [("test", "a96421579531ccd5bffcc465dc3e46cdfc29f70fc74da0e8881420377782fa9c", 8254251),
                                   ("dev", "845e0333dcf1c2f44d27fc3f1b44b9ae8ecfd21250c27007812220c29040c172", 152162)]),
        "MIT",
        "Hendrycks et al. 2021, Measuring Massive Multitask Language Understanding, ICLR 2021",
        "https://github.com/hendrycks/test",
    ),
    DataSet(
        "arc", "ARC-Challenge test (1,150 of 1,172) and dev (294 of 299), letter-labelled rows only",
        tuple(DataFile(f"arc_challenge/ARC-Challenge-{s}.jsonl", sha, size,
                       sources=(_gh(*_ARC, f"data/arc/ARC-Challenge-{s}.jsonl"),))
              for s, sha, size in [("Test", "edfac2380c22134a5f0cf78c61459ba76aa3299d7be0df0420cb1a340d3c2096", 484168),
                                   ("Dev", "6606c063fc6c3b0a03fc298d0f31c0af72a615471a711316befbd99d746d926c", 124457)]),
        "CC-BY-SA-4.0",
        "Clark et al. 2018, Think you have Solved Question Answering? Try ARC, the AI2 Reasoning Challenge, "
        "arXiv:1803.05457",
        "https://allenai.org/data/arc",
    ),
    DataSet(
        "mt-bench", "MT-Bench: 80 two-turn questions in 8 categories",
        (DataFile("mt_bench/question.jsonl", "119565adbab82227089cefdb44c8d7e2cf04dc0a0ec233634c82e7d4e2a944f7", 48929,
                  sources=(_gh("lm-sys/FastChat", "0e6d3e4beaab66f4d3f93db72541a4abab8af28d",
                               "fastchat/llm_judge/data/mt_bench/question.jsonl"),)),),
        "Apache-2.0",
        "Zheng et al. 2023, Judging LLM-as-a-Judge with MT-Bench and Chatbot Arena, NeurIPS 2023 Datasets and Benchmarks",
        "https://github.com/lm-sys/FastChat",
    ),
    DataSet(
        "pyrit-refusal", "PyRIT refusal-scorer eval: 169 human-labelled refusal / non-refusal responses",
        (DataFile("pyrit_refusal_eval/refusal_eval.jsonl",
                  "298cccabddd7469911abc66ba0b05034d89f27657a118b5b772b5c41b8f74f23", 204027,
                  inputs=tuple(
                      Input(name, sha, (_gh("Azure/PyRIT", "v1.1.0", f"pyrit/datasets/scorer_evals/refusal_scorer/{name}",
                                            note=_PYRIT_TAG),
                                        Source(url=_PYRIT_WHEEL, member=f"pyrit/datasets/scorer_evals/refusal_scorer/{name}")),
                            size)
                      for name, sha, size in [
                          ("refusal.csv", "1ebc42ef7dadd97962cc00d04edd6a52a321f7936c063ff3453d2bbcef30a5d7", 103694),
                          ("refusal_extra.csv", "6ce7f61a8205eb8c29b1a247b52b3730501349f9adf0674a696efb004658a18a", 83630)]),
                  convert="pyrit_refusal"),),
        "MIT",
        "Microsoft, PyRIT: Python Risk Identification Tool for generative AI, v1.1.0 (Munoz et al. 2024, arXiv:2410.02828)",
        "https://github.com/Azure/PyRIT",
    ),
]

REGISTRY: dict[str, DataSet] = {s.name: s for s in _SETS}
ALIASES: dict[str, str] = {a: s.name for s in _SETS for a in s.aliases}


def get_set(name: str) -> DataSet:
    """The registry entry of a named set (aliases such as ``jbb-harmful`` or ``xstest-safe`` accepted)."""
    base = name.split(":", 1)[0]
    base = ALIASES.get(base, base)
    if base not in REGISTRY:
        raise SaesteerError(f"unknown data set {name!r}; known: {', '.join([*REGISTRY, *ALIASES])}")
    return REGISTRY[base]


def set_for_path(rel: str) -> DataSet | None:
    """The set that owns the file ``rel`` (relative to the data root), or None."""
    rel = Path(rel).as_posix()
    return next((s for s in REGISTRY.values() if any(f.path == rel for f in s.files)), None)


# --------------------------------------------------------------------------------------------- resolution
def user_data_dir() -> Path:
    """Where ``saesteer data fetch`` writes by default: ``platformdirs.user_data_dir("saesteer")/data``."""
    import platformdirs

    return Path(platformdirs.user_data_dir("saesteer")) / "data"


def dev_data_root() -> Path | None:
    """``../shared/data`` relative to the cwd (or a parent) or to the repository: the development layout."""
    repo = Path(__file__).resolve().parents[2]
    for base in [Path.cwd(), *Path.cwd().parents, repo]:
        cand = base.parent / "shared" / "data"
        if cand.is_dir():
            return cand
    return None


def search_roots() -> list[tuple[str, Path]]:
    """``(origin, folder)`` in resolution order: ``SAESTEER_DATA``, the development layout, the user data dir."""
    roots: list[tuple[str, Path]] = []
    env = os.environ.get("SAESTEER_DATA")
    if env:
        p = Path(env).expanduser()
        ensure(p.is_dir(), f"SAESTEER_DATA={env} is not a directory")
        roots.append(("SAESTEER_DATA", p))
    dev = dev_data_root()
    if dev is not None:
        roots.append(("dev", dev))
    roots.append(("user", user_data_dir()))
    return roots


def find_file(rel: str) -> tuple[str, Path] | None:
    """``(origin, path)`` of the first root holding ``rel``, or None."""
    for origin, root in search_roots():
        p = root / rel
        if p.is_file():
            return origin, p
    return None


def set_location(name: str) -> tuple[str, Path] | None:
    """``(origin, root)`` where every file of the set is present (the first such root), or None."""
    ds = get_set(name)
    for origin, root in search_roots():
        if all((root / f.path).is_file() for f in ds.files):
            return origin, root
    return None


def list_sets() -> list[dict]:
    """One row per named set for ``saesteer data list``: source, licence, size, sha256 per file, where present."""
    rows = []
    for ds in REGISTRY.values():
        loc = set_location(ds.name)
        rows.append({
            "name": ds.name, "aliases": list(ds.aliases), "description": ds.description, "licence": ds.licence,
            "citation": ds.citation, "homepage": ds.homepage, "size": ds.size, "fetchable": ds.fetchable,
            "present": loc is not None, "where": f"{loc[0]}:{loc[1]}" if loc else None, "source": ds.source,
            "short_source": ds.short_source,
            "files": [{"path": f.path, "sha256": f.sha256, "size": f.size, "how": f.how, "source": f.describe(),
                       "mirrors": [s.describe() for s in f.sources] or
                       [[s.describe() for s in i.sources] for i in f.inputs],
                       "note": f.note} for f in ds.files],
        })
    return rows
