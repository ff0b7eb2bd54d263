"""Homeostasis: each tier keeps its SCREENED fraction inside a band by adapting its thresholds and decay.

Too many SCREENED circuits (crystallization: nothing new can be learned) raise the tier's θ_on/θ_off and
its decay; too few (amnesia: everything fades) lower them. Each tier starts from the configured values
and drifts on its own: no tier has a threshold or decay written for it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..config import TIERS, DynamicsConfig

BAND = (0.05, 0.6)  # the SCREENED fraction a tier holds to, once it has enough circuits to measure it
MIN_CIRCUITS = 4
STEP = 1.05  # per tick outside the band: slow enough that a tier does not swing between the two failures
FLOORS = {"theta_on": 0.1, "theta_off": 0.02, "decay": 0.02}  # forgetting never stops entirely


@dataclass
class TierRegulation:
    theta_on: float
    theta_off: float
    decay: float

    def adapt(self, screened_fraction: float) -> None:
        if screened_fraction > BAND[1]:  # crystallizing: harder to screen, faster fading
            self.theta_on = min(self.theta_on * STEP, 0.99)
            self.theta_off = min(self.theta_off * STEP, self.theta_on * 0.9)
            self.decay = min(self.decay * STEP, 0.5)
        elif screened_fraction < BAND[0]:  # amnesic: easier to screen, slower fading
            self.theta_on = max(self.theta_on / STEP, FLOORS["theta_on"])
            self.theta_off = max(min(self.theta_off / STEP, self.theta_on * 0.9), FLOORS["theta_off"])
            self.decay = max(self.decay / STEP, FLOORS["decay"])


class Homeostasis:
    def __init__(self, config: DynamicsConfig) -> None:
        self.tiers = {t: TierRegulation(config.theta_on, config.theta_off, config.decay) for t in TIERS}

    def update(self, tier: str, phases: list[str]) -> None:
        if len(phases) >= MIN_CIRCUITS:
            self.tiers[tier].adapt(sum(p == "SCREENED" for p in phases) / len(phases))

    def state(self) -> dict:
        return {t: asdict(r) for t, r in self.tiers.items()}

    def restore(self, state: dict) -> None:
        for t, values in state.items():
            self.tiers[t] = TierRegulation(**values)
