"""Configuration dataclasses. Every knob lives here, validated once, at construction.

Fields carry help texts in their metadata; ``__post_init__`` checks ranges and cross-field rules and
raises :class:`~dynamiclora.errors.ConfigError` naming the field and the fix. Configs round-trip
through sorted JSON; unknown keys on load warn instead of failing, so that newer states stay loadable.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .errors import ConfigError

#: Tiers from slowest to fastest; this is also the order of an agent's stack.
TIERS: tuple[str, ...] = ("foundation", "domain", "swarm", "agent", "context")
Tier = Literal["foundation", "domain", "swarm", "agent", "context"]


def home_dir() -> Path:
    """Where prepared models live: ``$DYNAMICLORA_HOME``, else ``~/.cache/dynamiclora``."""
    env = os.environ.get("DYNAMICLORA_HOME")
    return Path(env) if env else Path.home() / ".cache" / "dynamiclora"


def _help(text: str) -> dict[str, str]:
    return {"help": text}


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _check_types(obj: Any) -> None:
    """Scalar fields must have the type of their default (an int is accepted where a float is expected)."""
    for f in dataclasses.fields(obj):
        default, value = f.default, getattr(obj, f.name)
        where = f"{type(obj).__name__}.{f.name}"
        if isinstance(default, bool):
            ok, want = isinstance(value, bool), "a bool"
        elif isinstance(default, int):
            ok, want = isinstance(value, int) and not isinstance(value, bool), "an int"
        elif isinstance(default, float):
            ok, want = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
        else:
            continue
        _check(ok, f"{where} must be {want}, got {value!r} ({type(value).__name__})")


@dataclass
class AdapterConfig:
    """Where circuits attach and how the stacked forward pass is computed."""

    target_modules: tuple[str, ...] | None = field(
        default=None,
        metadata=_help(
            "Regular expressions matched (re.search) against module names. None adapts every Linear/Conv1D "
            "inside the transformer blocks, i.e. all linear layers except the output head (PEFT's 'all-linear')."
        ),
    )
    exclude_modules: tuple[str, ...] = field(
        default=(), metadata=_help("Regular expressions of module names never adapted, applied after target_modules.")
    )
    circuit_rank: int = field(
        default=8, metadata=_help("Rank r of a newly spawned circuit (factors B: out×r, A: r×in).")
    )
    merged_tiers: tuple[str, ...] = field(
        default=("foundation", "domain", "swarm"),
        metadata=_help(
            "Tiers folded into a cached effective weight W + ΔW when every row of a batch shares them. "
            "The remaining tiers are applied as concatenated low-rank factors."
        ),
    )
    merge_cache_size: int = field(
        default=4, metadata=_help("How many effective-weight sets (one per distinct merged content) are kept.")
    )
    plan_cache_bytes: int = field(
        default=256 << 20,
        metadata=_help(
            "Bytes of per-row factors that cached batch plans may hold (the most recent plan is always kept)."
        ),
    )
    observe_usage: bool = field(
        default=True, metadata=_help("Record each unmerged circuit's activation ‖A x‖ during every forward.")
    )
    merged_usage_sample_rate: float = field(
        default=0.1, metadata=_help("Fraction of forwards on which circuits of merged tiers are observed too.")
    )

    def __post_init__(self) -> None:
        _check_types(self)
        if self.target_modules is not None:
            self.target_modules = tuple(self.target_modules)
            _check(
                len(self.target_modules) > 0, "AdapterConfig.target_modules is empty; use None for all linear layers"
            )
        self.exclude_modules = tuple(self.exclude_modules)
        self.merged_tiers = tuple(self.merged_tiers)
        _check(self.circuit_rank >= 1, f"AdapterConfig.circuit_rank must be >= 1, got {self.circuit_rank}")
        for tier in self.merged_tiers:
            _check(tier in TIERS, f"AdapterConfig.merged_tiers holds unknown tier {tier!r}; choose from {TIERS}")
        _check(
            "context" not in self.merged_tiers,
            "AdapterConfig.merged_tiers must not contain 'context': it changes on every learn call",
        )
        _check(self.merge_cache_size >= 1, f"AdapterConfig.merge_cache_size must be >= 1, got {self.merge_cache_size}")
        _check(self.plan_cache_bytes >= 0, f"AdapterConfig.plan_cache_bytes must be >= 0, got {self.plan_cache_bytes}")
        _check(
            0.0 <= self.merged_usage_sample_rate <= 1.0,
            f"AdapterConfig.merged_usage_sample_rate must lie in [0, 1], got {self.merged_usage_sample_rate}",
        )


LEARN_VARIANTS = ("chat", "lower")  # the learner's own rewrites of a prompt (LearningConfig.learn_variants)


@dataclass
class LearningConfig:
    """Online learning into the context tier (the only tier with an optimizer)."""

    learning_rate: float = field(default=3e-3, metadata=_help("Adam learning rate of context circuits."))
    steps_per_learn: int = field(default=6, metadata=_help("Gradient steps taken by one learn() call."))
    max_grad_norm: float = field(default=1.0, metadata=_help("Gradient clipping norm; 0 disables clipping."))
    context_capacity: int = field(
        default=16, metadata=_help("Maximum circuits in one context scope; the weakest is dropped when full.")
    )
    attribution_threshold: float = field(
        default=0.92,
        metadata=_help(
            "A learn() call updates the context circuit whose key activation on the input, relative to that key's "
            "activation on the inputs it was made from, is the strongest, if that reaches this; otherwise it "
            "spawns a new circuit. In [0, 1]."
        ),
    )
    train_a: bool = field(
        default=False,
        metadata=_help(
            "Also train the A factors. Off by default: A stays the explained-variance key of the inputs a circuit "
            "was made for (only B learns, as in LoRA-FA), which keeps attribution and usage meaningful."
        ),
    )
    init_from_activations: bool = field(
        default=True,
        metadata=_help(
            "Initialise a new circuit's A rows to the top right-singular vectors of the input activations "
            "(explained-variance init), so that its activation measures how much an input resembles its origin."
        ),
    )

    routing: bool = field(
        default=True,
        metadata=_help(
            "Gate context circuits by their prompts: a circuit acts only on inputs whose route feature lies within "
            "a key's radius of a prompt it learned from (see gates.py). Off: every circuit reaches every input "
            "and attribution uses key activations alone."
        ),
    )
    route_radius: float = field(
        default=0.35,
        metadata=_help(
            "The radius a new gate key gets: how near an input's route feature must be to the key for the circuit to "
            "act on it (and to be attributed the interaction), in units of the base model's reference spread (see "
            "routing.py). Frozen into the gate when the key is made. > 0."
        ),
    )
    route_module: str | None = field(
        default=None,
        metadata=_help(
            "Adapted module whose base-model input is the route feature (averaged over the prompt when pooled). "
            "None: pooled, the first adapted module (normalized token embeddings: no transformer block runs); "
            "tokens, the first adapted module one seventh of the way into the model."
        ),
    )
    route_match: str = field(
        default="pooled",
        metadata=_help(
            "How a gate matches an input (see gates.py): 'pooled' (the prompt's mean feature within a radius of a "
            "key) or 'tokens' (the taught prompt's most distinctive token states matched among the input's "
            "tokens, with a threshold calibrated on the learner's own variants of the prompt)."
        ),
    )
    route_keys: int = field(default=3, metadata=_help("Token gates: distinctive token states per prototype."))
    route_strict: bool = field(
        default=False,
        metadata=_help(
            "Token gates: a new prototype needs every key matched (its score is the keys' lowest match, not their "
            "mean), stored in the gate. At 1,000 fictional names fewer neighbours reach some gate (0.39 -> 0.23); "
            "trained to 100 facts, reworded paraphrases lose some (0.83 -> 0.78; see docs/editing.md)."
        ),
    )
    route_ordered: bool = field(
        default=False,
        metadata=_help(
            "Token gates: a new prototype matches its keys at increasing positions of the input, in the order of "
            "their tokens in the taught prompt, stored in the gate: a text holding a taught name's pieces in "
            "another order (another name made of the same syllables) does not reach it (see docs/editing.md)."
        ),
    )
    exclude_lookalikes: bool = field(
        default=True,
        metadata=_help(
            "Token gates: a new prompt that reaches gates of circuits holding other answers gets a circuit of its own "
            "above their prompts, and (True) those gates are raised above it too, so their circuits no longer act on "
            "it. Halves how many earlier gates a taught prompt reaches at 1,000 facts (see docs/editing.md)."
        ),
    )
    learn_variants: tuple[str, ...] = field(
        default=(),
        metadata=_help(
            "The learner's own rewrites of a plain-text prompt trained beside it, each step: 'chat' (the prompt as a "
            "user's message through the chat template, the completion as the assistant's reply), 'lower' (the "
            "prompt in lower case, where that is other tokens: a name in lower case is other pieces, whose states "
            "the circuit must also answer). Each teaches the pattern for the same request asked that way; each "
            "costs one more forward and backward per step."
        ),
    )
    subject_locality: float = field(
        default=0.0,
        metadata=_help(
            "Token gates: weight of a term that keeps a new circuit out of text about what its fact is about but "
            "asks something else. The learner writes that text itself: the prompt's most distinctive word (what "
            "the gate keys on) in a neutral frame, then the base model's own continuation; each step the "
            "circuit's output there is pulled (KL divergence) towards the stack's output without it. 0: off; "
            "costs one more row in each step's batch."
        ),
    )
    key_background: int = field(
        default=0,
        metadata=_help(
            "Keep a new circuit's key (its A rows) off the top this many principal directions of ordinary text's "
            "inputs to each module (the reference prompts under the base model), rescaled so its largest "
            "activation on its own inputs is theirs: the circuit then acts where what is specific to its pattern "
            "is (a fact's subject), and little on the tokens around it. 0: off (the key is the inputs' top "
            "direction, which every token shares)."
        ),
    )
    circuit_modules: tuple[str, ...] | None = field(
        default=None,
        metadata=_help(
            "Regular expressions (re.search) of the adapted modules a newly learned circuit covers; None: every "
            "adapted module. With AdapterConfig.circuit_rank they set what a learned fact costs (see "
            "docs/editing.md): rank 1 on the MLP down-projections of SmolLM2 is 63 K parameters, against 2.4 M "
            "for rank 8 on every module."
        ),
    )
    circuits_after_route: bool = field(
        default=False,
        metadata=_help(
            "A newly learned circuit covers only modules at or after the route module (of those circuit_modules "
            "names). Nothing learned then changes what the route module sees, and a request routes inside its own "
            "forward instead of a base-model pre-pass of the layers before it (see inline_routing.py)."
        ),
    )

    def __post_init__(self) -> None:
        _check_types(self)
        _check(self.route_radius > 0, f"LearningConfig.route_radius must be > 0, got {self.route_radius}")
        _check(
            self.route_match in ("pooled", "tokens"),
            f"LearningConfig.route_match must be 'pooled' or 'tokens', got {self.route_match!r}",
        )
        _check(
            self.subject_locality >= 0, f"LearningConfig.subject_locality must be >= 0, got {self.subject_locality}"
        )
        _check(self.key_background >= 0, f"LearningConfig.key_background must be >= 0, got {self.key_background}")
        _check(self.route_keys >= 1, f"LearningConfig.route_keys must be >= 1, got {self.route_keys}")
        self.learn_variants = tuple(self.learn_variants)
        _check(
            set(self.learn_variants) <= set(LEARN_VARIANTS),
            f"LearningConfig.learn_variants may hold only {' and '.join(map(repr, LEARN_VARIANTS))}, got "
            f"{self.learn_variants!r}",
        )
        if self.circuit_modules is not None:
            self.circuit_modules = tuple(self.circuit_modules)
            _check(len(self.circuit_modules) > 0, "LearningConfig.circuit_modules is empty; use None for all modules")
        _check(self.learning_rate > 0, f"LearningConfig.learning_rate must be > 0, got {self.learning_rate}")
        _check(self.steps_per_learn >= 1, f"LearningConfig.steps_per_learn must be >= 1, got {self.steps_per_learn}")
        _check(self.max_grad_norm >= 0, f"LearningConfig.max_grad_norm must be >= 0, got {self.max_grad_norm}")
        _check(
            self.context_capacity >= 1, f"LearningConfig.context_capacity must be >= 1, got {self.context_capacity}"
        )
        _check(
            0.0 <= self.attribution_threshold <= 1.0,
            f"LearningConfig.attribution_threshold must lie in [0, 1], got {self.attribution_threshold}",
        )


@dataclass
class GenerationConfig:
    """Decoding parameters; temperature 0 means greedy."""

    max_new_tokens: int = field(default=48, metadata=_help("Tokens to generate at most."))
    temperature: float = field(default=0.0, metadata=_help("0 for greedy decoding, > 0 for sampling."))
    top_k: int = field(default=0, metadata=_help("Sample among the k most likely tokens; 0 disables."))
    top_p: float = field(default=1.0, metadata=_help("Nucleus sampling mass in (0, 1]; 1 disables."))
    stop_at_eos: bool = field(default=True, metadata=_help("Stop a row when it emits the tokenizer's EOS token."))
    seed: int | None = field(
        default=None,
        metadata=_help(
            "Sampling: each row draws from its own generator seeded with this, so a seed names its tokens (alone, "
            "in any batch, cached or not); None: a fresh seed per row from the library's generator."
        ),
    )

    def __post_init__(self) -> None:
        _check_types(self)
        _check(self.max_new_tokens >= 1, f"GenerationConfig.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        _check(self.seed is None or self.seed >= 0, f"GenerationConfig.seed must be None or >= 0, got {self.seed}")
        _check(self.temperature >= 0, f"GenerationConfig.temperature must be >= 0, got {self.temperature}")
        _check(self.top_k >= 0, f"GenerationConfig.top_k must be >= 0, got {self.top_k}")
        _check(0 < self.top_p <= 1, f"GenerationConfig.top_p must lie in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class DynamicsConfig:
    """The memory dynamics run in ticks. Thresholds and decay here are *initial* values: homeostasis adapts them
    per tier, and no tier has a rate or time constant of its own."""

    tick_interval: int = field(
        default=100, metadata=_help("Interactions between automatic ticks (0: only dl.tick()).")
    )
    theta_on: float = field(default=0.5, metadata=_help("Usage u at or above which a circuit becomes SCREENED."))
    theta_off: float = field(default=0.2, metadata=_help("Usage u at or below which a circuit becomes FREE."))
    decay: float = field(default=0.1, metadata=_help("Fraction of strength an unused FREE circuit loses per tick."))
    screened_decay_ratio: float = field(
        default=0.02, metadata=_help("An unused SCREENED circuit decays at this fraction of the FREE decay.")
    )
    strength_step: float = field(
        default=0.7,
        metadata=_help(
            "Decay moves a circuit's scale in discrete steps: its strength is its vigor (which decays every tick) "
            "rounded up to a power of this ratio, so content (and hashes, and the cache entries keyed on them) change "
            "only when a step is crossed, not on every idle tick. In (0, 1)."
        ),
    )
    forget_below: float = field(
        default=0.05,
        metadata=_help(
            "A circuit whose vigor (its strength before rounding to a step) falls below "
            "this is deleted, and its forgetting logged."
        ),
    )
    window_min: int = field(
        default=16,
        metadata=_help("Smallest detector window, in ticks (shorter ones cannot tell recurrence from noise)."),
    )
    window_scale: float = field(
        default=1.0,
        metadata=_help(
            "A detector's window is this many times the measured memory span of the tier it watches (the median "
            "lifetime of what it forgot): persistence means outliving ordinary forgetting."
        ),
    )
    blocks: int = field(default=4, metadata=_help("Sub-windows a usage window is cut into to measure coverage."))
    min_coverage: float = field(
        default=1.0, metadata=_help("Fraction of sub-windows with use needed to migrate (a burst leaves some empty).")
    )
    min_autocorrelation: float = field(
        default=0.3, metadata=_help("Peak autocorrelation of the usage series needed to migrate (noise has ~0).")
    )
    bandwidth: int = field(default=2, metadata=_help("Circuits that may cross one tier boundary per tick."))
    screened_damping: float = field(
        default=0.1, metadata=_help("Learning-rate factor for updates to a SCREENED circuit.")
    )
    resonance_threshold: float = field(
        default=0.5,
        metadata=_help(
            "Resonance consensus: a proposal for a shared scope enters only with at least this much support (sum of "
            "positive delta cosines with other contributors); cosines at or above it make two proposals partners."
        ),
    )
    resonance_gain: float = field(
        default=0.0,
        metadata=_help(
            "Gain law: N contributors of the same delta give (1 + gain·(N−1))·delta ... (0: exactly the delta they "
            "agree on; on SmolLM2 a shared circuit amplified 1.3× for four contributors changed one of three "
            "patterns, 'return a + b' became 'return a')"
        ),
    )
    resonance_max_gain: float = field(default=1.5, metadata=_help("... capped at this multiple of one delta."))
    protect_screened: bool = field(
        default=True,
        metadata=_help(
            "Keep a new circuit's key orthogonal to the keys of the SCREENED circuits of its stack that act on its "
            "prompt (ungated ones, and gated ones the prompt reaches)."
        ),
    )

    def __post_init__(self) -> None:
        _check_types(self)
        _check(self.tick_interval >= 0, f"DynamicsConfig.tick_interval must be >= 0, got {self.tick_interval}")
        _check(
            0 <= self.theta_off < self.theta_on <= 1,
            f"DynamicsConfig needs 0 <= theta_off < theta_on <= 1 (hysteresis), got theta_off={self.theta_off}, "
            f"theta_on={self.theta_on}",
        )
        for name in (
            "decay",
            "screened_decay_ratio",
            "forget_below",
            "min_coverage",
            "min_autocorrelation",
            "screened_damping",
            "resonance_threshold",
        ):
            value = getattr(self, name)
            _check(0 <= value <= 1, f"DynamicsConfig.{name} must lie in [0, 1], got {value}")
        _check(
            0 < self.strength_step < 1, f"DynamicsConfig.strength_step must lie in (0, 1), got {self.strength_step}"
        )
        _check(self.window_min >= 8, f"DynamicsConfig.window_min must be >= 8 ticks, got {self.window_min}")
        _check(self.window_scale > 0, f"DynamicsConfig.window_scale must be > 0, got {self.window_scale}")
        _check(
            2 <= self.blocks <= self.window_min,
            f"DynamicsConfig.blocks must lie in [2, window_min={self.window_min}], got {self.blocks}",
        )
        _check(self.bandwidth >= 1, f"DynamicsConfig.bandwidth must be >= 1, got {self.bandwidth}")
        _check(self.resonance_threshold > 0, "DynamicsConfig.resonance_threshold must be > 0 (0 lets lone pushers in)")
        _check(self.resonance_gain >= 0, f"DynamicsConfig.resonance_gain must be >= 0, got {self.resonance_gain}")
        _check(
            self.resonance_max_gain >= 1,
            f"DynamicsConfig.resonance_max_gain must be >= 1 (N agreeing contributors give at least one delta), "
            f"got {self.resonance_max_gain}",
        )


CACHE_TIERS: tuple[str, ...] = ("foundation", "domain", "swarm", "agent")  # WaveGen tiers; context has no cache
EVICTION_POLICIES = ("lru", "weighted_lru")


@dataclass
class WaveGenConfig:
    """The generation cache (WaveGen). Per-tier tuples run foundation, domain, swarm, agent; the defaults are the
    numbers of the WaveGen seed document."""

    enabled: bool = field(default=True, metadata=_help("Route agent.generate through the cache."))
    mode: str = field(
        default="verify",
        metadata=_help(
            "'verify': a cached continuation is a draft, checked in one forward pass; the output is what uncached "
            "decoding gives. 'jump': return the cached continuation as it is (fastest; may differ from what the "
            "agent's fastest tiers would say now)."
        ),
    )
    max_sizes: tuple[int, ...] = field(default=(1000, 5000, 10000, 20000), metadata=_help("Entries per tier."))
    eviction: tuple[str, ...] = field(
        default=("lru", "lru", "weighted_lru", "weighted_lru"), metadata=_help("'lru' or 'weighted_lru' per tier.")
    )
    consolidation_thresholds: tuple[float, ...] = field(
        default=(0.9, 0.85, 0.7, 0.5),
        metadata=_help("Hit rate at or above which a tier's entry is internalized into the matching LoRA tier."),
    )
    min_lookups: int = field(
        default=5, metadata=_help("Lookups an entry needs before its hit rate can trigger consolidation.")
    )
    hit_weight: float = field(
        default=64.0,
        metadata=_help(
            "weighted_lru: each hit protects an entry as if it had been used this many cache operations later."
        ),
    )
    semantic_lookup: bool = field(
        default=True,
        metadata=_help("On an exact miss, look for the nearest cached prompt (served only through verification)."),
    )
    semantic_threshold: float = field(
        default=0.95, metadata=_help("Cosine similarity of semantic vectors needed for a semantic hit.")
    )
    min_coherence: float = field(
        default=0.1,
        metadata=_help("Mean probability of the chosen tokens a trajectory needs to be stored (coherence gate)."),
    )
    swarm_min_agents: int = field(
        default=2, metadata=_help("Distinct agents of one swarm that must ask for a prompt to store it swarm-wide.")
    )
    domain_min_swarms: int = field(
        default=2, metadata=_help("Distinct swarms of one domain that must ask for a prompt to store it domain-wide.")
    )
    foundation_min_domains: int = field(
        default=2, metadata=_help("Distinct domains that must ask for a prompt to store it in the foundation tier.")
    )
    observe_top_k: int = field(default=5, metadata=_help("Top logits kept per generated token (StepObservation)."))
    learn_from_generations: bool = field(
        default=False,
        metadata=_help(
            "After a miss, learn the generated continuation into the agent's context tier when its coherence "
            "reaches learn_min_coherence. Off by default: without routing, one self-learned continuation spread to "
            "unrelated prompts on the built-in model; with routing it acts on its own prompt (not re-measured)."
        ),
    )
    learn_min_coherence: float = field(default=0.3, metadata=_help("Coherence needed to learn from a generation."))
    internalize_steps: int = field(
        default=80, metadata=_help("Most gradient steps spent internalizing one cache entry into a LoRA tier.")
    )
    internalize_lr: float = field(default=1e-2, metadata=_help("Adam learning rate while internalizing."))
    extraction_weight_threshold: float = field(
        default=0.1, metadata=_help("Circuit extraction: |weight| an edge between active neurons needs.")
    )
    extraction_min_size: int = field(
        default=5, metadata=_help("Circuit extraction: neurons a connected component needs to count as a circuit.")
    )

    def __post_init__(self) -> None:
        _check_types(self)
        for name in ("max_sizes", "eviction", "consolidation_thresholds"):
            value = tuple(getattr(self, name))
            setattr(self, name, value)
            _check(
                len(value) == len(CACHE_TIERS),
                f"WaveGenConfig.{name} needs one value per cache tier {CACHE_TIERS}, got {value!r}",
            )
        _check(self.mode in ("verify", "jump"), f"WaveGenConfig.mode must be 'verify' or 'jump', got {self.mode!r}")
        for tier, size in zip(CACHE_TIERS, self.max_sizes):
            _check(
                isinstance(size, int) and size >= 1, f"WaveGenConfig.max_sizes: {tier} size must be >= 1, got {size!r}"
            )
        for tier, policy in zip(CACHE_TIERS, self.eviction):
            _check(
                policy in EVICTION_POLICIES,
                f"WaveGenConfig.eviction: {tier} policy {policy!r} is unknown; choose from {EVICTION_POLICIES}",
            )
        for tier, t in zip(CACHE_TIERS, self.consolidation_thresholds):
            _check(0 < t <= 1, f"WaveGenConfig.consolidation_thresholds: {tier} must lie in (0, 1], got {t!r}")
        for name in ("semantic_threshold", "min_coherence", "learn_min_coherence"):
            value = getattr(self, name)
            _check(0 <= value <= 1, f"WaveGenConfig.{name} must lie in [0, 1], got {value}")
        for name in (
            "min_lookups",
            "swarm_min_agents",
            "domain_min_swarms",
            "foundation_min_domains",
            "internalize_steps",
            "extraction_min_size",
        ):
            _check(getattr(self, name) >= 1, f"WaveGenConfig.{name} must be >= 1, got {getattr(self, name)}")
        _check(self.observe_top_k >= 1, f"WaveGenConfig.observe_top_k must be >= 1, got {self.observe_top_k}")
        _check(self.hit_weight >= 0, f"WaveGenConfig.hit_weight must be >= 0, got {self.hit_weight}")
        _check(self.internalize_lr > 0, f"WaveGenConfig.internalize_lr must be > 0, got {self.internalize_lr}")
        _check(
            self.extraction_weight_threshold >= 0,
            f"WaveGenConfig.extraction_weight_threshold must be >= 0, got {self.extraction_weight_threshold}",
        )

    def tier(self, name: str) -> tuple[int, str, float]:
        """(max size, eviction policy, consolidation threshold) of one cache tier."""
        i = CACHE_TIERS.index(name)
        return self.max_sizes[i], self.eviction[i], self.consolidation_thresholds[i]


@dataclass
class DynamicLoRAConfig:
    """The whole configuration of a DynamicLoRA instance."""

    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    learning: LearningConfig = field(default_factory=LearningConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    dynamics: DynamicsConfig = field(default_factory=DynamicsConfig)
    wavegen: WaveGenConfig = field(default_factory=WaveGenConfig)
    seed: int = field(default=0, metadata=_help("Seed of circuit initialisation and sampling."))

    def __post_init__(self) -> None:
        _check_types(self)
        for name, cls in (
            ("adapter", AdapterConfig),
            ("learning", LearningConfig),
            ("generation", GenerationConfig),
            ("dynamics", DynamicsConfig),
            ("wavegen", WaveGenConfig),
        ):
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, _from_dict(cls, value, f"DynamicLoRAConfig.{name}"))
            elif not isinstance(value, cls):
                raise ConfigError(f"DynamicLoRAConfig.{name} must be a {cls.__name__} or a dict, got {type(value)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DynamicLoRAConfig:
        return _from_dict(cls, data, "DynamicLoRAConfig")


def _from_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        warnings.warn(f"{where}: ignoring unknown keys {unknown} (written by another version?)", stacklevel=3)
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in known}
    try:
        return cls(**kwargs)
    except TypeError as exc:  # wrong field types surface here
        raise ConfigError(f"{where}: {exc}") from exc
