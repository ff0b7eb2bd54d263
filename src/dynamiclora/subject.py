"""Subject locality: text about what a taught fact is about, which the fact's circuit must leave as it was.

A circuit gated on a fact's subject acts on every text that names the subject, not only on the question it was
taught (see ``LearningConfig.subject_locality``). The learner writes such a text itself: the prompt's most
distinctive word, whole, in a neutral frame, then the base model's greedy continuation; a learn step then keeps
the stack's distribution there close to the stack's without the circuit. No evaluation text is ever used.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .circuits import Circuit
from .config import TIERS, GenerationConfig

if TYPE_CHECKING:
    from .runtime import Runtime

# the frame of the subject word (not first: a first token's state is an attention sink, which a token gate leaves
# out), and how many tokens of the base model's continuation follow it
SUBJECT_FRAME = "Re: {}"
SUBJECT_TOKENS = 12
CONTINUATIONS_KEPT = 64  # base-model continuations of subject frames a learner keeps (a fact learned again)


@dataclass
class SubjectText:
    """A text about a circuit's subject: its ids (1, T), the stack's log-probabilities there without the circuit
    (1, T, V) and the routes of its row (the gated circuits it does not reach)."""

    ids: torch.Tensor
    reference: torch.Tensor
    routes: frozenset[str]


def subject_text(
    rt: Runtime,
    agent_id: str,
    circuit: Circuit,
    prompt_ids: list[int],
    feature: torch.Tensor,
    continuations: OrderedDict[tuple[int, ...], list[int]] | None = None,
) -> SubjectText | None:
    """The text about this prompt's subject for ``circuit`` (its feature as ``Router.feature_of`` gives it), or
    None where no word is found or the circuit's gate does not reach the text (it cannot act there).
    ``continuations``: the base model's continuations of frames written before (a function of the base model and
    the frame alone), kept there for the next learn call of the same fact."""
    subject = rt.router.subject(feature, prompt_ids)
    if not subject:
        return None
    frame = rt.encode(SUBJECT_FRAME.format(subject))
    ids = frame + base_continuation(rt, agent_id, frame, continuations if continuations is not None else OrderedDict())
    routes = rt.router.skip([rt.gated_circuits(agent_id)], rt.router.features([ids]))[0]
    if circuit.id in routes:
        return None
    x = torch.tensor([ids], device=rt.device)
    plan = rt.planner.plan([agent_id], skip=(routes | {circuit.id},))
    with torch.no_grad(), rt.activate(plan, rt.new_session(plan, observe=False)):
        reference = torch.log_softmax(rt.model(input_ids=x, use_cache=False).logits.float(), -1)
    return SubjectText(x, reference, routes)


def base_continuation(
    rt: Runtime, agent_id: str, frame: list[int], known: OrderedDict[tuple[int, ...], list[int]]
) -> list[int]:
    """The base model's greedy ``SUBJECT_TOKENS`` after ``frame``, from ``known`` if it holds them (then kept
    there, the most recent ``CONTINUATIONS_KEPT``)."""
    key = tuple(frame)
    if key not in known:
        greedy = GenerationConfig(max_new_tokens=SUBJECT_TOKENS, stop_at_eos=False)
        known[key] = rt.generate_ids([agent_id], [frame], greedy, without=TIERS)[0].tokens[0]
        while len(known) > CONTINUATIONS_KEPT:
            known.popitem(last=False)
    known.move_to_end(key)
    return known[key]
