"""Routing: route features of prompts, and which gated circuits a prompt reaches.

A learned circuit is gated (see gates.py): it acts on inputs whose route feature lies within a key's radius.
The route feature of a prompt is the mean, over its tokens, of the base model's input to one adapted module
(``LearningConfig.route_module``; the first, by default: the normalized token embeddings, computed without
running a single transformer block). For a conversation, the mean runs over what its author wrote: the chat
template's fixed scaffold is left out (see chat.py). The base model never changes, so a key stays valid wherever
its circuit goes.

A new key's radius is ``route_radius × unit``, where the unit is a constant of the base model alone: the spread
(root-mean-square distance from their mean) of the features of a fixed set of reference prompts. The radius is
then frozen into the gate. Nothing else enters: no statistic over what agents learned, so no agent's learning
moves another agent's gates, and no later configuration change moves a gate that exists.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .chat import ChatFormat
from .circuits import Circuit
from .config import LearningConfig
from .gates import THRESHOLD_CAP, THRESHOLD_MARGIN, Gate, TokenGateIndex

# Fixed, varied prompts (code and prose) whose features' spread is the unit of route distances.
REFERENCE_PROMPTS = (
    "def parse_json(text):",
    "import os\nimport sys\n",
    "class Stack:\n    def __init__(self):",
    "for i in range(10):\n    print(i)",
    "SELECT name, price FROM products WHERE price > 10;",
    "The weather today is sunny with a light breeze.",
    "Write a short poem about the sea.",
    "What is the capital of France?",
    "Summarize the following article in two sentences.",
    "return sorted(items, key=lambda x: x[1])",
    "try:\n    value = int(s)\nexcept ValueError:",
    "Translate 'good morning' into Spanish.",
    "The mitochondria is the powerhouse of the cell.",
    "async def fetch(session, url):",
    "with open('data.csv') as f:\n    rows = f.readlines()",
    "Explain how a binary search works.",
    "x = np.zeros((3, 4))",
    "Dear team, the meeting moves to Thursday.",
    "if __name__ == '__main__':\n    main()",
    "List three uses of a paperclip.",
    "<html><body><h1>Hello</h1></body></html>",
    "git commit -m 'fix the parser'",
    "A train leaves the station at noon at 60 miles per hour.",
    "def test_add():\n    assert add(1, 2) == 3",
)


# token gates: the learner's own variants of a plain-text prompt that set a prototype's threshold (a line before
# it, doubled spaces); lower case is not one of them, it gets a prototype of its own (see Router._prototypes)
VARIANTS: tuple[Callable[[str], str], ...] = (lambda text: "# note\n" + text, lambda text: text.replace(" ", "  "))
MEMO_SIZE = 256  # route features of the most recent distinct prompts
INDEX_CACHE_SIZE = 8  # sets of gated circuits prepared for matching (see _Matcher)


class _Captured(Exception):
    """Raised by the capture hook once the route module's input is in hand: nothing after it needs to run."""


def first_kept(start: int, end: int) -> int:
    """The first position of a content span ``[start, end)`` that a token feature keeps: a plain text's first token
    (an attention sink, alike for every prompt) is left out unless it is the only one."""
    return start + 1 if start == 0 and end - start > 1 else start


def word_span(words: list[str], lo: int, hi: int, start: int, end: int) -> tuple[int, int]:
    """``[lo, hi)`` widened within ``[start, end)`` to whole words, given each token's text (``words``): a token
    that neither begins with a space nor follows one continues the word before it."""

    def continues(i: int) -> bool:  # token i is a later piece of the word token i - 1 ends
        return bool(words[i]) and words[i][0].isalnum() and bool(words[i - 1]) and words[i - 1][-1].isalnum()

    while lo > start and continues(lo):
        lo -= 1
    while hi < end and continues(hi):
        hi += 1
    return lo, hi


@dataclass
class Router:
    """Computes route features on the base model and decides, per row, which gated circuits a prompt reaches.

        It gets the model, the layer whose input is the feature, a tokenizer (for the reference prompts only) and the
    chat format (to pool over a conversation's content).
    """

    model: nn.Module
    layer: nn.Module  # the StackedLinear of the route module
    module: str
    tokenizer: object
    chat: ChatFormat  # where a conversation's content lies among its tokens
    config: LearningConfig
    _unit: float | None = None
    _background: torch.Tensor | None = None
    _memo: OrderedDict[tuple[int, ...], torch.Tensor] = field(default_factory=OrderedDict)
    _matchers: OrderedDict[tuple[int, ...], _Matcher] = field(default_factory=OrderedDict)

    @property
    def enabled(self) -> bool:
        return self.config.routing

    # -- features ---------------------------------------------------------------------------------
    @torch.no_grad()
    def features(self, prompts: list[list[int]]) -> torch.Tensor | list[torch.Tensor]:
        """(B, d) route features: each prompt's mean base-model input to the route module (float32, CPU); token
        routing: a list of each prompt's (n, d) token states (see :meth:`feature_of`).

        Runs the base model only up to the route module, once per distinct prompt: a feature depends on the base
        model and the prompt alone, so the most recent ones are kept (a request's lookup and its decoding route
        the same prompt). Where the base inputs are at hand already (learning captures them), :meth:`feature_of`
        reads the feature from them instead."""
        device = next(self.model.parameters()).device
        out: list[torch.Tensor] = []
        seen: list[torch.Tensor] = []

        def hook(module: nn.Module, args: tuple) -> None:
            seen.append(args[0].detach())
            raise _Captured

        handle = self.layer.register_forward_pre_hook(hook)
        try:
            for ids in prompts:
                key = tuple(ids)
                if key not in self._memo:
                    seen.clear()
                    try:
                        self.model(input_ids=torch.tensor([ids], device=device), use_cache=False)
                    except _Captured:
                        pass
                    self._memo[key] = self.feature_of({self.module: seen[0]}, ids)
                    while len(self._memo) > MEMO_SIZE:
                        self._memo.popitem(last=False)
                self._memo.move_to_end(key)
                out.append(self._memo[key])
        finally:
            handle.remove()
        return out if self.tokens else torch.stack(out)

    def forget_features(self) -> None:
        """Drop the remembered route features: the next request for any prompt routes it from scratch (what a
        benchmark of a new request's cost needs; results never depend on it)."""
        self._memo.clear()

    @property
    def tokens(self) -> bool:
        return self.config.route_match == "tokens"

    def feature_of(self, base_inputs: dict[str, torch.Tensor], prompt_ids: list[int]) -> torch.Tensor:
        """The route feature of a prompt from base-model module inputs ``(1, T, in)`` of a sequence that starts with
        it (causal: later tokens do not change it). Pooled: (d,) the route module's input averaged over the
        prompt's content tokens. Tokens: (n, d) those inputs, unit-norm, without the sequence's first token (whose
        state is an attention sink, alike for every prompt)."""
        start, end = self.chat.content_span(prompt_ids)
        states = base_inputs[self.module][0, start:end].float()
        if not self.tokens:
            return states.mean(0).cpu()
        states = states[first_kept(start, end) - start :]
        return torch.nn.functional.normalize(states, dim=-1).cpu()

    # -- token gates ----------------------------------------------------------------------------------
    @property
    def background(self) -> torch.Tensor:
        """(N, d) unit-norm token states of the reference prompts: what every prompt's tokens look like (computed
        once; a constant of the base model)."""
        if self._background is None:
            self._background = torch.cat(self._reference_features())
        return self._background

    def new_gate(
        self, feature: torch.Tensor, prompt_ids: list[int], owner: str, negatives: list[torch.Tensor] = ()
    ) -> Gate:
        """The gate of a new circuit for this prompt (its feature as :meth:`feature_of` gives it). Token gates:
        ``negatives``, features of prompts it should not reach (other facts' prompts), raise its threshold."""
        if not self.tokens:
            return Gate.single(feature, self.new_radius, owner)
        (keys, threshold), *more = self._prototypes(feature, prompt_ids, list(negatives))
        gate = Gate.prototype(keys, threshold, owner, *self._flags)
        return self._with(gate, more, owner)

    def extend_gate(self, gate: Gate, feature: torch.Tensor, prompt_ids: list[int], owner: str) -> Gate:
        """``gate`` reaching this prompt too."""
        if not self.tokens:
            return gate.with_key(feature, self.new_radius, owner)
        return self._with(gate, self._prototypes(feature, prompt_ids), owner)

    def _with(self, gate: Gate, prototypes: list[tuple[torch.Tensor, float]], owner: str) -> Gate:
        for keys, threshold in prototypes:
            gate = gate.with_key(keys, threshold, owner, *self._flags)
        return gate

    @property
    def _flags(self) -> tuple[bool, bool]:
        """A new prototype's: strict, ordered."""
        return self.config.route_strict, self.config.route_ordered

    def separated(self, gate: Gate, feature: torch.Tensor, own: list[list[int]]) -> Gate:
        """``gate`` with the prototypes that reach ``feature`` (another fact's prompt, whose tokens match their keys
        exactly: a prefix both prompts share) made again from the gate's ``own`` prompts, keyed on their tokens
        least like the background plus the one least like that prompt's, and raised above it."""
        reached = gate.reached_by(feature)
        owner = next((o[0] for o, r in zip(gate.owners, reached.tolist()) if r and o), None)
        made = [p for ids in own for p in self._prototypes(self.features([ids])[0], ids, [feature], avoid=feature)]
        kept = gate.keeping(~reached)
        for keys, threshold in made:
            kept = (
                Gate.prototype(keys, threshold, owner, *self._flags)
                if kept is None
                else kept.with_key(keys, threshold, owner, *self._flags)
            )
        return kept.excluding(feature) if kept is not None else gate

    def _prototypes(
        self,
        feature: torch.Tensor,
        prompt_ids: list[int],
        negatives: list[torch.Tensor] = (),
        avoid: torch.Tensor | None = None,
    ) -> list[tuple[torch.Tensor, float]]:
        """The prompt's prototype (keys, threshold), and for a plain-text prompt that lower case spells with other
        tokens, its lower-case form's too. A name in lower case is other tokens, whose states match the taught
        ones poorly: as one of the variants that set the threshold it pulled many gates down to where neighbours
        reach them (1,000 facts: 0.77 of neighbours reached some gate; with a prototype of its own, 0.16)."""
        out = [self._prototype(feature, prompt_ids, negatives, avoid)]
        for lower in self.rewrites(prompt_ids, (str.lower,)):
            out.append(self._prototype(self.features([lower])[0], lower, negatives, avoid))
        return out

    def rewrites(self, prompt_ids: list[int], rewrites: tuple[Callable[[str], str], ...]) -> list[list[int]]:
        """A plain-text prompt's token ids after each of ``rewrites`` of its text, where they are other ids than
        the prompt's (none for a conversation: its scaffold is not the learner's to rewrite)."""
        if self.chat.content_span(prompt_ids) != (0, len(prompt_ids)):
            return []
        text = self.tokenizer.decode(prompt_ids, skip_special_tokens=True)
        out = []
        for rewrite in rewrites:
            ids = list(self.tokenizer(rewrite(text))["input_ids"])
            if ids and ids != list(prompt_ids):
                out.append(ids)
        return out

    def subject(self, feature: torch.Tensor, prompt_ids: list[int]) -> str:
        """What a prompt is about: the whole word around its most distinctive token (a name, an identifier)."""
        first = self.distinctive_positions(feature, prompt_ids)[0]
        start, end = self.chat.content_span(prompt_ids)
        lo, hi = word_span([self.tokenizer.decode([t]) for t in prompt_ids], first, first + 1, start, end)
        return self.tokenizer.decode(prompt_ids[lo:hi], skip_special_tokens=True).strip()

    def _prototype(
        self,
        feature: torch.Tensor,
        prompt_ids: list[int],
        negatives: list[torch.Tensor] = (),
        avoid: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, float]:
        """The prompt's most distinctive token states (least like any background token), and the threshold: 0.9 of
        the worst match among the learner's own variants of the prompt (a line before it, doubled spaces), never as
        low as the best match any background prompt or any of the ``negatives`` gets (+ ``THRESHOLD_MARGIN``).
        (Choosing the keys against the negatives too picks template words a neighbour shares: on the editing
        benchmark neighbour locality fell from 0.94 to 0.78; ``avoid``, one look-alike's token states, is used
        only to tell a gate from a prompt that matches its keys exactly, see :meth:`separated`.)"""
        chosen = self._distinctive(feature, avoid)
        keys = feature[chosen.sort().values if self.config.route_ordered else chosen]  # (ordered: as in the prompt)
        probe = Gate.prototype(keys, 0.0, None, *self._flags)

        def match(states: torch.Tensor) -> float:
            return 1.0 - probe.distance(states)  # at threshold 0: the mean (strict: lowest) best cosine

        floor = max(match(f) for f in [*self._reference_features(), *negatives]) + THRESHOLD_MARGIN
        variants = self.rewrites(prompt_ids, VARIANTS)  # the learner's own variants of a plain-text prompt
        worst = min((match(f) for f in self.features(variants)), default=0.95)
        return keys, float(min(max(0.9 * worst, floor), THRESHOLD_CAP))

    def _distinctive(self, feature: torch.Tensor, avoid: torch.Tensor | None = None) -> torch.Tensor:
        """Indices of the ``route_keys`` token states of ``feature`` least like any background token; with
        ``avoid`` (a look-alike's token states), also the one least like any of that input's, where it is another."""
        novelty = 1.0 - (feature @ self.background.T).max(dim=1).values
        chosen = novelty.topk(min(self.config.route_keys, feature.shape[0])).indices
        if avoid is None:
            return chosen
        apart = int((1.0 - (feature @ avoid.to(feature).T).max(dim=1).values).argmax())
        return chosen if apart in chosen.tolist() else torch.cat([chosen, torch.tensor([apart])])

    def distinctive_positions(self, feature: torch.Tensor, prompt_ids: list[int]) -> list[int]:
        """Where in ``prompt_ids`` the tokens a new gate would key on lie, the most distinctive first."""
        offset = first_kept(*self.chat.content_span(prompt_ids))
        return [int(i) + offset for i in self._distinctive(feature)]

    def reference_ids(self) -> list[list[int]]:
        """The reference prompts' token ids: ordinary text of many kinds, fixed."""
        return [list(self.tokenizer(p)["input_ids"]) or [0] for p in REFERENCE_PROMPTS]

    def _reference_features(self) -> list[torch.Tensor]:
        return list(self.features(self.reference_ids()))

    @property
    def unit(self) -> float:
        """The base model's distance unit: the spread of the reference prompts' features (computed once)."""
        if self._unit is None:
            feats = self.features(self.reference_ids())
            spread = float((feats - feats.mean(0)).pow(2).sum(1).mean().sqrt())
            self._unit = max(spread, 1e-6 * float(feats.norm(dim=1).mean()), 1e-12)
        return self._unit

    @property
    def new_radius(self) -> float:
        """The radius a new key gets: ``route_radius`` reference spreads."""
        return self.config.route_radius * self.unit

    # -- matching ---------------------------------------------------------------------------------
    def affinity(self, distance: float) -> float:
        """A gate distance (in radii) on the attribution scale of key activations: 1 at a key, falling linearly to
        the attribution threshold at the radius, and below it beyond (as 1 / distance)."""
        theta = self.config.attribution_threshold
        if distance <= 1.0:
            return 1.0 - (1.0 - theta) * distance
        return theta / distance

    def skip(self, gated_rows: list[list[Circuit]], features, slack: float = 0.0) -> tuple[frozenset[str], ...]:
        """Per row, the ids of its gated circuits (``gated_rows[i]``) that its prompt's feature does not reach.
        Token gates are matched all at once (:class:`TokenGateIndex`, kept for the most recent sets of gates).
        ``slack``: every match counts as this much nearer its gate (a token gate's score, a pooled distance in
        radii); negative: farther."""
        return tuple(within[0] for within in self._skips(gated_rows, features, (slack,)))

    def certain_skip(
        self, gated_rows: list[list[Circuit]], features, slack: float
    ) -> tuple[frozenset[str], ...] | None:
        """:meth:`skip`, if no match lies within ``slack`` of deciding otherwise (features computed with some
        rounding away from the pre-pass's then route as the pre-pass's would); None if one does."""
        rows = self._skips(gated_rows, features, (slack, -slack))
        return tuple(lenient for lenient, _ in rows) if all(a == b for a, b in rows) else None

    def distances(self, circuits: list[Circuit], feature) -> dict[str, float]:
        """Each gated circuit's gate distance (in radii, ≤ 1: reached) to one prompt's feature, by id; token gates
        matched all at once, as :meth:`skip` matches them."""
        return self._matcher(circuits).distances(feature) if circuits else {}

    def _skips(self, gated_rows: list[list[Circuit]], features, slacks: tuple[float, ...]) -> list[tuple]:
        """Per row, :meth:`skip`'s set at each of ``slacks``, each row's feature matched once."""
        return [
            self._matcher(row).unreached(f, slacks) if row else tuple(frozenset() for _ in slacks)
            for row, f in zip(gated_rows, features)
        ]

    def _matcher(self, circuits: list[Circuit]) -> _Matcher:
        # gates are immutable (a circuit that changes gets a new one); a circuit copied elsewhere gets a new id
        key = tuple([(c.id, id(c.gate)) for c in circuits])
        if key not in self._matchers:
            self._matchers[key] = _Matcher(circuits, self.tokens)
            while len(self._matchers) > INDEX_CACHE_SIZE:
                self._matchers.popitem(last=False)
        self._matchers.move_to_end(key)
        return self._matchers[key]


class _Matcher:
    """One set of gated circuits prepared to be matched against many prompts: its token gates in one
    :class:`TokenGateIndex`, the rest (pooled gates) matched one by one. Keeps the gates alive, so that the ids
    that key it stay theirs."""

    def __init__(self, circuits: list[Circuit], tokens: bool) -> None:
        token = [c for c in circuits if tokens and c.gate.tokens]
        self.pooled = [(c.id, c.gate) for c in circuits if not (tokens and c.gate.tokens)]
        self.index = TokenGateIndex([c.gate for c in token]) if token else None
        self.token_ids = [c.id for c in token]
        self.every_token_id = frozenset(self.token_ids)
        self.gates = [c.gate for c in circuits]

    def distances(self, feature) -> dict[str, float]:
        """Each circuit's gate distance to this feature, by id."""
        out = self._pooled_distances(feature)
        if self.index is not None:
            out.update(zip(self.token_ids, self.index.distances(feature).tolist()))
        return out

    def _pooled_distances(self, feature) -> dict[str, float]:
        return {i: gate.distance(feature) for i, gate in self.pooled}  # (pooled gates: one by one)

    def unreached(self, feature, slacks: tuple[float, ...]) -> tuple[frozenset[str], ...]:
        """At each slack, the ids of the circuits this feature does not reach."""
        distances = self._pooled_distances(feature)
        hits = self.index.reached_within(feature, slacks) if self.index is not None else None
        out = []
        for k, slack in enumerate(slacks):
            unreached = {i for i, d in distances.items() if d > 1.0 + slack}
            if hits is not None:
                reached = {self.token_ids[j] for j in hits[k].nonzero().flatten().tolist()}
                unreached |= self.every_token_id - reached
            out.append(frozenset(unreached))
        return tuple(out)
